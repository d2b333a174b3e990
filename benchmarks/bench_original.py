"""End to end: the original script's way (one process per image, see original_script.py)
against one ``cam-caffe`` batch run, on the same 64 images, wall clock including
process start, per image, and the speed-up measured in the same run.

GoogLeNet-CAM with random weights (made by the benchmark); the images are the
official demo images from ../shared, cropped/flipped and resized to 500×375,
written to a temporary folder.

    python benchmarks/bench_original.py [--images 64] [--repeat 3]
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys

from common import (
    CLI,
    PROTOTXT,
    WORK,
    available_backends,
    compile_package,
    googlenet_weights,
    make_images,
    median,
    original_script_seconds,
    run_timed,
    table,
    title,
    wait_for_quiet,
)


def cli(image_dir, weights, out_dir, extra: list[str]) -> float:
    """Seconds of one ``cam-caffe`` run over the folder (default settings + ``extra``)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    seconds, _ = run_timed([CLI, str(image_dir), "--prototxt", str(PROTOTXT), "--weights",
                                 str(weights), "--output-dir", str(out_dir), *extra])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5, help="cam-caffe runs per variant")
    args = parser.parse_args()
    weights = googlenet_weights()
    image_dir = WORK / f"original_{args.images}"
    shutil.rmtree(image_dir, ignore_errors=True)
    paths = make_images(image_dir, args.images)
    one_dir = WORK / "original_1"
    shutil.rmtree(one_dir, ignore_errors=True)
    make_images(one_dir, 1)
    variants = [("cam-caffe, default settings (--backend auto)", [])]
    variants += [(f"cam-caffe --backend {b}", ["--backend", b]) for b in available_backends()]
    compile_package()
    wait_for_quiet()

    per_process = original_script_seconds(PROTOTXT, weights, paths, WORK / "original_out")
    total = sum(per_process)
    rows = [["original script, 1 process per image", args.images, f"{total:.1f}",
             f"{1000 * total / args.images:.0f} (median process {1000 * median(per_process):.0f})",
             f"{median(per_process):.2f}", "1×"]]
    runs: dict[str, list[float]] = {label: [] for label, _ in variants}
    starts: dict[str, list[float]] = {label: [] for label, _ in variants}
    for round_ in range(args.repeat):   # every variant once a round, in a shuffled order:
        order = list(variants)          # neither a slow spell nor the variant run just
        random.Random(round_).shuffle(order)     # before favours one of them
        for label, extra in order:
            runs[label].append(cli(image_dir, weights, WORK / "cli_out", extra))
            starts[label].append(cli(one_dir, weights, WORK / "cli_out", extra))
    for label, _ in variants:
        seconds = median(runs[label])
        rows.append([label, 1, f"{seconds:.2f}", f"{1000 * seconds / args.images:.0f}",
                     f"{median(starts[label]):.2f}", f"**{total / seconds:.1f}×**"])
    title(f"End to end, {args.images} images (500×375 JPEG) → PNG overlays, GoogLeNet-CAM "
          f"(cam-caffe: median of {args.repeat} runs, variants shuffled in each round)")
    print(table(["method", "processes", "wall s (all images)", "ms/image",
                 "wall s for 1 image (start-up + 1)", "speed-up (target ≥30×)"], rows))


if __name__ == "__main__":
    sys.exit(main())
