"""Faithfulness of a saliency map: does the net's confidence follow the map?

For one image, one class c and its map (any method's, at any resolution):

- **Average Drop** and **Increase in Confidence** (Chattopadhay et al., WACV
  2018, *Grad-CAM++*): Y = p_c(image), O = p_c(image masked by the map),
  where the map is min–max normalised to m ∈ [0, 1] and the masked image is
  m·image + (1 − m)·substrate. Per image, drop = max(0, Y − O) / Y and
  increase = O > Y; over a set, Average Drop = 100·mean(drop) (%, lower is
  better) and Increase in Confidence = 100·mean(increase) (%, higher is better).
- **Deletion** and **Insertion** (Petsiuk et al., BMVC 2018, *RISE*): the
  pixels in decreasing order of the map (ties in raster order), in ``steps``
  equal steps. Deletion replaces them with the substrate, step by step;
  insertion starts from the substrate and puts them back. The curve is p_c
  after each step (steps + 1 points, from 0 to all pixels); its AUC is the
  trapezoid area over the fraction of pixels, in [0, 1]. Deletion: lower is
  better; insertion: higher is better.

Everything happens at the net's input resolution, on the preprocessed input
(after mean subtraction and scale). The **substrate** is either ``mean`` —
the net's mean pixel, which is zero there (RISE's deletion) — or ``blur`` —
the image under a Gaussian blur, 11×11 with σ = 5 (RISE's insertion). The
forwards of an image's 2·steps + 4 variants run in batches on the net's
backend.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from .api import CAMNet
from .cam import normalize, upsample

SUBSTRATES = ("mean", "blur")
DEFAULT_STEPS = 50
BLUR_KERNEL, BLUR_SIGMA = 11, 5.0        # RISE's insertion substrate


@dataclass
class Faithfulness:
    """One image's metrics for one class and map."""

    class_id: int
    prob: float                 # Y: p_c of the image
    masked_prob: float          # O: p_c of the image masked by the normalised map
    deletion: np.ndarray        # (steps + 1,) p_c as pixels are deleted
    insertion: np.ndarray       # (steps + 1,) p_c as pixels are inserted

    @property
    def drop(self) -> float:
        """max(0, Y − O) / Y, a fraction (0 when Y is 0)."""
        return max(0.0, self.prob - self.masked_prob) / self.prob if self.prob > 0 else 0.0

    @property
    def increase(self) -> bool:
        return self.masked_prob > self.prob

    @property
    def deletion_auc(self) -> float:
        return auc(self.deletion)

    @property
    def insertion_auc(self) -> float:
        return auc(self.insertion)

    def as_dict(self) -> dict:
        """JSON-ready, curves rounded to 6 decimals."""
        return {"class": self.class_id, "prob": round(self.prob, 6),
                "masked_prob": round(self.masked_prob, 6), "drop": round(self.drop, 6),
                "increase": self.increase, "deletion_auc": round(self.deletion_auc, 6),
                "insertion_auc": round(self.insertion_auc, 6),
                "deletion": [round(float(p), 6) for p in self.deletion],
                "insertion": [round(float(p), 6) for p in self.insertion]}


def auc(curve: np.ndarray) -> float:
    """Trapezoid area under ``curve`` sampled at equal steps over [0, 1]."""
    curve = np.asarray(curve, np.float64)
    return float((curve.sum() - (curve[0] + curve[-1]) / 2) / (len(curve) - 1))


def substrate(x: np.ndarray, kind: str) -> np.ndarray:
    """The substrate of a preprocessed (C, H, W) input: zeros (the mean) or its blur."""
    if kind == "mean":
        return np.zeros_like(x)
    if kind == "blur":
        hwc = np.ascontiguousarray(x.transpose(1, 2, 0))
        blurred = cv2.GaussianBlur(hwc, (BLUR_KERNEL, BLUR_KERNEL), BLUR_SIGMA,
                                   borderType=cv2.BORDER_REFLECT_101)
        return blurred.reshape(hwc.shape).transpose(2, 0, 1)
    raise ValueError(f"unknown substrate {kind!r}; choose from {', '.join(SUBSTRATES)}")


def variants(x: np.ndarray, cam: np.ndarray, steps: int, kind: str) -> np.ndarray:
    """The inputs to forward for one image: (2·steps + 4, C, H, W) float32 =
    the image, the masked image, the deletion steps, the insertion steps.

    ``x`` is the preprocessed (C, H, W) image, ``cam`` the map at (H, W).
    """
    _, height, width = x.shape
    base = substrate(x, kind)
    m = normalize(cam)
    n = height * width
    rank = np.empty(n, np.int64)
    rank[np.argsort(-m.ravel(), kind="stable")] = np.arange(n)
    counts = np.rint(np.arange(steps + 1) * n / steps).astype(np.int64)
    taken = (rank[None, :] < counts[:, None]).reshape(steps + 1, 1, height, width)
    deletion = np.where(taken, base, x)
    insertion = np.where(taken, x, base)
    masked = m * x + (1 - m) * base
    return np.concatenate([x[None], masked[None], deletion, insertion]).astype(np.float32)


def faithfulness(net: CAMNet, image: np.ndarray, class_id: int, cam: np.ndarray,
                 steps: int = DEFAULT_STEPS, kind: str = "mean",
                 batch_size: int = 16) -> Faithfulness:
    """The metrics of one BGR image, one class and its map (any size: upsampled
    bilinearly to the net's input)."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    x = net.preprocess([image])[0]
    inputs = variants(x, upsample(cam, net.input_size), steps, kind)
    probs = np.concatenate([net.backend.forward(inputs[i:i + batch_size]).probs[:, class_id]
                            for i in range(0, len(inputs), batch_size)]).astype(np.float64)
    return Faithfulness(class_id, float(probs[0]), float(probs[1]),
                        probs[2:steps + 3], probs[steps + 3:])


def summary(results: Sequence[Faithfulness]) -> dict[str, float]:
    """Average Drop and Increase in Confidence (%), mean deletion and insertion AUC."""
    return {"average_drop": 100 * float(np.mean([r.drop for r in results])),
            "increase_in_confidence": 100 * float(np.mean([r.increase for r in results])),
            "deletion_auc": float(np.mean([r.deletion_auc for r in results])),
            "insertion_auc": float(np.mean([r.insertion_auc for r in results]))}
