"""Nets with several global-pooling → FC branches: the CAM is the branch that feeds the
net's final output (the blob its last layer writes), whatever the layers' order in the
file; when that does not decide, a one-line refusal names the candidates."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nets import NIN_NET, TINY, write_random_net

from cam_caffe.backends.opencv import OpenCVBackend
from cam_caffe.cam import cam_weights, softmax
from cam_caffe.camspec import AmbiguousCamHead, CamSpec, find_cam_layers, find_target
from cam_caffe.errors import ModelError
from cam_caffe.netdef import CaffeModel, load_netdef, read_caffemodel

INPUT = 'input: "data"\ninput_shape { dim: 1 dim: 3 dim: 12 dim: 12 }\n'
# name → (layer text, blobs it reads); the main branch "a" ends in the Softmax "prob",
# the auxiliary branch "b" (more channels, other classes) ends in its own scores.
LAYERS = {
    "conv_a": ('layer { name: "conv_a" type: "Convolution" bottom: "data" top: "feat_a" '
               'convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }', ["data"]),
    "relu_a": ('layer { name: "relu_a" type: "ReLU" bottom: "feat_a" top: "feat_a" }',
               ["feat_a"]),
    "gap_a": ('layer { name: "gap_a" type: "Pooling" bottom: "feat_a" top: "gap_a" '
              'pooling_param { pool: AVE global_pooling: true } }', ["feat_a", "relu_a"]),
    "fc_a": ('layer { name: "fc_a" type: "InnerProduct" bottom: "gap_a" top: "fc_a" '
             'inner_product_param { num_output: 3 } }', ["gap_a"]),
    "prob": ('layer { name: "prob" type: "Softmax" bottom: "fc_a" top: "prob" }', ["fc_a"]),
    "conv_b": ('layer { name: "conv_b" type: "Convolution" bottom: "data" top: "feat_b" '
               'convolution_param { num_output: 6 kernel_size: 3 } }', ["data"]),
    "gap_b": ('layer { name: "gap_b" type: "Pooling" bottom: "feat_b" top: "gap_b" '
              'pooling_param { pool: AVE kernel_size: 10 } }', ["feat_b"]),
    "fc_b": ('layer { name: "fc_b" type: "InnerProduct" bottom: "gap_b" top: "fc_b" '
             'inner_product_param { num_output: 5 } }', ["gap_b"]),
}
PRODUCES = {"conv_a": "feat_a", "relu_a": "relu_a", "gap_a": "gap_a", "fc_a": "fc_a",
            "prob": "prob", "conv_b": "feat_b", "gap_b": "gap_b", "fc_b": "fc_b"}


def net_text(order: list[str]) -> str:
    return INPUT + "\n".join(LAYERS[name][0] for name in order) + "\n"


@st.composite
def file_orders(draw) -> list[str]:
    """A random order of the layers in which each comes after what it reads, and the
    main branch's Softmax last (it is the net's final output)."""
    done, order = {"data"}, []
    rest = [name for name in LAYERS if name != "prob"]
    while rest:
        ready = [n for n in rest if all(b in done for b in LAYERS[n][1])]
        name = draw(st.sampled_from(ready))
        order.append(name)
        done.add(PRODUCES[name])
        rest.remove(name)
    return [*order, "prob"]


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=file_orders())
def test_the_branch_feeding_the_output_is_chosen_in_any_order(tmp_path, order):
    path = tmp_path / "two.prototxt"
    path.write_text(net_text(order))
    spec = find_cam_layers(load_netdef(path))
    assert (spec.feature_blob, spec.fc_layer, spec.score_blob) == ("feat_a", "fc_a", "prob")
    assert (spec.channels, spec.num_classes, spec.softmax) == (4, 3, True)


def test_chosen_branch_computes_the_output(tmp_path):
    """The aux branch last in the file (it used to be taken): the backend's probabilities
    are softmax(W_a · mean(F_a) + b_a), NumPy on the caffemodel's fc_a blobs."""
    order = ["conv_a", "relu_a", "gap_a", "fc_a", "conv_b", "gap_b", "fc_b", "prob"]
    prototxt, weights = write_random_net(tmp_path, net_text(order), "two", seed=4)
    netdef = load_netdef(prototxt)
    spec = find_cam_layers(netdef)
    backend = OpenCVBackend(netdef, CaffeModel(weights), spec)
    batch = np.random.default_rng(0).normal(0, 1, (2, 3, 12, 12)).astype(np.float32)
    out = backend.forward(batch)
    stored = {layer.name: [np.array(b.data, np.float32).reshape(tuple(b.shape.dim))
                       for b in layer.blobs] for layer in read_caffemodel(weights).layer if layer.blobs}
    w, b = stored["fc_a"]
    np.testing.assert_array_equal(cam_weights(netdef, read_caffemodel(weights), spec), w)
    assert out.features.shape == (2, 4, 12, 12)
    expected = softmax(out.features.mean(axis=(2, 3)) @ w.T + b)
    np.testing.assert_allclose(out.probs, expected, rtol=1e-5, atol=1e-6)


