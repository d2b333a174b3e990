"""Normalising a net: any prototxt into one deploy net every backend can run.

Accepts deploy and train/test prototxt files, in current (``layer``) or legacy
V1 (``layers``) syntax. The result is a V2 net with one ``Input`` layer, only
the TEST-phase layers, data layers replaced by that input and loss layers
replaced by a ``Softmax`` (or dropped), plus the blob shapes inferred for it.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .. import proto
from ..errors import ModelError
from .net import Layer, NetDef, Shape, Transform
from .read import read_prototxt, upgrade_v1
from .shapes import hw_param, infer_shapes

DATA_TYPES = {"Data", "ImageData", "HDF5Data", "MemoryData", "WindowData", "DummyData",
              "AnnotatedData", "VideoData", "Input"}
LOSS_TYPES = {"SoftmaxWithLoss", "Accuracy", "EuclideanLoss", "HingeLoss", "InfogainLoss",
              "SigmoidCrossEntropyLoss", "MultinomialLogisticLoss", "ContrastiveLoss",
              "MultiBoxLoss", "Silence", "HDF5Output"}


def load_netdef(path: str | Path, *, input_size: tuple[int, int] | None = None,
                allow_python_layers: bool = False) -> NetDef:
    """Read ``path`` and normalise it into a deploy NetDef (see module docstring).

    ``input_size`` (H, W) overrides the declared input size; it is required
    when a train/test file declares none and the net cannot tell (global pooling).
    """
    path = Path(path)
    net = read_prototxt(path)
    if net.layers:
        upgrade_v1(net)
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
    deploy = with_input(net, input_name, shape)
    try:
        shapes, producers = infer_shapes(deploy, path)
    except ModelError as error:
        fixed = fixed_pooling(net)
        if fixed is None or fixed[0] == shape[2:]:
            raise
        (height, width), pool = fixed
        infer_shapes(with_input(net, input_name, (*shape[:2], height, width)), path)
        raise ModelError(f"{error}: this net's fixed layers only take {height}x{width} inputs "
                         f"(pooling '{pool}' has a fixed window); use --input-size "
                         f"{height}x{width}") from None
    return NetDef(deploy, path, input_name, shape, shapes, producers, transform)


def _rule_matches(rule: Any, level: int = 0, stages: frozenset[str] = frozenset()) -> bool:
    """Caffe's StateMeetsRule (``rule``: a NetStateRule) for phase TEST."""
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


def _replace_layers(net: proto.NetParameter, layers: Iterable[Layer]) -> None:
    copies = [proto.LayerParameter.FromString(layer.SerializeToString()) for layer in layers]
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
    data_layers = [layer for layer in net.layer if layer.type in DATA_TYPES]
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
        transform = Transform(tp.scale, list(tp.mean_value), tp.mean_file)   # scale: 1 unless set
    # Remove every data layer and the blobs they feed that nothing else produces (labels).
    _replace_layers(net, [layer for layer in net.layer if layer.type not in DATA_TYPES])
    return name, shape, transform


def _shape4(dims: tuple[int, ...], path: Path) -> Shape:
    if len(dims) != 4:
        raise ModelError(f"{path}: the input must be 4-D (N, C, H, W); found shape {list(dims)}")
    return (1, int(dims[1]), int(dims[2]), int(dims[3]))


def _drop_losses(net: proto.NetParameter) -> None:
    """Replace SoftmaxWithLoss by Softmax, drop other loss/accuracy layers."""
    kept = []
    taken = {name for layer in net.layer if layer.type not in LOSS_TYPES
             for name in [layer.name, *layer.top]}
    for layer in net.layer:
        if layer.type == "SoftmaxWithLoss":
            name = "prob" if "prob" not in taken else layer.name + "_prob"
            kept.append(proto.LayerParameter(name=name, type="Softmax",
                                             bottom=[layer.bottom[0]], top=[name]))
        elif layer.type not in LOSS_TYPES:
            kept.append(layer)
    _replace_layers(net, kept)


def with_input(net: proto.NetParameter, name: str, shape: Shape,
               layer_name: str | None = None) -> proto.NetParameter:
    """A copy of ``net`` whose first layer is an Input layer of ``shape`` (top ``name``)."""
    out = proto.NetParameter(name=net.name)
    layer = out.layer.add(name=layer_name or name, type="Input", top=[name])
    layer.input_param.shape.add(dim=list(shape))
    out.layer.extend(net.layer)
    return out


def _solve_input_size(net: proto.NetParameter, path: Path) -> tuple[int, int]:
    """(H, W) for a net that declares no input size, from its fixed final pooling."""
    fixed = fixed_pooling(net)
    if fixed is None:
        raise ModelError(f"{path}: the net does not declare its input size; "
                         "pass --input-size (e.g. 32 for CIFAR nets, 224 for ImageNet nets)")
    return fixed[0]


def fixed_pooling(net: proto.NetParameter) -> tuple[tuple[int, int], str] | None:
    """The input size a net's last pooling, a fixed (not global) AVE window, was made
    for: its kernel times the total stride before it; with that layer's name."""
    pools = [layer for layer in net.layer if layer.type == "Pooling"]
    stride_h = stride_w = 1
    for layer in net.layer:
        if layer.type in ("Convolution", "Pooling"):
            p = layer.convolution_param if layer.type == "Convolution" else layer.pooling_param
            if pools and layer is pools[-1] and layer.pooling_param.pool == p.AVE \
                    and not p.global_pooling:
                kh, kw = hw_param(p, "kernel", 0)
                return (kh * stride_h, kw * stride_w), layer.name
            sh, sw = hw_param(p, "stride", 1)
            stride_h, stride_w = stride_h * sh, stride_w * sw
    return None


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
    if shape is None:
        raise ModelError(f"{netdef.path}: blob '{blob}' has no known shape")
    names = {layer.name for layer in layers}
    input_layer = next(f"{blob}/input{i or ''}" for i in range(len(names) + 1)
                       if f"{blob}/input{i or ''}" not in names)   # weights never match it
    net = with_input(proto.NetParameter(name=netdef.net.name), blob, shape, input_layer)
    net.layer.extend(reversed(kept))
    shapes, producers = infer_shapes(net, netdef.path)
    return NetDef(net, netdef.path, blob, shape, shapes, producers)
