"""Layers with learned weights applied linearly: Convolution, Deconvolution, InnerProduct."""
from __future__ import annotations

import numpy as np

from ..netdef import Layer, Shape, conv_output_size, hw_param
from .converter import Converter, Unsupported, converter, vjp


def convolution(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
                shapes: list[Shape]) -> None:
    p = layer.convolution_param
    if p.axis != 1:
        raise Unsupported(f"axis {p.axis} (only 1)")
    if p.width_group != 1 or p.height_group != 1:
        raise Unsupported("width_group/height_group")
    kh, kw = hw_param(p, "kernel", 0)
    sh, sw = hw_param(p, "stride", 1)
    ph, pw = hw_param(p, "pad", 0)
    dil = list(p.dilation) or [1]
    blobs = cv.params(layer)
    inputs = [ins[0], cv.const(f"{layer.name}/weight", blobs[0])]
    cv.saved[layer.name, "weight"] = inputs[1]
    if p.bias_term:
        inputs.append(cv.const(f"{layer.name}/bias", blobs[1]))
    op = "Conv" if layer.type == "Convolution" else "ConvTranspose"
    cv.node(op, inputs, tops, layer.name, kernel_shape=[kh, kw], strides=[sh, sw],
            pads=[ph, pw, ph, pw], dilations=[dil[0], dil[-1]], group=p.group)


def convolution_vjp(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
                    shapes: list[Shape], g: str) -> list[str | None]:
    """The transposed convolution with the same weights, padded back to H × W."""
    p = layer.convolution_param
    (kh, kw), (sh, sw), (ph, pw) = (hw_param(p, "kernel", 0), hw_param(p, "stride", 1),
                                    hw_param(p, "pad", 0))
    dil = list(p.dilation) or [1]
    dh, dw = dil[0], dil[-1]
    _, _, hgt, wid = shapes[0]
    oh = conv_output_size(hgt, kh, ph, sh, dh)
    ow = conv_output_size(wid, kw, pw, sw, dw)
    back = cv.grad_node(layer, "ConvTranspose", [g, cv.saved[layer.name, "weight"]],
                        kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw],
                        dilations=[dh, dw], group=p.group)
    return [cv.pad_end(layer, back, hgt - (sh * (oh - 1) + dh * (kh - 1) + 1 - 2 * ph),
                       wid - (sw * (ow - 1) + dw * (kw - 1) + 1 - 2 * pw))]


def inner_product(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
                  shapes: list[Shape]) -> None:
    p = layer.inner_product_param
    blobs = cv.params(layer)
    axis = p.axis % len(shapes[0])
    weight = blobs[0]                 # (out, in), or (in, out) with transpose
    bias = blobs[1] if p.bias_term else None
    if axis == 1:
        flat = ins[0]
        if len(shapes[0]) != 2:
            flat = cv.node("Flatten", ins[:1], name=layer.name + "/flatten", axis=1)
        inputs = [flat, cv.const(f"{layer.name}/weight", weight)]
        cv.saved[layer.name, "weight"] = inputs[1]
        if bias is not None:
            inputs.append(cv.const(f"{layer.name}/bias", bias))
        cv.node("Gemm", inputs, tops, layer.name, transB=0 if p.transpose else 1)
        return
    # Other axes: keep the leading dims, lump the rest, then a MatMul.
    target = [0] * axis + [-1]
    flat = cv.node("Reshape", [ins[0], cv.const("shape", target, np.int64)],
                   name=layer.name + "/flatten")
    matrix = weight if p.transpose else weight.T
    out = cv.node("MatMul", [flat, cv.const(f"{layer.name}/weight", matrix)],
                  None if bias is not None else tops, layer.name)
    if bias is not None:
        cv.node("Add", [out, cv.const(f"{layer.name}/bias", bias)], tops, layer.name)


def inner_product_vjp(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
                      shapes: list[Shape], g: str) -> list[str | None]:
    p = layer.inner_product_param
    if p.axis % len(shapes[0]) != 1:
        raise Unsupported(f"axis {p.axis}")
    flat = cv.grad_node(layer, "Gemm", [g, cv.saved[layer.name, "weight"]],
                        transB=1 if p.transpose else 0)
    return [cv.reshape_like(layer, flat, ins[0]) if len(shapes[0]) != 2 else flat]


# Registered by calls, not decorators: mutmut (scripts/mutation.sh) does not mutate
# decorated functions.
converter("Convolution", "Deconvolution")(convolution)
vjp("Convolution")(convolution_vjp)
converter("InnerProduct")(inner_product)
vjp("InnerProduct")(inner_product_vjp)