def test_two_branches_into_the_output_are_refused_with_their_names(tmp_path):
    order = ["conv_a", "relu_a", "gap_a", "fc_a", "conv_b", "gap_b", "fc_b"]
    text = net_text(order).replace("num_output: 5", "num_output: 3") + (
        'layer { name: "sum" type: "Eltwise" bottom: "fc_a" bottom: "fc_b" top: "sum" }\n'
        'layer { name: "prob" type: "Softmax" bottom: "sum" top: "prob" }\n')
    path = tmp_path / "merged.prototxt"
    path.write_text(text)
    with pytest.raises(AmbiguousCamHead) as error:
        find_cam_layers(load_netdef(path))
    message = str(error.value)
    with pytest.raises(AmbiguousCamHead):        # no silent fallback to another method
        find_target(load_netdef(path))
    assert "2 of them feed the net's final output 'prob'" in message
    assert "'feat_a' → 'fc_a'" in message and "'feat_b' → 'fc_b'" in message
    assert "--feature-blob" in message and "\n" not in message
    spec = find_cam_layers(load_netdef(path), "feat_b")          # the user chooses
    assert (spec.feature_blob, spec.fc_layer) == ("feat_b", "fc_b")


# A third branch, NIN-like: global average pooling straight into a Softmax (no FC).
NIN_BRANCH = (
    'layer { name: "conv_c" type: "Convolution" bottom: "data" top: "feat_c" '
    'convolution_param { num_output: 3 kernel_size: 3 pad: 1 } }\n'
    'layer { name: "gap_c" type: "Pooling" bottom: "feat_c" top: "gap_c" '
    'pooling_param { pool: AVE global_pooling: true } }\n'
    'layer { name: "prob_c" type: "Softmax" bottom: "gap_c" top: "prob_c" }\n')
MERGED = (
    'layer { name: "sum" type: "Eltwise" bottom: "fc_a" bottom: "fc_b" top: "sum" }\n'
    'layer { name: "prob" type: "Softmax" bottom: "sum" top: "prob" }\n')


@pytest.mark.parametrize(("end", "message"), [
    (MERGED, "3 CAM branches (global average pooling → InnerProduct) and 2 of them feed the "
             "net's final output 'prob': 'feat_a' → 'fc_a', 'feat_b' → 'fc_b'; choose one "
             "with --feature-blob and --fc-layer"),
    ('layer { name: "edge" type: "ReLU" bottom: "data" top: "edge" }\n',
     "3 CAM branches (global average pooling → InnerProduct) and none of them feeds the "
     "net's final output 'edge': 'feat_a' → 'fc_a', 'feat_b' → 'fc_b', 'feat_c' → 'gap_c'; "
     "choose one with --feature-blob and --fc-layer")])
def test_the_refusal_names_exactly_the_branches_in_question(tmp_path, end, message):
    """Of three branches (one without FC), the two that feed the output, or all three
    when none does, each as 'feature blob' → 'FC' (or the pooling, without FC)."""
    order = ["conv_a", "relu_a", "gap_a", "fc_a", "conv_b", "gap_b", "fc_b"]
    path = tmp_path / "three.prototxt"
    path.write_text(net_text(order).replace("num_output: 5", "num_output: 3") + NIN_BRANCH
                    + end)
    with pytest.raises(ModelError) as error:
        find_cam_layers(load_netdef(path))
    assert str(error.value) == f"{path}: {message}"


def test_no_branch_into_the_last_layer_is_refused(tmp_path):
    order = ["conv_a", "relu_a", "gap_a", "fc_a", "prob", "conv_b", "gap_b", "fc_b"]
    text = net_text(order) + 'layer { name: "edge" type: "ReLU" bottom: "data" top: "edge" }\n'
    path = tmp_path / "odd.prototxt"
    path.write_text(text)
    with pytest.raises(ModelError, match="none of them feeds the net's final output 'edge'"):
        find_cam_layers(load_netdef(path))
    with pytest.raises(ModelError, match="'edge' is not a vector of class scores"):
        find_target(load_netdef(path))        # nor is it a classifier's output
    for feature, fc in (("feat_a", None), (None, "fc_a"), ("feat_b", "fc_b")):
        spec = find_cam_layers(load_netdef(path), feature, fc)
        assert spec.fc_layer == (fc or "fc_a")


