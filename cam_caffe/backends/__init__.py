"""Backends run the net. Each one, for a preprocessed batch, returns the class
probabilities and the CAM feature maps (what Caffe's feature blob holds), and
exposes the CAM weights (C × K).

- ``caffe``: pycaffe, CPU or CUDA (``--gpu``).
- ``opencv``: OpenCV's DNN module (``cv2.dnn.readNetFromCaffe``), pip-only.
- ``onnxruntime``: the net converted to ONNX, run by ONNX Runtime (CPU or CUDA).
- ``auto``: the fastest installed backend that can run the net (measured in
  ``benchmarks/``): ONNX Runtime, then OpenCV, then pycaffe; with ``--gpu``,
  pycaffe first (its CUDA build), then ONNX Runtime.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..camspec import CamSpec
from ..errors import BackendError, CamError
from ..netdef import CaffeModel, NetDef

BACKENDS = ("auto", "opencv", "caffe", "onnxruntime")


@dataclass
class Forward:
    """One batch's outputs."""

    probs: np.ndarray      # (N, C) float32, rows sum to 1; the caller's to keep
    # (N, K, h, w) float32; may be the backend's own buffer (pycaffe's blob),
    # valid until that backend's next forward: use it (CAMs) before then
    features: np.ndarray


class Backend(Protocol):
    """The narrow interface every backend implements."""

    name: str
    cam_weights: np.ndarray   # (C, K) float32

    def forward(self, batch: np.ndarray) -> Forward:
        """Run a (N, C, H, W) float32 batch."""


AUTO_ORDER = ("onnxruntime", "opencv", "caffe")
AUTO_ORDER_GPU = ("caffe", "onnxruntime")
_MODULES = {"caffe": "caffe", "onnxruntime": "onnxruntime", "opencv": "cv2"}


def cpu_threads() -> int:
    """Threads for a CPU forward pass: ``OMP_NUM_THREADS`` when it is a positive
    integer (a Dask worker's nanny sets 1: one worker process per core), else one
    per core."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else os.cpu_count() or 1


def installed(name: str) -> bool:
    """Whether backend ``name``'s library can be found (checked without importing it)."""
    return importlib.util.find_spec(_MODULES[name]) is not None


def create_backend(name: str, netdef: NetDef, weights: CaffeModel, spec: CamSpec,
                   gpu: int | None = None, verbose: bool = False) -> Backend:
    """Load the net into backend ``name``; ``auto`` takes the first of its order that works."""
    if name not in BACKENDS:
        raise BackendError(f"--backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name != "auto":
        return _create(name, netdef, weights, spec, gpu, verbose)
    candidates = [b for b in (AUTO_ORDER if gpu is None else AUTO_ORDER_GPU) if installed(b)]
    if not candidates:
        raise BackendError("no backend installed: pip install opencv-python-headless, "
                           "or run scripts/install_pycaffe.sh")
    for candidate in candidates:
        try:
            return _create(candidate, netdef, weights, spec, gpu, verbose)
        except CamError as error:      # e.g. a layer ONNX export does not support
            if candidate == candidates[-1]:
                raise
            if verbose:
                print(f"cam-caffe: backend {candidate} cannot run this net ({error}); "
                      "trying the next", file=sys.stderr)
    raise AssertionError("unreachable")


def _create(name: str, netdef: NetDef, weights: CaffeModel, spec: CamSpec, gpu: int | None,
            verbose: bool) -> Backend:
    if name == "caffe":
        from .caffe import CaffeBackend
        return CaffeBackend(netdef, weights, spec, gpu=gpu, verbose=verbose)
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend
        return OnnxRuntimeBackend(netdef, weights, spec, gpu=gpu)
    from .opencv import OpenCVBackend
    return OpenCVBackend(netdef, weights, spec, gpu=gpu)


def identity_or(weights: np.ndarray | None, spec: CamSpec) -> np.ndarray:
    """CAM weights as (C, K) float32; identity for nets without an FC layer."""
    if weights is None:
        return np.eye(spec.num_classes, dtype=np.float32)
    weights = np.asarray(weights, np.float32).reshape(weights.shape[0], -1)
    if weights.shape == (spec.channels, spec.num_classes) != (spec.num_classes, spec.channels):
        weights = weights.T                # InnerProduct with transpose: true
    return np.ascontiguousarray(weights)


def scores_to_probs(scores: np.ndarray, spec: CamSpec) -> np.ndarray:
    """(N, C) probabilities from the score blob (softmax applied if the net has none)."""
    from ..cam import softmax
    scores = np.asarray(scores, np.float32).reshape(scores.shape[0], -1)
    return scores.copy() if spec.softmax else softmax(scores)
