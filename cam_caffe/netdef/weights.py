"""Weight checks: does a caffemodel fit the net, and its blobs as float32 arrays."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .. import proto
from ..errors import ModelError
from .net import Layer, NetDef, Shape
from .normalize import fixed_pooling
from .shapes import infer_shapes, param_shapes


def blob_shape(blob: proto.BlobProto) -> Shape:
    """A BlobProto's shape; legacy 4-D num/channels/height/width when no shape is set."""
    if blob.HasField("shape"):
        return tuple(blob.shape.dim)
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return (blob.num, blob.channels, blob.height, blob.width)
    return ()            # a 0-axis (scalar) blob, e.g. a channel-shared PReLU slope


def _same_shape(a: Shape, b: Shape) -> bool:
    """Equal up to leading 1s, as Caffe accepts legacy 4-D blob shapes."""
    def strip(s: Shape) -> Shape:
        s = tuple(s)
        while s and s[0] == 1:
            s = s[1:]
        return s
    return strip(a) == strip(b)


def stored_layers(weights: proto.NetParameter) -> dict[str, Layer]:
    """The caffemodel's layers that hold blobs, by name (Caffe copies weights by name)."""
    return {layer.name: layer for layer in weights.layer if layer.blobs}


def check_weights(netdef: NetDef, weights: proto.NetParameter, weights_path: Path) -> None:
    """Fail clearly where Caffe would abort: blob counts or shapes that do not match.

    Caffe copies weights by layer name; a caffemodel that shares no layer with
    the prototxt is refused too (it belongs to another net).
    """
    stored = stored_layers(weights)
    learnable = [layer for layer in netdef.net.layer
                 if param_shapes(netdef, layer) or layer.name in stored]
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
        for i, (f, e) in enumerate(zip(found, expected, strict=True)):
            if not _same_shape(f, e):
                hint = _input_size_hint(netdef, layer.name, i, f, e)
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


def layer_blobs(netdef: NetDef, stored: dict[str, Layer], layer: Layer) -> list[np.ndarray]:
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


def _input_size_hint(netdef: NetDef, layer: str, index: int, found: Shape,
                     needed: Shape) -> str | None:
    """When the input size is why blob ``index`` of ``layer`` (``found``, the net
    ``needed``) does not fit (a fixed pooling made for another size): a message
    saying the size the net takes."""
    fixed = fixed_pooling(netdef.net)
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
    return (f"does not fit {netdef.path} at {h}x{w}: this net's fixed layers only take "
            f"{height}x{width} inputs (pooling '{pool}' has a fixed window; at {h}x{w}, "
            f"layer '{layer}' would need weights of shape {list(needed)}, the caffemodel's "
            f"are {list(found)}); use --input-size {height}x{width}")
