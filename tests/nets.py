"""Tiny Caffe nets written by the tests, with weights chosen so their CAMs are predictable."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from conftest import require_pycaffe, shared
from synthetic import random_weights, save_caffemodel

from cam_caffe.netdef import load_netdef

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


def square_case(folder: Path) -> tuple[Path, list[str]]:
    """The square net and one image of it in ``folder``: (image, the model's CLI arguments)."""
    prototxt, weights, _ = write_square_net(folder)
    image = folder / "i.png"
    cv2.imwrite(str(image), square_image(10, 10))
    return image, ["--prototxt", str(prototxt), "--weights", str(weights), "--mean", "0"]


def write_random_net(folder: Path, prototxt_text: str, name: str, seed: int = 0,
                     **load_args) -> tuple[Path, Path]:
    """Write ``prototxt_text`` and a He-random caffemodel for it."""
    prototxt = folder / f"{name}.prototxt"
    prototxt.write_text(prototxt_text)
    model = folder / f"{name}.caffemodel"
    netdef = load_netdef(prototxt, **load_args)
    save_caffemodel(netdef, random_weights(netdef, seed), model)
    return prototxt, model


# A colour detector with five classes, so that a batch's images have different top-1
# classes: conv "colour" (3x3, pad 1): channels 0–2 respond to blue, green and red
# (that channel minus half the others), 3 to brightness, 4 to darkness, 5 to a random
# mix; ReLU; 2x2 max pool → 12x12 feature map "feat"; global average pool; FC: class
# c reads channel c (weight 6), every class a little of each channel (random).
COLOUR_PROTOTXT = """
name: "ColourNet"
input: "data"
input_shape { dim: 1 dim: 3 dim: 24 dim: 24 }
layer { name: "colour" type: "Convolution" bottom: "data" top: "colour"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "relu" type: "ReLU" bottom: "colour" top: "colour" }
layer { name: "feat" type: "Pooling" bottom: "colour" top: "feat"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "gap" type: "Pooling" bottom: "feat" top: "gap"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "gap" top: "fc"
        inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""
COLOUR_LABELS = "blue\ngreen\nred\nwhite\nblack\n"
COLOUR_ARGS = {"mean": "0", "scale": 1 / 255}    # CAMNet arguments the net expects


def write_colour_net(folder: Path) -> tuple[Path, Path, Path]:
    """Write prototxt, caffemodel and labels of the colour net; return their paths."""
    rng = np.random.default_rng(7)
    prototxt = folder / "colour.prototxt"
    prototxt.write_text(COLOUR_PROTOTXT)
    conv = rng.normal(0, 0.05, (6, 3, 3, 3)).astype(np.float32)
    for k in range(3):
        conv[k, :, 1, 1] = -0.5
        conv[k, k, 1, 1] = 1.0
    conv[3, :, 1, 1] = 1 / 3
    conv[4, :, 1, 1] = -1 / 3
    bias = np.array([0, 0, 0, -0.5, 0.5, 0], np.float32)
    fc = (rng.normal(0, 0.5, (5, 6)) + 6 * np.eye(5, 6)).astype(np.float32)
    model = folder / "colour.caffemodel"
    save_caffemodel(load_netdef(prototxt), {"colour": [conv, bias], "fc": [fc, np.zeros(5)]},
                    model)
    labels = folder / "colour.txt"
    labels.write_text(COLOUR_LABELS)
    return prototxt, model, labels


def colour_images(count: int = 7, seed: int = 0) -> list[np.ndarray]:
    """``count`` non-square BGR images of assorted sizes, each dominated by one colour
    (blue, green, red, white, black in turn) with darker and lighter blobs."""
    rng = np.random.default_rng(seed)
    dominant = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (230, 230, 230), (15, 15, 15)]
    images = []
    for i in range(count):
        height, width = int(rng.integers(30, 70)), int(rng.integers(40, 90))
        image = np.empty((height, width, 3), np.float32)
        image[:] = dominant[i % len(dominant)]
        for _ in range(3):
            y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
            radius = int(rng.integers(3, 12))
            cv2.circle(image, (x, y), radius, rng.integers(0, 256, 3).tolist(), -1)
        image += rng.normal(0, 12, image.shape)
        images.append(np.clip(cv2.GaussianBlur(image, (0, 0), 1.5), 0, 255).astype(np.uint8))
    return images


def pycaffe_googlenet_weights(folder: Path, seed: int) -> Path:
    """A caffemodel of the official GoogLeNet-CAM prototxt with random weights from its
    own fillers, made and saved by pycaffe (seeded)."""
    caffe = require_pycaffe()
    caffe.set_mode_cpu()
    caffe.set_random_seed(seed)
    net = caffe.Net(str(shared("googlenet_cam", "deploy_googlenetCAM.prototxt")), caffe.TEST)
    path = folder / "googlenet.caffemodel"
    net.save(str(path))
    return path
