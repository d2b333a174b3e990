"""Find the layers the maps need: the target (feature) blob, the class scores, the CAM head.

CAM needs the blob that enters a global average pooling (its value after any
in-place layers, as Caffe's blob holds it), and the InnerProduct that maps the
pooled vector to class scores: CAM_c = Σ_k w_ck · F_k. A net whose pooled
feature goes straight into a Softmax (NIN, SqueezeNet) has one feature channel
per class, so its weights are the identity.

The other methods (Grad-CAM, Score-CAM, …) work on any classification net:
:func:`find_target` takes the CAM blob where the net has the CAM head, else
the last blob with a spatial size > 1 that the class scores depend on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ModelError
from .netdef import NetDef, hw_param

# Layers that may sit between the pooling and the FC without changing the vector.
PASS_THROUGH = {"Dropout", "Flatten", "Reshape", "Split"}


@dataclass(frozen=True)
class CamSpec:
    """Where a backend finds the CAM's inputs, by Caffe blob and by producing layer."""

    feature_blob: str       # Caffe blob F (N, K, h, w)
    feature_layer: str      # last layer writing it (OpenCV names outputs by layer)
    fc_layer: str | None    # InnerProduct holding W (C, K); None: identity weights
    score_blob: str         # probabilities (Softmax output) or raw scores
    score_layer: str
    softmax: bool           # True when score_blob already holds probabilities
    num_classes: int
    channels: int           # K
    feature_size: tuple[int, int]   # (h, w)
    logit_blob: str = ""    # the class scores before the final Softmax (= score_blob if none)
    logit_layer: str = ""
    cam_head: bool = True   # False: no GAP → FC head at feature_blob (no `cam` method)


def _is_global_average(netdef: NetDef, layer) -> bool:
    p = layer.pooling_param
    if layer.type != "Pooling" or p.pool != p.AVE:
        return False
    if p.global_pooling:
        return True
    # An unpadded window covering the map (one output: a larger kernel is clipped to the
    # map, and so is Caffe's divisor) averages the whole map.
    shape = netdef.shapes.get(layer.bottom[0])
    kernel = hw_param(p, "kernel", 0)
    return (shape is not None and not (p.pad or p.pad_h or p.pad_w)
            and kernel[0] >= shape[2] and kernel[1] >= shape[3])


def _follow(netdef: NetDef, blob: str):
    """The first non-pass-through layer reading ``blob``, skipping pass-through layers."""
    while True:
        readers = netdef.consumers(blob)
        if len(readers) != 1:
            return readers[0] if readers else None
        if readers[0].type not in PASS_THROUGH:
            return readers[0]
        blob = readers[0].top[0]


def _score_output(netdef: NetDef, blob: str) -> tuple[str, str, bool]:
    """The Softmax reading ``blob`` if there is one, else ``blob`` itself."""
    reader = _follow(netdef, blob)
    if reader is not None and reader.type == "Softmax":
        return reader.top[0], netdef.producers[reader.top[0]], True
    return blob, netdef.producers[blob], False


def find_cam_layers(netdef: NetDef, feature_blob: str | None = None,
                    fc_layer: str | None = None) -> CamSpec:
    """Locate the CAM structure of ``netdef``; the arguments override discovery.

    Raises ModelError, saying what was looked for, when the net has none.
    """
    candidates = []
    for pool in netdef.net.layer:
        if not _is_global_average(netdef, pool):
            continue
        if feature_blob and pool.bottom[0] != feature_blob:
            continue
        after = _follow(netdef, pool.top[0])
        if after is not None and after.type == "InnerProduct" and fc_layer in (None, after.name):
            candidates.append((pool, after))
        elif after is not None and after.type == "Softmax" and fc_layer is None:
            candidates.append((pool, None))
    if fc_layer and not candidates:
        return _explicit(netdef, feature_blob, fc_layer)
    if not candidates:
        what = f"blob '{feature_blob}'" if feature_blob else "a feature blob"
        raise ModelError(
            f"{netdef.path}: no CAM structure found: expected {what} → global average pooling "
            "(AVE over the whole map, or global_pooling) → InnerProduct (→ Softmax); "
            "name the layers with --feature-blob and --fc-layer")
    pool, fc = _choose(netdef, candidates)
    feature = pool.bottom[0]
    shape = netdef.shapes[feature]
    if fc is None:
        channels = shape[1] if shape else 0
        score_blob, score_layer, softmax = _score_output(netdef, pool.top[0])
        return CamSpec(feature, netdef.producers[feature], None, score_blob, score_layer,
                       softmax, channels, channels, (shape[2], shape[3]) if shape else (0, 0),
                       *_logit(netdef, score_blob, softmax))
    return _spec(netdef, feature, fc)


