"""Class Activation Maps: CAM_c = Σ_k w_ck · F_k, for many images and classes at once."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .camspec import CamSpec
from .netdef import NetDef, layer_blobs, stored_layers

if TYPE_CHECKING:
    from . import proto


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


def cam_weights(netdef: NetDef, weights: proto.NetParameter, spec: CamSpec) -> np.ndarray:
    """The CAM head's W as (C, K) float32, read from the parsed caffemodel ``weights``;
    the identity for a head without FC (global pooling straight into Softmax)."""
    if spec.fc_layer is None:
        return np.eye(spec.num_classes, dtype=np.float32)
    layer = netdef.layer(spec.fc_layer)
    fc = layer_blobs(netdef, stored_layers(weights), layer)[0]
    fc = fc.reshape(fc.shape[0], -1)
    if layer.inner_product_param.transpose:      # Caffe stores Wᵀ, (K, C)
        fc = fc.T
    return np.ascontiguousarray(fc, np.float32)


def upsample(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of one (h, w) map to ``size`` = (H, W), float32."""
    import cv2  # here: the commands' start-up does not load OpenCV
    height, width = size
    return cv2.resize(np.asarray(cam, np.float32), (width, height),
                      interpolation=cv2.INTER_LINEAR)


def normalize(cam: np.ndarray) -> np.ndarray:
    """Min–max scale to [0, 1]; a constant map becomes all zeros."""
    cam = np.asarray(cam, np.float32)
    low, high = float(cam.min()), float(cam.max())
    if not high > low:                       # constant (or NaN) map
        return np.zeros_like(cam)
    return (cam - low) / (high - low)


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) scores, for nets that end at the FC layer."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
