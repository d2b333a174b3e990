"""Peak memory of a ``cam-caffe`` batch run: 2,000 images against 20, same settings.

Each run is a fresh child (a small wrapper process starts ``cam-caffe`` and reports
``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the peak RSS of the largest process it
waited for). GoogLeNet-CAM with random weights, the OpenCV backend (the
fastest to start and run), 256×256 JPEGs, default outputs (PNG overlays).
The ratio should stay near 1: memory must not grow with the number of images.

    python benchmarks/bench_memory.py [--large 2000] [--small 20] [--repeat 2]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys

from common import (
    CLI,
    PROTOTXT,
    PYTHON,
    WORK,
    googlenet_weights,
    make_images,
    median,
    run_timed,
    table,
    title,
    wait_for_quiet,
)

WRAPPER = """
import json, resource, subprocess, sys
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": code, "maxrss_kib": peak}))
"""


def peak_rss(image_dir, count: int, backend: str, batch: int | None) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one cam-caffe run over ``image_dir``."""
    out_dir = WORK / "memory_out"
    shutil.rmtree(out_dir, ignore_errors=True)
    command = [PYTHON, "-c", WRAPPER, CLI, str(image_dir), "--prototxt", str(PROTOTXT),
               "--weights", str(googlenet_weights()), "--output-dir", str(out_dir),
               "--backend", backend, "-q"] + (["--batch-size", str(batch)] if batch else [])
    seconds, result = run_timed(command)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if report["rc"] != 0:
        raise RuntimeError(f"cam-caffe failed on {count} images (exit {report['rc']})")
    produced = sum(1 for _ in out_dir.rglob("*.png"))
    if produced != count:
        raise RuntimeError(f"{produced} overlays for {count} images")
    return report["maxrss_kib"] / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", type=int, default=2000)
    parser.add_argument("--small", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--backend", default="opencv")
    parser.add_argument("--batch-size", type=int, help="default: cam-caffe's own default")
    args = parser.parse_args()
    folders = {}
    for count in (args.small, args.large):
        folder = WORK / f"memory_{count}"
        if not folder.is_dir() or len(list(folder.glob("*.jpg"))) != count:
            shutil.rmtree(folder, ignore_errors=True)
            make_images(folder, count, size=(256, 256))
        folders[count] = folder
    wait_for_quiet()
    rows, peaks = [], {}
    for count in (args.small, args.large):
        runs = [peak_rss(folders[count], count, args.backend, args.batch_size)
                for _ in range(args.repeat)]
        peaks[count] = median([r[0] for r in runs])
        wall = median([r[1] for r in runs])
        rows.append([count, " / ".join(f"{r[0]:.1f}" for r in runs), f"{peaks[count]:.1f}",
                     f"{wall:.1f}", f"{1000 * wall / count:.1f}"])
    ratio = peaks[args.large] / peaks[args.small]
    title(f"Peak RSS of cam-caffe batch runs: {args.large} vs {args.small} images (256×256 JPEG), "
          f"GoogLeNet-CAM, --backend {args.backend}, batch "
          f"{args.batch_size or 'default'}; {args.repeat} runs each")
    print(table(["images", "peak RSS per run (MiB)", "median peak RSS (MiB)", "wall s",
                 "ms/image"], rows))
    print(f"\nRatio {args.large}/{args.small}: **{ratio:.3f}** (target ≤1.1)")


if __name__ == "__main__":
    sys.exit(main())
