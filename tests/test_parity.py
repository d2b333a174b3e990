"""pycaffe and OpenCV compute the same thing; pycaffe matches an independent NumPy forward.

These tests need pycaffe (scripts/install_pycaffe.sh); under CI=true they never skip.
"""
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import GOOGLENET, assert_rel_close, require_pycaffe, shared
from nets import (
    NIN_NET,
    TINY,
    V1_NET,
    noise_images,
    pycaffe_googlenet_weights,
    square_image,
    write_random_net,
    write_square_net,
)

from cam_caffe import CAMNet
from cam_caffe.errors import BackendError, ModelError

REL = 1e-4


def compare_backends(prototxt, weights, batch, **kwargs):
    """Run the same images through both backends; compare probabilities and CAMs."""
    require_pycaffe()
    nets = {name: CAMNet(prototxt, weights, backend=name, **kwargs) for name in ("caffe", "opencv")}
    assert nets["caffe"].backend.name == "caffe"
    spec = nets["caffe"].spec          # the CAM weights read from the file are pycaffe's
    fc = (nets["caffe"].backend.net.params[spec.fc_layer][0].data if spec.fc_layer
          else np.eye(spec.num_classes))
    np.testing.assert_array_equal(nets["opencv"].cam_weights,
                                  fc.T if fc.shape == (spec.channels, spec.num_classes)
                                  != (spec.num_classes, spec.channels) else fc)
    results = {}
    for name, net in nets.items():
        out = net.backend.forward(net.preprocess(batch))
        results[name] = out
    assert_rel_close(results["caffe"].probs, results["opencv"].probs)
    assert_rel_close(results["caffe"].features, results["opencv"].features)
    top = {n: net.predict(batch, top_k=3) for n, net in nets.items()}
    for a, b in zip(top["caffe"], top["opencv"], strict=True):
        assert a.classes == b.classes or np.allclose(a.probs[a.classes], b.probs[b.classes], rtol=1e-4)
        assert_rel_close(a.cams, b.cams)
    return nets, results


@pytest.fixture(scope="module")
def googlenet_pycaffe_weights(tmp_path_factory):
    """The official prototxt with its own fillers' random weights, saved by pycaffe."""
    return (shared("googlenet_cam", "deploy_googlenetCAM.prototxt"),
            pycaffe_googlenet_weights(tmp_path_factory.mktemp("gcam"), seed=3))


def test_googlenet_cam_backends_agree(googlenet_pycaffe_weights):
    prototxt, weights = googlenet_pycaffe_weights
    nets, results = compare_backends(prototxt, weights, noise_images(3))
    assert results["caffe"].features.shape == (3, 1024, 14, 14)
    # The project's generated prototxt runs the same weights identically.
    mine = CAMNet(GOOGLENET, weights, backend="caffe")
    batch = noise_images(2, seed=5)
    a = mine.backend.forward(mine.preprocess(batch))
    b = nets["caffe"].backend.forward(nets["caffe"].preprocess(batch))
    np.testing.assert_array_equal(a.probs, b.probs)


def test_cifar_resnet20_backends_agree():
    prototxt = shared("cifar10_resnet20", "test_ResNet_20.prototxt")
    weights = shared("cifar10_resnet20", "cifar10_ResNet_20_iter_53500.caffemodel")
    _, results = compare_backends(prototxt, weights, noise_images(4, (32, 32)), input_size=(32, 32))
    assert results["caffe"].features.shape == (4, 64, 8, 8)


def test_v1_syntax_backends_agree(tmp_path):
    prototxt, weights = write_random_net(tmp_path, V1_NET, "v1", seed=4)
    compare_backends(prototxt, weights, noise_images(3, (40, 30)))


def test_tiny_nets_backends_agree(tmp_path):
    prototxt, weights = write_random_net(tmp_path, NIN_NET, "nin", seed=2)
    compare_backends(prototxt, weights, noise_images(2, (16, 16)))
    prototxt, weights, _labels = write_square_net(tmp_path)
    nets, _ = compare_backends(prototxt, weights, [square_image(20, 30), square_image(90, 100)],
                               mean="0", scale=1 / 255)
    result = nets["caffe"].predict([square_image(20, 30)], classes=[0])[0]
    y, x = np.unravel_index(np.argmax(result.cam(0, (160, 200))), (160, 200))
    assert 20 - 10 <= y < 60 + 10 and 30 - 13 <= x < 70 + 13


