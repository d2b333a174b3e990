"""Reading net files: prototxt text, binary caffemodels, legacy V1 layers."""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from .. import proto
from ..errors import ModelError
from ..files import TEXT_LIMIT, read_limited

# Caffe's V1LayerParameter.LayerType enum names -> V2 type strings (upgrade_proto.cpp's
# UpgradeV1LayerType: every value of the enum; NONE has no type).
V1_TYPES = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise",
    "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col", "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU",
    "SIGMOID": "Sigmoid", "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss",
    "SILENCE": "Silence", "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH", "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
}
DIGEST_PIECE = 8 << 20


def read_prototxt(path: str | Path) -> proto.NetParameter:
    """Parse a prototxt file; errors name the file and line."""
    path = Path(path)
    text = _read_text(path, "prototxt")
    net = proto.NetParameter()
    try:
        text_format.Parse(text, net)
    except text_format.ParseError as e:
        raise ModelError(f"{path}: not a valid Caffe prototxt: {e}") from None
    if not net.layer and not net.layers:
        raise ModelError(f"{path}: the prototxt defines no layers")
    if net.layer and net.layers:
        raise ModelError(f"{path}: mixes V1 'layers' and V2 'layer' definitions")
    return net


class CaffeModel:
    """A caffemodel file, read and parsed at most once: the weight check and the
    backend share it (its digest keys the ONNX cache, its layers give CAM weights)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @cached_property
    def data(self) -> bytes:
        """The file's bytes."""
        return read_bytes(self.path, "caffemodel")

    @cached_property
    def net(self) -> proto.NetParameter:
        """The parsed V2 NetParameter (don't modify it: it is shared)."""
        return _parse_caffemodel(self.data, self.path)

    @cached_property
    def digest(self) -> str:
        """SHA-256 (hex) over the SHA-256s of the file's 8 MiB pieces, hashed on all
        cores: hashlib releases the GIL (33 MB: 28 ms on one core, 15 on two)."""
        view = memoryview(self.data)
        pieces = [view[i:i + DIGEST_PIECE] for i in range(0, len(view), DIGEST_PIECE)]
        with ThreadPoolExecutor(min(len(pieces), os.cpu_count() or 1)) as pool:
            hashes = pool.map(lambda piece: hashlib.sha256(piece).digest(), pieces)
            return hashlib.sha256(b"".join(hashes)).hexdigest()


def read_caffemodel(path: str | Path) -> proto.NetParameter:
    """Parse a binary caffemodel (V1 or V2) into a V2 NetParameter."""
    return CaffeModel(path).net


def _parse_caffemodel(data: bytes, path: Path) -> proto.NetParameter:
    net = proto.NetParameter()
    try:
        net.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelError(f"{path}: not a Caffe caffemodel (truncated or corrupt?): {e}") from None
    if not net.layer and not net.layers:
        raise ModelError(f"{path}: not a Caffe caffemodel: it holds no layers")
    if net.layers:
        upgrade_v1(net)
    return net


def read_bytes(path: Path, what: str) -> bytes:
    """Read a whole file, turning OS errors into a one-line ModelError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise ModelError(f"{path}: is a directory, expected a {what} file") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read {what} file: {e.strerror}") from None
    if not data:
        raise ModelError(f"{path}: {what} file is empty")
    return data


def _read_text(path: Path, what: str) -> str:
    """A text file (or pipe) of at most TEXT_LIMIT bytes, as one-line ModelErrors."""
    data = read_limited(path, f"{what} file", TEXT_LIMIT, ModelError)
    if not data:
        raise ModelError(f"{path}: {what} file is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelError(f"{path}: not a text {what} file") from None


def upgrade_v1(net: proto.NetParameter) -> None:
    """Convert legacy V1 ``layers`` into V2 ``layer`` messages, in place."""
    v1_enum = proto.V1LayerParameter.DESCRIPTOR.enum_types_by_name["LayerType"]
    v2_fields = proto.LayerParameter.DESCRIPTOR.fields_by_name
    for old in net.layers:
        new = net.layer.add()
        type_name = v1_enum.values_by_number[old.type].name
        new.type = V1_TYPES[type_name]
        for fd, value in old.ListFields():
            target = v2_fields.get(fd.name)
            if target is None or target.type != fd.type or (
                    fd.message_type is not None
                    and target.message_type.full_name != fd.message_type.full_name):
                continue
            if _is_repeated(fd):
                getattr(new, fd.name).extend(value)
            elif fd.message_type is not None:
                getattr(new, fd.name).CopyFrom(value)
            else:
                setattr(new, fd.name, value)
    del net.layers[:]


def _is_repeated(fd: FieldDescriptor) -> bool:
    """FieldDescriptor.is_repeated (protobuf >= 5.29), or its older spelling."""
    if hasattr(fd, "is_repeated"):
        return bool(fd.is_repeated)
    return bool(fd.label == fd.LABEL_REPEATED)  # type: ignore[attr-defined]  # protobuf < 5.29
