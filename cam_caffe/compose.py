"""The pictures an image's files hold: an overlay in the chosen style with its boxes, a
thumbnail, and the captioned montage of the image and its overlays (render.py draws
one map; this puts the pieces together)."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .boxes import Box, draw_boxes
from .render import DEFAULT_ALPHA, overlay_paper, overlay_seed

THUMB_SIDE = 192                # a thumbnail's longest side, pixels
CAPTION_FONT = (cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)   # face, scale, thickness


@dataclass(frozen=True)
class Look:
    """How a map is drawn: ``style`` (render.STYLES), ``colormap``, the heatmap's
    weight ``alpha`` (None: the style's own), and the net's input size (H, W),
    at which the seed style draws."""

    style: str = "paper"
    colormap: str = "jet"
    alpha: float | None = None
    net_size: tuple[int, int] = (224, 224)


def render_overlay(image: np.ndarray, cam_full: np.ndarray, boxes: list[Box],
                   look: Look) -> np.ndarray:
    """The overlay of one map at the image's size, in ``look``, with its boxes drawn."""
    alpha = DEFAULT_ALPHA[look.style] if look.alpha is None else look.alpha
    if look.style == "seed":
        h, w = look.net_size
        small = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        cam_small = cv2.resize(cam_full, (w, h), interpolation=cv2.INTER_LINEAR)
        sy, sx = h / image.shape[0], w / image.shape[1]
        scaled = [Box(round(b.x * sx), round(b.y * sy), round(b.w * sx), round(b.h * sy))
                  for b in boxes]
        return draw_boxes(overlay_seed(small, cam_small, look.colormap, alpha), scaled)
    return draw_boxes(overlay_paper(image, cam_full, look.colormap, alpha), boxes)


def thumbnail(image: np.ndarray, cam_full: np.ndarray, look: Look) -> np.ndarray:
    """A small overlay without boxes (the report draws them): longest side THUMB_SIDE."""
    scale = min(1.0, THUMB_SIDE / max(image.shape[:2]))
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return render_overlay(small, cv2.resize(cam_full, size, interpolation=cv2.INTER_AREA),
                          [], look)


def fit_caption(label: str, prob: float | None, width: int) -> str:
    """``label`` and ``prob`` ("garter snake 0.812") within ``width`` pixels: the label
    is shortened (to its first comma part, then cut, with ".."), never the probability."""
    tail = "" if prob is None else f" {prob:.3f}"

    def fits(text: str) -> bool:
        return cv2.getTextSize(text + tail, *CAPTION_FONT)[0][0] <= width

    if fits(label):
        return label + tail
    label = label.split(",")[0].strip()
    if fits(label):
        return label + tail
    while label and not fits(label + ".."):
        label = label[:-1].rstrip()
    return label + ".." + tail if label else tail.strip()


def montage(image: np.ndarray, overlays: list[np.ndarray],
            captions: list[tuple[str, float]], height: int = 224) -> np.ndarray:
    """The image and its overlays side by side, each captioned with its (label,
    probability) (like the demo's result.jpg)."""
    def tile(picture: np.ndarray, label: str, prob: float | None) -> np.ndarray:
        width = max(1, round(picture.shape[1] * height / picture.shape[0]))
        body = cv2.resize(picture, (width, height), interpolation=cv2.INTER_AREA)
        strip = np.full((28, width, 3), 255, np.uint8)
        cv2.putText(strip, fit_caption(label, prob, width - 8), (4, 19), CAPTION_FONT[0],
                    CAPTION_FONT[1], (0, 0, 0), CAPTION_FONT[2], cv2.LINE_AA)
        return np.vstack([strip, body])
    tiles = [tile(image, "input", None)] + [tile(overlay, label, prob) for overlay, (label, prob)
                                            in zip(overlays, captions, strict=True)]
    gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
    return np.hstack([part for t in tiles for part in (t, gap)][:-1])
