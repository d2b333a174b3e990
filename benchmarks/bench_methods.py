"""Per-method cost: ms per image of ``CAMNet.predict`` (forward + the method's maps, top-1
class) for each backend at batch 16, on GoogLeNet-CAM (random weights) and the demo model,
against the forward pass alone.

    python benchmarks/bench_methods.py [--images 16] [--repeat 3] [--slow-images 1]
                                       [--models GoogLeNet-CAM,demo] [--backends B,B]

Grad-CAM & co. add one backward pass through the net after the target blob;
Score-CAM runs K = channels masked forwards per image (1,024 for GoogLeNet-CAM,
``--batch-size`` at a time), so its expected cost is K × the forward's ms per
image; Ablation-CAM runs K forwards of the net's tail. Score-CAM and
Ablation-CAM on GoogLeNet-CAM are timed on ``--slow-images`` images.
"""
from __future__ import annotations

import argparse

import numpy as np
from common import (
    PROTOTXT,
    ROOT,
    available_backends,
    googlenet_weights,
    median,
    ms,
    source_images,
    table,
    times,
    title,
)

from cam_caffe import CAMNet
from cam_caffe.methods import GRADIENT_METHODS, METHODS

BATCH = 16
MODELS = {"GoogLeNet-CAM": (PROTOTXT, None),
          "demo": (ROOT / "models" / "demo" / "deploy.prototxt",
                   ROOT / "models" / "demo" / "demo.caffemodel")}


def images(count: int) -> list[np.ndarray]:
    sources = source_images()
    return [sources[i % len(sources)][:, ::(1 if i % 2 else -1)].copy() for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=BATCH)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--slow-images", type=int, default=1)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--backends", help="comma list (default: every backend that loads)")
    args = parser.parse_args()
    for model in args.models.split(","):
        prototxt, weights = MODELS[model]
        weights = weights or googlenet_weights()
        title(f"Methods on {model}: ms per image at batch {BATCH} (top-1 class)")
        rows = []
        backends = (args.backends.split(",") if args.backends
                    else available_backends(weights, prototxt))
        for backend in backends:
            forward_net = CAMNet(prototxt, weights, backend=backend, method="cam",
                                 batch_size=BATCH)
            batch = forward_net.preprocess(images(args.images))
            forward = median(times(lambda: forward_net.backend.forward(batch),
                                   args.repeat)) / len(batch)
            channels = forward_net.spec.channels
            rows.append([backend, "forward only", ms(forward), "1.00", ""])
            for method in METHODS:
                if backend == "opencv" and method in GRADIENT_METHODS:
                    continue
                slow = method in ("scorecam", "ablationcam") and model == "GoogLeNet-CAM"
                count = args.slow_images if slow else args.images
                net = CAMNet(prototxt, weights, backend=backend, method=method,
                             batch_size=BATCH)
                pictures = images(count)
                seconds = median(times(lambda: net.predict(pictures, top_k=1),
                                       1 if slow else args.repeat, 0 if slow else 1)) / count
                note = ""
                if method == "scorecam":
                    note = f"K = {channels}: {seconds / (channels * forward):.2f} × K forwards"
                rows.append([backend, method, ms(seconds), f"{seconds / forward:.2f}", note])
        print(table(["backend", "method", "ms/image", "× forward", "note"], rows))


if __name__ == "__main__":
    main()