class AmbiguousCamHead(ModelError):
    """Several CAM heads feed the net's output: the user must choose (never a fallback)."""


def _choose(netdef: NetDef, candidates: list) -> tuple:
    """The one (pooling, FC) branch whose scores feed the net's final output (the last
    blob nothing reads); a ModelError naming the branches when that does not decide
    (AmbiguousCamHead when several do)."""
    if len(candidates) == 1:
        return candidates[0]
    final = _final_output(netdef)
    feeding = [c for c in candidates if final in _downstream(netdef, (c[1] or c[0]).top[0])]
    if len(feeding) == 1:
        return feeding[0]
    listed = ", ".join(f"'{pool.bottom[0]}' → '{fc.name if fc else pool.name}'"
                       for pool, fc in (feeding or candidates))
    which = (f"{len(feeding)} of them feed" if feeding else "none of them feeds")
    error = AmbiguousCamHead if feeding else ModelError
    raise error(f"{netdef.path}: {len(candidates)} CAM branches (global average pooling "
                f"→ InnerProduct) and {which} the net's final output '{final}': {listed}; "
                "choose one with --feature-blob and --fc-layer")


def _downstream(netdef: NetDef, blob: str) -> set[str]:
    """``blob`` and every blob computed from it (layers are in topological order)."""
    reached = {blob}
    for layer in netdef.net.layer:
        if reached.intersection(layer.bottom):
            reached.update(layer.top)
    return reached


def _spec(netdef: NetDef, feature: str, fc) -> CamSpec:
    shape = netdef.shapes.get(feature)
    if shape is None or len(shape) != 4:
        raise ModelError(f"{netdef.path}: cannot tell the shape of feature blob '{feature}'")
    fan_in = netdef.shapes.get(fc.bottom[0])
    values = math.prod(fan_in[1:]) if fan_in is not None else shape[1]
    if values != shape[1]:
        raise ModelError(f"{netdef.path}: FC layer '{fc.name}' reads {values} values per "
                         f"image, but feature blob '{feature}' has {shape[1]} channels (CAM "
                         "needs the FC to read the feature blob's global average)")
    score_blob, score_layer, softmax = _score_output(netdef, fc.top[0])
    return CamSpec(feature, netdef.producers[feature], fc.name, score_blob, score_layer,
                   softmax, fc.inner_product_param.num_output, shape[1], (shape[2], shape[3]),
                   *_logit(netdef, score_blob, softmax))


def _explicit(netdef: NetDef, feature_blob: str | None, fc_layer: str) -> CamSpec:
    """--feature-blob/--fc-layer given for a net discovery cannot read."""
    try:
        fc = netdef.layer(fc_layer)
    except KeyError:
        raise ModelError(f"{netdef.path}: no layer named '{fc_layer}'") from None
    if fc.type != "InnerProduct":
        raise ModelError(f"{netdef.path}: layer '{fc_layer}' is a {fc.type}, not an InnerProduct")
    if not feature_blob:
        raise ModelError(f"{netdef.path}: give --feature-blob with --fc-layer for this net")
    if feature_blob not in netdef.shapes:
        raise ModelError(f"{netdef.path}: no blob named '{feature_blob}'")
    return _spec(netdef, feature_blob, fc)


def _logit(netdef: NetDef, score_blob: str, softmax: bool) -> tuple[str, str]:
    """(blob, layer) of the logits: the final Softmax's input, else the score blob."""
    blob = netdef.layer(netdef.producers[score_blob]).bottom[0] if softmax else score_blob
    return blob, netdef.producers[blob]


