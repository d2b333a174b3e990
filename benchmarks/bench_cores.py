"""How cam-caffe uses the cores: per backend, at 1, 2, 4, … cores (``taskset``),
images/s end to end (``cam-caffe DIR --output-dir``, with ``--workers`` 0 = threads
of the main process, and worker processes) and forward-only (the backend alone,
on preprocessed batches). With ``--gpu ID``, the pycaffe GPU forward and end to end
on all cores instead.

End to end is measured after start-up: each configuration runs over ``--images``
and over ``--batch-size`` images, and the rate is the difference of images over
the difference of seconds (process start, model load and worker start cancel
out). GoogLeNet-CAM with random weights, 500×375 JPEGs, default outputs (PNG
overlay), batch 16.

    python benchmarks/bench_cores.py [--images 128] [--cores 1,2] [--workers 0,1,2]
                                     [--backends opencv,onnxruntime,caffe] [--gpu ID]

In the GPU bundle (docs/GPU.md):
    ./run.sh --python app/benchmarks/bench_cores.py --gpu 0 --command ./run.sh \
        --images 2048 --batch-size 64 --workers 0,7,15
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from common import (
    CLI,
    PROTOTXT,
    PYTHON,
    WORK,
    available_backends,
    googlenet_weights,
    make_images,
    median,
    run_timed,
    table,
    title,
    wait_for_quiet,
)

COMMAND = [CLI]                    # the cam-caffe command (--command)


def pinned(cores: int) -> list[str]:
    """``taskset`` onto the first ``cores`` usable cores."""
    usable = sorted(os.sched_getaffinity(0))[:cores]
    return ["taskset", "-c", ",".join(map(str, usable))]


def forward_rate(backend: str, cores: int, batch: int, gpu: int | None, repeat: int) -> float:
    """Images/s of the backend's forward pass alone (a child pinned to ``cores``)."""
    code = f"""
import json, time, numpy as np
from cam_caffe import CAMNet
net = CAMNet({str(PROTOTXT)!r}, {str(googlenet_weights())!r}, backend={backend!r}, gpu={gpu!r})
data = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
data = np.repeat(data, {batch}, axis=0)
net.backend.forward(data)
runs = []
for _ in range({repeat}):
    start = time.perf_counter()
    net.backend.forward(data)
    runs.append(time.perf_counter() - start)
print(json.dumps(sorted(runs)[len(runs) // 2]))
"""
    _, result = run_timed([*pinned(cores), PYTHON, "-c", code])
    return batch / json.loads(result.stdout.strip().splitlines()[-1])


def end_to_end(folder, count: int, backend: str, cores: int, workers: int, batch: int,
               gpu: int | None) -> float:
    """Seconds of one ``cam-caffe`` run over the first ``count`` images of ``folder``."""
    listing = WORK / "cores_list.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted(folder.glob("*.jpg"))[:count]))
    out = WORK / "cores_out"
    shutil.rmtree(out, ignore_errors=True)
    command = [*pinned(cores), *COMMAND, f"@{listing}", "--prototxt", str(PROTOTXT), "--weights",
               str(googlenet_weights()), "--backend", backend, "--output-dir", str(out), "-q",
               "--batch-size", str(batch), "--workers", str(workers)]
    if gpu is not None:
        command += ["--gpu", str(gpu)]
    seconds, _ = run_timed(command)
    made = sum(1 for _ in out.glob("*.png"))
    if made != count:
        raise RuntimeError(f"{made} overlays for {count} images: {' '.join(command)}")
    return seconds


def steady_rate(folder, images: int, backend: str, cores: int, workers: int, batch: int,
                gpu: int | None, repeat: int) -> float:
    """Images/s after start-up: (images − batch) / (t(images) − t(batch)), medians."""
    large = median([end_to_end(folder, images, backend, cores, workers, batch, gpu)
                    for _ in range(repeat)])
    small = median([end_to_end(folder, batch, backend, cores, workers, batch, gpu)
                    for _ in range(repeat)])
    return (images - batch) / max(large - small, 1e-9)


