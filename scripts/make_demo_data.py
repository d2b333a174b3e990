#!/usr/bin/env python3
"""Generate the demo data set: coloured shapes on cluttered backgrounds, with boxes.

Each image holds one object of one of ``CLASSES`` (circle, square, triangle,
cross, star), filled with a random colour, rotated at random, its extent
(circumscribed diameter) ``SIZE_RANGE`` of the image side, anywhere inside
the image. The background is a random two-colour gradient with thin lines
and small blobs of other colours, and Gaussian noise over everything. The
ground-truth box is the tight box of the object's pixels.

Everything is drawn with OpenCV from one ``numpy`` generator, so a seed gives
the same images on every run. A split is written as PNG files and a
``boxes.csv`` (``image,label,x,y,w,h``; label = class name) — the simple CSV
format ``cam-caffe evaluate --boxes-file`` reads::

    .venv/bin/python scripts/make_demo_data.py --out /tmp/demo-test --count 500 --seed 2
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

CLASSES = ("circle", "square", "triangle", "cross", "star")
IMAGE_SIZE = 64                 # pixels, square
SIZE_RANGE = (0.25, 0.45)       # object extent as a fraction of the image side


class Sample(NamedTuple):
    image: np.ndarray                    # (H, W, 3) uint8 BGR
    label: int                           # index into CLASSES
    box: tuple[int, int, int, int]       # x, y, w, h (tight, exclusive right/bottom)


def _polygon(kind: str, radius: float) -> np.ndarray:
    """The outline of ``kind`` around the origin, circumradius ``radius``, (N, 2)."""
    if kind == "square":
        angles = np.arange(4) * math.pi / 2 + math.pi / 4
        return radius * np.stack([np.cos(angles), np.sin(angles)], 1)
    if kind == "triangle":
        angles = np.arange(3) * 2 * math.pi / 3 - math.pi / 2
        return radius * np.stack([np.cos(angles), np.sin(angles)], 1)
    if kind == "star":
        angles = np.arange(10) * math.pi / 5 - math.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.42)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    if kind == "cross":
        a = radius / math.sqrt(1 + (1 / 3) ** 2)      # half arm length, corners on the circle
        t = a / 3                                     # half arm thickness
        return np.array([(-t, -a), (t, -a), (t, -t), (a, -t), (a, t), (t, t), (t, a), (-t, a),
                         (-t, t), (-a, t), (-a, -t), (-t, -t)], float)
    raise ValueError(kind)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A two-colour linear gradient at a random angle, with lines and small blobs."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
    t = (xs * math.cos(angle) + ys * math.sin(angle))
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    image = (c0 + (c1 - c0) * t[..., None]).astype(np.uint8)
    for _ in range(rng.integers(2, 6)):                    # thin lines across the image
        p0, p1 = rng.integers(-size // 4, size + size // 4, (2, 2))
        cv2.line(image, tuple(int(v) for v in p0), tuple(int(v) for v in p1), _colour(rng), 1,
                 cv2.LINE_AA)
    for _ in range(rng.integers(3, 9)):                    # small distractor blobs
        centre = tuple(int(v) for v in rng.integers(0, size, 2))
        if rng.random() < 0.5:
            cv2.circle(image, centre, int(rng.integers(1, 4)), _colour(rng), -1, cv2.LINE_AA)
        else:
            w, h = rng.integers(2, 6, 2)
            cv2.rectangle(image, centre, (centre[0] + int(w), centre[1] + int(h)), _colour(rng), -1)
    return image


def make_sample(rng: np.random.Generator, size: int = IMAGE_SIZE,
                size_range: tuple[float, float] = SIZE_RANGE, label: int | None = None) -> Sample:
    """One image with one object (of class ``label``, else a random one) and its box."""
    label = int(rng.integers(len(CLASSES))) if label is None else label
    image = _background(rng, size)
    extent = rng.uniform(*size_range) * size
    radius = extent / 2
    centre = rng.uniform(radius, size - radius, 2)
    # A colour that stands out from the background under the object.
    x0, y0 = (int(max(0, v - radius)) for v in centre)
    x1, y1 = (int(min(size, v + radius + 1)) for v in centre)
    under = image[y0:y1, x0:x1].reshape(-1, 3).mean(axis=0)
    for _ in range(100):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - under) >= 130:
            break
    colour = tuple(float(v) for v in colour)
    mask = np.zeros((size, size), np.uint8)
    kind = CLASSES[label]
    shift = 4                                               # sub-pixel precision for OpenCV
    if kind == "circle":
        c = tuple(round(v * (1 << shift)) for v in centre)
        r = round(radius * (1 << shift))
        cv2.circle(image, c, r, colour, -1, cv2.LINE_AA, shift)
        cv2.circle(mask, c, r, 255, -1, cv2.LINE_8, shift)
    else:
        angle = rng.uniform(0, 2 * math.pi)
        rotation = np.array([[math.cos(angle), -math.sin(angle)],
                             [math.sin(angle), math.cos(angle)]])
        points = _polygon(kind, radius) @ rotation.T + centre
        fixed = np.round(points * (1 << shift)).astype(np.int32)[None]
        cv2.fillPoly(image, fixed, colour, cv2.LINE_AA, shift)
        cv2.fillPoly(mask, fixed, 255, cv2.LINE_8, shift)
    x, y, w, h = cv2.boundingRect(mask)
    noise = rng.normal(0, rng.uniform(4, 16), image.shape)
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    return Sample(image, label, (int(x), int(y), int(w), int(h)))


def make_batch(rng: np.random.Generator, count: int, size: int = IMAGE_SIZE,
               size_range: tuple[float, float] = SIZE_RANGE):
    """``count`` samples as arrays: images (N, H, W, 3) uint8, labels (N,), boxes (N, 4)."""
    samples = [make_sample(rng, size, size_range) for _ in range(count)]
    return (np.stack([s.image for s in samples]), np.array([s.label for s in samples]),
            np.array([s.box for s in samples]))


def generate(count: int, seed: int, size: int = IMAGE_SIZE,
             size_range: tuple[float, float] = SIZE_RANGE) -> list[Sample]:
    """``count`` samples, the same for the same seed; classes balanced (round robin)."""
    rng = np.random.default_rng(seed)
    return [make_sample(rng, size, size_range, label=i % len(CLASSES)) for i in range(count)]


def write_split(folder: str | Path, count: int, seed: int, size: int = IMAGE_SIZE,
                size_range: tuple[float, float] = SIZE_RANGE, prefix: str = "img") -> Path:
    """Write ``count`` samples as ``folder/PREFIX_NNNN.png`` and ``folder/boxes.csv``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, sample in enumerate(generate(count, seed, size, size_range)):
        name = f"{prefix}_{i:04d}.png"
        if not cv2.imwrite(str(folder / name), sample.image):
            raise OSError(f"cannot write {folder / name}")
        rows.append([name, CLASSES[sample.label], *sample.box])
    csv_path = folder / "boxes.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "x", "y", "w", "h"])
        writer.writerows(rows)
    return csv_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs and boxes.csv")
    p.add_argument("--count", type=int, default=500, help="number of images (default 500)")
    p.add_argument("--seed", type=int, default=2, help="random seed (default 2)")
    p.add_argument("--size", type=int, default=IMAGE_SIZE, help="image side in pixels")
    p.add_argument("--prefix", default="img", help="file name prefix (default img)")
    args = p.parse_args(argv)
    path = write_split(args.out, args.count, args.seed, args.size, prefix=args.prefix)
    print(f"wrote {args.count} images and {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
