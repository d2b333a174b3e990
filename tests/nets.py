"""Tiny Caffe nets written by the tests, with weights chosen so their CAMs are predictable,
prototxts shared by several test files (V1 syntax, NIN/VGG-like train files, layer
mixes for the ONNX export), and images to feed them (including a PNG bomb header)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
from conftest import require_pycaffe, shared
from synthetic import random_weights, save_caffemodel

from cam_caffe.netdef import load_netdef, param_shapes

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


V1_NET = """
name: "V1Net"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 20 input_dim: 20
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
         convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers { name: "pool1" type: POOLING bottom: "conv1" top: "pool1"
         pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layers { name: "conv2" type: CONVOLUTION bottom: "pool1" top: "conv2"
         convolution_param { num_output: 6 kernel_size: 3 pad: 1 group: 2 } }
layers { name: "relu2" type: RELU bottom: "conv2" top: "conv2" }
layers { name: "gap" type: POOLING bottom: "conv2" top: "gap"
         pooling_param { pool: AVE kernel_size: 10 stride: 10 } }
layers { name: "fc" type: INNER_PRODUCT bottom: "gap" top: "fc"
         inner_product_param { num_output: 4 } }
layers { name: "prob" type: SOFTMAX bottom: "fc" top: "prob" }
"""


NIN_NET = """
name: "NINLike"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 5 kernel_size: 3 stride: 2 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "loss" type: "Softmax" bottom: "pool" top: "loss" }
"""


VGG_LIKE = """
name: "VGGLike"
layer { name: "data" type: "Data" top: "data" top: "label"
        include { phase: TRAIN } transform_param { crop_size: 24 mirror: true } }
layer { name: "data" type: "Data" top: "data" top: "label"
        include { phase: TEST } transform_param { crop_size: 24 scale: 0.5 mean_value: 10 mean_value: 20 mean_value: 30 } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 7 kernel_size: 3 pad: 1 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "gap" type: "Pooling" bottom: "conv" top: "gap"
        pooling_param { pool: AVE kernel_size: 24 stride: 24 } }