def find_target(netdef: NetDef, feature_blob: str | None = None,
                fc_layer: str | None = None) -> CamSpec:
    """The spec of any classification net: its CAM head where it has one (and
    ``feature_blob`` is that head's blob), else ``feature_blob`` or, by default, the
    last blob with a spatial size > 1 that the class scores depend on (no CAM head).

    Raises ModelError listing the candidate blobs for an unusable ``feature_blob``.
    """
    try:
        return find_cam_layers(netdef, feature_blob, fc_layer)
    except AmbiguousCamHead:
        raise
    except ModelError:
        if fc_layer:
            raise
    score_blob, score_layer, softmax = _final_scores(netdef)
    logit_blob, logit_layer = _logit(netdef, score_blob, softmax)
    candidates = spatial_blobs(netdef, logit_blob)
    if not candidates:
        raise ModelError(f"{netdef.path}: no blob with a spatial size > 1 feeds the class "
                         f"scores '{logit_blob}'")
    if feature_blob is None:
        feature_blob = candidates[-1]
    elif feature_blob not in candidates:
        shape = netdef.shapes.get(feature_blob)
        why = ("no blob of that name" if feature_blob not in netdef.shapes
               else f"its spatial size is 1 ({'x'.join(map(str, shape[2:]))})"
               if shape and len(shape) == 4 and shape[2] * shape[3] == 1
               else f"the class scores '{logit_blob}' do not depend on it"
               if shape and len(shape) == 4 else f"it is not an N×C×H×W blob ({shape})")
        listed = candidates[-12:]
        more = f" and {len(candidates) - 12} earlier" if len(candidates) > 12 else ""
        raise ModelError(f"{netdef.path}: --feature-blob '{feature_blob}': {why}; candidates "
                         f"(input to output): {', '.join(listed)}{more}")
    shape, logits = netdef.shapes[feature_blob], netdef.shapes[logit_blob]
    assert shape is not None and logits is not None     # candidates have known shapes
    return CamSpec(feature_blob, netdef.producers[feature_blob], None, score_blob, score_layer,
                   softmax, logits[1], shape[1], (shape[2], shape[3]),
                   logit_blob, logit_layer, cam_head=False)


def _final_output(netdef: NetDef) -> str:
    """The net's final output: the last blob (in layer order) that nothing reads."""
    read = {b for layer in netdef.net.layer for b in layer.bottom if b not in layer.top}
    outputs = [top for layer in netdef.net.layer for top in layer.top
               if top not in read and top != netdef.input_name]
    if not outputs:
        raise ModelError(f"{netdef.path}: the net has no output blob")
    return outputs[-1]


def _final_scores(netdef: NetDef) -> tuple[str, str, bool]:
    """The net's class scores: its final output (a Softmax's output or not)."""
    blob = _final_output(netdef)
    shape = netdef.shapes.get(blob)
    if shape is None or len(shape) < 2 or any(d != 1 for d in shape[2:]):
        raise ModelError(f"{netdef.path}: the output blob '{blob}' is not a vector of class "
                         f"scores (shape {shape})")
    layer = netdef.layer(netdef.producers[blob])
    return blob, layer.name, layer.type == "Softmax"


def spatial_blobs(netdef: NetDef, output: str) -> list[str]:
    """Blobs that ``output`` depends on with shape N×C×H×W, H·W > 1, input to output."""
    needed, stack = set(), [output]
    while stack:
        blob = stack.pop()
        if blob in needed or blob == netdef.input_name:
            continue
        needed.add(blob)
        for layer in netdef.net.layer:
            if blob in layer.top:
                stack.extend(layer.bottom)
    order: list[str] = []
    for layer in netdef.net.layer:
        for top in layer.top:
            shape = netdef.shapes.get(top)
            if (top in needed and shape and len(shape) == 4 and shape[2] * shape[3] > 1):
                if top in order:
                    order.remove(top)        # in-place: placed at its last writer
                order.append(top)
    return order
