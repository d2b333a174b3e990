"""The caffemodel against its prototxt: blobs read as Caffe reads them, mismatches refused.

A caffemodel that does not fit its prototxt makes Caffe abort the whole process
(a CHECK failure); cam-caffe must refuse it first, in one line naming the files,
the layer and the blob. One that does fit, in any of the layouts Caffe writes
(shape field or legacy num/channels/height/width, float or double values), must
give the same arrays pycaffe loads from it.
"""
import math
import re

import numpy as np
import pytest
from conftest import require_pycaffe
from nets import TINY, input_block

from cam_caffe import proto
from cam_caffe.errors import ModelError
from cam_caffe.netdef import (
    blob_shape,
    check_weights,
    layer_blobs,
    load_netdef,
    read_caffemodel,
    stored_layers,
)

# TINY's learnable blobs: conv (4, 3, 3, 3) + (4,), fc (3, 4) + (3,).
SHAPES = {"conv": [(4, 3, 3, 3), (4,)], "fc": [(3, 4), (3,)]}


def legacy_blob(array: np.ndarray, double: bool = False) -> proto.BlobProto:
    """A BlobProto in the pre-2015 layout: 4-D num/channels/height/width, leading 1s."""
    dims = (1,) * (4 - array.ndim) + array.shape
    message = proto.BlobProto(num=dims[0], channels=dims[1], height=dims[2], width=dims[3])
    values = array.astype(np.float64).ravel().tolist()
    (message.double_data if double else message.data).extend(values)
    return message


def caffemodel(path, blobs: dict[str, list[proto.BlobProto]]):
    """Write a caffemodel holding ``blobs`` (layer name → BlobProtos) and read it back."""
    net = proto.NetParameter(name="Tiny")
    for name, layer_blobs_ in blobs.items():
        net.layer.add(name=name, type="Convolution" if name == "conv" else "InnerProduct",
                      blobs=layer_blobs_)
    path.write_bytes(net.SerializeToString())
    return read_caffemodel(path)


def arrays(seed: int = 0) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {name: [rng.normal(0, 1, s).astype(np.float32) for s in shapes]
            for name, shapes in SHAPES.items()}


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.prototxt"
    path.write_text(TINY)
    return load_netdef(path)


def test_blob_shape_reads_the_shape_field_legacy_dims_and_scalars():
    """Caffe writes a blob's shape three ways; each must give the shape Caffe reads,
    or a correct caffemodel is refused (or a wrong one accepted)."""
    assert blob_shape(proto.blob(np.zeros((2, 3, 5)))) == (2, 3, 5)
    assert blob_shape(proto.BlobProto(num=2, channels=3, height=5, width=7)) == (2, 3, 5, 7)
    assert blob_shape(proto.BlobProto(channels=6)) == (0, 6, 0, 0)    # the others default 0
    assert blob_shape(proto.BlobProto(data=[0.25])) == ()              # a scalar (PReLU slope)


def test_legacy_and_double_blobs_load_as_pycaffe_loads_them(tiny, tmp_path):
    """A caffemodel of legacy 4-D blobs (fc as 1 × 1 × 3 × 4) holding doubles: accepted,
    and every array equals what pycaffe loads from the same file."""
    caffe = require_pycaffe()
    values = arrays()
    path = tmp_path / "legacy.caffemodel"
    weights = caffemodel(path, {
        "conv": [legacy_blob(values["conv"][0]), legacy_blob(values["conv"][1], double=True)],
        "fc": [legacy_blob(values["fc"][0], double=True), proto.blob(values["fc"][1])]})
    check_weights(tiny, weights, path)
    stored = stored_layers(weights)
    net = caffe.Net(str(tiny.path), caffe.TEST, weights=str(path))
    for name in SHAPES:
        ours = layer_blobs(tiny, stored, tiny.layer(name))
        assert [a.shape for a in ours] == [p.data.shape for p in net.params[name]]
        for mine, theirs, original in zip(ours, net.params[name], values[name], strict=True):
            assert mine.dtype == np.float32
            np.testing.assert_array_equal(mine, theirs.data)
            np.testing.assert_array_equal(mine, original)


