"""Layers that only move values: Split, Concat, Flatten, Reshape."""
from __future__ import annotations

import math

import numpy as np

from ..netdef import Layer, Shape, concat_axis, layer_shapes
from .converter import Converter, Unsupported, converter, vjp


def split(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
          shapes: list[Shape]) -> None:
    for top in tops:
        cv.node("Identity", ins[:1], [top], layer.name)


def split_vjp(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
              shapes: list[Shape], g: str) -> list[str | None]:
    return [g]             # the tops' gradients were summed into g


def concat(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
           shapes: list[Shape]) -> None:
    cv.node("Concat", ins, tops, layer.name,
            axis=concat_axis(layer.concat_param) % len(shapes[0]))


def concat_vjp(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
               shapes: list[Shape], g: str) -> list[str]:
    axis = concat_axis(layer.concat_param) % len(shapes[0])
    sizes = cv.const("split", [s[axis] for s in shapes], np.int64)
    outputs = [cv.fresh(f"{layer.name}/grad/{i}") for i in range(len(ins))]
    cv.node("Split", [g, sizes], outputs, f"{layer.name}/grad/Split", axis=axis)
    return outputs


def flatten(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
            shapes: list[Shape]) -> None:
    shape = shapes[0]
    p = layer.flatten_param
    axis, end = p.axis % len(shape), p.end_axis % len(shape)
    if axis == 1 and end == len(shape) - 1:
        cv.node("Flatten", ins, tops, layer.name, axis=1)
        return
    out = [*list(shape[:axis]), math.prod(shape[axis:end + 1]), *list(shape[end + 1:])]
    _reshape_to(cv, layer, ins, tops, out)


def reshape(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
            shapes: list[Shape]) -> None:
    p = layer.reshape_param
    dims = list(p.shape.dim)
    if p.axis == 0 and p.num_axes == -1:
        # Caffe's 0 (copy) and -1 (infer) mean the same as ONNX Reshape's here.
        cv.node("Reshape", [ins[0], cv.const("shape", dims, np.int64)], tops, layer.name)
        return
    out = layer_shapes(layer, shapes)[0] or ()      # known: so is the input's
    axis = p.axis % (len(shapes[0]) + 1) if p.axis < 0 else p.axis
    if axis == 0 and dims and dims[0] != 0:
        raise Unsupported("reshaping the batch axis with num_axes set")
    _reshape_to(cv, layer, ins, tops, list(out))


def _reshape_to(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
                out: list[int]) -> None:
    """Reshape to ``out`` (the shape at batch 1) at any batch N: the first axis is
    inferred (-1), so it is N when the batch is kept, N · its size when merged into it."""
    cv.node("Reshape", [ins[0], cv.const("shape", [-1, *out[1:]], np.int64)], tops, layer.name)


def reshape_vjp(cv: Converter, layer: Layer, ins: list[str], tops: list[str],
                shapes: list[Shape], g: str) -> list[str | None]:
    return [cv.reshape_like(layer, g, ins[0])]


# Registered by calls, not decorators: mutmut (scripts/mutation.sh) does not mutate
# decorated functions.
converter("Split")(split)
vjp("Split")(split_vjp)
converter("Concat")(concat)
vjp("Concat")(concat_vjp)
converter("Flatten")(flatten)
converter("Reshape")(reshape)
vjp("Flatten", "Reshape")(reshape_vjp)
