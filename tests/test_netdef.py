"""Reading and normalising prototxt files, and finding the CAM layers."""
import math
import re
from fractions import Fraction

import numpy as np
import pytest
from conftest import GOOGLENET, shared
from nets import NIN_NET, TINY, V1_NET, VGG_LIKE, write_random_net
from numpy_net import stored_weights
from synthetic import random_weights, save_caffemodel

from cam_caffe import CAMNet
from cam_caffe.camspec import find_cam_layers, find_target
from cam_caffe.errors import ModelError
from cam_caffe.netdef import (
    CaffeModel,
    check_weights,
    load_netdef,
    pool_output_size,
    read_caffemodel,
    tail,
)

NO_CAM = """
name: "Plain"
input: "data"
input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" inner_product_param { num_output: 3 } }
"""


def write(tmp_path, text, name="net"):
    path = tmp_path / f"{name}.prototxt"
    path.write_text(text)
    return path


def test_v1_syntax_is_upgraded(tmp_path):
    netdef = load_netdef(write(tmp_path, V1_NET))
    assert [layer.type for layer in netdef.net.layer] == [
        "Input", "Convolution", "ReLU", "Pooling", "Convolution", "ReLU", "Pooling",
        "InnerProduct", "Softmax"]
    assert netdef.net.layer[4].convolution_param.group == 2
    assert netdef.shapes["pool1"] == (1, 8, 10, 10)      # Caffe's ceil: (20-3)/2 → 9.5 → 10
    spec = find_cam_layers(netdef)
    assert (spec.feature_blob, spec.feature_layer, spec.fc_layer) == ("conv2", "relu2", "fc")
    assert spec.num_classes == 4 and spec.channels == 6 and spec.feature_size == (10, 10)


def test_v1_net_runs_end_to_end(tmp_path):
    prototxt, model = write_random_net(tmp_path, V1_NET, "v1")
    net = CAMNet(prototxt, model, backend="opencv")
    result = net.predict([np.full((30, 40, 3), 128, np.uint8)], top_k=4)[0]
    assert result.cams.shape == (4, 10, 10)
    np.testing.assert_allclose(result.probs.sum(), 1, rtol=1e-5)


def test_train_test_prototxt_becomes_deploy(tmp_path):
    netdef = load_netdef(write(tmp_path, VGG_LIKE))
    types = [layer.type for layer in netdef.net.layer]
    assert types == ["Input", "Convolution", "ReLU", "Pooling", "Dropout", "Flatten",
                     "InnerProduct", "Softmax"]
    assert netdef.input_shape == (1, 3, 24, 24)
    assert netdef.transform.scale == 0.5
    assert netdef.transform.mean_values == [10, 20, 30]
    spec = find_cam_layers(netdef)
    assert spec.fc_layer == "fc" and spec.softmax and spec.score_blob == "prob"


def test_identity_weights_for_nin_like_nets(tmp_path):
    prototxt, model = write_random_net(tmp_path, NIN_NET, "nin")
    spec = find_cam_layers(load_netdef(prototxt))
    assert spec.fc_layer is None and spec.num_classes == 5 and spec.score_blob == "loss"
    net = CAMNet(prototxt, model, backend="opencv")
    np.testing.assert_array_equal(net.cam_weights, np.eye(5, dtype=np.float32))
    image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8)
    result = net.predict([image], classes=[3])[0]
    # With identity weights, the CAM of class 3 is feature channel 3 itself.
    features = net.backend.forward(net.preprocess([image])).features
    np.testing.assert_allclose(result.cams[0], features[0, 3], rtol=1e-6)


def test_net_without_cam_structure_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no CAM structure found"):
        find_cam_layers(load_netdef(write(tmp_path, NO_CAM)))


def test_overrides_name_the_layers(tmp_path):
    netdef = load_netdef(write(tmp_path, V1_NET))
    spec = find_cam_layers(netdef, feature_blob="conv2", fc_layer="fc")
    assert spec.feature_blob == "conv2"
    with pytest.raises(ModelError, match="no layer named 'nope'"):
        find_cam_layers(load_netdef(write(tmp_path, NO_CAM, "x")), "conv", "nope")
    with pytest.raises(ModelError, match="no CAM structure"):
        find_cam_layers(netdef, feature_blob="conv1")


