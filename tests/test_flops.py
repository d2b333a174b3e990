"""FLOP counts: hand counts on tiny nets; GoogLeNet-CAM against an independent NumPy count
and against OpenCV's own per-layer estimate."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import GOOGLENET
from flops import count_flops, layer_flops
from google.protobuf import text_format
from nets import SQUARE_PROTOTXT
from synthetic import random_weights, save_caffemodel

from cam_caffe import proto
from cam_caffe.netdef import load_netdef

GOOGLENET_FLOPS = 4_453_588_320      # 4.45 GFLOP per 224x224 image

MIXED_PROTOTXT = """
name: "Mixed"
input: "data"
input_shape { dim: 1 dim: 4 dim: 8 dim: 8 }
layer { name: "gconv" type: "Convolution" bottom: "data" top: "gconv"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 group: 2 bias_term: false } }
layer { name: "up" type: "Deconvolution" bottom: "gconv" top: "up"
        convolution_param { num_output: 2 kernel_size: 2 stride: 2 } }
layer { name: "norm" type: "LRN" bottom: "up" top: "norm" lrn_param { local_size: 3 } }
layer { name: "sum" type: "Eltwise" bottom: "up" bottom: "norm" top: "sum"
        %s }
layer { name: "cat" type: "Concat" bottom: "sum" bottom: "up" top: "cat" }
layer { name: "fc" type: "InnerProduct" bottom: "sum" top: "fc"
        inner_product_param { num_output: 5 } }
"""


def by_name(prototxt: Path) -> dict[str, int]:
    return {entry.name: entry.flops for entry in layer_flops(load_netdef(prototxt))}


def test_square_net_hand_count(tmp_path: Path) -> None:
    path = tmp_path / "square.prototxt"
    path.write_text(SQUARE_PROTOTXT)
    counts = by_name(path)
    assert counts == {
        "data": 0,
        "bright": 2 * 2 * 32 * 32 * 3 + 2 * 32 * 32,   # 1x1 conv 3->2 at 32x32, + bias
        "relu": 2 * 32 * 32,
        "feat": 2 * 16 * 16 * 4,                       # 2x2 max pool: 4 per output
        "gap": 2 * 16 * 16,                            # global pool: 1 per input
        "fc": 2 * 2 * 2 + 2,
        "prob": 3 * 2,
    }
    assert count_flops(load_netdef(path)) == 14336 + 2048 + 2048 + 512 + 10 + 6


@pytest.mark.parametrize(("eltwise", "eltwise_flops"), [
    ("", 512),                                                   # SUM: n − 1 = 1 per element
    ("eltwise_param { coeff: 1 coeff: -1 }", 3 * 512),           # with coefficients: 2n − 1
])
def test_group_deconv_lrn_eltwise_hand_count(tmp_path: Path, eltwise: str,
                                             eltwise_flops: int) -> None:
    path = tmp_path / "mixed.prototxt"
    path.write_text(MIXED_PROTOTXT % eltwise)
    counts = by_name(path)
    assert counts["gconv"] == 2 * 6 * 8 * 8 * (4 // 2) * 3 * 3          # no bias
    assert counts["up"] == 2 * 6 * 8 * 8 * 2 * 2 * 2 + 2 * 16 * 16      # per input pixel
    assert counts["norm"] == 2 * 16 * 16 * (2 * 3 + 3)
    assert counts["sum"] == eltwise_flops
    assert counts["cat"] == 0
    assert counts["fc"] == 2 * (2 * 16 * 16) * 5 + 5
    assert count_flops(load_netdef(path)) == sum(counts.values())


def reference_counts(prototxt: Path) -> dict[str, int]:
    """An independent count: the prototxt parsed and its shapes propagated here, with
    NumPy, following Caffe's rules for the layer types GoogLeNet-CAM uses."""
    net = proto.NetParameter()
    text_format.Parse(prototxt.read_text(), net)
    shapes = {net.input[0]: np.array(net.input_shape[0].dim)}
    counts = {}

    def positions(size: int, kernel: int, pad: int, stride: int, ceil: bool) -> int:
        last = size + 2 * pad - kernel                          # the last window's start
        starts = np.arange(0, last + (stride if ceil else 1), stride)
        return int(np.count_nonzero(starts < size + pad))       # Caffe: start inside image

    for layer in net.layer:
        x = shapes[layer.bottom[0]]
        if layer.type == "Convolution":
            p = layer.convolution_param
            k, pad, s = p.kernel_size[0], (list(p.pad) or [0])[0], (list(p.stride) or [1])[0]
            n = positions(x[2], k, pad, s, False)
            weights = np.zeros((p.num_output, x[1] // p.group, k, k), np.float32)
            y = np.array([1, p.num_output, n, n])
            flops = 2 * weights.size * n * n + np.prod(y)       # each weight used once a pixel
        elif layer.type == "Pooling":
            p = layer.pooling_param
            n = positions(x[2], p.kernel_size, p.pad, p.stride, True)
            y = np.array([1, x[1], n, n])
            flops = np.prod(y) * p.kernel_size ** 2
        elif layer.type == "LRN":
            y, flops = x, np.prod(x) * (2 * layer.lrn_param.local_size + 3)
        elif layer.type == "Concat":
            parts = [shapes[b] for b in layer.bottom]
            y, flops = np.array([1, sum(s[1] for s in parts), *x[2:]]), 0
        elif layer.type == "InnerProduct":
            y = np.array([1, layer.inner_product_param.num_output])
            flops = 2 * np.prod(x) * y[1] + y[1]
        elif layer.type == "ReLU":
            y, flops = x, np.prod(x)
        elif layer.type == "Softmax":
            y, flops = x, 3 * np.prod(x)
        else:
            raise AssertionError(f"unexpected layer type {layer.type}")
        shapes[layer.top[0]] = y
        counts[layer.name] = int(flops)
    return counts


def test_googlenet_cam_matches_independent_numpy_count() -> None:
    ours = by_name(GOOGLENET)
    ours.pop("data")
    reference = reference_counts(GOOGLENET)
    assert ours == reference
    assert count_flops(load_netdef(GOOGLENET)) == sum(reference.values()) == GOOGLENET_FLOPS
    assert math.isclose(GOOGLENET_FLOPS, 4.4e9, rel_tol=0.02)
    conv = sum(e.flops for e in layer_flops(load_netdef(GOOGLENET)) if e.type == "Convolution")
    assert conv / GOOGLENET_FLOPS > 0.99                   # the convolutions are the work
    assert ours["CAM_conv"] == 2 * 1024 * 14 * 14 * 416 * 9 + 1024 * 14 * 14   # group 2


def test_googlenet_cam_convolutions_match_opencv(tmp_path: Path) -> None:
    """OpenCV counts a convolution as out·(2·k²·in_c + 1), like us for group 1 (it
    ignores ``group``, so CAM_conv is left out), and a ReLU as 1 per element."""
    netdef = load_netdef(GOOGLENET)
    model = tmp_path / "googlenet.caffemodel"
    save_caffemodel(netdef, random_weights(netdef), model)
    net = cv2.dnn.readNetFromCaffe(str(GOOGLENET), str(model))
    checked = 0
    for entry in layer_flops(netdef):
        layer = netdef.layer(entry.name)
        if entry.type == "ReLU" or (entry.type == "Convolution"
                                    and layer.convolution_param.group == 1):
            assert net.getFLOPS(net.getLayerId(entry.name), netdef.input_shape) == entry.flops, \
                entry.name
            checked += 1
    assert checked == 45 + 46
