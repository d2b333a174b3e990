"""The CAM methods: each one turns what a backend provides into maps (N, M, h, w).

Notation: A (N, K, h, w) is the target blob (``--feature-blob``) as the next
layer reads it; y_c the logit of class c (the final Softmax's input, or the
net's output if it has none); G = ∂y_c/∂A (N, M, K, h, w), one per mapped
class; Σ_k sums over channels and Σ_ij over positions. The maps are raw (not
normalised) at the blob's resolution; every method but ``cam`` ends with a
ReLU, as pytorch-grad-cam's methods do.

- ``cam``, Zhou et al. 2016: CAM_c = Σ_k w_ck A_k, w the FC weights of the
  global-average-pooling head (no ReLU: today's raw CAM).
- ``gradcam``, Selvaraju et al. 2017: α_k = mean_ij G_kij, ReLU(Σ_k α_k A_k).
- ``gradcam++``, Chattopadhay et al. 2018, under the exponential-logit
  assumption: a_kij = G² / (2 G² + (Σ_ij A_k) G³ + 1e-6) (0 where G = 0),
  w_k = Σ_ij a_kij ReLU(G_kij), ReLU(Σ_k w_k A_k).
- ``xgradcam``, Fu et al. 2020: w_k = Σ_ij G_kij A_kij / (Σ_ij A_kij + 1e-7),
  ReLU(Σ_k w_k A_k).
- ``layercam``, Jiang et al. 2021: ReLU(Σ_k ReLU(G_k) ⊙ A_k).
- ``scorecam``, Wang et al. 2020: M_k = A_k upsampled (bilinear) to the input
  and min–max scaled to [0, 1] (0 when constant); s_kc = y_c(x ⊙ M_k) for the
  preprocessed input x; w = softmax_k(s_kc); ReLU(Σ_k w_k A_k). K forwards.
- ``ablationcam``, Desai & Ramaswamy 2020: y_c^(k) the logit with A_k set to
  0 (the net run from the target blob on); w_k = (y_c − y_c^(k)) / y_c;
  ReLU(Σ_k w_k A_k). K forwards of the net's tail.
- ``eigencam``, Muhammad & Yeasin 2020: the projection of the centred
  (h·w, K) matrix of A on its first right-singular vector v (sign chosen so
  that the projection correlates positively with Σ_k A_k), ReLU; the same
  map for every class.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .cam import class_activation_maps, upsample
from .errors import CamError
from .progress import finish, progress_bar

GRADIENT_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam")
FORWARD_METHODS = ("scorecam", "ablationcam", "eigencam")
METHODS = ("cam", *GRADIENT_METHODS, *FORWARD_METHODS)


@dataclass
class Evidence:
    """What the methods may use, for one batch of N images and M classes each."""

    features: np.ndarray                              # A, (N, K, h, w) float32
    classes: np.ndarray                               # (N, M) class ids
    batch: np.ndarray                                 # the preprocessed input (N, 3, H, W)
    gradients: Callable[[], np.ndarray]               # () → G (N, M, K, h, w)
    forward_logits: Callable[[np.ndarray], np.ndarray]   # inputs (B, 3, H, W) → (B, C)
    tail_logits: Callable[[np.ndarray], np.ndarray]      # A values (B, K, h, w) → (B, C)
    logits: np.ndarray                                # (N, C) of the batch itself
    cam_weights: np.ndarray | None = None             # (C, K) of the CAM head
    batch_size: int = 16                              # rows per extra forward
    progress: bool = False                            # a progress bar for the K forwards


def parse_methods(text: str) -> tuple[str, ...]:
    """The methods a ``--method`` value names (one, or a comma list: each map of an
    image then comes once per method), checked: CamError for an unknown or
    repeated name."""
    names = tuple(name.strip() for name in text.split(","))
    for name in names:
        if name not in METHODS:
            raise CamError(f"--method {name!r}: choose one of {', '.join(METHODS)} "
                           "(or a comma list of them)")
    if len(set(names)) < len(names):
        raise CamError(f"--method {text!r}: a method named twice")
    return names


def compute(method: str, evidence: Evidence) -> np.ndarray:
    """Raw maps, float32 (N, M, h, w), of ``method`` (one of METHODS)."""
    return np.ascontiguousarray(_FUNCTIONS[method](evidence), np.float32)


def _weighted(weights: np.ndarray, features: np.ndarray) -> np.ndarray:
    """ReLU(Σ_k w_k A_k) for weights (N, M, K) and A (N, K, h, w)."""
    return np.maximum(np.einsum("nmk,nkhw->nmhw", weights, features), 0)


def cam(e: Evidence) -> np.ndarray:
    """CAM_c = Σ_k w_ck A_k (Zhou et al. 2016)."""
    assert e.cam_weights is not None, "CAM needs a GAP→FC head"   # chosen only for one
    return class_activation_maps(e.features, e.cam_weights, e.classes)


def gradcam(e: Evidence) -> np.ndarray:
    """ReLU(Σ_k α_k A_k), α_k = mean_ij ∂y_c/∂A_kij (Selvaraju et al. 2017)."""
    return _weighted(e.gradients().mean(axis=(3, 4)), e.features)


def gradcam_plus_plus(e: Evidence) -> np.ndarray:
    """ReLU(Σ_k w_k A_k), w_k = Σ_ij a_kij ReLU(G_kij),
    a = G² / (2 G² + (Σ_ij A_k) G³ + 1e-6), 0 where G = 0 (Chattopadhay et al. 2018)."""
    g = e.gradients().astype(np.float64)
    g2 = g * g
    total = e.features.sum(axis=(2, 3), dtype=np.float64)[:, None, :, None, None]
    alpha = np.where(g != 0, g2 / (2 * g2 + total * g2 * g + 1e-6), 0.0)
    return _weighted((alpha * np.maximum(g, 0)).sum(axis=(3, 4)), e.features)


def xgradcam(e: Evidence) -> np.ndarray:
    """ReLU(Σ_k w_k A_k), w_k = Σ_ij G_kij A_kij / (Σ_ij A_kij + 1e-7) (Fu et al. 2020)."""
    a = e.features[:, None]
    total = e.features.sum(axis=(2, 3))[:, None, :]
    return _weighted((e.gradients() * a).sum(axis=(3, 4)) / (total + 1e-7), e.features)


def layercam(e: Evidence) -> np.ndarray:
    """ReLU(Σ_k ReLU(G_k) ⊙ A_k) (Jiang et al. 2021)."""
    return np.maximum((np.maximum(e.gradients(), 0) * e.features[:, None]).sum(axis=2), 0)


def _channel_logits(e: Evidence, rows: Callable[[int, slice], np.ndarray],
                    run: Callable[[np.ndarray], np.ndarray], what: str) -> np.ndarray:
    """Logits (N, K, C) of K variants of each image, ``rows(i, ks)`` building the variants
    ks of image i, run ``batch_size`` at a time with a progress bar."""
    n, k = e.features.shape[:2]
    out = np.empty((n, k, e.logits.shape[1]), np.float32)
    bar = progress_bar(n * k, e.progress, "fwd", desc=what)
    for i in range(n):
        for start in range(0, k, e.batch_size):
            ks = slice(start, min(k, start + e.batch_size))
            out[i, ks] = run(rows(i, ks))
            bar.update(ks.stop - ks.start)
    finish(bar)
    return out


def _per_class(scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """scores (N, K, C) → (N, M, K) at each image's classes."""
    return np.take_along_axis(scores, classes[:, None, :], axis=2).transpose(0, 2, 1)


