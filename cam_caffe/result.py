"""One image's result, built once right after the forward pass; what every consumer reads.

``CAMNet.predict`` makes an :class:`ImageResult` per image; the batch writer,
``-o``/``--show``, ``evaluate`` and API users all take it from there. The maps
at the image's size and the boxes are computed on first use, once, on
whichever thread or process renders the image. The JSON record is made from
it (:func:`record`) and never read back into one.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .boxes import NO_BOXES, Box, BoxRule
from .cam import upsample
from .errors import EXIT_MODEL, CamError
from .labels import class_name, resolve_class

if TYPE_CHECKING:
    from .api import CAMNet
    from .inputs import Input

PROB_DIGITS = 6          # a probability's decimals in the JSON record and captions


@dataclass(eq=False)
class ImageResult:
    """One image's classes, probabilities and maps (``cams``: the method's raw maps
    (M, h, w) of ``classes``, at feature size, or at the resize size with
    ``ten_crop``); ``item`` is the input it came from, when it came from one."""

    probs: np.ndarray             # (C,) float32
    classes: list[int]            # the classes whose maps were computed, in order
    cams: np.ndarray              # (len(classes), h, w) float32, the method's raw maps
    image_size: tuple[int, int]   # (H, W) of the original image
    labels: list[str] | None = None
    methods: tuple[str, ...] = ("cam",)   # with several, each class's maps are one per method
    ten_crop: bool = False
    item: Input | None = None
    box_rule: BoxRule = NO_BOXES
    _full: dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False)
    _boxes: list[list[Box]] | None = field(default=None, init=False, repr=False)

    def top(self, k: int = 5) -> list[tuple[int, str, float]]:
        """The k most probable classes as (id, label, probability)."""
        order = np.argsort(-self.probs, kind="stable")[:k]
        return [(int(i), class_name(self.labels, int(i)), float(self.probs[i])) for i in order]

    @property
    def method(self) -> str:
        """The methods as ``--method`` names them (``cam``, ``gradcam,scorecam``)."""
        return ",".join(self.methods)

    def map_method(self, rank: int) -> str:
        """The method of the ``rank``-th map (0-based)."""
        return self.methods[rank % len(self.methods)]

    def label(self, class_id: int) -> str:
        """The label of ``class_id`` ("class N" without labels)."""
        return class_name(self.labels, class_id)

    def prob(self, class_id: int) -> float:
        """The probability of ``class_id`` as the record and captions give it (rounded)."""
        return round(float(self.probs[class_id]), PROB_DIGITS)

    def full_map(self, rank: int) -> np.ndarray:
        """The ``rank``-th map (0-based) bilinearly upsampled to the image's size, computed
        on first use and kept (read-only) until :meth:`release`."""
        if rank not in self._full:
            self._full[rank] = upsample(self.cams[rank], self.image_size)
            self._full[rank].flags.writeable = False
        return self._full[rank]

    @property
    def full_maps(self) -> list[np.ndarray]:
        """Every map at the image's size, in the order of ``classes``."""
        return [self.full_map(rank) for rank in range(len(self.classes))]

    @property
    def boxes(self) -> list[list[Box]]:
        """Each map's boxes by ``box_rule`` (none without a rule), found on first use."""
        if self._boxes is None:
            self._boxes = [self.box_rule.find(self.full_map(rank)) if self.box_rule.kind
                           else [] for rank in range(len(self.classes))]
        return self._boxes

    def release(self) -> None:
        """Drop the maps at the image's size (a batch keeps its results for their
        classes and boxes, not their pixels)."""
        self._full.clear()

    def cam(self, class_id: int | str, size: tuple[int, int] | None = None) -> np.ndarray:
        """The raw CAM of ``class_id`` (an id or a label name), bilinearly upsampled to
        ``size`` (H, W) if given (at the image's size: :meth:`full_map`, read-only).
        Only the classes in ``classes`` were computed; with several methods, this is
        the first method's map."""
        index = resolve_class(class_id, self.labels, len(self.probs))
        if index not in self.classes:
            computed = ", ".join(f"{c} ({self.label(c)})" for c in self.classes)
            raise CamError(f"no CAM computed for class {index} "
                           f"({self.label(index)}): this prediction has "
                           f"{computed}; ask predict() for it with classes=[{index}]")
        rank = self.classes.index(index)
        if size is None:
            return self.cams[rank]
        return self.full_map(rank) if tuple(size) == tuple(self.image_size) \
            else upsample(self.cams[rank], size)

    def check_finite(self) -> None:
        """A CamError (exit code of a model error) naming the image when the net gave
        NaN or infinity."""
        if not (np.isfinite(self.probs).all() and np.isfinite(self.cams).all()):
            name = self.item.path if self.item else "image"
            raise CamError(f"{name}: the net's output is not finite (NaN or infinity): "
                           "check the weights, --mean and --scale", EXIT_MODEL)


def record(result: ImageResult, net: CAMNet, top_k: int,
           files: Mapping[str, Path] | None = None) -> dict:
    """The JSON record of an input's result (``--jsonl``, ``stem.json``, the report's
    cards): its ``top_k`` classes, each map's class and boxes, and ``files`` when
    written."""
    if result.item is None:
        raise ValueError("a JSON record names its input: the result has none")
    size = result.image_size
    entry = {
        "image": str(result.item.path),
        "size": {"width": size[1], "height": size[0]},
        "model": {"prototxt": str(net.netdef.path), "weights": str(net.weights)},
        "backend": net.backend_name,
        "method": result.method,
        "feature_blob": net.spec.feature_blob,
        "ten_crop": result.ten_crop,
        "top_k": [{"class": c, "label": label, "prob": round(p, PROB_DIGITS)}
                  for c, label, p in result.top(top_k)],
        "maps": [{"class": c, "label": result.label(c), "prob": result.prob(c),
                  "boxes": [[b.x, b.y, b.w, b.h] for b in boxes],
                  **({"method": result.map_method(rank)} if len(result.methods) > 1 else {})}
                 for rank, (c, boxes) in enumerate(zip(result.classes, result.boxes,
                                                       strict=True))],
    }
    if files is not None:
        entry["files"] = {kind: str(path) for kind, path in files.items()}
    return entry