# GAP → Power → FC: discovery stops at the Power layer; --feature-blob and --fc-layer
# name the head. The GAP's output is also read by a second layer, after the FC.
SCALED_HEAD = """
name: "ScaledHead"
input: "data"
input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "gap" type: "Pooling" bottom: "conv" top: "gap"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "twice" type: "Power" bottom: "gap" top: "twice" power_param { scale: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "twice" top: "fc"
        inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def test_named_layers_where_discovery_cannot_see_the_head(tmp_path):
    prototxt, model = write_random_net(tmp_path, SCALED_HEAD, "scaled")
    netdef = load_netdef(prototxt)
    with pytest.raises(ModelError, match="no CAM structure found"):
        find_cam_layers(netdef)
    spec = find_cam_layers(netdef, "conv", "fc")
    assert (spec.feature_blob, spec.feature_layer, spec.fc_layer, spec.score_blob,
            spec.score_layer, spec.softmax, spec.logit_blob, spec.logit_layer) == (
        "conv", "relu", "fc", "prob", "prob", True, "fc", "fc")
    assert (spec.num_classes, spec.channels, spec.feature_size) == (5, 4, (6, 6))
    # The maps are the FC's weights applied to the feature channels (a NumPy sum).
    net = CAMNet(prototxt, model, backend="opencv", feature_blob="conv", fc_layer="fc",
                 mean="0")
    image = np.random.default_rng(1).integers(0, 255, (8, 8, 3), np.uint8)
    result = net.predict([image], classes=[4, 1])[0]
    features = net.backend.forward(net.preprocess([image])).features[0].astype(np.float64)
    w = stored_weights(model)["fc"][0]
    expected = np.stack([np.tensordot(w[c], features, axes=1) for c in (4, 1)])
    np.testing.assert_allclose(result.cams, expected, rtol=1e-5, atol=1e-6 * abs(expected).max())


@pytest.mark.parametrize(("feature", "fc", "message"), [
    ("conv", "conv", "layer 'conv' is a Convolution, not an InnerProduct"),
    (None, "fc", "give --feature-blob with --fc-layer for this net"),
    ("nope", "fc", "no blob named 'nope'"),
    ("fc", "fc", "cannot tell the shape of feature blob 'fc'"),
    ("data", "fc", "FC layer 'fc' reads 4 values per image, but feature blob 'data' has 3 "
                   "channels"),
])
def test_named_layers_that_cannot_make_a_cam_are_refused(tmp_path, feature, fc, message):
    path = write(tmp_path, SCALED_HEAD)
    with pytest.raises(ModelError, match=f"^{path}: {re.escape(message)}"):
        find_cam_layers(load_netdef(path), feature, fc)


def test_an_fc_reading_a_spatial_blob_is_refused(tmp_path):
    """An FC that reads the whole C×H×W blob, not its global average: a clear error
    (it was a matmul failure, exit 70)."""
    prototxt, model = write_random_net(tmp_path, NO_CAM, "nocam")
    with pytest.raises(ModelError, match=r"FC layer 'fc' reads 36 values per image, but "
                                         r"feature blob 'pool' has 4 channels"):
        CAMNet(prototxt, model, backend="opencv", feature_blob="pool", fc_layer="fc")


def test_a_pooled_vector_read_twice_uses_its_first_reader(tmp_path):
    """The GAP's output goes to the FC and, after it in the file, to another layer."""
    text = SCALED_HEAD.replace(
        'layer { name: "twice" type: "Power" bottom: "gap" top: "twice" power_param '
        '{ scale: 2 } }\n', "").replace('bottom: "twice"', 'bottom: "gap"').replace(
        'layer { name: "prob"', 'layer { name: "dup" type: "Power" bottom: "gap" top: "dup" }\n'
        'layer { name: "prob"')
    netdef = load_netdef(write(tmp_path, text))
    assert [layer.name for layer in netdef.consumers("gap")] == ["fc", "dup"]
    spec = find_cam_layers(netdef)
    assert (spec.feature_blob, spec.fc_layer, spec.score_blob) == ("conv", "fc", "prob")


