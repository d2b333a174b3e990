"""OpenCV DNN backend: ``cv2.dnn.readNetFromCaffe``; needs only pip packages.

OpenCV names outputs by layer, so the feature blob is read from the last
layer that writes it (with Caffe's in-place ReLU: ``CAM_relu``, not ``CAM_conv``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import cv2
import numpy as np

from ..camspec import CamSpec
from ..errors import BackendError, ModelError
from ..netdef import NetDef, read_bytes
from . import Forward, identity_or, scores_to_probs


class OpenCVBackend:
    name = "opencv"

    def __init__(self, netdef: NetDef, weights: Path, spec: CamSpec,
                 gpu: int | None = None) -> None:
        self.spec = spec
        model = np.frombuffer(read_bytes(Path(weights), "caffemodel"), np.uint8)
        text = np.frombuffer(netdef.prototxt().encode(), np.uint8)
        try:
            self.net = cv2.dnn.readNetFromCaffe(text, model)
        except cv2.error as e:
            raise ModelError(f"{weights}: OpenCV cannot load the net: {_reason(e)}") from None
        if gpu is not None:
            if cv2.cuda.getCudaEnabledDeviceCount() <= gpu:
                raise BackendError(f"--gpu {gpu}: this OpenCV has no CUDA device {gpu} "
                                   "(opencv-python-headless is CPU-only); use --backend caffe")
            cv2.cuda.setDevice(gpu)
            self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_CUDA)
            self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CUDA)
        cv2.setNumThreads(os.cpu_count() or 1)
        self.outputs = [spec.score_layer, spec.feature_layer]
        try:               # OpenCV creates layers lazily: fail now, not on the first image
            self.net.setInput(np.zeros(netdef.input_shape, np.float32))
            self.net.forward(self.outputs)
        except cv2.error as e:
            raise ModelError(f"{netdef.path}: OpenCV cannot run the net: {_reason(e)}") from None
        fc = self.net.getParam(spec.fc_layer, 0) if spec.fc_layer else None
        self.cam_weights = identity_or(fc, spec)

    def forward(self, batch: np.ndarray) -> Forward:
        self.net.setInput(np.ascontiguousarray(batch, np.float32))
        try:
            scores, features = self.net.forward(self.outputs)
        except cv2.error as e:
            raise BackendError(f"OpenCV forward failed: {_reason(e)}") from None
        return Forward(scores_to_probs(scores, self.spec), np.array(features, np.float32))


def _reason(error: Exception) -> str:
    """OpenCV's message without its source location: "Can't create layer …"."""
    text = " ".join(l.strip() for l in str(error).splitlines() if l.strip())
    match = re.search(r"error: \(-?\d+:[^)]*\) (.*?)(?: in function '[^']*')?$", text)
    return match.group(1) if match else text or type(error).__name__
