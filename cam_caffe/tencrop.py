"""The official test-time procedure: ten crops in, one merged CAM out.

The image is resized to 256×256 (aspect not kept); crops 1–5 are the
top-left, top-right, bottom-left, bottom-right and centre 224×224 windows,
crops 6–10 the same flipped left-right. That order (crop 2 is top-right) is
the one of the official ``mergeTenCrop.m`` and of the official stored
activations (``data_img1.mat``): their crop 2 is crop 1 moved 2 cells
(32 px) to the right.
"""
from __future__ import annotations

import cv2
import numpy as np


def crop_offsets(resize: int = 256, crop: int = 224) -> list[tuple[int, int]]:
    """(x, y) of crops 1–5: top-left, top-right, bottom-left, bottom-right, centre."""
    if not 0 < crop <= resize:
        raise ValueError(f"crop {crop} must be in 1..{resize}")
    m = resize - crop
    c = (m + 1) // 2          # the official centre: floor((m + 1) / 2)
    return [(0, 0), (m, 0), (0, m), (m, m), (c, c)]


def ten_crops(image_bgr: np.ndarray, resize: int = 256, crop: int = 224) -> np.ndarray:
    """(10, crop, crop, 3): the image resized to resize×resize, cropped, then mirrored."""
    square = cv2.resize(image_bgr, (resize, resize), interpolation=cv2.INTER_LINEAR)
    crops = np.stack([square[y:y + crop, x:x + crop] for x, y in crop_offsets(resize, crop)])
    return np.ascontiguousarray(np.concatenate([crops, crops[:, :, ::-1]]))


def merge_ten_crops(cams: np.ndarray, resize: int = 256, crop: int = 224) -> np.ndarray:
    """The ten crops' CAMs (10, h, w) merged into one (resize, resize) float32 map.

    As ``mergeTenCrop.m``: each map resized to the crop (bilinear), crops
    6–10 flipped back, absolute values summed at the crops' places. (The
    official demo resizes the maps to 256 instead, so that every crop lands
    at (0, 0); this follows the official ILSVRC heatmap script: crop size.)
    """
    cams = np.asarray(cams, np.float32)
    if cams.ndim != 3 or cams.shape[0] != 10:
        raise ValueError(f"merge_ten_crops needs (10, h, w) maps, got {cams.shape}")
    stacked = cv2.resize(cams.transpose(1, 2, 0), (crop, crop), interpolation=cv2.INTER_LINEAR)
    large = np.abs(stacked.transpose(2, 0, 1))
    unflipped = large[:5] + large[5:, :, ::-1]
    merged = np.zeros((resize, resize), np.float32)
    for (x, y), window in zip(crop_offsets(resize, crop), unflipped, strict=True):
        merged[y:y + crop, x:x + crop] += window
    return merged
