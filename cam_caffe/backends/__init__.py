"""Backends run the net. Each one, for a preprocessed batch, returns the class
probabilities, the logits and the target blob's maps (what Caffe's blob holds),
and offers what the CAM methods build on (``cam_caffe.methods``): the logits
for given target-blob values (the net's tail), and, except OpenCV, the
gradients of given classes' logits at the target blob.

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


GRADIENT_BACKENDS = ("caffe", "onnxruntime")


@dataclass
class Forward:
    """One batch's outputs."""

    probs: np.ndarray      # (N, C) float32, rows sum to 1; the caller's to keep
    logits: np.ndarray     # (N, C) float32, the final Softmax's input (or the scores)
    # (N, K, h, w) float32; may be the backend's own buffer (pycaffe's blob),
    # valid until that backend's next forward: use it (CAMs) before then
    features: np.ndarray


class Backend(Protocol):
    """The narrow interface every backend implements."""

    name: str

    def forward(self, batch: np.ndarray) -> Forward:
        """Run a (N, C, H, W) float32 batch."""

    def gradients(self, classes: np.ndarray) -> np.ndarray:
        """∂logit_c/∂A, float32 (N, M, K, h, w), for ``classes`` (N, M) of each image of
        the last forward's batch, A the target blob as the next layer reads it."""

    def tail_logits(self, features: np.ndarray) -> np.ndarray:
        """Logits (B, C) of the net run from given target-blob values (B, K, h, w)."""


AUTO_ORDER = ("onnxruntime", "opencv", "caffe")
AUTO_ORDER_GPU = ("caffe", "onnxruntime")
_MODULES = {"caffe": "caffe", "onnxruntime": "onnxruntime", "opencv": "cv2"}


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: ``taskset``, cgroups)."""
    return len(os.sched_getaffinity(0))


def cpu_threads(threads: int | None = None) -> int:
    """Threads for a CPU forward pass: ``threads`` (``--threads``) if given, else
    ``OMP_NUM_THREADS`` when it is a positive integer (a Dask worker's nanny sets 1:
    one worker process per core), else one per usable core."""
    if threads:
        return threads
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else usable_cores()


def installed(name: str) -> bool:
    """Whether backend ``name``'s library can be found (checked without importing it)."""
    return importlib.util.find_spec(_MODULES[name]) is not None


def create_backend(name: str, netdef: NetDef, weights: CaffeModel, spec: CamSpec,
                   gpu: int | None = None, verbose: bool = False,
                   gradients: bool = False, threads: int | None = None) -> Backend:
    """Load the net into backend ``name``; ``auto`` takes the first of its order that works
    (of those that compute gradients, with ``gradients``). A CPU forward pass runs on
    ``cpu_threads(threads)`` threads.

    When no backend of ``auto`` can run the net, the error raised is the clearest
    one: cam-caffe's own diagnosis (an unsupported layer, named) before a message
    relayed from a library, else the preferred backend's.
    """
    if name not in BACKENDS:
        raise BackendError(f"--backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if gpu is not None and gpu < 0:
        raise CamError(f"--gpu {gpu}: a CUDA device ID is 0 or more")
    if name != "auto":
        return _create(name, netdef, weights, spec, gpu, verbose, gradients, threads)
    order = AUTO_ORDER if gpu is None else AUTO_ORDER_GPU
    candidates = [b for b in order if installed(b)
                  and (not gradients or b in GRADIENT_BACKENDS)]
    if not candidates and gradients:
        raise BackendError("gradient methods need ONNX Runtime or pycaffe, and neither is "
                           "installed: pip install 'cam-caffe[onnx]', or run "
                           "scripts/install_pycaffe.sh")
    if not candidates:
        raise BackendError("no backend installed: pip install opencv-python-headless, "
                           "or run scripts/install_pycaffe.sh")
    errors: list[CamError] = []
    for candidate in candidates:
        try:
            backend = _create(candidate, netdef, weights, spec, gpu, verbose, gradients,
                               threads)
        except CamError as error:      # e.g. a layer ONNX export does not support
            errors.append(error)
            if verbose:
                print(f"cam-caffe: backend auto: {candidate} cannot run this net ({error})",
                      file=sys.stderr)
            continue
        if verbose:
            skipped = [b for b in order if b not in candidates]
            why = (f"the {'first' if not errors else 'first working'} of "
                   f"{', '.join(order)}{' on a GPU' if gpu is not None else ''}"
                   + (f"; not installed{' or without gradients' if gradients else ''}: "
                      f"{', '.join(skipped)}" if skipped else ""))
            print(f"cam-caffe: backend auto: chose {candidate} ({why})", file=sys.stderr)
        return backend
    raise min(errors, key=lambda error: error.relayed)


def _create(name: str, netdef: NetDef, weights: CaffeModel, spec: CamSpec, gpu: int | None,
            verbose: bool, gradients: bool, threads: int | None) -> Backend:
    if name == "caffe":
        from .caffe import CaffeBackend
        return CaffeBackend(netdef, weights, spec, gpu=gpu, verbose=verbose, threads=threads)
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend
        return OnnxRuntimeBackend(netdef, weights, spec, gpu=gpu, gradients=gradients,
                                  verbose=verbose, threads=threads)
    if gradients:
        raise no_gradients(name)
    from .opencv import OpenCVBackend
    return OpenCVBackend(netdef, weights, spec, gpu=gpu, verbose=verbose, threads=threads)


def scores_to_probs(scores: np.ndarray, spec: CamSpec) -> np.ndarray:
    """(N, C) probabilities from the score blob (softmax applied if the net has none)."""
    from ..cam import softmax
    scores = rows(scores)
    return scores.copy() if spec.softmax else softmax(scores)


def rows(array: np.ndarray) -> np.ndarray:
    """(N, …) as (N, C) float32 (class scores of a Caffe blob N×C×1×1)."""
    return np.asarray(array, np.float32).reshape(array.shape[0], -1)


def one_hot(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, M) class ids → (M, N, C) float32 seeds: row i of seed m selects classes[i, m]."""
    n, m = classes.shape
    seeds = np.zeros((m, n, num_classes), np.float32)
    seeds[np.arange(m)[:, None], np.arange(n)[None, :], classes.T] = 1.0
    return seeds


def no_gradients(name: str) -> CamError:
    """The error of a backend without a backward pass (a usage error)."""
    return CamError(f"the {name} backend has no backward pass: gradient methods "
                    f"(gradcam, gradcam++, xgradcam, layercam) need --backend "
                    f"{' or '.join(GRADIENT_BACKENDS)}")
