"""Shape inference: every blob's shape at batch 1 and each layer's learnable blob shapes,
following Caffe's layer rules (exact integers, so absurd sizes cannot overflow)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from .. import proto
from ..errors import ModelError
from .net import Layer, NetDef, Shape

# Layers whose output has the shape of their (first) input.
ELEMENTWISE_TYPES = {"ReLU", "Sigmoid", "TanH", "AbsVal", "BNLL", "ELU", "PReLU", "Power",
                     "Exp", "Log", "Dropout", "BatchNorm", "BN", "Scale", "Bias", "LRN", "MVN",
                     "Threshold", "ReLU6", "HardSigmoid", "HardSwish", "Swish", "Softmax",
                     "Normalize", "Clip"}


def hw_param(param: Any, name: str, default: int) -> tuple[int, int]:
    """Caffe's (h, w) of ``kernel``/``stride``/``pad`` in a Convolution or Pooling
    parameter message, given as one value or as ``_h``/``_w`` fields."""
    if param.HasField(f"{name}_h"):
        return getattr(param, f"{name}_h"), getattr(param, f"{name}_w")
    value = getattr(param, "kernel_size" if name == "kernel" else name)
    if isinstance(value, int):             # PoolingParameter: optional field with a default
        return value, value
    values = list(value) or [default]      # ConvolutionParameter: repeated field
    return values[0], values[-1]


def conv_output_size(size: int, kernel: int, pad: int, stride: int, dilation: int = 1) -> int:
    """A convolution's output length along one axis (Caffe rounds down)."""
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def pool_output_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool,
                     padded: bool) -> int:
    """Caffe's pooled output length along one axis: ``ceil((size + 2·pad − kernel) /
    stride) + 1`` (floor with ``ceil_mode: false``), one less when the layer pads
    (``padded``: along either axis) and the last window would start in the padding."""
    out = _divide(size + 2 * pad - kernel, stride, ceil_mode) + 1
    if padded and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _divide(a: int, b: int, up: bool) -> int:
    """a / b rounded up or down, in integers (exact for any size, unlike floats)."""
    return -(-a // b) if up else a // b


def infer_shapes(net: proto.NetParameter,
                 path: Path) -> tuple[dict[str, Shape | None], dict[str, str]]:
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
            outs = layer_shapes(layer, ins)
        except (ValueError, ZeroDivisionError, IndexError) as e:
            raise ModelError(f"{path}: layer '{layer.name}' ({layer.type}): {e}") from None
        for i, top in enumerate(layer.top):
            shapes[top] = outs[i] if i < len(outs) else None
            producers[top] = layer.name
    return shapes, producers


def layer_shapes(layer: Layer, ins: Sequence[Shape | None]) -> list[Shape | None]:
    """The shapes of ``layer``'s tops from its bottoms' (None: unknown), by Caffe's rules.

    Raises ValueError (or ZeroDivisionError, IndexError) for shapes Caffe would refuse.
    """
    if layer.type == "Input":
        return [tuple(s.dim) for s in layer.input_param.shape]
    known = [s for s in ins if s is not None]
    if len(known) < len(ins):
        return [None] * len(layer.top)
    return _known_shapes(layer, known)


def _known_shapes(layer: Layer, ins: list[Shape]) -> list[Shape | None]:
    t = layer.type
    if t in ELEMENTWISE_TYPES or t == "Split":
        return [ins[0]] * len(layer.top)
    if t in ("Convolution", "Deconvolution"):
        return [_conv_shape(layer, ins[0])]
    if t == "Pooling":
        return [_pool_shape(layer.pooling_param, ins[0])]
    if t == "InnerProduct":
        p = layer.inner_product_param
        axis = p.axis % len(ins[0])
        return [(*ins[0][:axis], p.num_output)]
    if t == "Concat":
        axis = concat_axis(layer.concat_param) % len(ins[0])
        for s in ins[1:]:
            if len(s) != len(ins[0]) or any(
                    a != b for i, (a, b) in enumerate(zip(s, ins[0], strict=True)) if i != axis):
                raise ValueError(f"cannot concatenate shapes {list(ins[0])} and {list(s)}")
        return [(*ins[0][:axis], sum(s[axis] for s in ins), *ins[0][axis + 1:])]
    if t == "Eltwise":
        if len(ins) < 2:
            raise ValueError(f"{len(ins)} input; Eltwise takes at least 2")
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
        return [(*ins[0][:axis], b - a, *ins[0][axis + 1:])
                for a, b in pairwise([0, *points, size])]
    if t == "Flatten":
        s = ins[0]
        axis = layer.flatten_param.axis % len(s)
        end = layer.flatten_param.end_axis % len(s)
        return [(*s[:axis], math.prod(s[axis:end + 1]), *s[end + 1:])]
    if t == "Reshape":
        return [_reshape(ins[0], layer.reshape_param)]
    return [None] * len(layer.top)


def concat_axis(p: Any) -> int:
    """A ConcatParameter's axis: ``axis``, else the legacy ``concat_dim`` (default 1)."""
    return int(p.axis) if p.HasField("axis") else int(p.concat_dim)


def _check_hw_fields(p: Any, pooling: bool) -> None:
    """Caffe's rules (CHECKs that abort it) for kernel, stride and pad given as one
    value or as ``_h``/``_w``: not both ways; Pooling needs ``_h`` and ``_w``
    together; a Convolution takes one value or one per spatial axis (two)."""
    for name in ("kernel", "stride", "pad"):
        field = "kernel_size" if name == "kernel" else name
        has_h, has_w = p.HasField(f"{name}_h"), p.HasField(f"{name}_w")
        one = p.HasField(field) if pooling else len(getattr(p, field)) > 0
        if one and (has_h or has_w):
            raise ValueError(f"{field} and {name}_h/{name}_w are both given")
        if pooling and has_h != has_w:
            raise ValueError(f"{name}_h and {name}_w must be given together")
        if not pooling and len(getattr(p, field)) > 2:
            raise ValueError(f"{field} has {len(getattr(p, field))} values for 2 spatial axes")
    if not pooling and len(p.dilation) > 2:
        raise ValueError(f"dilation has {len(p.dilation)} values for 2 spatial axes")


def _conv_shape(layer: Layer, shape: Shape) -> Shape:
    p = layer.convolution_param
    n, c, h, w = shape
    _check_hw_fields(p, pooling=False)
    kh, kw = hw_param(p, "kernel", 0)
    if kh <= 0 or kw <= 0:
        raise ValueError("kernel size not set")
    sh, sw = hw_param(p, "stride", 1)
    if sh <= 0 or sw <= 0:
        raise ValueError(f"stride {sh}x{sw}: it must be positive")
    ph, pw = hw_param(p, "pad", 0)
    dil = list(p.dilation) or [1]
    dh, dw = dil[0], dil[-1]
    if c % p.group or p.num_output % p.group:
        raise ValueError(f"{c} input channels or {p.num_output} outputs "
                         f"not divisible by group {p.group}")
    if layer.type == "Convolution":
        oh, ow = conv_output_size(h, kh, ph, sh, dh), conv_output_size(w, kw, pw, sw, dw)
    else:
        oh = sh * (h - 1) + dh * (kh - 1) + 1 - 2 * ph
        ow = sw * (w - 1) + dw * (kw - 1) + 1 - 2 * pw
    if oh <= 0 or ow <= 0:
        raise ValueError(f"input {h}x{w} is too small for this kernel")
    return (n, p.num_output, oh, ow)


def _pool_shape(p: Any, shape: Shape) -> Shape:
    n, c, h, w = shape
    _check_hw_fields(p, pooling=True)
    kh, kw = hw_param(p, "kernel", 0)
    sh, sw = hw_param(p, "stride", 1)
    ph, pw = hw_param(p, "pad", 0)
    if p.global_pooling:
        if p.HasField("kernel_size") or p.HasField("kernel_h"):
            raise ValueError("a global pooling takes no kernel size")
        if (ph, pw, sh, sw) != (0, 0, 1, 1):
            raise ValueError("a global pooling takes only pad 0 and stride 1")
        return (n, c, 1, 1)
    if kh <= 0 or kw <= 0:                      # not set: the fields' default is 0
        raise ValueError("kernel size not set")
    if sh <= 0 or sw <= 0:
        raise ValueError(f"stride {sh}x{sw}: it must be positive")
    if ph >= kh or pw >= kw:
        raise ValueError(f"pad {ph}x{pw} must be smaller than the kernel {kh}x{kw}")
    padded = bool(ph or pw)
    oh = pool_output_size(h, kh, sh, ph, p.ceil_mode, padded)
    ow = pool_output_size(w, kw, sw, pw, p.ceil_mode, padded)
    if oh <= 0 or ow <= 0:      # a kernel past the padded input by a stride or more
        raise ValueError(f"pooling kernel {kh}x{kw} is larger than its input {h}x{w}")
    return (n, c, oh, ow)


def _reshape(shape: Shape, p: Any) -> Shape:
    axis = p.axis if p.axis >= 0 else len(shape) + p.axis + 1     # as Caffe counts it
    if not 0 <= axis <= len(shape):
        raise ValueError(f"reshape axis {p.axis} is out of range for {len(shape)} axes")
    end = len(shape) if p.num_axes == -1 else axis + p.num_axes
    dims = list(p.shape.dim)
    out = [shape[axis + i] if d == 0 else d for i, d in enumerate(dims)]
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        out[out.index(-1)] = math.prod(shape[axis:end]) // known
    return tuple(shape[:axis]) + tuple(out) + tuple(shape[end:])


def param_shapes(netdef: NetDef, layer: Layer) -> list[Shape] | None:
    """The shapes Caffe gives a layer's learnable blobs, or None for unknown layer types."""
    bottom = netdef.shapes.get(layer.bottom[0]) if layer.bottom else None
    if bottom is None:
        return None
    t = layer.type
    if t in ("Convolution", "Deconvolution"):
        p = layer.convolution_param
        kh, kw = hw_param(p, "kernel", 0)
        c = bottom[1]
        weights: Shape = ((p.num_output, c // p.group, kh, kw) if t == "Convolution"
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
