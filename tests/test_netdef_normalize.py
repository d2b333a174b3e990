"""The deploy net made of any prototxt, against Caffe's own reading of the same file:
the layers it keeps for phase TEST, the input it declares, the losses it drops."""
import re

import numpy as np
import pytest
from conftest import require_pycaffe
from nets import input_block, write_random_net

from cam_caffe.errors import ModelError
from cam_caffe.netdef import load_netdef, tail

RULES = [
    "include { phase: TEST }", "include { phase: TRAIN }", "exclude { phase: TEST }",
    "exclude { phase: TRAIN }", "include { min_level: 1 }", "include { min_level: 0 }",
    "include { max_level: 0 }", "include { max_level: -1 }", "include { stage: 'deploy' }",
    "include { not_stage: 'deploy' }", "exclude { not_stage: 'deploy' }",
    "exclude { stage: 'deploy' }", "include { phase: TRAIN } include { phase: TEST }",
    "include { phase: TEST min_level: 2 }", "exclude { phase: TRAIN } exclude { min_level: 0 }",
    "include { phase: TEST stage: 'a' not_stage: 'b' }",
]


def write(tmp_path, text, name="net"):
    path = tmp_path / f"{name}.prototxt"
    path.write_text(text)
    return path


def test_layers_kept_for_test_are_those_caffe_keeps(tmp_path):
    """Caffe's StateMeetsRule for phase TEST, level 0, no stages, rule by rule: a layer
    kept that Caffe drops (a TRAIN-only scale) would change every score."""
    caffe = require_pycaffe()
    text = input_block(3, 4, 4) + "".join(
        f'layer {{ name: "r{i}" type: "ReLU" bottom: "data" top: "data" {rule} }}\n'
        for i, rule in enumerate(RULES))
    path = write(tmp_path, text)
    net = caffe.Net(str(path), caffe.TEST)
    ours = [layer.name for layer in load_netdef(path).net.layer]
    assert ours == list(net._layer_names)
    assert 0 < len(ours) - 1 < len(RULES)


def test_data_layers_give_the_input_and_its_preprocessing(tmp_path):
    """The input shape and transform_param of the data layer Caffe would use in TEST
    (the TRAIN one first in the file is not it; another type's parameter block in it
    is ignored, as Caffe ignores it), and its label blob gone."""
    text = """
name: "Net"
layer { name: "train" type: "Data" top: "data" top: "label" include { phase: TRAIN }
        transform_param { crop_size: 5 scale: 9 mean_value: 1 } }
layer { name: "test" type: "ImageData" top: "data" top: "label" include { phase: TEST }
        image_data_param { new_height: 6 new_width: 7 }
        dummy_data_param { shape { dim: 1 dim: 1 dim: 2 dim: 2 } }
        transform_param { scale: 0.25 mean_value: 1 mean_value: 2 mean_value: 3 mean_file: "m" } }
layer { name: "relu" type: "ReLU" bottom: "data" top: "out" }
"""
    netdef = load_netdef(write(tmp_path, text))
    assert netdef.input_shape == (1, 3, 6, 7)
    assert (netdef.transform.scale, netdef.transform.mean_values, netdef.transform.mean_file
            ) == (0.25, [1, 2, 3], "m")
    assert [layer.name for layer in netdef.net.layer] == ["data", "relu"]
    assert netdef.net.name == "Net"
    cropped = load_netdef(write(tmp_path, text.replace("scale: 0.25", "crop_size: 4")))
    assert cropped.input_shape == (1, 3, 4, 4)
    assert cropped.transform.scale == 1.0                  # unset scale: Caffe's 1


