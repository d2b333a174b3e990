"""Caffe net definitions: read any prototxt and caffemodel, normalise the net into one
deploy net every backend can run, infer its blob shapes and check its weights.

- :mod:`.read`: prototxt and caffemodel files (V1 or V2) → NetParameter messages;
- :mod:`.normalize`: → a deploy :class:`NetDef` (one Input, TEST phase, no losses);
  the part of a net after a blob (:func:`tail`);
- :mod:`.shapes`: blob and parameter shapes by Caffe's rules, the memory of a forward;
- :mod:`.weights`: does a caffemodel fit the net, its blobs as arrays.
"""
from .net import Layer, NetDef, Shape, Transform
from .normalize import load_netdef, tail
from .read import CaffeModel, read_bytes, read_caffemodel, read_prototxt
from .shapes import (
    concat_axis,
    conv_output_size,
    forward_bytes,
    hw_param,
    infer_shapes,
    layer_shapes,
    param_shapes,
    pool_output_size,
)
from .weights import blob_shape, check_weights, layer_blobs, stored_layers

__all__ = ["CaffeModel", "Layer", "NetDef", "Shape", "Transform", "blob_shape", "check_weights",
           "concat_axis", "conv_output_size", "forward_bytes", "hw_param", "infer_shapes",
           "layer_blobs", "layer_shapes", "load_netdef", "param_shapes", "pool_output_size",
           "read_bytes", "read_caffemodel", "read_prototxt", "stored_layers", "tail"]
