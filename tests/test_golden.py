"""Real data of the official GoogLeNet-CAM model (../shared golden_img1.npz).

The stored post-ReLU ``CAM_conv`` blobs of the ten crops of img1.jpg go through
the official head (``CAM_pool`` → ``CAM_fc`` with the real weights → ``prob``)
run by every backend, and must give the official model's stored probabilities.
"""
import numpy as np
import pytest
from conftest import require_pycaffe, shared
from synthetic import save_caffemodel

from cam_caffe import CAMNet
from cam_caffe.api import Prediction
from cam_caffe.cam import class_activation_maps
from cam_caffe.labels import read_labels
from cam_caffe.netdef import load_netdef

CUP = 968
# The official deploy file's layers after CAM_conv, fed the stored CAM_conv blob (its
# ReLU, a no-op on post-ReLU data, writes a new blob: ONNX cannot output its input).
GOLDEN_HEAD = """
name: "GoogLeNetCAMHead"
input: "stored"
input_shape { dim: 10 dim: 1024 dim: 14 dim: 14 }
layer { name: "CAM_relu" type: "ReLU" bottom: "stored" top: "CAM_conv" }
layer { name: "CAM_pool" type: "Pooling" bottom: "CAM_conv" top: "CAM_pool"
        pooling_param { pool: AVE kernel_size: 14 stride: 14 } }
layer { name: "CAM_fc" type: "InnerProduct" bottom: "CAM_pool" top: "CAM_fc"
        inner_product_param { num_output: 1000 } }
layer { name: "prob" type: "Softmax" bottom: "CAM_fc" top: "prob" }
"""


def load_golden():
    data = np.load(shared("googlenet_cam", "golden_img1.npz"))
    return data["cam_conv"], data["cam_fc_weights"], data["prob"]


@pytest.fixture(scope="module")
def golden_head(tmp_path_factory):
    """The head's prototxt and a caffemodel holding the real CAM_fc weights (bias 0)."""
    _, weights, _ = load_golden()
    folder = tmp_path_factory.mktemp("golden")
    prototxt = folder / "head.prototxt"
    prototxt.write_text(GOLDEN_HEAD)
    model = folder / "head.caffemodel"
    save_caffemodel(load_netdef(prototxt), {"CAM_fc": [weights, np.zeros(1000)]}, model)
    return prototxt, model


@pytest.mark.parametrize("backend", ["opencv", "onnxruntime", "caffe"])
def test_backends_reproduce_the_official_probabilities(golden_head, backend):
    """Each backend's pooling, FC and softmax on the real activations give the stored
    ``prob`` of the official model (within 1e-3: the stored FC has a ~0 bias)."""
    if backend == "caffe":
        require_pycaffe()
    features, weights, prob = load_golden()
    net = CAMNet(*golden_head, backend=backend, labels=shared("imagenet", "synset_words.txt"))
    assert net.spec.feature_blob == "CAM_conv" and net.spec.fc_layer == "CAM_fc"
    np.testing.assert_array_equal(net.cam_weights, weights)
    out = net.backend.forward(features)
    np.testing.assert_allclose(out.probs, prob, atol=1e-3)
    np.testing.assert_allclose(out.features, features, rtol=1e-6)
    # The ten crops' mean, as the API reports it: the official top-1 is the cup.
    mean = Prediction(out.probs.mean(axis=0), [CUP], np.zeros((1, 14, 14)), (256, 256),
                      net.labels)
    (top_class, label, p), *_ = mean.top(5)
    assert (top_class, label) == (CUP, "cup") and abs(p - prob.mean(axis=0)[CUP]) < 1e-3


def test_labels_drop_the_wordnet_ids():
    labels = read_labels(shared("imagenet", "synset_words.txt"))
    assert len(labels) == 1000
    assert labels[CUP] == "cup" and labels[243] == "bull mastiff"


def test_cam_equals_independent_numpy_reference():
    features, weights, prob = load_golden()
    classes = np.argsort(-prob, axis=1)[:, :5]
    cams = class_activation_maps(features, weights, classes)
    assert cams.shape == (10, 5, 14, 14) and cams.dtype == np.float32
    for n in range(10):
        for m, c in enumerate(classes[n]):
            reference = np.zeros((14, 14), np.float64)
            for k in range(features.shape[1]):          # the original script's loop
                reference += weights[c, k] * features[n, k].astype(np.float64)
            np.testing.assert_allclose(cams[n, m], reference, rtol=1e-4, atol=1e-4)


def test_cam_mean_identity():
    """The spatial mean of CAM_c is the class score without bias (GAP then FC)."""
    features, weights, _ = load_golden()
    cams = class_activation_maps(features, weights, np.tile(np.arange(1000), (10, 1)))
    np.testing.assert_allclose(cams.mean(axis=(2, 3)), features.mean(axis=(2, 3)) @ weights.T,
                               rtol=1e-4, atol=1e-5)
