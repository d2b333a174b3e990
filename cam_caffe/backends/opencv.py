"""OpenCV DNN backend: ``cv2.dnn.readNetFromCaffe``; needs only pip packages.

OpenCV names outputs by layer, so the feature blob is read from the last
layer that writes it (with Caffe's in-place ReLU: ``CAM_relu``, not ``CAM_conv``).
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import cv2
import numpy as np
from google.protobuf import text_format

from .. import proto
from ..camspec import CamSpec
from ..errors import BackendError, ModelError
from ..netdef import CaffeModel, NetDef, blob_shape, hw_param, tail
from . import Forward, cpu_threads, no_gradients, rows, scores_to_probs


class OpenCVBackend:
    name = "opencv"

    def __init__(self, netdef: NetDef, weights: CaffeModel, spec: CamSpec,
                 gpu: int | None = None, verbose: bool = False,
                 threads: int | None = None) -> None:
        self.spec = spec
        self.netdef, self.weights, self.gpu, self.verbose = netdef, weights, gpu, verbose
        self.tail_net = None
        with _log(verbose):        # OpenCV logs [ERROR] lines before raising: ours say it
            self.net = _load(netdef, weights)
            if gpu is not None:
                if cv2.cuda.getCudaEnabledDeviceCount() <= gpu:
                    raise BackendError(f"--gpu {gpu}: this OpenCV has no CUDA device {gpu} "
                                       "(opencv-python-headless is CPU-only); "
                                       "use --backend caffe")
                cv2.cuda.setDevice(gpu)
                _on_cuda(self.net)
            cv2.setNumThreads(cpu_threads(threads))
            self.outputs = list(dict.fromkeys([spec.score_layer, spec.logit_layer,
                                               spec.feature_layer]))
            try:           # OpenCV creates layers lazily: fail now, not on the first image
                self.net.setInput(np.zeros(netdef.input_shape, np.float32))
                self.net.forward(self.outputs)
            except cv2.error as e:
                raise ModelError(f"{netdef.path}: OpenCV cannot run the net: {_reason(e)}",
                                 relayed=True) from None

    def forward(self, batch: np.ndarray) -> Forward:
        values = dict(zip(self.outputs, _run(self.net, batch, self.outputs), strict=True))
        spec = self.spec
        return Forward(scores_to_probs(values[spec.score_layer], spec),
                       rows(values[spec.logit_layer]),
                       np.array(values[spec.feature_layer], np.float32))

    def gradients(self, classes: np.ndarray) -> np.ndarray:
        raise no_gradients(self.name)

    def tail_logits(self, features: np.ndarray) -> np.ndarray:
        """The tail's logits: a second OpenCV net, from the target blob to the logits."""
        if self.tail_net is None:
            with _log(self.verbose):
                self.tail_net = _load(tail(self.netdef, self.spec.feature_blob,
                                           [self.spec.logit_blob]), self.weights)
            if self.gpu is not None:
                _on_cuda(self.tail_net)
        logits, = _run(self.tail_net, features, [self.spec.logit_layer])
        return rows(logits)


def _load(netdef: NetDef, weights: CaffeModel):
    prototxt, caffemodel = _for_opencv(netdef, weights)
    text = np.frombuffer(prototxt.encode(), np.uint8)
    model = np.frombuffer(caffemodel, np.uint8)
    try:
        return cv2.dnn.readNetFromCaffe(text, model)
    except cv2.error as e:
        raise ModelError(f"{weights.path}: OpenCV cannot load the net: {_reason(e)}",
                         relayed=True) from None


def _on_cuda(net) -> None:
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_CUDA)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CUDA)


def _run(net, batch: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    net.setInput(np.ascontiguousarray(batch, np.float32))
    try:
        return net.forward(outputs)
    except cv2.error as e:
        raise BackendError(f"OpenCV forward failed: {_reason(e)}", relayed=True) from None


def _for_opencv(netdef: NetDef, weights: CaffeModel) -> tuple[str, bytes]:
    """Prototxt text and caffemodel bytes, around two things OpenCV 4.x gets wrong.

    OpenCV ignores InnerProduct's ``transpose``: such weights are stored
    transposed back, with ``transpose: false``. It also ignores LRN's ``k``
    across channels (uses 1), and gives no output for a pooling kernel larger than
    its padded input: both refused rather than computed wrongly.
    """
    data = weights.data
    for layer in netdef.net.layer:
        if layer.type == "LRN" and layer.lrn_param.k != 1.0 \
                and layer.lrn_param.norm_region == layer.lrn_param.ACROSS_CHANNELS:
            raise ModelError(f"{netdef.path}: layer '{layer.name}': OpenCV's LRN ignores "
                             f"k={layer.lrn_param.k:g}; use --backend caffe or onnxruntime")
        if layer.type == "Pooling" and not layer.pooling_param.global_pooling:
            _pooling_fits(netdef, layer)
    transposed = {layer.name for layer in netdef.net.layer
                  if layer.type == "InnerProduct" and layer.inner_product_param.transpose}
    if not transposed:
        return netdef.prototxt(), data
    net = proto.NetParameter()
    net.CopyFrom(netdef.net)
    for layer in net.layer:
        if layer.name in transposed:
            layer.inner_product_param.transpose = False
    stored = proto.NetParameter()
    stored.CopyFrom(weights.net)                              # the shared parse stays as is
    for layer in stored.layer:
        if layer.name in transposed and layer.blobs:
            blob = layer.blobs[0]
            fan_in, outputs = blob_shape(blob)[-2:]          # stored as (K, C)
            matrix = np.array(blob.data, np.float32).reshape(fan_in, outputs).T
            blob.CopyFrom(proto.blob(matrix))
    return text_format.MessageToString(net), stored.SerializeToString()


def _pooling_fits(netdef: NetDef, layer: proto.LayerParameter) -> None:
    """Refuse a pooling kernel larger than its padded input: Caffe gives one window
    there (when the kernel is past it by less than the stride), OpenCV no output."""
    shape = netdef.shapes.get(layer.bottom[0])
    if shape is None:
        return
    (kh, kw), (ph, pw) = hw_param(layer.pooling_param, "kernel", 0), \
        hw_param(layer.pooling_param, "pad", 0)
    height, width = shape[2] + 2 * ph, shape[3] + 2 * pw
    if kh > height or kw > width:
        raise ModelError(f"{netdef.path}: layer '{layer.name}': OpenCV gives no output for a "
                         f"pooling kernel {kh}x{kw} larger than its padded input "
                         f"{height}x{width}; use --backend caffe or onnxruntime")


@contextmanager
def _log(verbose: bool) -> Iterator[None]:
    """OpenCV's own log silenced (unless ``verbose``) while the block runs."""
    logging = cv2.utils.logging
    level = logging.getLogLevel()
    logging.setLogLevel(level if verbose else logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        logging.setLogLevel(level)


def _reason(error: Exception) -> str:
    """OpenCV's message without its source location: "Can't create layer …"."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    match = re.search(r"error: \(-?\d+:[^)]*\) (.*?)(?: in function '[^']*')?$", text)
    return match.group(1) if match else text or type(error).__name__
