"""Where one image's time goes in a batch run: decode, preprocess, forward, CAM,
upsample, boxes, render, PNG encode, file write — per backend, at batch 16 and 32.

The stages are the package's own functions called one after the other (as
``run_batch`` does, without its worker threads), each timed; then ``run_batch``
itself is timed on the same images, so the table also shows what its workers
gain (they decode the next batch and render/encode/write the previous one
while the forward runs).
Default CLI settings: top-1 map, ``--style paper`` overlay, PNG, no boxes (the
boxes column is the opt-in ``--boxes paper``, not counted in the totals).

    python benchmarks/bench_stages.py [--images 64] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from common import (
    PROTOTXT,
    PYTHON,
    WORK,
    available_backends,
    googlenet_weights,
    make_images,
    median,
    run_json,
    table,
    title,
    wait_for_quiet,
)

STAGES = ("decode", "preprocess", "forward", "CAM", "upsample", "boxes", "render", "encode",
          "write")
NOT_DEFAULT = ("boxes",)          # timed, but not part of a default run


def stage_times(net, paths: list[Path], batch_size: int, out_dir: Path) -> dict[str, float]:
    """Seconds per image of each stage over ``paths`` (one pass)."""
    from cam_caffe.boxes import BoxRule
    from cam_caffe.cam import class_activation_maps
    from cam_caffe.compose import Look, render_overlay
    from cam_caffe.output import encode_image, write_bytes
    from cam_caffe.result import ImageResult

    look = Look(net_size=net.input_size)
    boxed = BoxRule("paper")
    total: dict[str, float] = defaultdict(float)
    clock = time.perf_counter

    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        t0 = clock()
        images = [net.load(p) for p in chunk]
        t1 = clock()
        batch = net.preprocess(images)
        t2 = clock()
        out = net.backend.forward(batch)
        t3 = clock()
        chosen = net._choose(out.probs, None, 1)
        cams = class_activation_maps(out.features, net.cam_weights, chosen)
        results = [ImageResult(out.probs[i], [int(c) for c in chosen[i]], cams[i],
                               images[i].shape[:2]) for i in range(len(images))]
        t4 = clock()
        for stage, seconds in zip(("decode", "preprocess", "forward", "CAM"),
                                  (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            total[stage] += seconds
        for path, image, result in zip(chunk, images, results, strict=True):
            t0 = clock()
            cam_full = result.full_map(0)
            t1 = clock()
            boxed.find(cam_full)
            t2 = clock()
            overlay = render_overlay(image, cam_full, [], look)
            t3 = clock()
            target = out_dir / f"{path.stem}.cam.png"
            data = encode_image(target, overlay)
            t4 = clock()
            write_bytes(target, data)
            t5 = clock()
            for stage, seconds in zip(("upsample", "boxes", "render", "encode", "write"),
                                      (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                total[stage] += seconds
    return {stage: seconds / len(paths) for stage, seconds in total.items()}


def run_batch_time(net, paths: list[Path], batch_size: int, out_dir: Path) -> float:
    """Seconds per image of ``run_batch`` itself (worker threads on), default options."""
    from cam_caffe.batch import Options, run_batch
    from cam_caffe.inputs import collect
    inputs = collect([str(p) for p in paths], out_dir)
    start = time.perf_counter()
    report = run_batch(net, inputs, Options(output_dir=out_dir, batch_size=batch_size,
                                            quiet=True))
    assert report.done == len(paths), report
    return (time.perf_counter() - start) / len(paths)


def child(backend: str, batches: list[int], count: int, repeat: int) -> dict:
    from cam_caffe import CAMNet
    net = CAMNet(PROTOTXT, googlenet_weights(), backend=backend)
    paths = sorted((WORK / "photos_375x500").glob("*.jpg"))[:count]
    out_dir = WORK / "stages_out"
    results = {}
    for batch in batches:
        stage_times(net, paths[:batch], batch, out_dir)                  # warm-up
        runs = [stage_times(net, paths, batch, out_dir) for _ in range(repeat)]
        stages = {s: median([r[s] for r in runs]) for s in STAGES}
        whole = median([run_batch_time(net, paths, batch, out_dir / "run_batch")
                        for _ in range(repeat)])
        results[batch] = {"stages": stages, "run_batch": whole}
    return results


def fast_overlay(image, cam_full, lut, alpha: float = 0.7):
    """render.overlay_paper in three uint8 OpenCV calls: the candidate this benchmark
    measured before the package adopted the same approach (kept as a reference)."""
    import cv2
    low, high = float(cam_full.min()), float(cam_full.max())
    span = high - low if high > low else 1.0
    index = cv2.convertScaleAbs(cam_full, alpha=255 / span, beta=-low * 255 / span)
    heat = cv2.applyColorMap(index, lut.reshape(256, 1, 3))
    return cv2.addWeighted(image, 0.2, heat, alpha, 0)


def write_fsync(path: Path, data: bytes) -> None:
    """write_bytes with an fsync before the rename (what the package did until 2026-11-27)."""
    import os
    import tempfile
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def options_table(path: Path, repeat: int) -> None:
    """Render, encode and write alternatives on one 500×375 image (ms, median)."""
    import cv2
    import numpy as np
    from common import times

    from cam_caffe.cam import upsample
    from cam_caffe.output import encode_image, write_bytes
    from cam_caffe.render import colormap_lut, heatmap, overlay_paper
    image = cv2.imread(str(path))
    rng = np.random.default_rng(0)
    cam_full = upsample(rng.random((14, 14), np.float32), image.shape[:2])
    lut = colormap_lut("jet")
    current = overlay_paper(image, cam_full)
    candidate = fast_overlay(image, cam_full, lut)
    diff = int(np.abs(current.astype(int) - candidate).max())
    out = WORK / "options_out"
    out.mkdir(parents=True, exist_ok=True)
    png = encode_image(out / "x.png", current)
    cv_png = cv2.imencode(".png", current)[1]
    raw_png = cv2.imencode(".png", current, [cv2.IMWRITE_PNG_COMPRESSION, 0])[1]
    jpg = encode_image("x.jpg", current)

    def t(fn) -> str:
        return f"{median(times(fn, repeat=max(repeat, 20), warmup=2)) * 1000:.2f}"
    rows = [
        ["render", "render.overlay_paper (package)",
         t(lambda: overlay_paper(image, cam_full)), ""],
        ["render", "  of which heatmap()", t(lambda: heatmap(cam_full)), ""],
        ["render", f"candidate: cv2 convertScaleAbs + applyColorMap + addWeighted "
                   f"(max diff {diff} level)",
         t(lambda: fast_overlay(image, cam_full, lut)), ""],
        ["encode", "output.encode_png: Sub filter + ISA-L deflate level 1 (package)",
         t(lambda: encode_image("x.png", current)), f"{len(png) / 1024:.0f}"],
        ["encode", "cv2.imencode .png, default (zlib level 1, Sub, RLE; package until "
                   "2026-11-27)",
         t(lambda: cv2.imencode(".png", current)), f"{len(cv_png) / 1024:.0f}"],
        ["encode", "cv2.imencode .png, IMWRITE_PNG_COMPRESSION=0",
         t(lambda: cv2.imencode(".png", current, [cv2.IMWRITE_PNG_COMPRESSION, 0])),
         f"{len(raw_png) / 1024:.0f}"],
        ["encode", "cv2.imencode .jpg (--format jpg)", t(lambda: encode_image("x.jpg", current)),
         f"{len(jpg) / 1024:.0f}"],
        ["write", "write_bytes: temp file + rename (package)",
         t(lambda: write_bytes(out / "a.png", png)), ""],
        ["write", "temp file + fsync + rename",
         t(lambda: write_fsync(out / "b.png", png)), ""],
    ]
    title("Render / encode / write alternatives, one 500×375 overlay (ms, median)")
    print(table(["stage", "how", "ms", "KiB"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batches", default="16,32")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        print(json.dumps(child(args.child, batches, args.images, args.repeat)))
        return
    backends = available_backends()
    folder = WORK / "photos_375x500"
    if len(list(folder.glob("*.jpg"))) < args.images:
        make_images(folder, args.images)
    wait_for_quiet()
    rows = []
    for backend in backends:
        results = run_json([PYTHON, __file__, "--child", backend, "--images", str(args.images),
                            "--repeat", str(args.repeat), "--batches", args.batches])
        for batch in batches:
            r = results[str(batch)]
            s = r["stages"]
            rest = sum(v for k, v in s.items() if k != "forward" and k not in NOT_DEFAULT)
            serial = rest + s["forward"]
            rows.append([backend, batch] + [f"{s[k] * 1000:.2f}" for k in STAGES]
                        + [f"{rest * 1000:.1f}", f"**{100 * rest / s['forward']:.0f}%**",
                           f"{serial * 1000:.1f}", f"{r['run_batch'] * 1000:.1f}"])
    title(f"Stages per image (ms, median of {args.repeat} passes over {args.images} JPEGs of "
          "500×375), GoogLeNet-CAM")
    print(table(["backend", "batch", *list(STAGES), "all but forward (excl. boxes)",
                 "÷ forward (target ≤10%)", "serial sum", "run_batch (overlapped)"], rows))
    options_table(WORK / "photos_375x500" / "img00000.jpg", args.repeat)


if __name__ == "__main__":
    sys.exit(main())
