"""Elementwise layers: activations, Power, Dropout, Eltwise, and Scale/Bias broadcasts."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..netdef import Layer, Shape
from .converter import Converter, Unsupported, converter, vjp

# Caffe types that are one ONNX operator on the same inputs (BNLL: log(1 + e^x)).
SAME_AS = {"Sigmoid": "Sigmoid", "TanH": "Tanh", "AbsVal": "Abs", "BNLL": "Softplus"}


def same_as(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
            shapes: list[Shape]) -> None:
    cv.node(SAME_AS[layer.type], ins, tops, layer.name)


def relu(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
         shapes: list[Shape]) -> None:
    slope = layer.relu_param.negative_slope
    if slope:
        cv.node("LeakyRelu", ins, tops, layer.name, alpha=slope)
    else:
        cv.node("Relu", ins, tops, layer.name)


def relu_vjp(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
             shapes: list[Shape], g: str) -> list[str | None]:
    """Caffe's: g · (x > 0) + slope · g · (x ≤ 0)."""
    slope = layer.relu_param.negative_slope
    positive = cv.grad_node(layer, "Greater", [ins[0], cv.const("zero", 0.0)])
    other = cv.grad_node(layer, "Mul", [g, cv.const("slope", slope)]) if slope \
        else cv.const("zero", 0.0)
    return [cv.grad_node(layer, "Where", [positive, g, other])]


def prelu(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
          shapes: list[Shape]) -> None:
    slope = cv.params(layer)[0]
    ndim = len(shapes[0])
    if layer.prelu_param.channel_shared:
        slope = slope.reshape(1)
    else:
        slope = slope.reshape((-1,) + (1,) * (ndim - 2))
    cv.node("PRelu", [ins[0], cv.const(f"{layer.name}/slope", slope)], tops, layer.name)


def elu(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
        shapes: list[Shape]) -> None:
    cv.node("Elu", ins, tops, layer.name, alpha=layer.elu_param.alpha)


def sigmoid_vjp(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
                shapes: list[Shape], g: str) -> list[str | None]:
    y = tops[0]
    one_minus = cv.grad_node(layer, "Sub", [cv.const("one", 1.0), y])
    return [cv.grad_node(layer, "Mul", [g, cv.grad_node(layer, "Mul", [y, one_minus])])]


def tanh_vjp(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
             shapes: list[Shape], g: str) -> list[str | None]:
    y = tops[0]
    one_minus = cv.grad_node(layer, "Sub", [cv.const("one", 1.0),
                                            cv.grad_node(layer, "Mul", [y, y])])
    return [cv.grad_node(layer, "Mul", [g, one_minus])]


def power(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
          shapes: list[Shape]) -> None:
    """y = (shift + scale · x) ^ power, skipping the identity steps."""
    p = layer.power_param
    x = ins[0]
    steps = [("Mul", p.scale, 1.0), ("Add", p.shift, 0.0), ("Pow", p.power, 1.0)]
    todo = [(op, v) for op, v, identity in steps if v != identity]
    if not todo:
        cv.node("Identity", [x], tops, layer.name)
    for i, (op, value) in enumerate(todo):
        last = i == len(todo) - 1
        x = cv.node(op, [x, cv.const(f"{layer.name}/{op.lower()}", value)],
                    tops if last else None, layer.name)


def dropout(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
            shapes: list[Shape]) -> None:
    # Caffe's Dropout is the identity at test time (it scales while training).
    cv.node("Identity", ins[:1], tops[:1], layer.name)


def dropout_vjp(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
                shapes: list[Shape], g: str) -> list[str | None]:
    return [g]


def eltwise(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
            shapes: list[Shape]) -> None:
    p = layer.eltwise_param
    if p.operation == p.SUM:
        coeffs = list(p.coeff) or [1.0] * len(ins)
        if len(coeffs) != len(ins):
            raise Unsupported(f"{len(coeffs)} coefficients for {len(ins)} inputs")
        terms = [x if c == 1.0 else cv.node(
            "Mul", [x, cv.const(f"{layer.name}/coeff", c)], name=layer.name + "/coeff")
            for x, c in zip(ins, coeffs, strict=True)]
        _chain(cv, "Add", terms, tops, layer.name)
    elif p.operation == p.PROD:
        _chain(cv, "Mul", ins, tops, layer.name)
    else:
        cv.node("Max", ins, tops, layer.name)


def _chain(cv: Converter, op: str, inputs: list[str], tops: list[str], name: str) -> None:
    """``inputs`` (at least two) combined pairwise by ``op``, left to right, into ``tops``."""
    x = inputs[0]
    for i, y in enumerate(inputs[1:]):
        x = cv.node(op, [x, y], tops if i == len(inputs) - 2 else None, name)