# No CAM head: blobs of 5×1 and 2×1 (spatial all the same), a side branch the scores do
# not depend on, scores reshaped to N×C×1×1 and a Dropout in place on them, last.
THIN = """
name: "Thin"
input: "data"
input_shape { dim: 1 dim: 3 dim: 5 dim: 2 }
layer { name: "side" type: "Convolution" bottom: "data" top: "side"
        convolution_param { num_output: 2 kernel_h: 4 kernel_w: 1 } }
layer { name: "side_pool" type: "Pooling" bottom: "side" top: "side_pool"
        pooling_param { pool: MAX kernel_h: 1 kernel_w: 2 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_h: 1 kernel_w: 2 } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_h: 3 kernel_w: 1 stride_h: 2 stride_w: 1 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"
        inner_product_param { num_output: 6 } }
layer { name: "scores" type: "Reshape" bottom: "fc" top: "scores"
        reshape_param { shape { dim: 0 dim: -1 dim: 1 dim: 1 } } }
layer { name: "drop" type: "Dropout" bottom: "scores" top: "scores" }
"""


def test_the_target_blob_of_a_net_without_cam_head(tmp_path):
    netdef = load_netdef(write(tmp_path, THIN))
    assert [netdef.shapes[b] for b in ("side", "side_pool", "conv1", "pool1", "scores")] == [
        (1, 2, 2, 2), (1, 2, 2, 1), (1, 4, 5, 1), (1, 4, 2, 1), (1, 6, 1, 1)]
    spec = find_target(netdef)
    assert (spec.feature_blob, spec.feature_layer, spec.channels, spec.feature_size) == (
        "pool1", "pool1", 4, (2, 1))
    assert (spec.score_blob, spec.score_layer, spec.softmax, spec.num_classes) == (
        "scores", "drop", False, 6)
    assert (spec.logit_blob, spec.fc_layer, spec.cam_head) == ("scores", None, False)
    assert find_target(netdef, "conv1").feature_size == (5, 1)
    for side in ("side", "side_pool"):
        with pytest.raises(ModelError, match=rf"--feature-blob '{side}': the class scores "
                                             r"'scores' do not depend on it; candidates "
                                             r"\(input to output\): conv1, pool1$"):
            find_target(netdef, side)
    # Named layers the discovery cannot read are taken as named (here: no global average
    # pooling before fc, so refused) rather than dropped for the no-CAM-head default.
    with pytest.raises(ModelError, match="FC layer 'fc' reads 8 values per image"):
        find_target(netdef, "pool1", "fc")
    flat = load_netdef(write(tmp_path, THIN.replace("dim: 5 dim: 2", "dim: 1 dim: 1").replace(
        "kernel_h: 1 kernel_w: 2", "kernel_size: 1").replace(
        "kernel_h: 4 kernel_w: 1", "kernel_size: 1").replace(
        "kernel_h: 3 kernel_w: 1 stride_h: 2 stride_w: 1", "kernel_size: 1"), "flat"))
    with pytest.raises(ModelError, match=r"no blob with a spatial size > 1 feeds the class "
                                         r"scores 'scores'$"):
        find_target(flat)


@pytest.mark.parametrize(("last", "shape"), [
    ('layer { name: "am" type: "ArgMax" bottom: "scores" top: "am" }', "None"),
    ('layer { name: "am" type: "Reshape" bottom: "scores" top: "am" '
     'reshape_param { shape { dim: 0 dim: 3 dim: 2 dim: 1 } } }', r"\(1, 3, 2, 1\)"),
])
def test_an_output_that_is_not_a_score_vector_is_refused(tmp_path, last, shape):
    netdef = load_netdef(write(tmp_path, THIN + last + "\n"))
    with pytest.raises(ModelError, match=rf"the output blob 'am' is not a vector of class "
                                         rf"scores \(shape {shape}\)$"):
        find_target(netdef)


def test_a_net_of_its_input_alone_has_no_output(tmp_path):
    path = write(tmp_path, 'name: "Empty"\nlayer { name: "data" type: "Input" top: "data" '
                           'input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }\n')
    with pytest.raises(ModelError, match=f"^{re.escape(str(path))}: the net has no output "
                                         "blob$"):
        find_target(load_netdef(path))