@pytest.mark.parametrize(("declaration", "shape"), [
    ('input: "x" input_shape { dim: 2 dim: 5 dim: 6 dim: 7 }', (1, 5, 6, 7)),
    ('input: "x" input_dim: 2 input_dim: 5 input_dim: 6 input_dim: 7', (1, 5, 6, 7)),
    ('input: "x" input_dim: 2 input_dim: 5 input_dim: 6 input_dim: 7 input: "z" '
     'input_dim: 1 input_dim: 1 input_dim: 1 input_dim: 1', (1, 5, 6, 7)),
    ('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 3 dim: 5 dim: 6 '
     'dim: 7 } } }', (1, 5, 6, 7)),
    ('layer { name: "x" type: "MemoryData" top: "x" top: "l" memory_data_param { batch_size: 2 '
     'channels: 5 height: 6 width: 7 } }', (1, 5, 6, 7)),
    ('layer { name: "x" type: "DummyData" top: "x" top: "l" dummy_data_param { shape { dim: 2 '
     'dim: 5 dim: 6 dim: 7 } shape { dim: 2 } } }', (1, 5, 6, 7)),
])
def test_every_input_declaration_gives_its_shape_at_batch_one(tmp_path, declaration, shape):
    """Each way a prototxt declares its input, as the blob shape pycaffe gives it (at
    batch 1): the CAM layers and the preprocessing are sized from it."""
    caffe = require_pycaffe()
    text = declaration + '\nlayer { name: "relu" type: "ReLU" bottom: "x" top: "y" }\n'
    path = write(tmp_path, text)
    netdef = load_netdef(path)
    assert netdef.input_shape == shape and netdef.input_name == "x"
    assert netdef.transform is None                        # no transform_param to read
    assert netdef.shapes["y"] == shape
    assert (1, *caffe.Net(str(path), caffe.TEST).blobs["x"].data.shape[1:]) == shape


@pytest.mark.parametrize(("declaration", "message"), [
    ('input: "x"', r"input 'x' has no shape \(input_dim or input_shape\)"),
    ('input: "x" input_dim: 1 input_dim: 3 input_dim: 4', "input 'x' has no shape"),
    ('input: "x" input_shape { dim: 3 dim: 4 dim: 5 }',
     r"the input must be 4-D \(N, C, H, W\); found shape \[3, 4, 5\]"),
    ('layer { name: "x" type: "Input" top: "x" }', r"found shape \[\]"),
    ('layer { name: "x" type: "DummyData" top: "x" dummy_data_param { shape { dim: 1 dim: 2 } } }',
     r"found shape \[1, 2\]"),
    ('layer { name: "p" type: "Python" top: "x" }', re.escape(
        "layer 'p' is a Python layer, which would run code from the model files; pass "
        "--allow-python-layers if you trust them")),
    ('input: "x" input_shape { dim: 1 dim: 3 dim: 4 dim: 0 }', "pass --input-size"),
    ('input: "x" input_shape { dim: 1 dim: 0 dim: 4 dim: 4 }',
     r"input shape \[1, 0, 4, 4\]: every dimension must be a positive 64-bit integer"),
    ('layer { name: "r" type: "ReLU" bottom: "a" top: "a" }',
     r"the net declares no input \(no 'input' field and no data layer\)"),
])
def test_an_input_caffe_cannot_build_is_refused(tmp_path, declaration, message):
    """An input without a 4-D positive shape: a one-line error naming the file."""
    path = write(tmp_path, declaration + '\nlayer { name: "relu" type: "ReLU" bottom: "x" '
                 'top: "y" }\n')
    with pytest.raises(ModelError, match=f"^{path}: .*{message}"):
        load_netdef(path)


def test_input_size_overrides_height_and_width_only(tmp_path):
    """--input-size sets H and W (C from the file); one past int64 is refused, as Caffe's
    int64 blob shapes could not hold it."""
    path = write(tmp_path, 'input: "x" input_shape { dim: 4 dim: 5 dim: 6 dim: 7 }\n'
                 'layer { name: "relu" type: "ReLU" bottom: "x" top: "y" }\n')
    assert load_netdef(path, input_size=(9, 8)).input_shape == (1, 5, 9, 8)
    assert load_netdef(path, input_size=((1 << 63) - 1, 1)).input_shape[2] == (1 << 63) - 1
    with pytest.raises(ModelError, match=r"input shape \[1, 5, 1, 9223372036854775808\]"):
        load_netdef(path, input_size=(1, 1 << 63))