def numpy_forward(image_chw, w1, b1, fc_w, fc_b):
    """Conv 3x3 pad 1 → ReLU → global average → FC → softmax, by plain loops/einsum."""
    _c, h, w = image_chw.shape
    padded = np.pad(image_chw.astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    conv = np.zeros((w1.shape[0], h, w))
    for y in range(h):
        for x in range(w):
            patch = padded[:, y:y + 3, x:x + 3]
            conv[:, y, x] = np.einsum("kcij,cij->k", w1, patch) + b1
    feat = np.maximum(conv, 0)
    scores = fc_w @ feat.mean(axis=(1, 2)) + fc_b
    e = np.exp(scores - scores.max())
    return feat, e / e.sum()


def test_pycaffe_matches_an_independent_numpy_forward(tmp_path):
    from cam_caffe.netdef import load_netdef, read_caffemodel
    prototxt, weights = write_random_net(tmp_path, TINY, "tiny", seed=9)
    net = CAMNet(prototxt, weights, backend="caffe", mean="0")
    stored = {layer.name: [np.array(b.data).reshape(tuple(b.shape.dim)) for b in layer.blobs]
              for layer in read_caffemodel(weights).layer}
    image = np.random.default_rng(1).integers(0, 256, (9, 7, 3), np.uint8)
    out = net.backend.forward(net.preprocess([image]))
    feat, prob = numpy_forward(image.transpose(2, 0, 1), *stored["conv"], *stored["fc"])
    assert_rel_close(out.features[0], feat, 1e-5)
    assert_rel_close(out.probs[0], prob, 1e-5)
    cam = net.predict([image], classes=[2])[0].cams[0]
    assert_rel_close(cam, np.einsum("k,khw->hw", stored["fc"][0][2], feat), 1e-5)
    assert load_netdef(prototxt).shapes["conv"] == (1, 4, 9, 7)


MAX_POOL = """
name: "pool" input: "data" input_shape { dim: 2 dim: 3 dim: 9 dim: 11 }
layer { name: "pool" type: "Pooling" bottom: "data" top: "out" top: "mask"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
"""


def numpy_max_pool(x, k, s, p, out_h, out_w):
    """Caffe's MAX pooling loop: the first maximum of each window wins; its flat index."""
    n, c, h, w = x.shape
    out = np.full((n, c, out_h, out_w), -np.finfo(np.float32).max, np.float32)
    mask = np.full(out.shape, -1.0, np.float32)
    for i, j, ph, pw in np.ndindex(out.shape):
        h0, w0 = ph * s - p, pw * s - p
        for y in range(max(h0, 0), min(h0 + k, h)):
            for x_ in range(max(w0, 0), min(w0 + k, w)):
                if x[i, j, y, x_] > out[i, j, ph, pw]:
                    out[i, j, ph, pw], mask[i, j, ph, pw] = x[i, j, y, x_], y * w + x_
    return out, mask


def test_pycaffe_max_pooling_values_and_mask_match_numpy(tmp_path):
    """patches/pycaffe/04 rewrote Caffe's MAX pooling loop: same values and argmax, ties too."""
    caffe = require_pycaffe()
    caffe.set_mode_cpu()
    prototxt = tmp_path / "pool.prototxt"
    prototxt.write_text(MAX_POOL)
    net = caffe.Net(str(prototxt), caffe.TEST)
    x = np.random.default_rng(0).integers(-3, 3, (2, 3, 9, 11)).astype(np.float32)  # many ties
    net.blobs["data"].data[...] = x
    net.forward()
    out, mask = net.blobs["out"].data, net.blobs["mask"].data
    assert out.shape == (2, 3, 5, 6)                 # ceil((9+2-3)/2)+1, ceil((11+2-3)/2)+1
    ref, ref_mask = numpy_max_pool(x, 3, 2, 1, 5, 6)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(mask, ref_mask)


def test_caffe_abort_becomes_a_clear_error(tmp_path):
    require_pycaffe()
    bad = TINY + 'layer { name: "extra" type: "NoSuchLayer" bottom: "prob" top: "extra" }\n'
    _prototxt, weights = write_random_net(tmp_path, TINY, "ok")
    (tmp_path / "bad.prototxt").write_text(bad)
    with pytest.raises(ModelError, match="Unknown layer type: NoSuchLayer"):
        CAMNet(tmp_path / "bad.prototxt", weights, backend="caffe", mean="0")
    # And through the command line: one line, no core dump, exit code 3.
    image = tmp_path / "i.png"
    cv2.imwrite(str(image), np.zeros((9, 7, 3), np.uint8))
    child = subprocess.run([sys.executable, "-m", "cam_caffe", str(image), "--prototxt",
                            str(tmp_path / "bad.prototxt"), "--weights", str(weights),
                            "--backend", "caffe"], capture_output=True, text=True)
    assert child.returncode == 3, child.stderr
    assert child.stderr.count("\n") == 1 and "Unknown layer type" in child.stderr


def test_gpu_on_cpu_only_caffe_is_a_clear_error(tmp_path):
    require_pycaffe()
    prototxt, weights = write_random_net(tmp_path, TINY, "ok")
    with pytest.raises((BackendError, ModelError), match=r"GPU|CPU|CUDA"):
        CAMNet(prototxt, weights, backend="caffe", gpu=0, mean="0")
