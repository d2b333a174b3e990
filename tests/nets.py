"""Tiny Caffe nets written by the tests, with weights chosen so their CAMs are predictable."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cam_caffe.netdef import load_netdef
from cam_caffe.synthetic import random_weights, save_caffemodel

# A bright-square detector. conv "bright" (1x1): channel 0 = mean brightness − 0.5
# (> 0 on white), channel 1 = 0.5 − brightness (> 0 on black); ReLU; 2x2 max pool
# → 16x16 feature map "feat"; global average pool; FC: class 0 reads channel 0
# ("square"), class 1 reads channel 1 ("background").
SQUARE_PROTOTXT = """
name: "SquareNet"
input: "data"
input_shape { dim: 1 dim: 3 dim: 32 dim: 32 }
layer { name: "bright" type: "Convolution" bottom: "data" top: "bright"
        convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "relu" type: "ReLU" bottom: "bright" top: "bright" }
layer { name: "feat" type: "Pooling" bottom: "bright" top: "feat"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "gap" type: "Pooling" bottom: "feat" top: "gap"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "gap" top: "fc"
        inner_product_param { num_output: 2 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""
SQUARE_LABELS = "square\nbackground\n"


def write_square_net(folder: Path) -> tuple[Path, Path, Path]:
    """Write prototxt, caffemodel and labels of the square net; return their paths."""
    prototxt = folder / "square.prototxt"
    prototxt.write_text(SQUARE_PROTOTXT)
    netdef = load_netdef(prototxt)
    conv = np.zeros((2, 3, 1, 1), np.float32)
    conv[0, :, 0, 0] = 1 / 3
    conv[1, :, 0, 0] = -1 / 3
    fc = np.array([[8.0, 0.0], [0.0, 8.0]], np.float32)
    weights = {"bright": [conv, np.array([-0.5, 0.5])], "fc": [fc, np.zeros(2)]}
    model = folder / "square.caffemodel"
    save_caffemodel(netdef, weights, model)
    labels = folder / "square.txt"
    labels.write_text(SQUARE_LABELS)
    return prototxt, model, labels


def square_image(top: int, left: int, size: int = 40,
                 shape: tuple[int, int] = (160, 200)) -> np.ndarray:
    """A black BGR image of ``shape`` with a white ``size`` square at (top, left)."""
    image = np.zeros((*shape, 3), np.uint8)
    image[top:top + size, left:left + size] = 255
    return image


def write_random_net(folder: Path, prototxt_text: str, name: str, seed: int = 0,
                     **load_args) -> tuple[Path, Path]:
    """Write ``prototxt_text`` and a He-random caffemodel for it."""
    prototxt = folder / f"{name}.prototxt"
    prototxt.write_text(prototxt_text)
    model = folder / f"{name}.caffemodel"
    netdef = load_netdef(prototxt, **load_args)
    save_caffemodel(netdef, random_weights(netdef, seed), model)
    return prototxt, model