LOSSES = """
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 2 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "fc" bottom: "label" top: "TAKEN" }
layer { name: "eu" type: "EuclideanLoss" bottom: "fc" bottom: "label" top: "eu" }
"""
DATA = ('layer { name: "d" type: "DummyData" top: "data" top: "label" dummy_data_param { '
        'shape { dim: 1 dim: 3 dim: 2 dim: 2 } shape { dim: 1 } } }\n')


@pytest.mark.parametrize(("taken", "name"),
                         [("acc", "prob"), ("prob", "prob"), ("fc2", "loss_prob")])
def test_a_softmax_loss_becomes_a_softmax_named_prob_unless_taken(tmp_path, taken, name):
    """SoftmaxWithLoss → Softmax (the class probabilities), named "prob" unless a kept
    layer or blob has that name (a dropped Accuracy's does not count); other losses go."""
    text = DATA + LOSSES.replace("TAKEN", "prob" if taken == "prob" else "acc")
    if taken == "fc2":
        text += 'layer { name: "prob" type: "ReLU" bottom: "fc" top: "r" }\n'
    netdef = load_netdef(write(tmp_path, text))
    layers = [(layer.name, layer.type, list(layer.bottom), list(layer.top))
              for layer in netdef.net.layer]
    assert (name, "Softmax", ["fc"], [name]) in layers
    assert not {"Accuracy", "EuclideanLoss", "SoftmaxWithLoss", "DummyData"} & {
        layer.type for layer in netdef.net.layer}
    assert netdef.shapes[name] == (1, 2)


def test_a_fixed_pooling_net_at_another_size_names_the_size_it_takes(tmp_path):
    """The fixed AVE window after a stride-2 conv: 2·5 x 2·3; at a smaller size the
    error says which --input-size the net takes (H and W not swapped)."""
    text = input_block(3, 10, 6) + """
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 2 kernel_size: 1 stride: 2 } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
        pooling_param { pool: AVE kernel_h: 5 kernel_w: 3 } }
layer { name: "max" type: "Pooling" bottom: "pool" top: "max"
        pooling_param { pool: MAX kernel_size: 1 } }
"""
    path = write(tmp_path, text.replace("dim: 10 dim: 6", "dim: 0 dim: 0"))
    # the last pooling is MAX: no fixed size to solve from
    with pytest.raises(ModelError, match="^" + re.escape(
            f"{tmp_path / 'net.prototxt'}: the net does not declare its input size; pass "
            "--input-size (e.g. 32 for CIFAR nets, 224 for ImageNet nets)") + "$"):
        load_netdef(path)
    text = text.replace('name: "max" type: "Pooling"', 'name: "max" type: "ReLU"').replace(
        "pooling_param { pool: MAX kernel_size: 1 }", "")
    for unset in ("dim: 0 dim: 0", "dim: 0 dim: 6", "dim: 10 dim: 0"):
        assert load_netdef(write(tmp_path, text.replace("dim: 10 dim: 6", unset))
                           ).input_shape == (1, 3, 10, 6)
    path = write(tmp_path, text)
    with pytest.raises(ModelError, match="^" + re.escape(
            f"{path}: layer 'pool' (Pooling): pooling kernel 5x3 is larger than its input 3x3: "
            "this net's fixed layers only take 10x6 inputs (pooling 'pool' has a fixed "
            "window); use --input-size 10x6") + "$"):
        load_netdef(path, input_size=(6, 6))
    # a layer that fails at every size: its own error, not the size hint
    broken = text + 'layer { name: "e" type: "Eltwise" bottom: "pool" bottom: "conv" top: "e" }\n'
    with pytest.raises(ModelError, match=f"^{re.escape(str(path))}: layer 'e' \\(Eltwise\\): "
                       "inputs of different shapes"):
        load_netdef(write(tmp_path, broken), input_size=(6, 6))
    with pytest.raises(ModelError, match=r"too small for this kernel$"):
        load_netdef(write(tmp_path, text.replace("kernel_size: 1 stride", "kernel_size: 20 stride")))


