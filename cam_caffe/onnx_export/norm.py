"""Normalising layers: LRN, BatchNorm, Softmax."""
from __future__ import annotations

import numpy as np

from ..netdef import Layer, Shape
from .converter import Converter, Unsupported, converter, vjp


def lrn(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
        shapes: list[Shape]) -> None:
    p = layer.lrn_param
    if p.local_size % 2 == 0:
        raise Unsupported(f"local_size {p.local_size} must be odd (as in Caffe)")
    n, pad = p.local_size, (p.local_size - 1) // 2
    square = cv.node("Mul", [ins[0], ins[0]], name=layer.name + "/square")
    if p.norm_region == p.ACROSS_CHANNELS:
        # Caffe: x · (k + alpha · mean of x² over the n channels centred on c)^-beta.
        # The windowed channel sum is a 1×1 convolution with a banded C×C weight:
        # ONNX Runtime's own LRN kernel took a third of GoogLeNet's forward time
        # for 0.2% of its FLOPs (benchmarks/bench_forward.py, LRN table). k is
        # the convolution's bias (ORT does not fuse a scalar Add into a Conv).
        c = shapes[0][1]
        band = np.zeros((c, c, 1, 1), np.float32)
        for i in range(c):
            band[i, max(0, i - pad):i + pad + 1] = p.alpha / n
        cv.saved[layer.name, "band"] = cv.const(f"{layer.name}/band", band)
        shifted = cv.node("Conv", [square, cv.saved[layer.name, "band"],
                                   cv.const(f"{layer.name}/k", np.full(c, p.k))],
                          name=layer.name + "/window")
    else:
        # WITHIN_CHANNEL, as Caffe composes it: x · (1 + alpha · avgpool_n×n(x²))^-beta,
        # the average over the zero-padded n × n window (always n² cells); k is unused.
        mean = cv.node("AveragePool", [square], name=layer.name + "/pool",
                       kernel_shape=[n, n], strides=[1, 1], pads=[pad] * 4,
                       count_include_pad=1)
        scaled = cv.node("Mul", [mean, cv.const(f"{layer.name}/alpha", p.alpha)],
                         name=layer.name + "/alpha")
        shifted = cv.node("Add", [scaled, cv.const(f"{layer.name}/one", 1.0)],
                          name=layer.name + "/shift")
    if p.beta == 0.75:
        # s^-0.75 = 1 / (√s · √√s): two square roots are far cheaper than Pow
        root2 = cv.node("Sqrt", [shifted], name=layer.name + "/sqrt")
        root4 = cv.node("Sqrt", [root2], name=layer.name + "/sqrt2")
        denominator = cv.node("Mul", [root2, root4], name=layer.name + "/denominator")
        cv.node("Div", [ins[0], denominator], tops, layer.name)
        cv.saved[layer.name, "denominator"] = denominator
    else:
        power = cv.node("Pow", [shifted, cv.const(f"{layer.name}/beta", -p.beta)],
                        name=layer.name + "/pow")
        cv.node("Mul", [ins[0], power], tops, layer.name)
        cv.saved[layer.name, "power"] = power
    cv.saved[layer.name, "shifted"] = shifted


def lrn_vjp(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
            shapes: list[Shape], g: str) -> list[str | None]:
    """Caffe's: g · s^-β − (2αβ/n) · x · Σ_window(g · y / s),
    s = k + α/n Σ_window x² (across channels; within a channel the window is
    n × n and the sum's 1/n², as in the forward's average)."""
    p = layer.lrn_param
    x, y = ins[0], tops[0]
    shifted = cv.saved[layer.name, "shifted"]
    if (layer.name, "denominator") in cv.saved:
        direct = cv.grad_node(layer, "Div", [g, cv.saved[layer.name, "denominator"]])
    else:
        direct = cv.grad_node(layer, "Mul", [g, cv.saved[layer.name, "power"]])
    ratio = cv.grad_node(layer, "Div", [cv.grad_node(layer, "Mul", [g, y]), shifted])
    if p.norm_region == p.ACROSS_CHANNELS:
        window = cv.grad_node(layer, "Conv", [ratio, cv.saved[layer.name, "band"]])
        factor = 2 * p.beta                         # the band holds α/n
    else:
        pad = (p.local_size - 1) // 2
        window = cv.grad_node(layer, "AveragePool", [ratio], kernel_shape=[p.local_size] * 2,
                              strides=[1, 1], pads=[pad] * 4, count_include_pad=1)
        factor = 2 * p.alpha * p.beta
    cross = cv.grad_node(layer, "Mul", [x, cv.grad_node(layer, "Mul", [
        window, cv.const("factor", factor)])])
    return [cv.grad_node(layer, "Sub", [direct, cross])]


def _batchnorm_stats(cv: Converter, layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """Caffe's BatchNorm mean and variance: the stored ones divided by the stored
    scale factor (0 if the factor is 0, as Caffe does)."""
    blobs = cv.params(layer)
    if len(blobs) < 3:
        raise Unsupported(f"{len(blobs)} weight blobs, expected mean, variance, scale factor")
    factor = float(blobs[2].ravel()[0])
    factor = 0.0 if factor == 0 else 1.0 / factor
    return blobs[0].ravel() * factor, blobs[1].ravel() * factor


def batchnorm(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
              shapes: list[Shape]) -> None:
    p = layer.batch_norm_param
    if p.use_alpha_beta:
        raise Unsupported("use_alpha_beta")
    mean, var = _batchnorm_stats(cv, layer)
    c = mean.size
    cv.node("BatchNormalization",
            [ins[0], cv.const(f"{layer.name}/scale", np.ones(c)),
             cv.const(f"{layer.name}/bias", np.zeros(c)),
             cv.const(f"{layer.name}/mean", mean), cv.const(f"{layer.name}/var", var)],
            tops, layer.name, epsilon=p.eps)


def batchnorm_vjp(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
                  shapes: list[Shape], g: str) -> list[str | None]:
    _, var = _batchnorm_stats(cv, layer)
    scale = (1.0 / np.sqrt(var + layer.batch_norm_param.eps))
    scale = scale.reshape((-1,) + (1,) * (len(shapes[0]) - 2))
    return [cv.grad_node(layer, "Mul", [g, cv.const(f"{layer.name}/grad/scale", scale)])]


def softmax(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
            shapes: list[Shape]) -> None:
    cv.node("Softmax", ins, tops, layer.name, axis=layer.softmax_param.axis % len(shapes[0]))


def softmax_vjp(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
                shapes: list[Shape], g: str) -> list[str | None]:
    """y · (g − Σ_axis g·y)."""
    y = tops[0]
    axis = layer.softmax_param.axis % len(shapes[0])
    total = cv.grad_node(layer, "ReduceSum", [cv.grad_node(layer, "Mul", [g, y]),
                                              cv.const("axes", [axis], np.int64)], keepdims=1)
    return [cv.grad_node(layer, "Mul", [y, cv.grad_node(layer, "Sub", [g, total])])]


# Registered by calls, not decorators: mutmut (scripts/mutation.sh) does not mutate
# decorated functions.
converter("LRN")(lrn)
vjp("LRN")(lrn_vjp)
converter("BatchNorm")(batchnorm)
vjp("BatchNorm")(batchnorm_vjp)
converter("Softmax")(softmax)
vjp("Softmax")(softmax_vjp)