def test_global_max_pooling_is_no_cam_head(tmp_path):
    """CAM needs the average: a global MAX pooling → FC is not a CAM head."""
    text = TINY.replace("pool: AVE global_pooling: true", "pool: MAX global_pooling: true")
    netdef = load_netdef(write(tmp_path, text))
    with pytest.raises(ModelError, match="no CAM structure found"):
        find_cam_layers(netdef)
    assert not find_target(netdef).cam_head


@pytest.mark.parametrize(("pooling", "top"), [
    ("kernel_h: 2 kernel_w: 7", (1, 4, 8, 1)), ("kernel_h: 9 kernel_w: 2", (1, 4, 1, 6)),
    ("kernel_h: 9 kernel_w: 7 pad_h: 1 pad_w: 0", (1, 4, 3, 1)),
    ("kernel_h: 9 kernel_w: 7 pad: 1", (1, 4, 3, 3)),
    ("kernel_h: 11 kernel_w: 9 pad: 1", (1, 4, 1, 1)),
    ("kernel_h: 8 kernel_w: 7 stride: 2 ceil_mode: false", (1, 4, 1, 1)),
    ("kernel_h: 9 kernel_w: 7", None), ("kernel_h: 10 kernel_w: 8 stride: 2", None)])
def test_an_average_pooling_is_global_only_over_the_whole_unpadded_map(tmp_path, pooling, top):
    """The 9×7 map of TINY's conv, pooled by AVE with a kernel of one axis only, over the
    whole map with padding (one output, zeros in its average), or one window missing the
    last row (floor rounding): no CAM head; the whole map without padding, or a larger
    kernel that Caffe clips to it: the CAM head."""
    text = TINY.replace("pool: AVE global_pooling: true", f"pool: AVE {pooling}")
    netdef = load_netdef(write(tmp_path, text))
    if top is None:
        assert netdef.shapes["gap"] == (1, 4, 1, 1) and find_cam_layers(netdef).fc_layer == "fc"
        return
    assert netdef.shapes["gap"] == top
    with pytest.raises(ModelError, match="no CAM structure found"):
        find_cam_layers(netdef)


def test_python_layers_are_refused_by_default(tmp_path):
    text = NO_CAM + 'layer { name: "py" type: "Python" bottom: "fc" top: "py" }\n'
    with pytest.raises(ModelError, match="Python layer"):
        load_netdef(write(tmp_path, text))
    netdef = load_netdef(write(tmp_path, text), allow_python_layers=True)
    assert netdef.net.layer[-1].type == "Python"


def test_weights_of_another_net_are_refused(tmp_path):
    prototxt, _ = write_random_net(tmp_path, V1_NET, "a")
    other = NIN_NET.replace("num_output: 5", "num_output: 8")
    _other_proto, other_model = write_random_net(tmp_path, other, "b")
    netdef = load_netdef(prototxt)
    with pytest.raises(ModelError, match="no layer of the prototxt"):
        check_weights(netdef, read_caffemodel(other_model), other_model)
    # Same layer name, other shape: named precisely.
    renamed = tmp_path / "renamed.caffemodel"
    weights = random_weights(netdef)
    weights["conv1"][0] = np.zeros((8, 3, 5, 5))
    save_caffemodel(netdef, weights, renamed)
    with pytest.raises(ModelError, match=r"layer 'conv1' blob 0 has shape \[8, 3, 5, 5\]"):
        check_weights(netdef, read_caffemodel(renamed), renamed)


def test_cifar_train_test_prototxt_needs_and_takes_an_input_size():
    prototxt = shared("cifar10_resnet20", "test_ResNet_20.prototxt")
    with pytest.raises(ModelError, match="--input-size"):
        load_netdef(prototxt)
    netdef = load_netdef(prototxt, input_size=(32, 32))
    assert netdef.transform.scale == pytest.approx(1 / 256)
    np.testing.assert_allclose(netdef.transform.mean_values, [125.3, 122.9, 113.8], rtol=1e-6)
    spec = find_cam_layers(netdef)
    assert spec.fc_layer == "fc1" and spec.feature_size == (8, 8) and spec.channels == 64
    weights = shared("cifar10_resnet20", "cifar10_ResNet_20_iter_53500.caffemodel")
    check_weights(netdef, read_caffemodel(weights), weights)


