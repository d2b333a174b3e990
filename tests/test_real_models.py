"""The real GoogLeNet-CAM prototxt (random weights) and the real CIFAR-10 ResNet-20."""
import cv2
import numpy as np
import pytest
from conftest import GOOGLENET, shared
from synthetic import random_weights, save_caffemodel

from cam_caffe import CAMNet
from cam_caffe.commands import main
from cam_caffe.netdef import load_netdef, read_caffemodel


@pytest.fixture(scope="session")
def googlenet(tmp_path_factory):
    """The project's GoogLeNet-CAM prototxt and a He-random caffemodel for it."""
    prototxt = GOOGLENET
    model = tmp_path_factory.mktemp("googlenet") / "googlenet_random.caffemodel"
    netdef = load_netdef(prototxt)
    save_caffemodel(netdef, random_weights(netdef, seed=1), model)
    return prototxt, model


def test_googlenet_cam_with_opencv(googlenet):
    prototxt, model = googlenet
    net = CAMNet(prototxt, model, backend="opencv")
    image = cv2.imread(str(shared("googlenet_cam", "img1.jpg")))
    out = net.backend.forward(net.preprocess([image, image[:, ::-1]]))
    assert out.features.shape == (2, 1024, 14, 14)
    assert net.cam_weights.shape == (1000, 1024)
    np.testing.assert_allclose(out.probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (out.features >= 0).all()                  # post-ReLU, as Caffe's blob holds
    # The weights OpenCV holds are the ones in the file.
    stored = {layer.name: layer for layer in read_caffemodel(model).layer}
    fc = np.array(stored["CAM_fc"].blobs[0].data, np.float32).reshape(1000, 1024)
    np.testing.assert_array_equal(net.cam_weights, fc)
    result = net.predict([image])[0]
    assert result.cam(result.classes[0], (224, 224)).shape == (224, 224)
    assert result.cam(result.classes[0], result.image_size).shape == image.shape[:2]


def test_cifar_resnet20_gives_an_8x8_cam():
    prototxt = shared("cifar10_resnet20", "test_ResNet_20.prototxt")
    weights = shared("cifar10_resnet20", "cifar10_ResNet_20_iter_53500.caffemodel")
    net = CAMNet(prototxt, weights, backend="opencv", input_size=(32, 32))
    assert net.preprocess.scale == pytest.approx(1 / 256)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), np.uint8)
    result = net.predict([image], top_k=3)[0]
    assert result.cams.shape == (3, 8, 8)
    assert result.cam(result.classes[0], (48, 64)).shape == (48, 64)
    np.testing.assert_allclose(result.probs.sum(), 1.0, rtol=1e-5)
    # The CAM's spatial mean is the class score less the FC bias (GAP, then FC).
    stored = {layer.name: layer for layer in read_caffemodel(weights).layer}
    bias = np.array(stored["fc1"].blobs[1].data, np.float32)
    scores = np.log(result.probs)                      # softmax's input, up to a constant
    means = result.cams.mean(axis=(1, 2)) + bias[result.classes]
    np.testing.assert_allclose(means - means[0], scores[result.classes] - scores[result.classes[0]],
                               atol=2e-3)


def test_cifar_cli(tmp_path, capsys):

    image = tmp_path / "x.png"
    cv2.imwrite(str(image), np.full((32, 32, 3), 90, np.uint8))
    labels = tmp_path / "cifar.txt"
    labels.write_text("\n".join(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]))
    code = main([str(image), "--prototxt", str(shared("cifar10_resnet20", "test_ResNet_20.prototxt")),
                 "--weights", str(shared("cifar10_resnet20", "cifar10_ResNet_20_iter_53500.caffemodel")),
                 "--input-size", "32", "--labels", str(labels), "--backend", "opencv", "--top-k", "5",
                 "-o", str(tmp_path / "o.png")])
    assert code == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 6
    assert cv2.imread(str(tmp_path / "o.png")).shape == (32, 32, 3)