def test_the_last_layer_of_the_file_decides(tmp_path):
    """With the aux scores written last, they are the net's final output: branch b."""
    order = ["conv_a", "relu_a", "gap_a", "fc_a", "prob", "conv_b", "gap_b", "fc_b"]
    path = tmp_path / "aux_last.prototxt"
    path.write_text(net_text(order))
    spec = find_cam_layers(load_netdef(path))
    assert (spec.feature_blob, spec.fc_layer, spec.softmax) == ("feat_b", "fc_b", False)
    assert (spec.logit_blob, spec.logit_layer) == ("fc_b", "fc_b")     # no Softmax: the scores


def test_a_head_without_fc_is_the_pooled_maps_themselves(tmp_path):
    """NIN-style: global average pooling straight into Softmax. Every field a backend
    reads: the features as the in-place ReLU leaves them, K = C = 5 channels of 7x9
    (16x20 input, kernel 3, stride 2), the pooled blob as the logits; behind a layer
    whose shapes nobody knows (pycaffe's own), 0 channels of 0x0 until pycaffe says."""
    path = tmp_path / "nin.prototxt"
    path.write_text(NIN_NET.replace("dim: 16 dim: 16", "dim: 16 dim: 20"))
    assert find_cam_layers(load_netdef(path)) == CamSpec(
        "conv", "relu", None, "loss", "loss", True, 5, 5, (7, 9), "pool", "pool", True)
    path.write_text(NIN_NET.replace(
        'layer { name: "pool" type: "Pooling" bottom: "conv"',
        'layer { name: "odd" type: "MyOwnLayer" bottom: "conv" top: "odd" }\n'
        'layer { name: "pool" type: "Pooling" bottom: "odd"'))
    assert find_cam_layers(load_netdef(path)) == CamSpec(
        "odd", "odd", None, "loss", "loss", True, 0, 0, (0, 0), "pool", "pool", True)


def test_no_cam_head_and_an_fc_of_the_wrong_width_say_what_was_expected(tmp_path):
    path = tmp_path / "plain.prototxt"
    path.write_text(NIN_NET.replace("pool: AVE global_pooling: true", "pool: MAX kernel_size: 2"))
    netdef = load_netdef(path)
    expected = (r"plain\.prototxt: no CAM structure found: expected {} → global average "
                r"pooling \(AVE over the whole map, or global_pooling\) → InnerProduct "
                r"\(→ Softmax\); name the layers with --feature-blob and --fc-layer$")
    with pytest.raises(ModelError, match=expected.format("a feature blob")):
        find_cam_layers(netdef)
    with pytest.raises(ModelError, match=expected.format("blob 'conv'")):
        find_cam_layers(netdef, "conv")
    wide = tmp_path / "wide.prototxt"
    wide.write_text(TINY.replace('bottom: "gap" top: "fc"', 'bottom: "conv" top: "fc"'))
    with pytest.raises(ModelError, match=r"wide\.prototxt: FC layer 'fc' reads 252 values "
                                         r"per image, but feature blob 'conv' has 4 channels "
                                         r"\(CAM needs the FC to read the feature blob's "
                                         r"global average\)$"):
        find_cam_layers(load_netdef(wide), "conv", "fc")
    # an FC behind a layer whose shapes nobody knows is taken at its word (named by hand)
    wide.write_text(TINY.replace(
        'layer { name: "fc" type: "InnerProduct" bottom: "gap"',
        'layer { name: "odd" type: "MyOwnLayer" bottom: "gap" top: "odd" }\n'
        'layer { name: "fc" type: "InnerProduct" bottom: "odd"'))
    spec = find_cam_layers(load_netdef(wide), "conv", "fc")
    assert (spec.fc_layer, spec.channels, spec.num_classes) == ("fc", 4, 3)


@pytest.mark.parametrize("depth", [12, 13, 14])
def test_a_wrong_feature_blob_lists_the_last_twelve_candidates(tmp_path, depth):
    """A deep net: the refusal names the 12 candidates nearest the output and how many
    earlier ones it left out (a list of 50 blob names helps nobody)."""
    layers = "".join(
        f'layer {{ name: "c{i}" type: "Convolution" bottom: "{"data" if i == 0 else f"c{i - 1}"}" '
        f'top: "c{i}" convolution_param {{ num_output: 2 kernel_size: 3 pad: 1 }} }}\n'
        for i in range(depth))
    text = ('input: "data"\ninput_shape { dim: 1 dim: 3 dim: 6 dim: 6 }\n' + layers +
            f'layer {{ name: "fc" type: "InnerProduct" bottom: "c{depth - 1}" top: "fc" '
            'inner_product_param { num_output: 3 } }\n'
            'layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }\n')
    path = tmp_path / "deep.prototxt"
    path.write_text(text)
    listed = ", ".join(f"c{i}" for i in range(depth - 12, depth))
    more = f" and {depth - 12} earlier" if depth > 12 else ""
    with pytest.raises(ModelError, match=rf"--feature-blob 'nope': no blob of that name; "
                                         rf"candidates \(input to output\): {listed}{more}$"):
        find_target(load_netdef(path), "nope")
