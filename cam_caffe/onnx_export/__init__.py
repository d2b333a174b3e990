"""Convert a Caffe net (a normalised :class:`NetDef` plus its caffemodel) to ONNX.

The ONNX graph has one input, named like the Caffe input blob, of shape
``(N, C, H, W)`` with a dynamic batch ``N`` and the NetDef's fixed H × W, and
the weights as initializers. Its outputs are Caffe blobs with Caffe's
semantics, named exactly like them: by default the CAM's score blob (the
probabilities, or the raw scores for a net without Softmax) and its feature
blob.

Caffe's in-place layers (``top`` == ``bottom``) rewrite a blob, so one Caffe
blob can stand for several values. Each value gets its own ONNX tensor: the
blob's name for its first value and ``name@1``, ``name@2``, … for later ones;
a blob that is a graph output is named the other way round, its last value
(what Caffe's blob holds after the forward pass) getting the bare name and the
earlier ones ``name@0``, ``name@1``, ….

Only the layers the outputs depend on are converted. Layers are matched to
Caffe's own arithmetic, not to what ONNX's nearest operator does; see
``pool.pooling`` for Caffe's ceil-mode output size and its average-pooling divisor.

:mod:`.converter` holds the conversion and the registry; each layer type has a
function registered with ``converter("Type")`` (and ``vjp("Type")`` for its
gradient) in a module by kind: :mod:`.linear` (Convolution, InnerProduct),
:mod:`.pool`, :mod:`.elementwise` (activations, Eltwise, Scale, Bias),
:mod:`.norm` (LRN, BatchNorm, Softmax), :mod:`.shape` (Split, Concat, Flatten,
Reshape).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import proto
from ..camspec import CamSpec, find_cam_layers
from ..errors import ModelError
from ..netdef import NetDef
from . import elementwise, linear, norm, pool, shape  # noqa: F401  (they register converters)
from .converter import (
    CONVERTER_VERSION,
    CONVERTERS,
    IR_VERSION,
    OPSET,
    VJPS,
    Converter,
    gradient_names,
    load_onnx,
    registered,
)

if TYPE_CHECKING:
    import onnx

# Layer types with a converter (besides Input, which becomes the graph input).
SUPPORTED = registered(CONVERTERS)
# Layer types whose vector–Jacobian product is exported (``convert(…, gradient=)``).
VJP = registered(VJPS)

__all__ = ["CONVERTER_VERSION", "IR_VERSION", "OPSET", "SUPPORTED", "VJP", "convert",
           "gradient_names"]


def convert(netdef: NetDef, weights: proto.NetParameter, spec: CamSpec | None = None,
            outputs: Sequence[str] | None = None, check: bool = True,
            gradient: str | None = None) -> onnx.ModelProto:
    """The ONNX ModelProto of ``netdef`` with ``weights`` (a parsed caffemodel).

    ``outputs`` are Caffe blob names; by default the CAM's score and feature
    blobs from ``spec`` (found with :func:`find_cam_layers` when not given).
    With ``gradient`` (a blob name), the model also takes a seed S shaped like
    the first output y and outputs ∂(Σ S·y)/∂B at blob B = ``gradient``, as
    the next layer reads it (names: :func:`gradient_names`): with a one-hot
    seed, the gradient of one class's logit. Raises ModelError for layers or
    parameters ONNX cannot express here, or without a VJP on the way.
    """
    checker = load_onnx().checker
    if outputs is None:
        spec = spec or find_cam_layers(netdef)
        outputs = [spec.score_blob, spec.feature_blob]
    model = Converter(netdef, weights).run(list(dict.fromkeys(outputs)), gradient)
    if spec is not None:
        meta = {"cam_caffe.converter_version": CONVERTER_VERSION,
                "cam_caffe.score_blob": spec.score_blob,
                "cam_caffe.softmax": str(spec.softmax).lower(),
                "cam_caffe.feature_blob": spec.feature_blob,
                "cam_caffe.fc_layer": spec.fc_layer or ""}
        for key, value in meta.items():
            model.metadata_props.add(key=key, value=value)
    if check:
        try:
            checker.check_model(model)
        except checker.ValidationError as e:
            raise ModelError(f"{netdef.path}: the converted ONNX model is invalid: "
                             f"{str(e).splitlines()[0]}") from None
    return model
