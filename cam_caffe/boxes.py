"""Bounding boxes from a CAM at the original image size.

``paper_box``: the paper's rule — keep the values of at least 20% of the
max, box the largest connected component. ``dt_boxes``: the official
generator (``bboxgenerator/dt_box.cpp`` of github.com/zhoubolei/CAM), which
thresholds a 0–255 heatmap at three levels and boxes what survives a
distance-transform erosion.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from .cam import normalize

DT_LEVEL = 10.5        # dt_box keeps round(255·d/max d) > 10, i.e. 255·d/max d ≥ 10.5
DT_MARGIN = 5          # dt_box keeps boxes 5 px inside the right and bottom edges


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixels: top-left (x, y), width w, height h."""

    x: int
    y: int
    w: int
    h: int

    @property
    def area(self) -> int:
        return self.w * self.h

    def as_xyxy(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) with exclusive x1 = x + w, y1 = y + h."""
        return self.x, self.y, self.x + self.w, self.y + self.h

    def intersection(self, other: Box) -> int:
        """The overlap area with ``other``."""
        ax0, ay0, ax1, ay1 = self.as_xyxy()
        bx0, by0, bx1, by1 = other.as_xyxy()
        return max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))

    def iou(self, other: Box) -> float:
        """Intersection over union; 0.0 for two empty boxes."""
        inter = self.intersection(other)
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0


def paper_box(cam: np.ndarray, threshold: float = 0.2) -> Box | None:
    """The box of the largest 8-connected region with values ≥ ``threshold``.

    The map is min–max normalised to [0, 1] first, so "20% of the max" is
    measured from the map's minimum and negative or offset CAMs work too.
    A constant map has no object: None.
    """
    cam = np.asarray(cam, np.float32)
    if not float(cam.max()) > float(cam.min()):
        return None
    mask = (normalize(cam) >= threshold).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count < 2:
        return None
    label = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) for v in stats[label, :4])   # LEFT, TOP, WIDTH, HEIGHT
    return Box(x, y, w, h)


def eroded_mask(heatmap: np.ndarray, threshold: int) -> np.ndarray:
    """dt_box's mask of one level: ``heatmap > threshold``, thin parts removed.

    The distance of each pixel to the nearest background pixel (the image
    border does not count) is scaled so its max is 255, rounded, and kept
    where it is above 10.
    """
    mask = (heatmap > threshold).astype(np.uint8)
    if not mask.any():
        return mask
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, cv2.DIST_MASK_PRECISE).astype(np.float64)
    return (dist * (255.0 / dist.max()) >= DT_LEVEL).astype(np.uint8)


def contour_boxes(mask: np.ndarray) -> list[Box]:
    """Bounding boxes of all contours, outer and hole (RETR_CCOMP), clipped as dt_box does.

    A contour that starts inside the 5-pixel margin dt_box cuts off at the right or
    bottom gets a negative or zero size there; such a box is dropped here.
    """
    height, width = mask.shape
    contours, _ = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    boxes = []
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        w, h = min(w, width - x - DT_MARGIN), min(h, height - y - DT_MARGIN)
        if w > 0 and h > 0:
            boxes.append(Box(x, y, w, h))
    return boxes


def big_overlap(a: Box, b: Box) -> bool:
    """dt_box's rule: the overlap exceeds half the larger box's area (truncated)."""
    return a.intersection(b) > max(a.area, b.area) // 2


def suppress(boxes: list[Box]) -> list[Box]:
    """dt_box's merge, on boxes sorted by area: drop those overlapping a kept larger one.

    As in ``mergeBBox``, the box that moves into a dropped box's slot is not
    compared with the same larger box.
    """
    kept = list(boxes)
    i = 0
    while i < len(kept):
        j = i + 1
        while j < len(kept):
            if big_overlap(kept[i], kept[j]):
                del kept[j]
            j += 1
        i += 1
    return kept


def dt_boxes(heatmap_u8: np.ndarray, thresholds: Sequence[int] = (20, 100, 110)) -> list[Box]:
    """The official ``dt_box`` boxes of a 2-D uint8 heatmap, largest first."""
    heatmap = np.asarray(heatmap_u8)
    if heatmap.ndim != 2 or heatmap.dtype != np.uint8:
        raise ValueError(f"dt_boxes needs a 2-D uint8 heatmap, got {heatmap.dtype} {heatmap.shape}")
    candidates = [box for t in thresholds for box in contour_boxes(eroded_mask(heatmap, t))]
    return suppress(sorted(candidates, key=lambda box: -box.area))


def dt_boxes_from_cam(cam: np.ndarray, thresholds: Sequence[int] = (20, 100, 110)) -> list[Box]:
    """``dt_boxes`` of a float CAM, min–max scaled to the 0–255 heatmap dt_box reads."""
    heatmap = np.rint(normalize(cam) * 255).astype(np.uint8)
    return dt_boxes(heatmap, thresholds)


@dataclass(frozen=True)
class BoxRule:
    """How boxes are found in a map at the image's size: ``paper`` (the largest region
    ≥ ``threshold``·max), ``dt`` (the official generator at 0–255 ``levels``) or
    None (no boxes)."""

    kind: str | None = None
    threshold: float = 0.2
    levels: tuple[int, ...] = (20, 100, 110)

    def find(self, cam_full: np.ndarray) -> list[Box]:
        """The boxes of one map at the image's size, largest first."""
        if self.kind == "paper":
            box = paper_box(cam_full, self.threshold)
            return [box] if box else []
        if self.kind == "dt":
            return dt_boxes_from_cam(cam_full, self.levels)
        return []


NO_BOXES = BoxRule()


def draw_boxes(image_bgr: np.ndarray, boxes: Sequence[Box],
               color: tuple[int, int, int] = (0, 255, 0), thickness: int = 2) -> np.ndarray:
    """A copy of the image with the boxes drawn."""
    out = image_bgr.copy()
    for box in boxes:
        x0, y0, x1, y1 = box.as_xyxy()
        cv2.rectangle(out, (x0, y0), (x1, y1), color, thickness)
    return out