def test_googlenet_cam_structure():
    netdef = load_netdef(GOOGLENET)
    spec = find_cam_layers(netdef)
    assert (spec.feature_blob, spec.feature_layer, spec.fc_layer, spec.score_blob) == (
        "CAM_conv", "CAM_relu", "CAM_fc", "prob")
    assert (spec.num_classes, spec.channels, spec.feature_size) == (1000, 1024, (14, 14))
    official = load_netdef(shared("googlenet_cam", "deploy_googlenetCAM.prototxt"))
    assert official.input_shape == (1, 3, 224, 224)
    assert find_cam_layers(official) == spec


def test_fixed_pool_gives_the_input_size(tmp_path):
    text = VGG_LIKE.replace("crop_size: 24 scale", "scale").replace("crop_size: 24 mirror", "mirror")
    netdef = load_netdef(write(tmp_path, text))
    assert netdef.input_shape == (1, 3, 24, 24)          # kernel 24 × total stride 1


@pytest.mark.parametrize("size", [1, (8 << 20) - 1, 8 << 20, (20 << 20) + 5])
def test_caffemodel_digest_is_sha256_of_piece_hashes(tmp_path, size):
    """The parallel digest equals the same hash computed serially with hashlib."""
    import hashlib
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "w.caffemodel"
    path.write_bytes(data)
    piece = 8 << 20
    expected = hashlib.sha256(b"".join(hashlib.sha256(data[i:i + piece]).digest()
                                       for i in range(0, size, piece))).hexdigest()
    assert CaffeModel(path).digest == expected
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert CaffeModel(path).digest != expected


def caffe_pooled_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool) -> int:
    """Caffe's pooling_layer.cpp in exact fractions: ceil((size + 2·pad − kernel) / stride)
    + 1 (floor without ceil_mode), one less when the layer pads and the last window
    would start in the padding."""
    ratio = Fraction(size + 2 * pad - kernel, stride)
    out = (math.ceil(ratio) if ceil_mode else math.floor(ratio)) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def test_pool_output_size_is_caffes_rule():
    """Every size up to 40 with kernel, stride up to 8 and pad below 8; and sizes where
    floats are not exact (2^62 + 1, kernel 3, stride 2: float64 gives 2^61 + 1)."""
    cases = [(n, k, s, q, c) for n in range(1, 41) for k in range(1, 9) for s in range(1, 9)
             for q in range(8) for c in (True, False) if k <= n + 2 * q]
    cases += [((1 << 62) + 1, 3, 2, 0, True), ((1 << 62) + 1, 3, 2, 1, False),
              ((1 << 61) - 1, 7, 5, 3, True)]
    for n, k, s, q, c in cases:
        assert pool_output_size(n, k, s, q, c, padded=q > 0) == caffe_pooled_size(n, k, s, q, c), \
            (n, k, s, q, c)


def test_pool_output_size_pads_by_the_layer_not_the_axis():
    """Caffe drops a last window that starts in the padding when the layer pads along
    either axis: 6 wide, kernel 2, stride 3, no pad along it: windows at 0, 3 and 6 (past
    the edge, ceil mode), the last one dropped if the layer pads along the other axis."""
    assert pool_output_size(6, 2, 3, 0, True, padded=False) == 3
    assert pool_output_size(6, 2, 3, 0, True, padded=True) == 2


def test_tail_after_a_blob_of_unknown_shape_is_refused(tmp_path):
    text = """
input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "odd" type: "ArgMax" bottom: "data" top: "odd" }
layer { name: "fc" type: "InnerProduct" bottom: "odd" top: "fc"
        inner_product_param { num_output: 2 } }
"""
    netdef = load_netdef(write(tmp_path, text))
    assert netdef.shapes["odd"] is None
    with pytest.raises(ModelError, match="blob 'odd' has no known shape"):
        tail(netdef, "odd", ["fc"])
