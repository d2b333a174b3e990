"""cam-caffe's normalised net against Caffe's own reading of the user's original file.

Every backend runs the deploy net that ``netdef`` makes of a V1 or train/test
prototxt, pycaffe included; a conversion mistake (a V1 type mapped to the wrong V2
type, a TRAIN layer kept) would be the same on all of them. Here the reference is
pycaffe loading the ORIGINAL file itself (Caffe upgrades V1 and picks the TEST
phase on its own); the only change the test makes to it is a ``DummyData`` layer
in place of an LMDB data layer, which pycaffe could not open.
"""
import re

import numpy as np
from conftest import assert_rel_close, require_pycaffe, shared
from nets import write_random_net

from cam_caffe import CAMNet
from cam_caffe.cam import softmax

BACKENDS = ["caffe", "opencv", "onnxruntime"]
REL = 1e-4

# A V1 train/test file using most V1 layer types. TRAIN has its own data layer and a
# layer excluded from TEST that would change the numbers if it were kept.
V1_TRAIN_TEST = """
name: "V1TrainTest"
layers { name: "data" type: DATA top: "data" top: "label"
         data_param { source: "/nonexistent/train_lmdb" batch_size: 4 backend: LMDB }
         transform_param { crop_size: 20 mirror: true } include { phase: TRAIN } }
layers { name: "data" type: DUMMY_DATA top: "data" top: "label"
         dummy_data_param { shape { dim: 3 dim: 3 dim: 18 dim: 18 } shape { dim: 3 } }
         include { phase: TEST } }
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
         convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" relu_param { negative_slope: 0.1 } }
layers { name: "norm1" type: LRN bottom: "conv1" top: "norm1"
         lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 } }
layers { name: "pool1" type: POOLING bottom: "norm1" top: "pool1"
         pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layers { name: "split" type: SPLIT bottom: "pool1" top: "p1a" top: "p1b" }
layers { name: "a" type: CONVOLUTION bottom: "p1a" top: "a"
         convolution_param { num_output: 4 kernel_size: 1 } }
layers { name: "b" type: CONVOLUTION bottom: "p1b" top: "b"
         convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layers { name: "sig" type: SIGMOID bottom: "a" top: "sig" }
layers { name: "tanh" type: TANH bottom: "b" top: "tanh" }
layers { name: "absval" type: ABSVAL bottom: "tanh" top: "abs" }
layers { name: "bnll" type: BNLL bottom: "a" top: "bnll" }
layers { name: "sum" type: ELTWISE bottom: "abs" bottom: "bnll" top: "sum"
         eltwise_param { operation: SUM coeff: 1 coeff: -0.5 } }
layers { name: "train_only" type: POWER bottom: "sum" top: "sum"
         power_param { scale: 3 } exclude { phase: TEST } }
layers { name: "pow" type: POWER bottom: "sum" top: "pow"
         power_param { power: 2 scale: 0.5 shift: 1 } }
layers { name: "cat" type: CONCAT bottom: "sig" bottom: "tanh" bottom: "pow" top: "feat" }
layers { name: "drop" type: DROPOUT bottom: "feat" top: "feat" dropout_param { dropout_ratio: 0.5 } }
layers { name: "gap" type: POOLING bottom: "feat" top: "gap"
         pooling_param { pool: AVE kernel_size: 9 stride: 9 } }
layers { name: "flat" type: FLATTEN bottom: "gap" top: "flat" }
layers { name: "fc" type: INNER_PRODUCT bottom: "flat" top: "fc"
         inner_product_param { num_output: 5 } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "fc" bottom: "label" top: "loss" }
layers { name: "accuracy" type: ACCURACY bottom: "fc" bottom: "label" top: "accuracy"
         include { phase: TEST } }
"""


def caffe_on_original(prototxt, weights, batch, first_layer, score_blob, feature_blob):
    """pycaffe reading the file as given: the batch put into its data blob, the net run
    from ``first_layer``; (softmax of the scores, the feature blob)."""
    caffe = require_pycaffe()
    caffe.set_mode_cpu()
    net = caffe.Net(str(prototxt), caffe.TEST, weights=str(weights))
    net.blobs["data"].reshape(*batch.shape)
    net.reshape()
    net.blobs["data"].data[...] = batch
    net.forward(start=first_layer)
    scores = net.blobs[score_blob].data.reshape(len(batch), -1)
    return softmax(scores), net.blobs[feature_blob].data.copy()


def compare_with_original(original, weights, batch, first_layer, score_blob, for_caffe=None,
                          **kwargs):
    """Each backend on cam-caffe's reading of ``original`` against pycaffe on
    ``for_caffe`` (``original`` unless given)."""
    probs, features = None, None
    for backend in BACKENDS:
        net = CAMNet(original, weights, backend=backend, **kwargs)
        if probs is None:
            probs, features = caffe_on_original(for_caffe or original, weights, batch,
                                                first_layer, score_blob, net.spec.feature_blob)
        out = net.backend.forward(batch)
        assert_rel_close(out.probs, probs, REL, f"{backend} probabilities")
        assert_rel_close(out.features, features, REL, f"{backend} features")
    return net


def test_v1_train_test_file_matches_caffes_own_upgrade(tmp_path):
    original, weights = write_random_net(tmp_path, V1_TRAIN_TEST, "v1", seed=3)
    batch = np.random.default_rng(0).normal(0, 1, (3, 3, 18, 18)).astype(np.float32)
    net = compare_with_original(original, weights, batch, "conv1", "fc")
    assert net.spec.feature_blob == "feat" and net.netdef.input_shape == (1, 3, 18, 18)


def test_resnet20_train_test_file_matches_caffe_on_the_original(tmp_path):
    """The real CIFAR-10 ResNet-20 train/test file and weights (BatchNorm, Scale,
    Eltwise, SoftmaxWithLoss, an Accuracy layer named "prob")."""
    text = shared("cifar10_resnet20", "test_ResNet_20.prototxt").read_text()
    data_layer = re.search(r'layer \{\s*name: "Data1".*?\n\}\n', text, re.S).group(0)
    dummy = ('layer { name: "Data1" type: "DummyData" top: "data" top: "label"\n'
             '  dummy_data_param { shape { dim: 4 dim: 3 dim: 32 dim: 32 } shape { dim: 4 } } }\n')
    for_caffe = tmp_path / "resnet20_dummy_data.prototxt"
    for_caffe.write_text(text.replace(data_layer, dummy))
    original = shared("cifar10_resnet20", "test_ResNet_20.prototxt")
    weights = shared("cifar10_resnet20", "cifar10_ResNet_20_iter_53500.caffemodel")
    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), np.uint8)
    # The LMDB file's own preprocessing, as cam-caffe reads it from the data layer.
    net = CAMNet(original, weights, backend="opencv", input_size=(32, 32))
    batch = net.preprocess(list(images))
    expected = (images.transpose(0, 3, 1, 2) - np.array([125.3, 122.9, 113.8]).reshape(3, 1, 1)
                ) * 0.00390625
    np.testing.assert_allclose(batch, expected, rtol=1e-5, atol=1e-5)
    compare_with_original(original, weights, batch, "conv1", "fc1", for_caffe,
                          input_size=(32, 32))