def test_an_extra_blob_keeps_its_own_shape(tiny, tmp_path):
    """A blob beyond those the layer's type declares (layer_blobs is also used for
    layers cam-caffe cannot shape) comes out in its stored shape."""
    values = arrays()
    path = tmp_path / "extra.caffemodel"
    extra = np.arange(6, dtype=np.float32).reshape(2, 3)
    weights = caffemodel(path, {"fc": [*map(proto.blob, values["fc"]), proto.blob(extra)]})
    out = layer_blobs(tiny, stored_layers(weights), tiny.layer("fc"))
    np.testing.assert_array_equal(out[2], extra)


def expected_message(path, tiny, text):
    return re.escape(f"{path}: does not fit {tiny.path}: {text}") + "$"


@pytest.mark.parametrize("case", ["count", "middle 1", "leading 2", "transposed"])
def test_blobs_that_do_not_fit_are_refused_naming_the_layer_and_blob(tiny, tmp_path, case):
    """Where Caffe would abort on a CHECK: a one-line error with both files, the layer,
    the blob and both shapes. Only leading 1s may differ (legacy 4-D blobs)."""
    values = arrays()
    fc = [proto.blob(a) for a in values["fc"]]
    w = values["fc"][0]
    if case == "count":
        fc, text = fc[:1], "layer 'fc' has 1 weight blobs, the prototxt needs 2"
    else:
        bad = {"middle 1": w.reshape(3, 1, 4), "leading 2": np.concatenate([w, w]).reshape(2, 3, 4),
               "transposed": w.T}[case]
        fc[0] = proto.blob(bad)
        text = f"layer 'fc' blob 0 has shape {list(bad.shape)}, the prototxt needs [3, 4]"
    path = tmp_path / "bad.caffemodel"
    weights = caffemodel(path, {"conv": [proto.blob(a) for a in values["conv"]], "fc": fc})
    with pytest.raises(ModelError, match=expected_message(path, tiny, text)):
        check_weights(tiny, weights, path)


@pytest.mark.parametrize("double", [False, True])
def test_a_blob_holding_too_few_values_is_refused(tiny, tmp_path, double):
    """A blob whose shape fits but whose values are one short (a truncated export):
    refused by check_weights and by layer_blobs, with the counts."""
    values = arrays()
    short = legacy_blob(values["fc"][0], double)
    del (short.double_data if double else short.data)[-1]
    path = tmp_path / "short.caffemodel"
    weights = caffemodel(path, {"conv": [proto.blob(a) for a in values["conv"]],
                                "fc": [short, proto.blob(values["fc"][1])]})
    text = f"layer 'fc' blob 0 holds 11 values, its shape [3, 4] needs {math.prod((3, 4))}"
    with pytest.raises(ModelError, match=re.escape(f"{path}: {text}") + "$"):
        check_weights(tiny, weights, path)
    with pytest.raises(ModelError, match="^" + re.escape(text) + "$"):
        layer_blobs(tiny, stored_layers(weights), tiny.layer("fc"))


def test_layers_without_blobs_are_no_weights(tiny, tmp_path):
    """Caffe saves every layer, learnable or not; a layer saved with no blobs is no
    weight for it: a caffemodel of such layers only fits no net that learns."""
    path = tmp_path / "empty.caffemodel"
    weights = caffemodel(path, {"conv": [], "fc": []})
    assert stored_layers(weights) == {}
    with pytest.raises(ModelError, match=expected_message(
            path, tiny, "no layer of the prototxt has weights in this caffemodel")):
        check_weights(tiny, weights, path)
    with pytest.raises(ModelError, match=re.escape(
            f"{tiny.path}: layer 'fc' (InnerProduct) has no weights in the caffemodel")):
        layer_blobs(tiny, stored_layers(weights), tiny.layer("fc"))


