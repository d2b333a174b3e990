"""Read a Caffe net definition and turn it into one deploy net every backend can run.

Accepts deploy and train/test prototxt files, in current (``layer``) or legacy
V1 (``layers``) syntax. The result is a V2 net with one ``Input`` layer, only
the TEST-phase layers, data layers replaced by that input and loss layers
replaced by a ``Softmax`` (or dropped), plus the blob shapes inferred for it.
"""
from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from . import proto
from .errors import ModelError
from .files import TEXT_LIMIT, read_limited

# Caffe's V1LayerParameter.LayerType enum names -> V2 type strings (upgrade_proto.cpp).
V1_TYPES = {
    "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
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
DATA_TYPES = {"Data", "ImageData", "HDF5Data", "MemoryData", "WindowData", "DummyData",
              "AnnotatedData", "VideoData", "Input"}
LOSS_TYPES = {"SoftmaxWithLoss", "Accuracy", "EuclideanLoss", "HingeLoss", "InfogainLoss",
              "SigmoidCrossEntropyLoss", "MultinomialLogisticLoss", "ContrastiveLoss",
              "MultiBoxLoss", "Silence", "HDF5Output"}
# Layers whose output has the shape of their (first) input.
ELEMENTWISE_TYPES = {"ReLU", "Sigmoid", "TanH", "AbsVal", "BNLL", "ELU", "PReLU", "Power",
                     "Exp", "Log", "Dropout", "BatchNorm", "BN", "Scale", "Bias", "LRN", "MVN",
                     "Threshold", "ReLU6", "HardSigmoid", "HardSwish", "Swish", "Softmax",
                     "Normalize", "Clip"}

Shape = tuple[int, ...]


@dataclass
class Transform:
    """Preprocessing declared by a data layer's ``transform_param``."""

    scale: float = 1.0
    mean_values: list[float] = field(default_factory=list)
    mean_file: str = ""


@dataclass
class NetDef:
    """A normalised deploy net and what is known about its blobs."""

    net: proto.NetParameter
    path: Path
    input_name: str
    input_shape: Shape                     # (1, C, H, W)
    shapes: dict[str, Shape | None]        # every blob's shape at batch 1 (None: unknown)
    producers: dict[str, str]              # blob -> name of the last layer that writes it
    transform: Transform | None = None     # from a data layer, if the file had one

    def layer(self, name: str) -> proto.LayerParameter:
        for layer in self.net.layer:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def consumers(self, blob: str) -> list[proto.LayerParameter]:
        """Layers that read ``blob`` and are not in-place ops on it."""
        return [l for l in self.net.layer if blob in l.bottom and blob not in l.top]

    def prototxt(self, batch: int = 1) -> str:
        """The net as prototxt text, with the input's batch size set to ``batch``."""
        net = proto.NetParameter()
        net.CopyFrom(self.net)
        net.layer[0].input_param.shape[0].dim[0] = batch
        return text_format.MessageToString(net)


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
        _upgrade_v1(net)
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


def load_netdef(path: str | Path, *, input_size: tuple[int, int] | None = None,
                allow_python_layers: bool = False) -> NetDef:
    """Read ``path`` and normalise it into a deploy NetDef (see module docstring).

    ``input_size`` (H, W) overrides the declared input size; it is required
    when a train/test file declares none and the net cannot tell (global pooling).
    """
    path = Path(path)
    net = read_prototxt(path)
    if net.layers:
        _upgrade_v1(net)
    _keep_test_phase(net)
    if not allow_python_layers:
        for layer in net.layer:
            if layer.type == "Python":
                raise ModelError(
                    f"{path}: layer '{layer.name}' is a Python layer, which would run code from "
                    "the model files; pass --allow-python-layers if you trust them")
    input_name, shape, transform = _take_input(net, path)
    _drop_losses(net)
    if input_size:
        shape = (1, shape[1], *input_size)
    if shape[2] <= 0 or shape[3] <= 0:
        shape = (1, shape[1], *_solve_input_size(net, path))
    if not all(0 < d < 1 << 63 for d in shape):
        raise ModelError(f"{path}: input shape {list(shape)}: every dimension must be "
                         "a positive 64-bit integer")
    deploy = _with_input(net, input_name, shape)
    try:
        shapes, producers = infer_shapes(deploy, path)
    except ModelError as error:
        fixed = _fixed_pooling(net)
        if fixed is None or fixed[0] == shape[2:]:
            raise
        (height, width), pool = fixed
        infer_shapes(_with_input(net, input_name, (*shape[:2], height, width)), path)
        raise ModelError(f"{error}: this net's fixed layers only take {height}x{width} inputs "
                         f"(pooling '{pool}' has a fixed window); use --input-size "
                         f"{height}x{width}") from None
    return NetDef(deploy, path, input_name, shape, shapes, producers, transform)


def _upgrade_v1(net: proto.NetParameter) -> None:
    """Convert legacy V1 ``layers`` into V2 ``layer`` messages, in place."""
    v1_enum = proto.V1LayerParameter.DESCRIPTOR.enum_types_by_name["LayerType"]
    v2_fields = proto.LayerParameter.DESCRIPTOR.fields_by_name
    for old in net.layers:
        new = net.layer.add()
        type_name = v1_enum.values_by_number[old.type].name
        new.type = V1_TYPES.get(type_name, type_name.title().replace("_", ""))
        for fd, value in old.ListFields():
            target = v2_fields.get(fd.name)
            if fd.name == "type" or target is None or target.type != fd.type or (
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


def _is_repeated(fd) -> bool:
    """FieldDescriptor.is_repeated (protobuf >= 5.29), or its older spelling."""
    if hasattr(fd, "is_repeated"):
        return fd.is_repeated
    return fd.label == fd.LABEL_REPEATED


def _rule_matches(rule, level: int = 0, stages: frozenset[str] = frozenset()) -> bool:
    """Caffe's StateMeetsRule for phase TEST."""
    if rule.HasField("phase") and rule.phase != proto.TEST:
        return False
    if rule.HasField("min_level") and level < rule.min_level:
        return False
    if rule.HasField("max_level") and level > rule.max_level:
        return False
    return all(s in stages for s in rule.stage) and not any(s in stages for s in rule.not_stage)


def _keep_test_phase(net: proto.NetParameter) -> None:
    kept = []
    for layer in net.layer:
        if layer.include:
            keep = any(_rule_matches(r) for r in layer.include)
        else:
            keep = not any(_rule_matches(r) for r in layer.exclude)
        if keep:
            kept.append(layer)
    _replace_layers(net, kept)


def _replace_layers(net: proto.NetParameter, layers: list) -> None:
    copies = [proto.LayerParameter.FromString(l.SerializeToString()) for l in layers]
    del net.layer[:]
    net.layer.extend(copies)


def _take_input(net: proto.NetParameter, path: Path) -> tuple[str, Shape, Transform | None]:
    """Find the net's image input, remove its declaration, return (name, shape, transform).

    The shape's H and W are 0 when the file does not say.
    """
    if net.input:
        name = net.input[0]
        if net.input_shape:
            dims = tuple(net.input_shape[0].dim)
        elif len(net.input_dim) >= 4:
            dims = tuple(net.input_dim[:4])
        else:
            raise ModelError(f"{path}: input '{name}' has no shape (input_dim or input_shape)")
        del net.input[:], net.input_dim[:], net.input_shape[:]
        return name, _shape4(dims, path), None
    data_layers = [l for l in net.layer if l.type in DATA_TYPES]
    if not data_layers:
        raise ModelError(f"{path}: the net declares no input (no 'input' field and no data layer)")
    layer = data_layers[0]
    name = layer.top[0]
    transform = None
    if layer.type == "Input":
        dims = tuple(layer.input_param.shape[0].dim) if layer.input_param.shape else ()
        shape = _shape4(dims, path)
    elif layer.type == "MemoryData":
        p = layer.memory_data_param
        shape = (1, p.channels, p.height, p.width)
    elif layer.type == "DummyData" and layer.dummy_data_param.shape:
        shape = _shape4(tuple(layer.dummy_data_param.shape[0].dim), path)
    else:
        tp = layer.transform_param
        size = tp.crop_size
        height = width = size
        if not size and layer.type == "ImageData":
            height, width = layer.image_data_param.new_height, layer.image_data_param.new_width
        shape = (1, 3, height, width)
        transform = Transform(tp.scale if tp.HasField("scale") else 1.0,
                              list(tp.mean_value), tp.mean_file)
    # Remove every data layer and the blobs they feed that nothing else produces (labels).
    _replace_layers(net, [l for l in net.layer if l.type not in DATA_TYPES])
    return name, shape, transform


def _shape4(dims: tuple, path: Path) -> Shape:
    if len(dims) != 4:
        raise ModelError(f"{path}: the input must be 4-D (N, C, H, W); found shape {list(dims)}")
    return (1, int(dims[1]), int(dims[2]), int(dims[3]))


def _drop_losses(net: proto.NetParameter) -> None:
    """Replace SoftmaxWithLoss by Softmax, drop other loss/accuracy layers."""
    kept = []
    taken = {n for l in net.layer if l.type not in LOSS_TYPES for n in [l.name, *l.top]}
    for layer in net.layer:
        if layer.type == "SoftmaxWithLoss":
            name = "prob" if "prob" not in taken else layer.name + "_prob"
            kept.append(proto.LayerParameter(name=name, type="Softmax",
                                             bottom=[layer.bottom[0]], top=[name]))
        elif layer.type not in LOSS_TYPES:
            kept.append(layer)
    _replace_layers(net, kept)


def _with_input(net: proto.NetParameter, name: str, shape: Shape,
                layer_name: str | None = None) -> proto.NetParameter:
    """A copy of ``net`` whose first layer is an Input layer of ``shape`` (top ``name``)."""
    out = proto.NetParameter(name=net.name)
    layer = out.layer.add(name=layer_name or name, type="Input", top=[name])
    layer.input_param.shape.add(dim=list(shape))
    out.layer.extend(net.layer)
    return out


def _solve_input_size(net: proto.NetParameter, path: Path) -> tuple[int, int]:
    """(H, W) for a net that declares no input size, from its fixed final pooling."""
    fixed = _fixed_pooling(net)
    if fixed is None:
        raise ModelError(f"{path}: the net does not declare its input size; "
                         "pass --input-size (e.g. 32 for CIFAR nets, 224 for ImageNet nets)")
    return fixed[0]


def _fixed_pooling(net: proto.NetParameter) -> tuple[tuple[int, int], str] | None:
    """The input size a net's last pooling, a fixed (not global) AVE window, was made
    for: its kernel times the total stride before it; with that layer's name."""
    pools = [l for l in net.layer if l.type == "Pooling"]
    stride_h = stride_w = 1
    for layer in net.layer:
        if layer.type in ("Convolution", "Pooling"):
            p = layer.convolution_param if layer.type == "Convolution" else layer.pooling_param
            if pools and layer is pools[-1] and layer.pooling_param.pool == p.AVE \
                    and not p.global_pooling:
                kh, kw = _pair(p, "kernel", 0)
                return (kh * stride_h, kw * stride_w), layer.name
            sh, sw = _pair(p, "stride", 1)
            stride_h, stride_w = stride_h * sh, stride_w * sw
    return None


def _pair(param, name: str, default: int) -> tuple[int, int]:
    """Caffe's (h, w) for kernel/stride/pad, given as one value or as _h/_w fields."""
    if param.HasField(f"{name}_h"):
        return getattr(param, f"{name}_h"), getattr(param, f"{name}_w")
    value = getattr(param, "kernel_size" if name == "kernel" else name)
    if isinstance(value, int):             # PoolingParameter: optional field with a default
        return value, value
    values = list(value) or [default]      # ConvolutionParameter: repeated field
    return values[0], values[-1]


def infer_shapes(net: proto.NetParameter, path: Path) -> tuple[dict[str, Shape | None], dict[str, str]]:
    """Blob shapes at batch 1 and each blob's last producer, following Caffe's layer rules.

    Layers of unknown type give unknown (None) shapes downstream. Inconsistent
    shapes (e.g. Concat of different sizes) raise ModelError naming the layer.
    """
    shapes: dict[str, Shape | None] = {}
    producers: dict[str, str] = {}
    for layer in net.layer:
        for b in layer.bottom:
            if b not in shapes:
                raise ModelError(f"{path}: layer '{layer.name}' reads blob '{b}', "
                                 "which no earlier layer produces")
        ins = [shapes[b] for b in layer.bottom]
        try:
            outs = _layer_shapes(layer, ins)
        except (ValueError, ZeroDivisionError, IndexError) as e:
            raise ModelError(f"{path}: layer '{layer.name}' ({layer.type}): {e}") from None
        for i, top in enumerate(layer.top):
            shapes[top] = outs[i] if i < len(outs) else None
            producers[top] = layer.name
    return shapes, producers


def _conv_out(size: int, kernel: int, pad: int, stride: int, dilation: int = 1) -> int:
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def _divide(a: int, b: int, up: bool) -> int:
    """a / b rounded up or down, in integers (exact for any size, unlike floats)."""
    return -(-a // b) if up else a // b


def _layer_shapes(layer, ins: list[Shape | None]) -> list[Shape | None]:
    t = layer.type
    if t == "Input":
        return [tuple(s.dim) for s in layer.input_param.shape]
    if any(s is None for s in ins):
        return [None] * len(layer.top)
    if t in ELEMENTWISE_TYPES or t == "Split":
        return [ins[0]] * len(layer.top)
    if t in ("Convolution", "Deconvolution"):
        p = layer.convolution_param
        n, c, h, w = ins[0]
        kh, kw = _pair(p, "kernel", 0)
        if kh <= 0 or kw <= 0:
            raise ValueError("kernel size not set")
        sh, sw = _pair(p, "stride", 1)
        ph, pw = _pair(p, "pad", 0)
        dil = list(p.dilation) or [1]
        dh, dw = dil[0], dil[-1]
        if c % p.group or p.num_output % p.group:
            raise ValueError(f"{c} input channels or {p.num_output} outputs "
                             f"not divisible by group {p.group}")
        if t == "Convolution":
            oh, ow = _conv_out(h, kh, ph, sh, dh), _conv_out(w, kw, pw, sw, dw)
        else:
            oh = sh * (h - 1) + dh * (kh - 1) + 1 - 2 * ph
            ow = sw * (w - 1) + dw * (kw - 1) + 1 - 2 * pw
        if oh <= 0 or ow <= 0:
            raise ValueError(f"input {h}x{w} is too small for this kernel")
        return [(n, p.num_output, oh, ow)]
    if t == "Pooling":
        p = layer.pooling_param
        n, c, h, w = ins[0]
        if p.global_pooling:
            return [(n, c, 1, 1)]
        kh, kw = _pair(p, "kernel", 0)
        sh, sw = _pair(p, "stride", 1)
        ph, pw = _pair(p, "pad", 0)
        oh = _divide(h + 2 * ph - kh, sh, p.ceil_mode) + 1    # Caffe rounds up
        ow = _divide(w + 2 * pw - kw, sw, p.ceil_mode) + 1
        if ph or pw:                       # the last window must start inside the image
            if (oh - 1) * sh >= h + ph:
                oh -= 1
            if (ow - 1) * sw >= w + pw:
                ow -= 1
        if oh <= 0 or ow <= 0 or kh > h + 2 * ph or kw > w + 2 * pw:
            raise ValueError(f"pooling kernel {kh}x{kw} is larger than its input {h}x{w}")
        return [(n, c, oh, ow)]
    if t == "InnerProduct":
        p = layer.inner_product_param
        axis = p.axis % len(ins[0])
        return [(*ins[0][:axis], p.num_output)]
    if t == "Concat":
        axis = (layer.concat_param.axis if layer.concat_param.HasField("axis")
                else layer.concat_param.concat_dim if layer.concat_param.HasField("concat_dim")
                else 1)
        axis %= len(ins[0])
        for s in ins[1:]:
            if len(s) != len(ins[0]) or any(a != b for i, (a, b) in enumerate(zip(s, ins[0]))
                                            if i != axis):
                raise ValueError(f"cannot concatenate shapes {list(ins[0])} and {list(s)}")
        return [(*ins[0][:axis], sum(s[axis] for s in ins), *ins[0][axis + 1:])]
    if t == "Eltwise":
        for s in ins[1:]:
            if s != ins[0]:
                raise ValueError(f"inputs of different shapes {list(ins[0])} and {list(s)}")
        return [ins[0]]
    if t == "Slice":
        p = layer.slice_param
        axis = (p.axis if not p.HasField("slice_dim") else p.slice_dim) % len(ins[0])
        size = ins[0][axis]
        points = list(p.slice_point) or [size * i // len(layer.top)
                                         for i in range(1, len(layer.top))]
        bounds = [0, *points, size]
        return [(*ins[0][:axis], b - a, *ins[0][axis + 1:]) for a, b in zip(bounds, bounds[1:])]
    if t == "Flatten":
        s = ins[0]
        axis = layer.flatten_param.axis % len(s)
        end = layer.flatten_param.end_axis % len(s)
        return [(*s[:axis], math.prod(s[axis:end + 1]), *s[end + 1:])]
    if t == "Reshape":
        return [_reshape(ins[0], layer.reshape_param)]
    return [None] * len(layer.top)


def _reshape(shape: Shape, p) -> Shape:
    axis = p.axis % (len(shape) + 1) if p.axis < 0 else p.axis
    end = len(shape) if p.num_axes == -1 else axis + p.num_axes
    dims = list(p.shape.dim)
    out = [shape[axis + i] if d == 0 else d for i, d in enumerate(dims)]
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        out[out.index(-1)] = math.prod(shape[axis:end]) // known
    return tuple(shape[:axis]) + tuple(out) + tuple(shape[end:])


def forward_bytes(netdef: NetDef, batch: int = 1) -> int:
    """Bytes a forward pass of ``batch`` inputs needs: every blob of known shape, once
    per name (in-place layers share theirs), times ``batch``, plus the learned
    parameters, all float32. Exact Python integers: absurd sizes cannot overflow.

    This is what pycaffe allocates for the data of its blobs and parameters
    (tests/test_model_limits.py); it is a floor for every backend (pycaffe adds im2col
    buffers, ONNX Runtime reuses blobs but adds workspace). ``cam_caffe.limits``
    checks it against the memory limit.
    """
    activations = sum(math.prod(shape) for shape in netdef.shapes.values() if shape)
    params = sum(math.prod(shape) for layer in netdef.net.layer
                 for shape in param_shapes(netdef, layer) or [])
    return 4 * (batch * activations + params)


def blob_shape(blob) -> Shape:
    """A BlobProto's shape; legacy 4-D num/channels/height/width when no shape is set."""
    if blob.HasField("shape"):
        return tuple(blob.shape.dim)
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return (blob.num, blob.channels, blob.height, blob.width)
    return ()            # a 0-axis (scalar) blob, e.g. a channel-shared PReLU slope


def param_shapes(netdef: NetDef, layer) -> list[Shape] | None:
    """The shapes Caffe gives a layer's learnable blobs, or None for unknown layer types."""
    bottom = netdef.shapes.get(layer.bottom[0]) if layer.bottom else None
    if bottom is None:
        return None
    t = layer.type
    if t in ("Convolution", "Deconvolution"):
        p = layer.convolution_param
        kh, kw = _pair(p, "kernel", 0)
        c = bottom[1]
        weights = ((p.num_output, c // p.group, kh, kw) if t == "Convolution"
                   else (c, p.num_output // p.group, kh, kw))
        return [weights, (p.num_output,)] if p.bias_term else [weights]
    if t == "InnerProduct":
        p = layer.inner_product_param
        fan_in = math.prod(bottom[p.axis % len(bottom):])
        weights = (fan_in, p.num_output) if p.transpose else (p.num_output, fan_in)
        return [weights, (p.num_output,)] if p.bias_term else [weights]
    if t == "BatchNorm":
        return [(bottom[1],), (bottom[1],), (1,)]
    if t in ("Scale", "Bias"):
        p = layer.scale_param if t == "Scale" else layer.bias_param
        if len(layer.bottom) == 2:         # factors from the second bottom: no learned factor
            factor = netdef.shapes.get(layer.bottom[1])
            return [factor] if t == "Scale" and p.bias_term and factor else []
        axis = p.axis % len(bottom)
        shape = bottom[axis:] if p.num_axes == -1 else bottom[axis:axis + p.num_axes]
        if t == "Scale" and p.bias_term:
            return [shape, shape]
        return [shape]
    if t == "PReLU":
        return [()] if layer.prelu_param.channel_shared else [(bottom[1],)]
    return None


def _same_shape(a: Shape, b: Shape) -> bool:
    """Equal up to leading 1s, as Caffe accepts legacy 4-D blob shapes."""
    def strip(s: Shape) -> Shape:
        s = tuple(s)
        while s and s[0] == 1:
            s = s[1:]
        return s
    return strip(a) == strip(b)


def check_weights(netdef: NetDef, weights: proto.NetParameter, weights_path: Path) -> None:
    """Fail clearly where Caffe would abort: blob counts or shapes that do not match.

    Caffe copies weights by layer name; a caffemodel that shares no layer with
    the prototxt is refused too (it belongs to another net).
    """
    stored = {l.name: l for l in weights.layer if l.blobs}
    learnable = [l for l in netdef.net.layer if param_shapes(netdef, l) or l.name in stored]
    matched = 0
    for layer in netdef.net.layer:
        source = stored.get(layer.name)
        if source is None:
            continue
        matched += 1
        expected = param_shapes(netdef, layer)
        if expected is None:
            continue
        found = [blob_shape(b) for b in source.blobs]
        if len(found) != len(expected):
            raise ModelError(
                f"{weights_path}: does not fit {netdef.path}: layer '{layer.name}' has "
                f"{len(found)} weight blobs, the prototxt needs {len(expected)}")
        for i, (f, e) in enumerate(zip(found, expected)):
            if not _same_shape(f, e):
                hint = _input_size_hint(netdef, layer.name, i, f)
                if hint:
                    raise ModelError(f"{weights_path}: {hint}")
                raise ModelError(
                    f"{weights_path}: does not fit {netdef.path}: layer '{layer.name}' blob {i} "
                    f"has shape {list(f)}, the prototxt needs {list(e)}")
            count = len(source.blobs[i].data) or len(source.blobs[i].double_data)
            if count != math.prod(e):
                raise ModelError(f"{weights_path}: layer '{layer.name}' blob {i} holds {count} "
                                 f"values, its shape {list(e)} needs {math.prod(e)}")
    if learnable and not matched:
        raise ModelError(f"{weights_path}: does not fit {netdef.path}: "
                         "no layer of the prototxt has weights in this caffemodel")


def stored_layers(weights: proto.NetParameter) -> dict[str, object]:
    """The caffemodel's layers that hold blobs, by name (Caffe copies weights by name)."""
    return {l.name: l for l in weights.layer if l.blobs}


def layer_blobs(netdef: NetDef, stored: dict[str, object], layer) -> list[np.ndarray]:
    """The blobs of ``layer`` (``stored``: from :func:`stored_layers`) as float32 arrays.

    They get the shapes Caffe gives the layer's parameters, so legacy 4-D blob
    shapes (``1 × 1 × out × in`` for an InnerProduct) come out right.
    """
    source = stored.get(layer.name)
    if source is None:
        raise ModelError(f"{netdef.path}: layer '{layer.name}' ({layer.type}) has no weights "
                         "in the caffemodel")
    expected = param_shapes(netdef, layer) or []
    arrays = []
    for i, b in enumerate(source.blobs):
        data = np.array(b.data if len(b.data) else b.double_data, np.float32)
        shape = expected[i] if i < len(expected) else blob_shape(b)
        if data.size != math.prod(shape):
            raise ModelError(f"layer '{layer.name}' blob {i} holds {data.size} values, "
                             f"its shape {list(shape)} needs {math.prod(shape)}")
        arrays.append(data.reshape(shape))
    return arrays


def tail(netdef: NetDef, blob: str, outputs: list[str]) -> NetDef:
    """The part of ``netdef`` after ``blob`` that ``outputs`` need, as a net whose input
    is ``blob`` (its value after any in-place layers, as the next layer reads it).

    Raises ModelError when those layers also read a blob computed before ``blob``
    that does not come from it (``blob`` does not cut the net there).
    """
    layers = list(netdef.net.layer)
    last = max(i for i, layer in enumerate(layers) if blob in layer.top)
    needed, kept = set(outputs), []
    for layer in reversed(layers[last + 1:]):
        if any(top in needed for top in layer.top):
            kept.append(layer)
            needed.difference_update(layer.top)
            needed.update(layer.bottom)
    needed.discard(blob)
    if needed:
        raise ModelError(
            f"{netdef.path}: the layers after blob '{blob}' also read blob "
            f"'{sorted(needed)[0]}', computed before it: choose a blob that every path to "
            "the class scores goes through")
    shape = netdef.shapes[blob]
    names = {layer.name for layer in layers}
    input_layer = next(f"{blob}/input{i or ''}" for i in range(len(names) + 1)
                       if f"{blob}/input{i or ''}" not in names)   # weights never match it
    net = _with_input(proto.NetParameter(name=netdef.net.name), blob, shape, input_layer)
    net.layer.extend(reversed(kept))
    shapes, producers = infer_shapes(net, netdef.path)
    return NetDef(net, netdef.path, blob, shape, shapes, producers)


def _input_size_hint(netdef: NetDef, layer: str, index: int, found: Shape) -> str | None:
    """When the input size is why blob ``index`` of ``layer`` does not fit (a fixed
    pooling made for another size): a message saying the size the net takes."""
    fixed = _fixed_pooling(netdef.net)
    if fixed is None or fixed[0] == netdef.input_shape[2:]:
        return None
    (height, width), pool = fixed
    net = proto.NetParameter()
    net.CopyFrom(netdef.net)
    dims = net.layer[0].input_param.shape[0].dim
    dims[2], dims[3] = height, width
    try:
        shapes, producers = infer_shapes(net, netdef.path)
    except ModelError:
        return None
    resized = NetDef(net, netdef.path, netdef.input_name, tuple(dims), shapes, producers)
    expected = param_shapes(resized, resized.layer(layer))
    if not expected or index >= len(expected) or not _same_shape(found, expected[index]):
        return None
    h, w = netdef.input_shape[2:]
    needed = param_shapes(netdef, netdef.layer(layer))[index]
    return (f"does not fit {netdef.path} at {h}x{w}: this net's fixed layers only take "
            f"{height}x{width} inputs (pooling '{pool}' has a fixed window; at {h}x{w}, "
            f"layer '{layer}' would need weights of shape {list(needed)}, the caffemodel's "
            f"are {list(found)}); use --input-size {height}x{width}")
