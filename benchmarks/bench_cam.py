"""The CAM step alone: cam.class_activation_maps (one batched matmul) against the original
script's Python loop over the 1024 channels, on GoogLeNet-CAM-sized features.

    python benchmarks/bench_cam.py [--repeat 7]
"""
from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable

import numpy as np
from common import median, table, title

from cam_caffe.cam import class_activation_maps

CHANNELS, SIZE, CLASSES = 1024, 14, 1000


def original_loop(features: np.ndarray, weights: np.ndarray, classes: list[int]) -> list:
    """The original script: for each class, cam += w[c, k] · F[k] over the channels k."""
    maps = []
    for c in classes:
        cam = np.zeros((SIZE, SIZE), np.float32)
        for k in range(CHANNELS):
            cam += weights[c, k] * features[k]
        maps.append(cam)
    return maps


def per_call(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds per call, each sample long enough (≥0.2 s) to time reliably."""
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    return median(timer.repeat(repeat=repeat, number=number)) / number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    weights = rng.normal(0, 0.05, (CLASSES, CHANNELS)).astype(np.float32)
    rows = []
    for images, count in ((1, 1), (1, 5), (32, 1), (32, 5)):
        features = np.maximum(rng.normal(0, 1, (images, CHANNELS, SIZE, SIZE)), 0) \
            .astype(np.float32)
        classes = rng.choice(CLASSES, (images, count), replace=images != 1)
        vectorised = per_call(lambda: class_activation_maps(features, weights, classes),
                              args.repeat) / images
        loop = per_call(lambda: [original_loop(features[i], weights, list(classes[i]))
                                 for i in range(images)], args.repeat) / images
        reference = original_loop(features[0], weights, list(classes[0]))
        assert np.allclose(class_activation_maps(features, weights, classes)[0],
                           np.stack(reference), rtol=1e-4, atol=1e-3)
        rows.append([images, count, f"{loop * 1e6:.0f}", f"{vectorised * 1e6:.1f}",
                     f"**{loop / vectorised:.0f}×**"])
    title("CAM step alone: features 1024×14×14 per image (µs per image, median)")
    print(table(["images per call", "classes", "original Python loop", "vectorised (matmul)",
                 "speed-up (target ≥100×)"], rows))


if __name__ == "__main__":
    main()