def main_process_costs(folder, batch: int) -> list[list[str]]:
    """CPU ms per image that the main process spends with worker processes: the
    preprocessing, receiving a decoded image, sending image and maps to a render
    worker (pickled as ``pipeline.ProcessPool`` does)."""
    import io
    import pickle
    from pathlib import Path

    from cam_caffe import CAMNet
    from cam_caffe.batch import Options, finish_image
    from cam_caffe.inputs import Input
    from cam_caffe.pipeline import _SharedPickler

    net = CAMNet(PROTOTXT, googlenet_weights(), backend="opencv")
    paths = sorted(folder.glob("*.jpg"))[:batch]
    images = [net.load(p) for p in paths]
    options = Options()
    results = net.predict(images, items=[Input(p, Path(p.stem)) for p in paths])
    decoded = [pickle.dumps(image, protocol=5) for image in images]
    finished = [pickle.dumps(finish_image(net, result, image, options), protocol=5)
                for result, image in zip(results, images, strict=True)]

    def send() -> None:
        for image, result in zip(images, results, strict=True):
            buffer = io.BytesIO()
            _SharedPickler(buffer, {"net": net}).dump((finish_image,
                                                       (net, result, image, options), {}))
            pickle.dumps(buffer.getvalue(), protocol=5)

    def cpu_ms(fn) -> str:
        fn()
        start = time.process_time()
        for _ in range(5):
            fn()
        return f"{(time.process_time() - start) / 5 / len(paths) * 1000:.3f}"

    return [["preprocess (resize, mean, NCHW)", cpu_ms(lambda: net.preprocess(images))],
            ["receive a decoded image", cpu_ms(lambda: [pickle.loads(d) for d in decoded])],
            ["receive a finished image's record",
             cpu_ms(lambda: [pickle.loads(d) for d in finished])],
            ["send image and maps to a render worker", cpu_ms(send)]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cores", default=None,
                        help="comma list (default 1, 2, 4, … up to the usable cores)")
    parser.add_argument("--workers", default="0,1,2",
                        help="comma list of --workers values for the end-to-end runs")
    parser.add_argument("--backends", default=None, help="default: every one that loads")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--gpu", type=int, help="measure the pycaffe GPU path on device ID")
    parser.add_argument("--command", default=CLI,
                        help="the cam-caffe command (default: this venv's; in the GPU "
                             "bundle: ./run.sh)")
    args = parser.parse_args()
    COMMAND[:] = args.command.split()
    wait_for_quiet()
    usable = len(os.sched_getaffinity(0))
    cores = ([int(c) for c in args.cores.split(",")] if args.cores else
             [c for c in (1, 2, 4, 8, 16, 32, 64) if c < usable] + [usable])
    workers = [int(w) for w in args.workers.split(",")]
    folder = WORK / f"cores_{args.images}"
    if len(list(folder.glob("*.jpg"))) != args.images:
        shutil.rmtree(folder, ignore_errors=True)
        make_images(folder, args.images)
    if args.gpu is not None:
        backends, cores = ["caffe"], [usable]
    else:
        backends = args.backends.split(",") if args.backends else available_backends()

    headers = ["backend", "cores", "forward only, images/s"] + [
        f"end to end, --workers {w}, images/s" for w in workers]
    rows = []
    for backend in backends:
        for count in cores:
            start = time.monotonic()
            forward = forward_rate(backend, count, args.batch_size, args.gpu, 3)
            row = [backend, count, f"{forward:.1f}"]
            for w in workers:
                rate = steady_rate(folder, args.images, backend, count, w, args.batch_size,
                                   args.gpu, args.repeat)
                row.append(f"{rate:.1f}")
            rows.append(row)
            print(f"({backend} on {count} cores: {time.monotonic() - start:.0f} s)",
                  file=sys.stderr, flush=True)
    where = f"GPU {args.gpu}, " if args.gpu is not None else ""
    title(f"Images/s by cores: {where}GoogLeNet-CAM, batch {args.batch_size}, "
          f"{args.images} images of 500x375 (JPEG), PNG overlays, after start-up")
    print(table(headers, rows))
    title(f"Main-process CPU per image with worker processes (500x375 JPEG, batch "
          f"{args.batch_size})")
    print(table(["step", "CPU ms per image"], main_process_costs(folder, args.batch_size)))


if __name__ == "__main__":
    sys.exit(main())