def eltwise_vjp(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
                shapes: list[Shape], g: str) -> list[str | None]:
    """SUM: coefficient · g. PROD: g · the product of the others. MAX: g where the
    input won Caffe's comparison (ties: the second of the first two, else the first)."""
    p = layer.eltwise_param
    if p.operation == p.SUM:
        coeffs = list(p.coeff) or [1.0] * len(ins)
        return [g if c == 1.0 else cv.grad_node(layer, "Mul", [g, cv.const("coeff", c)])
                for c in coeffs]
    if p.operation == p.PROD:
        grads: list[str | None] = []
        for i in range(len(ins)):
            others = [x for j, x in enumerate(ins) if j != i]
            grads.append(cv.grad_node(layer, "Mul", [g, _product(cv, layer, others)]))
        return grads
    wins = [cv.grad_node(layer, "Greater", [ins[0], ins[1]])]
    wins.append(cv.grad_node(layer, "Not", [wins[0]]))
    best = cv.grad_node(layer, "Max", ins[:2])
    for x in ins[2:]:
        won = cv.grad_node(layer, "Greater", [x, best])
        lost = cv.grad_node(layer, "Not", [won])
        wins = [cv.grad_node(layer, "And", [w, lost]) for w in wins] + [won]
        best = cv.grad_node(layer, "Max", [best, x])
    zero = cv.const("zero", 0.0)
    return [cv.grad_node(layer, "Where", [w, g, zero]) for w in wins]


def _product(cv: Converter, layer: Layer, tensors: list[str]) -> str:
    """The product of ``tensors``, in ``layer``'s VJP."""
    total = tensors[0]
    for x in tensors[1:]:
        total = cv.grad_node(layer, "Mul", [total, x])
    return total


def _affine(cv: Converter, layer: Layer, ins: list[str], tops: list[str], shapes: list[Shape],
            op: str, p: Any, bias_term: bool) -> None:
    """Scale (Mul) or Bias (Add) along ``p.axis``, from a second bottom or weights."""
    ndim = len(shapes[0])
    axis = p.axis % ndim
    if len(ins) > 1:
        other_dims = len(shapes[1])
        extra = ndim - axis - other_dims
        other = ins[1]
        if extra > 0:
            other = cv.node("Unsqueeze", [other, cv.const(
                "axes", list(range(other_dims, other_dims + extra)), np.int64)],
                name=layer.name + "/unsqueeze")
        cv.saved[layer.name, "factor"] = other
        first = cv.node(op, [ins[0], other], tops if not bias_term else None, layer.name)
        blobs = cv.params(layer) if bias_term else []
    else:
        blobs = cv.params(layer)
        value = blobs[0]
        value = value.reshape(value.shape + (1,) * (ndim - axis - value.ndim))
        cv.saved[layer.name, "factor"] = cv.const(f"{layer.name}/{op.lower()}", value)
        first = cv.node(op, [ins[0], cv.saved[layer.name, "factor"]],
                        tops if not bias_term else None, layer.name)
        blobs = blobs[1:]
    if bias_term:
        bias = blobs[-1]
        bias = bias.reshape(bias.shape + (1,) * (ndim - axis - bias.ndim))
        cv.node("Add", [first, cv.const(f"{layer.name}/bias", bias)], tops,
                layer.name + "/bias")


def scale(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
          shapes: list[Shape]) -> None:
    _affine(cv, layer, ins, tops, shapes, "Mul", layer.scale_param,
            layer.scale_param.bias_term)


def bias(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
         shapes: list[Shape]) -> None:
    _affine(cv, layer, ins, tops, shapes, "Add", layer.bias_param, False)


def _second_bottom_fixed(cv: Converter, ins: list[str]) -> None:
    if len(ins) > 1 and ins[1] in cv.depends:
        raise Unsupported("a second bottom that depends on the target blob")


def scale_vjp(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
              shapes: list[Shape], g: str) -> list[str | None]:
    _second_bottom_fixed(cv, ins)
    return [cv.grad_node(layer, "Mul", [g, cv.saved[layer.name, "factor"]]), None]


def bias_vjp(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
             shapes: list[Shape], g: str) -> list[str | None]:
    _second_bottom_fixed(cv, ins)
    return [g, None]


# Registered by calls, not decorators: mutmut (scripts/mutation.sh) does not mutate
# decorated functions.
converter(*SAME_AS)(same_as)
converter("ReLU")(relu)
vjp("ReLU")(relu_vjp)
converter("PReLU")(prelu)
converter("ELU")(elu)
vjp("Sigmoid")(sigmoid_vjp)
vjp("TanH")(tanh_vjp)
converter("Power")(power)
converter("Dropout")(dropout)
vjp("Dropout")(dropout_vjp)
converter("Eltwise")(eltwise)
vjp("Eltwise")(eltwise_vjp)
converter("Scale")(scale)
converter("Bias")(bias)
vjp("Scale")(scale_vjp)
vjp("Bias")(bias_vjp)
