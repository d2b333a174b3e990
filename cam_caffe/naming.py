"""The names of the files cam-caffe writes for an image, defined once.

Under the output directory, ``stem`` being the image's relative path without
its extension:

- ``stem.cam.png`` the overlay (``stem.cam-R.png`` for the R-th of several maps),
- ``stem.heatmap.png`` the coloured map (same numbering),
- ``stem.thumb.jpg`` a small overlay without boxes (``--report``'s cards; same numbering),
- ``stem.cam.npy`` the raw maps (M, h, w) and ``stem.cam-full.npy`` at image size,
- ``stem.json`` the predictions, maps and boxes, ``stem.montage.png`` with --montage.
"""
from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path

PER_MAP = {"overlay": "cam", "heatmap": "heatmap", "thumb": "thumb"}   # kind: name part
THUMB_FORMAT = "jpg"
IMAGE_FORMATS = ("png", "jpg")

# The image files above, never taken as inputs from a folder that holds the output directory.
OUTPUT_NAME = re.compile(rf"\.({'|'.join(PER_MAP.values())})(-\d+)?\.({'|'.join(IMAGE_FORMATS)})$"
                         rf"|\.montage\.({'|'.join(IMAGE_FORMATS)})$")


def output_paths(base: Path, save: Collection[str], montage: bool, image_format: str,
                 maps: int) -> dict[str, Path]:
    """Every file of the image whose output stem is ``base`` (output directory / stem),
    by kind (``overlay-2`` for the second of several maps), for the kinds in ``save``."""
    def name(suffix: str) -> Path:
        return base.with_name(f"{base.name}.{suffix}")

    paths: dict[str, Path] = {}
    for kind, part in PER_MAP.items():
        if kind in save:
            ext = THUMB_FORMAT if kind == "thumb" else image_format
            paths.update({kind: name(f"{part}.{ext}")} if maps == 1 else
                         {f"{kind}-{r}": name(f"{part}-{r}.{ext}") for r in range(1, maps + 1)})
    if "npy" in save:
        paths["npy"] = name("cam.npy")
        paths["npy-full"] = name("cam-full.npy")
    if "json" in save:
        paths["json"] = name("json")
    if montage:
        paths["montage"] = name(f"montage.{image_format}")
    return paths
