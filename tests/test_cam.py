"""The CAM head's weights as cam.py reads them from a caffemodel: W (classes × channels)
as written, with and without InnerProduct's ``transpose``, square ones included, and
the identity for a head without FC. (cam.py's maths, Σ_k w_ck·F_k, softmax and the
bilinear upsampling, are checked against NumPy in test_properties.py.)"""
from __future__ import annotations

import numpy as np
import pytest
from nets import write_random_net
from synthetic import save_caffemodel

from cam_caffe.cam import cam_weights, normalize
from cam_caffe.camspec import find_cam_layers
from cam_caffe.netdef import load_netdef, read_caffemodel


def cam_net(channels: int, classes: int, transpose: bool = False, fc: bool = True) -> str:
    """conv (``channels`` maps) → global average pool → [FC to ``classes``] → Softmax."""
    head = (f'layer {{ name: "fc" type: "InnerProduct" bottom: "gap" top: "fc" '
            f'inner_product_param {{ num_output: {classes} transpose: {str(transpose).lower()} '
            f'}} }}\nlayer {{ name: "prob" type: "Softmax" bottom: "fc" top: "prob" }}'
            if fc else 'layer { name: "prob" type: "Softmax" bottom: "gap" top: "prob" }')
    return f"""
input: "data"
input_shape {{ dim: 1 dim: 3 dim: 8 dim: 8 }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "feat"
        convolution_param {{ num_output: {channels} kernel_size: 3 pad: 1 }} }}
layer {{ name: "gap" type: "Pooling" bottom: "feat" top: "gap"
        pooling_param {{ pool: AVE global_pooling: true }} }}
{head}
"""


@pytest.mark.parametrize(("channels", "classes", "transpose"),
                         [(4, 3, False), (4, 3, True), (3, 3, False), (3, 3, True)])
def test_cam_weights_are_the_fc_matrix_classes_by_channels(tmp_path, channels, classes,
                                                          transpose):
    """W (classes × channels) as written, however the caffemodel stores it: with
    ``transpose: true`` Caffe keeps Wᵀ (channels × classes), square ones included."""
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text(cam_net(channels, classes, transpose))
    netdef = load_netdef(prototxt)
    rng = np.random.default_rng(1)
    conv = rng.standard_normal((channels, 3, 3, 3)).astype(np.float32)
    w = rng.standard_normal((classes, channels)).astype(np.float32)
    stored = np.ascontiguousarray(w.T) if transpose else w
    save_caffemodel(netdef, {"conv": [conv, np.zeros(channels)],
                             "fc": [stored, np.zeros(classes)]}, tmp_path / "net.caffemodel")
    weights = read_caffemodel(tmp_path / "net.caffemodel")
    result = cam_weights(netdef, weights, find_cam_layers(netdef))
    assert result.dtype == np.float32 and result.flags.c_contiguous
    np.testing.assert_array_equal(result, w)


def test_cam_weights_without_fc_are_the_identity(tmp_path):
    """Global pooling straight into Softmax: class c is feature map c."""
    prototxt, model = write_random_net(tmp_path, cam_net(5, 5, fc=False), "nofc")
    netdef = load_netdef(prototxt)
    result = cam_weights(netdef, read_caffemodel(model), find_cam_layers(netdef))
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, np.eye(5, dtype=np.float32))


def test_normalize_scales_to_zero_one_in_float32_and_a_flat_map_to_zeros():
    """What every rendering and metric reads: min 0, max 1, float32 even from float64
    maps; a constant map (all evidence equal, or a dead class) is zeros, not 0/0."""
    cam = np.array([[2.0, 4.0], [3.0, 6.0]])
    result = normalize(cam)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, [[0, 0.5], [0.25, 1]], rtol=0, atol=1e-7)
    for flat in (np.full((3, 4), 7.5), np.full((3, 4), np.nan)):
        result = normalize(flat)
        assert result.dtype == np.float32 and result.shape == (3, 4) and not result.any()
