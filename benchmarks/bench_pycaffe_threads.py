"""pycaffe's CPU forward by cores (issue #20; patches/pycaffe/05-openmp-batch.patch runs
convolution, pooling, LRN and ReLU over the images of a batch on OpenMP threads).

GoogLeNet-CAM (random weights) images/s of ``caffe.Net.forward`` at each batch size on 1,
2, 4, … cores (``taskset`` and ``OMP_NUM_THREADS``, which OpenBLAS and the patch read),
for the installed pycaffe and, with ``--baseline WHEEL``, for another build of it (e.g.
the wheel built before patch 05, from the wheel cache), unpacked under the bench folder
and put first on ``PYTHONPATH``. With a baseline, the last columns are the ratio of the
rates and the largest difference of the ``prob`` and ``CAM_conv`` outputs from the
baseline's on the same cores and batch, relative to the largest value (0: bit for bit).
``--rounds N`` measures each configuration N times, the builds in turn, and reports the
medians (for a busy machine).

    python benchmarks/bench_pycaffe_threads.py [--cores 1,2] [--batches 16,1] [--images 48]
        [--rounds 1] [--baseline ~/.cache/cam-caffe/pycaffe/<key>/pycaffe-<ver>-<tags>.whl]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from bench_cores import pinned
from common import (
    PROTOTXT,
    PYTHON,
    WORK,
    googlenet_weights,
    median,
    run_json,
    table,
    title,
    wait_for_quiet,
)

OUTPUTS = ("prob", "CAM_conv")

CHILD = """
import json, os, sys, time
import numpy as np
os.environ.setdefault("GLOG_minloglevel", "2")
import caffe
prototxt, weights, batch, images, out, outputs = sys.argv[1:7]
batch, images = int(batch), int(images)
caffe.set_mode_cpu()
net = caffe.Net(prototxt, caffe.TEST, weights=weights)
net.blobs["data"].reshape(batch, 3, 224, 224)
net.reshape()
net.blobs["data"].data[...] = np.random.default_rng(0).normal(0, 50, (batch, 3, 224, 224))
net.forward()
np.savez(out, **{name: net.blobs[name].data for name in outputs.split(",")})
runs = []
for _ in range(max(3, -(-images // batch))):
    start = time.perf_counter()
    net.forward()
    runs.append(time.perf_counter() - start)
print(json.dumps({"seconds": sorted(runs)[len(runs) // 2], "caffe": caffe.__file__}))
"""


def unpack(wheel: Path) -> Path:
    """The wheel's files under the bench folder (a folder for PYTHONPATH)."""
    target = WORK / "pycaffe_baseline" / wheel.stem
    if not (target / "caffe").is_dir():
        shutil.rmtree(target, ignore_errors=True)
        subprocess.run([PYTHON, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                        "--target", str(target), str(wheel)], check=True)
    return target


def forward(build: str, site: Path | None, cores: int, batch: int,
            images: int) -> tuple[float, Path]:
    """Images/s of one build's forward on ``cores`` cores, and its outputs' file."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    env["OMP_NUM_THREADS"] = str(cores)
    if site:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    out = WORK / f"pycaffe_threads_{build}_{cores}_{batch}.npz"
    result = run_json([*pinned(cores), PYTHON, "-c", CHILD, str(PROTOTXT),
                       str(googlenet_weights()), str(batch), str(images), str(out),
                       ",".join(OUTPUTS)], env)
    assert isinstance(result, dict)
    if site and not result["caffe"].startswith(str(site)):
        raise RuntimeError(f"the baseline run imported {result['caffe']}, not {site}")
    return batch / result["seconds"], out


def difference(a: Path, b: Path) -> float:
    """The largest |a − b| of the outputs, relative to each output's largest |b|."""
    with np.load(a) as x, np.load(b) as y:
        return max(float(np.abs(x[k].astype(np.float64) - y[k]).max()
                         / max(np.abs(y[k]).max(), 1e-30)) for k in OUTPUTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", default=None,
                        help="comma list (default 1, 2, 4, … up to the usable cores)")
    parser.add_argument("--batches", default="16,1", help="comma list of batch sizes")
    parser.add_argument("--images", type=int, default=48,
                        help="images a configuration forwards (at least 3 batches)")
    parser.add_argument("--baseline", type=Path, help="a pycaffe wheel to compare with")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every configuration this many times, the builds in "
                             "turn (on a busy machine), and report the median")
    args = parser.parse_args()
    wait_for_quiet()
    WORK.mkdir(parents=True, exist_ok=True)
    usable = len(os.sched_getaffinity(0))
    cores = ([int(c) for c in args.cores.split(",")] if args.cores else
             [c for c in (1, 2, 4, 8, 16, 32, 64) if c < usable] + [usable])
    batches = [int(b) for b in args.batches.split(",")]
    builds: list[tuple[str, Path | None]] = [("installed", None)]
    if args.baseline:
        builds.insert(0, ("baseline", unpack(args.baseline.expanduser())))
    rates: dict[tuple[str, int, int], list[float]] = {}
    outputs: dict[tuple[str, int, int], Path] = {}
    for _ in range(args.rounds):
        for batch in batches:
            for count in cores:
                for build, site in builds:
                    rate, outputs[build, batch, count] = forward(build, site, count, batch,
                                                                 args.images)
                    rates.setdefault((build, batch, count), []).append(rate)
                    print(f"({build}, batch {batch}, {count} cores: {rate:.2f} images/s)",
                          file=sys.stderr, flush=True)
    headers = ["pycaffe", "batch", "cores", "images/s", f"× its rate on {cores[0]} core(s)"]
    if args.baseline:
        headers += ["× baseline", "vs baseline: max rel. diff"]
    rows = []
    for batch in batches:
        for build, _ in builds:
            for count in cores:
                rate = median(rates[build, batch, count])
                row = [build, batch, count, f"{rate:.2f}",
                       f"{rate / median(rates[build, batch, cores[0]]):.2f}"]
                if args.baseline and build != "baseline":
                    diff = difference(outputs[build, batch, count],
                                      outputs["baseline", batch, count])
                    row += [f"{rate / median(rates['baseline', batch, count]):.2f}",
                            f"{diff:.2g}"]
                elif args.baseline:
                    row += ["", ""]
                rows.append(row)
    baseline = f"; baseline {args.baseline.name}" if args.baseline else ""
    title(f"pycaffe CPU forward by cores: GoogLeNet-CAM, random weights, median of "
          f"{args.rounds} round(s){baseline}")
    print(table(headers, rows))


if __name__ == "__main__":
    main()