TAIL_NET = 'name: "TailNet"\n' + input_block(3, 8, 8) + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "conv1/input" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "side" type: "Convolution" bottom: "conv1" top: "side"
        convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "a" type: "Convolution" bottom: "conv1" top: "a"
        convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "b" type: "Convolution" bottom: "conv1" top: "b"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" }
layer { name: "gap" type: "Pooling" bottom: "sum" top: "gap"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "gap" top: "fc" inner_product_param { num_output: 3 } }
layer { name: "mix" type: "Eltwise" bottom: "fc" bottom: "fc" top: "mix" }
"""


def test_the_tail_after_a_blob_computes_what_the_whole_net_does(tmp_path):
    """The part of a net after a blob (Score-CAM's and the gradients' second half):
    fed that blob's value, pycaffe on the tail gives the whole net's scores; only the
    layers the outputs need are kept, its input layer's name taken by no layer."""
    caffe = require_pycaffe()
    prototxt, weights = write_random_net(tmp_path, TAIL_NET, "tail")
    netdef = load_netdef(prototxt)
    part = tail(netdef, "conv1", ["fc"])
    assert [layer.name for layer in part.net.layer] == ["conv1/input1", "a", "b", "sum", "gap",
                                                        "fc"]
    assert part.net.name == netdef.net.name and part.input_name == "conv1"
    assert part.input_shape == (1, 4, 8, 8) == part.shapes["conv1"]
    assert part.shapes == {b: netdef.shapes[b] for b in part.shapes}
    assert part.producers["fc"] == "fc" and part.path == netdef.path
    assert tail(netdef, "sum", ["fc"]).net.layer[0].name == "sum/input"
    whole = caffe.Net(str(prototxt), caffe.TEST, weights=str(weights))
    whole.blobs["data"].data[...] = np.random.default_rng(0).normal(0, 1, (1, 3, 8, 8))
    whole.forward()
    path = tmp_path / "part.prototxt"
    path.write_text(part.prototxt())
    second = caffe.Net(str(path), caffe.TEST, weights=str(weights))
    second.blobs["conv1"].data[...] = whole.blobs["conv1"].data
    second.forward()
    np.testing.assert_allclose(second.blobs["fc"].data, whole.blobs["fc"].data, rtol=1e-5)


def test_the_tail_input_layer_takes_a_free_name_when_every_other_is_taken(tmp_path):
    """Every layer named like a tail input (the Input layer itself too): the next free
    name is still found, and weights, copied by layer name, never land on it."""
    text = ('input: "c/input1" input_shape { dim: 1 dim: 2 dim: 3 dim: 3 }\n'
            'layer { name: "c/input" type: "Convolution" bottom: "c/input1" top: "c" '
            'convolution_param { num_output: 2 kernel_size: 1 } }\n'
            'layer { name: "c/input2" type: "InnerProduct" bottom: "c" top: "fc" '
            'inner_product_param { num_output: 2 } }\n')
    netdef = load_netdef(write(tmp_path, text))
    assert [layer.name for layer in tail(netdef, "c", ["fc"]).net.layer] == ["c/input3",
                                                                             "c/input2"]


def test_a_blob_that_does_not_cut_the_net_has_no_tail(tmp_path):
    """Blob "a" is one branch: "sum" also reads "b", computed from "conv1", before it."""
    netdef = load_netdef(write(tmp_path, TAIL_NET))
    with pytest.raises(ModelError, match="^" + re.escape(
            f"{netdef.path}: the layers after blob 'a' also read blob 'conv1', computed before "
            "it: choose a blob that every path to the class scores goes through") + "$"):
        tail(netdef, "a", ["mix"])
