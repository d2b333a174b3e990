"""Class Activation Maps: CAM_c = Σ_k w_ck · F_k, for many images and classes at once."""
from __future__ import annotations

import cv2
import numpy as np


def class_activation_maps(features: np.ndarray, weights: np.ndarray,
                          classes: np.ndarray) -> np.ndarray:
    """Raw CAMs, float32 (N, M, h, w), for ``classes`` (N, M) of each image.

    ``features`` is (N, K, h, w), ``weights`` (C, K). One batched matrix
    product: no loop over channels or images.
    """
    n, k, h, w = features.shape
    selected = weights[classes]                                  # (N, M, K)
    maps = np.matmul(selected, features.reshape(n, k, h * w))    # (N, M, h*w)
    return maps.reshape(n, -1, h, w)


def upsample(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of one (h, w) map to ``size`` = (H, W), float32."""
    height, width = size
    return cv2.resize(np.asarray(cam, np.float32), (width, height),
                      interpolation=cv2.INTER_LINEAR)


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) scores, for nets that end at the FC layer."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
