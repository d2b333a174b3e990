"""Pooling, as Caffe computes it (output size, padding, average divisor)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..netdef import Layer, Shape, hw_param, pool_output_size
from .converter import Converter, Unsupported, converter, vjp


@dataclass(frozen=True)
class PoolWindows:
    """A pooling layer's windows along (H, W), as ONNX pools them with floor rounding."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]       # Caffe's padding, at the top and left
    out: tuple[int, int]       # Caffe's output size
    end: tuple[int, int]       # padding at the bottom and right that yields ``out``

    def attrs(self) -> dict[str, list[int]]:
        """ONNX MaxPool/AveragePool attributes for these windows."""
        return {"kernel_shape": list(self.kernel), "strides": list(self.stride),
                "pads": [*self.pad, *self.end]}


def pool_windows(p: Any, shape: Shape) -> PoolWindows:
    """The windows of a PoolingParameter ``p`` over an input of ``shape`` (N, C, H, W);
    a global pooling is one window of the whole input.

    Caffe's output size (``pool_output_size``) is floor((size + pad + end − kernel)
    / stride) + 1 with ``end`` = max(0, (out − 1)·stride + kernel − size − pad): the
    last window ends at the padded edge when it crosses it, and otherwise the floor
    cannot give more windows (Caffe's rule drops any that would start past it).
    """
    size = shape[2], shape[3]
    if p.global_pooling:
        kernel, stride, pad = size, (1, 1), (0, 0)
    else:
        kernel, stride, pad = (hw_param(p, "kernel", 0), hw_param(p, "stride", 1),
                               hw_param(p, "pad", 0))
    padded = any(pad)
    out = tuple(pool_output_size(n, k, s, q, p.ceil_mode, padded)
                for n, k, s, q in zip(size, kernel, stride, pad, strict=True))
    end = tuple(max(0, (o - 1) * s + k - n - q)
                for n, k, s, q, o in zip(size, kernel, stride, pad, out, strict=True))
    return PoolWindows(kernel, stride, pad, (out[0], out[1]), (end[0], end[1]))


def _ave_ratio(size: int, kernel: int, stride: int, pad: int, out: int) -> np.ndarray:
    """kernel / Caffe's AVE divisor for each output position along one axis."""
    starts = np.arange(out) * stride - pad
    return kernel / (np.minimum(starts + kernel, size + pad) - starts)


def _ave_ratios(windows: PoolWindows, shape: Shape) -> np.ndarray:
    """kernel area / Caffe's AVE divisor at each output position, (out_h, out_w)."""
    return np.outer(*(_ave_ratio(n, k, s, q, o) for n, k, s, q, o in zip(
        shape[2:], windows.kernel, windows.stride, windows.pad, windows.out, strict=True)))


def pooling(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
            shapes: list[Shape]) -> None:
    """Caffe's pooling, exactly.

    Output size: ``ceil((H + 2p - k) / s) + 1`` (floor with ``ceil_mode:
    false``), one less when the last window would start in the bottom/right
    padding. Caffe's MAX takes the window clipped to the image; its AVE
    sums the window clipped to the image and divides by the window clipped
    to the *padded* image, ``min(start + k, H + p) - start``.

    ONNX's ceil_mode and its divisor at the right edge differ between opset
    versions and runtimes, so no ceil_mode is used: the end padding is
    given explicitly so that floor rounding yields Caffe's size
    (:func:`pool_windows`), AVE runs with count_include_pad (every window then
    covers k × k cells) and is multiplied by a constant k·k / Caffe's divisor
    where the two differ.
    """
    p = layer.pooling_param
    if p.pool not in (p.MAX, p.AVE):
        raise Unsupported("only MAX and AVE pooling")
    if p.global_pooling:
        op = "GlobalMaxPool" if p.pool == p.MAX else "GlobalAveragePool"
        cv.node(op, ins[:1], tops[:1], layer.name)
        return
    windows = pool_windows(p, shapes[0])
    for axis, end, kernel, stride in zip("HW", windows.end, windows.kernel, windows.stride,
                                         strict=True):
        if end >= kernel:
            raise Unsupported(f"its last window along {axis} lies wholly outside the input "
                              f"(stride {stride} > kernel {kernel}), where Caffe's MAX gives "
                              "-FLT_MAX and its AVE 0 or NaN")
    ratio = None
    if p.pool == p.AVE:
        ratio = _ave_ratios(windows, shapes[0])
        if np.all(ratio == 1.0):
            ratio = None
    out = tops[:1] if ratio is None else None
    if p.pool == p.MAX:
        pooled = cv.node("MaxPool", ins[:1], out, layer.name, **windows.attrs())
    else:
        pooled = cv.node("AveragePool", ins[:1], out, layer.name, count_include_pad=1,
                         **windows.attrs())
    if ratio is not None:
        cv.node("Mul", [pooled, cv.const(f"{layer.name}/divisor",
                                         ratio.reshape(1, 1, *windows.out))],
                tops[:1], layer.name + "/divisor")


def pooling_vjp(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
                shapes: list[Shape], g: str) -> list[str | None]:
    """MAX: the gradient added at each window's first maximum (ONNX MaxPool's
    indices, scattered with ScatterElements' add). AVE: each output's gradient
    times its window's 1 / Caffe's divisor, spread over the window by a transposed
    depthwise convolution of ones."""
    p = layer.pooling_param
    _n, c, hgt, wid = shapes[0]
    windows = pool_windows(p, shapes[0])
    if p.pool == p.MAX:
        indices = cv.fresh(f"{layer.name}/grad/indices")
        cv.node("MaxPool", [ins[0]], [cv.fresh(f"{layer.name}/grad/max"), indices],
                f"{layer.name}/grad/MaxPool", **windows.attrs())
        flat = cv.const("flat", [-1], np.int64)
        zeros = cv.grad_node(layer, "ConstantOfShape", [cv.grad_node(layer, "Shape", [
            cv.grad_node(layer, "Reshape", [ins[0], flat])])])
        scattered = cv.grad_node(layer, "ScatterElements", [
            zeros, cv.grad_node(layer, "Reshape", [indices, flat]),
            cv.grad_node(layer, "Reshape", [g, flat])], axis=0, reduction="add")
        return [cv.reshape_like(layer, scattered, ins[0])]
    (kh, kw), (sh, sw), (ph, pw) = windows.kernel, windows.stride, windows.pad
    (oh, ow), (end_h, end_w) = windows.out, windows.end
    ratio = _ave_ratios(windows, shapes[0])
    weighted = cv.grad_node(layer, "Mul", [g, cv.const(
        f"{layer.name}/grad/divisor", (ratio / (kh * kw)).reshape(1, 1, oh, ow))])
    back = cv.grad_node(layer, "ConvTranspose", [weighted, cv.const(
        f"{layer.name}/grad/window", np.ones((c, 1, kh, kw)))], group=c, **windows.attrs())
    return [cv.pad_end(layer, back, hgt - (sh * (oh - 1) + kh - ph - end_h),
                       wid - (sw * (ow - 1) + kw - pw - end_w))]


# Registered by calls, not decorators: mutmut (scripts/mutation.sh) does not mutate
# decorated functions.
converter("Pooling")(pooling)
vjp("Pooling")(pooling_vjp)