def test_a_net_that_learns_nothing_takes_any_caffemodel(tmp_path):
    """Caffe copies weights by layer name and ignores the rest: a net with no learnable
    layer (pooling and softmax only) runs with any caffemodel."""
    path = tmp_path / "pool.prototxt"
    path.write_text(input_block(3, 4, 4) + 'layer { name: "gap" type: "Pooling" bottom: "data" '
                    'top: "gap" pooling_param { pool: AVE global_pooling: true } }\n')
    netdef = load_netdef(path)
    model = tmp_path / "other.caffemodel"
    weights = caffemodel(model, {"fc": [proto.blob(a) for a in arrays()["fc"]]})
    check_weights(netdef, weights, model)


# A fixed 6x4 AVE pooling (stride 6x4): the net only takes 6x4 inputs.
FIXED = input_block(3, 6, 4) + """
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
        pooling_param { pool: AVE kernel_h: 6 kernel_w: 4 stride_h: 6 stride_w: 4 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" inner_product_param { num_output: 3 } }
"""


@pytest.fixture
def fixed(tmp_path):
    path = tmp_path / "fixed.prototxt"
    path.write_text(FIXED)
    model = tmp_path / "fixed.caffemodel"
    weights = caffemodel(model, {name: [proto.blob(a) for a in blobs]
                                 for name, blobs in arrays().items()})
    return path, model, weights


def test_weights_made_for_the_fixed_input_size_say_which_size(fixed):
    """#14: at another --input-size, a fixed pooling changes the fc's fan-in; the user
    is told the size the net takes (6x4, not 4x6), not only that blob shapes differ."""
    path, model, weights = fixed
    netdef = load_netdef(path, input_size=(12, 12))       # pool 2x3: fc needs 4·6 inputs
    with pytest.raises(ModelError, match="^" + re.escape(
            f"{model}: does not fit {path} at 12x12: this net's fixed layers only take 6x4 "
            "inputs (pooling 'pool' has a fixed window; at 12x12, layer 'fc' would need "
            "weights of shape [3, 24], the caffemodel's are [3, 4]); use --input-size 6x4")
            + "$"):
        check_weights(netdef, weights, model)
    check_weights(load_netdef(path), weights, model)


def test_weights_of_another_net_get_no_input_size_hint(fixed, tmp_path):
    """When the weights fit neither size, changing --input-size would not help:
    the plain shape error, at the fixed size and at another."""
    path, _, _ = fixed
    values = arrays()
    model = tmp_path / "other.caffemodel"
    weights = caffemodel(model, {"conv": [proto.blob(a) for a in values["conv"]],
                                 "fc": [proto.blob(np.zeros((3, 5))), proto.blob(values["fc"][1])]})
    for size, needed in [(None, "[3, 4]"), ((12, 12), "[3, 24]")]:
        netdef = load_netdef(path, input_size=size)
        with pytest.raises(ModelError, match=expected_message(
                model, netdef, f"layer 'fc' blob 0 has shape [3, 5], the prototxt needs {needed}")):
            check_weights(netdef, weights, model)


def test_blobs_of_a_layer_without_shape_rule_do_not_end_the_check(tiny, tmp_path):
    """Weights stored for a layer whose parameter shapes cam-caffe does not know (here
    the ReLU) are left to Caffe, and the layers after it are still checked."""
    values = arrays()
    path = tmp_path / "relu.caffemodel"
    weights = caffemodel(path, {"conv": [proto.blob(a) for a in values["conv"]],
                                "relu": [proto.blob(np.ones(2))],
                                "fc": [proto.blob(values["fc"][0])]})
    with pytest.raises(ModelError, match=expected_message(
            path, tiny, "layer 'fc' has 1 weight blobs, the prototxt needs 2")):
        check_weights(tiny, weights, path)