layer { name: "drop" type: "Dropout" bottom: "gap" top: "gap" dropout_param { dropout_ratio: 0.5 } }
layer { name: "flat" type: "Flatten" bottom: "gap" top: "flat" }
layer { name: "fc" type: "InnerProduct" bottom: "flat" top: "fc" inner_product_param { num_output: 3 } }
layer { name: "acc" type: "Accuracy" bottom: "fc" bottom: "label" top: "acc" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


TINY = """
name: "Tiny"
input: "data"
input_shape { dim: 1 dim: 3 dim: 9 dim: 7 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "gap" type: "Pooling" bottom: "conv" top: "gap" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "gap" top: "fc" inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def noise_images(count, size=(180, 240), seed=0):
    """``count`` BGR images of blurred uniform noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        image = cv2.GaussianBlur(rng.integers(0, 256, (*size, 3), np.uint8), (0, 0), 3)
        out.append(np.ascontiguousarray(image))
    return out


def input_block(c: int, h: int, w: int) -> str:
    return (f'layer {{ name: "data" type: "Input" top: "data" '
            f'input_param {{ shape {{ dim: 1 dim: {c} dim: {h} dim: {w} }} }} }}\n')


def layer(name: str, kind: str, bottoms: str, tops: str, params: str = "") -> str:
    """One layer's prototxt; ``bottoms`` and ``tops`` are space-separated blob names."""
    bottom = " ".join(f'bottom: "{b}"' for b in bottoms.split())
    top = " ".join(f'top: "{t}"' for t in tops.split())
    return f'layer {{ name: "{name}" type: "{kind}" {bottom} {top} {params} }}\n'


def cam_head(feature: str, classes: int = 5, softmax: bool = True) -> str:
    """feature → global AVE pooling → fc (→ prob): the CAM structure."""
    text = (f'layer {{ name: "gap" type: "Pooling" bottom: "{feature}" top: "gap" '
            f'pooling_param {{ pool: AVE global_pooling: true }} }}\n'
            f'layer {{ name: "fc" type: "InnerProduct" bottom: "gap" top: "fc" '
            f'inner_product_param {{ num_output: {classes} }} }}\n')
    if softmax:
        text += 'layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }\n'
    return text


def nontrivial_weights(netdef, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """random_weights, with non-zero biases and BatchNorm/Scale/PReLU away from identity."""
    rng = np.random.default_rng(seed + 100)
    weights = random_weights(netdef, seed)
    for layer in netdef.net.layer:
        shapes = param_shapes(netdef, layer)
        if shapes is None:
            continue
        if layer.type == "BatchNorm":
            factor = 0.5        # Caffe stores mean · f, var · f and f itself
            weights[layer.name] = [rng.normal(0, 0.5, shapes[0]) * factor,
                                   rng.uniform(0.5, 2.0, shapes[1]) * factor,
                                   np.array([factor])]
        elif layer.type in ("Scale", "Bias"):
            weights[layer.name] = [rng.uniform(0.5, 1.5, s) if i == 0 and layer.type == "Scale"
                                   else rng.normal(0, 0.3, s) for i, s in enumerate(shapes)]
        elif layer.type == "PReLU":
            slopes = rng.uniform(0.05, 0.6, shapes[0])
            if layer.prelu_param.channel_shared:
                slopes = slopes.reshape(())   # Caffe's shared slope is a 0-axis blob
            weights[layer.name] = [slopes]
        elif layer.type in ("Convolution", "Deconvolution", "InnerProduct") and len(shapes) > 1:
            weights[layer.name][1] = rng.normal(0, 0.1, shapes[1])
    return weights


CONV = input_block(4, 17, 15) + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_size: 3 pad: 2 dilation: 2 group: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 8 kernel_h: 3 kernel_w: 1 pad_h: 1 pad_w: 0 stride_h: 2 stride_w: 1
                      bias_term: false } }
layer { name: "conv3" type: "Convolution" bottom: "conv2" top: "conv3"
  convolution_param { num_output: 8 kernel_size: 3 kernel_size: 2 stride: 1 stride: 2 pad: 1 pad: 0
                      dilation: 1 dilation: 2 group: 4 } }
layer { name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }
""" + cam_head("conv3")


ELTWISE = input_block(4, 8, 8) + """
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 5 kernel_size: 3 pad: 1 } }
layer { name: "c2" type: "Convolution" bottom: "data" top: "c2" convolution_param { num_output: 5 kernel_size: 1 } }
layer { name: "c3" type: "Convolution" bottom: "data" top: "c3" convolution_param { num_output: 5 kernel_size: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "c1" bottom: "c2" bottom: "c3" top: "sum"
  eltwise_param { operation: SUM coeff: 0.5 coeff: -2 coeff: 1 } }
layer { name: "plain" type: "Eltwise" bottom: "c1" bottom: "c2" top: "plain" }
layer { name: "prod" type: "Eltwise" bottom: "c1" bottom: "c2" bottom: "c3" top: "prod"
  eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "c1" bottom: "c2" bottom: "c3" top: "max"
  eltwise_param { operation: MAX } }
layer { name: "cat" type: "Concat" bottom: "sum" bottom: "plain" bottom: "prod" bottom: "max" top: "cat" }
""" + cam_head("cat")


SLICE_NET = """
name: "SliceNet"
input: "data"
input_shape { dim: 1 dim: 3 dim: 12 dim: 12 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "split" type: "Slice" bottom: "conv" top: "a" top: "b"
        slice_param { axis: 1 slice_point: 4 } }
layer { name: "relu" type: "ReLU" bottom: "a" top: "a" }
""" + cam_head("a", classes=3)


def png_header_only(width, height):
    """A PNG that declares ``width`` x ``height`` pixels and holds almost none."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
