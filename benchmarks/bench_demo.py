"""The project's demo model (models/demo/, 64×64 input, 5 classes): the original
script's way against one ``cam-caffe --model demo`` run on the same images, end to
end, and the forward throughput of each backend.

The images are the six demo PNGs in images/, repeated to ``--images``. The
original script's way is benchmarks/original_script.py (one process per image)
with the demo net's preprocessing (no mean: the net scales its input itself).

    python benchmarks/bench_demo.py [--images 64] [--repeat 3]
"""
from __future__ import annotations

import argparse
import shutil

import numpy as np
from common import (
    CLI,
    ROOT,
    WORK,
    available_backends,
    compile_package,
    median,
    original_script_seconds,
    run_timed,
    table,
    times,
    title,
    wait_for_quiet,
)

DEMO = ROOT / "models" / "demo"
PROTOTXT, WEIGHTS = DEMO / "deploy.prototxt", DEMO / "demo.caffemodel"


def forward_ms(backend: str, batch: int) -> float:
    """Median ms per image of the backend's forward at ``batch``, in this process."""
    from cam_caffe import CAMNet
    net = CAMNet(PROTOTXT, WEIGHTS, backend=backend)
    data = np.random.default_rng(0).integers(0, 256, (batch, 3, 64, 64)).astype(np.float32)
    return median(times(lambda: net.backend.forward(data), repeat=max(5, 256 // batch))) \
        / batch * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="cam-caffe runs per variant")
    args = parser.parse_args()
    from flops import count_flops

    from cam_caffe.netdef import load_netdef
    gflop = count_flops(load_netdef(PROTOTXT)) / 1e9
    image_dir = WORK / f"demo_{args.images}"
    shutil.rmtree(image_dir, ignore_errors=True)
    image_dir.mkdir(parents=True)
    sources = sorted((ROOT / "images").glob("*.png"))
    paths = []
    for i in range(args.images):
        paths.append(image_dir / f"{i:04d}_{sources[i % len(sources)].name}")
        shutil.copyfile(sources[i % len(sources)], paths[-1])
    backends = available_backends(WEIGHTS, PROTOTXT)
    compile_package()
    wait_for_quiet()

    out_dir = WORK / "demo_out"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    per_process = original_script_seconds(PROTOTXT, WEIGHTS, paths, out_dir, ["0,0,0"])
    total = sum(per_process)
    rows = [["original script, 1 process per image", f"{total:.1f}",
             f"{1000 * total / len(paths):.0f}", "1×"]]
    for backend in ["auto", *backends]:
        runs = []
        for _ in range(args.repeat):
            shutil.rmtree(out_dir, ignore_errors=True)
            runs.append(run_timed([CLI, str(image_dir), "--model", "demo", "--backend", backend,
                                   "--output-dir", str(out_dir), "-q"])[0])
        seconds = median(runs)
        rows.append([f"cam-caffe --model demo --backend {backend}", f"{seconds:.2f}",
                     f"{1000 * seconds / len(paths):.1f}", f"**{total / seconds:.1f}×**"])
    title(f"Demo model, end to end: {len(paths)} images 64×64 → PNG overlays "
          f"(cam-caffe: median of {args.repeat} runs)")
    print(table(["method", "wall s (all images)", "ms/image", "speed-up"], rows))

    rows = []
    for backend in backends:
        for batch in (1, 16):
            ms = forward_ms(backend, batch)
            rows.append([backend, batch, f"{ms:.3f}", f"{1000 / ms:.0f}",
                         f"{gflop / ms * 1000:.1f}"])
    title(f"Demo model forward ({gflop * 1000:.1f} MFLOP/image): per backend")
    print(table(["backend", "batch", "ms/image", "images/s", "GFLOP/s"], rows))


if __name__ == "__main__":
    main()