def scorecam(e: Evidence) -> np.ndarray:
    """ReLU(Σ_k w_k A_k), w = softmax_k y_c(x ⊙ M_k), M_k = min–max scaled upsampled A_k
    (Wang et al. 2020)."""
    features = np.array(e.features)          # a backend's buffer changes with each forward
    size = e.batch.shape[2:]

    def masked(i: int, ks: slice) -> np.ndarray:
        masks = np.stack([upsample(a, size) for a in features[i, ks]])
        low = masks.min(axis=(1, 2), keepdims=True)
        span = masks.max(axis=(1, 2), keepdims=True) - low
        masks = np.divide(masks - low, span, out=np.zeros_like(masks), where=span > 0)
        return e.batch[i][None] * masks[:, None]

    scores = _per_class(_channel_logits(e, masked, e.forward_logits, "masked forwards"),
                        e.classes).astype(np.float64)
    weights = np.exp(scores - scores.max(axis=2, keepdims=True))
    return _weighted(weights / weights.sum(axis=2, keepdims=True), features)


def ablationcam(e: Evidence) -> np.ndarray:
    """ReLU(Σ_k w_k A_k), w_k = (y_c − y_c^(k)) / y_c, y_c^(k) with A_k zeroed
    (Desai & Ramaswamy 2020)."""
    features = np.array(e.features)

    def ablated(i: int, ks: slice) -> np.ndarray:
        copies = np.repeat(features[i][None], ks.stop - ks.start, axis=0)
        copies[np.arange(len(copies)), np.arange(ks.start, ks.stop)] = 0
        return copies

    scores = _per_class(_channel_logits(e, ablated, e.tail_logits, "ablated forwards"),
                        e.classes).astype(np.float64)
    original = np.take_along_axis(e.logits, e.classes, axis=1)[:, :, None].astype(np.float64)
    return _weighted((original - scores) / original, features)


def eigencam(e: Evidence) -> np.ndarray:
    """ReLU of A projected on its first principal component (Muhammad & Yeasin 2020)."""
    n, k, h, w = e.features.shape
    maps = np.empty((n, h * w))
    for i in range(n):
        x = e.features[i].reshape(k, h * w).T.astype(np.float64)
        x -= x.mean(axis=0)
        v = np.linalg.svd(x, full_matrices=False)[2][0]
        projection = x @ v
        if projection @ e.features[i].sum(axis=0).ravel() < 0:
            projection = -projection
        maps[i] = projection
    maps = np.maximum(maps, 0).reshape(n, 1, h, w)
    return np.repeat(maps, e.classes.shape[1], axis=1)


_FUNCTIONS: dict[str, Callable[[Evidence], np.ndarray]] = {
    "cam": cam, "gradcam": gradcam, "gradcam++": gradcam_plus_plus, "xgradcam": xgradcam,
    "layercam": layercam, "scorecam": scorecam, "ablationcam": ablationcam,
    "eigencam": eigencam}
