"""The API's results, checked against the API's own building blocks run by hand:
ten-crop against the crops' own maps merged, Prediction's accessors, load and the
memory limit's batch size."""
import re

import numpy as np
import pytest
from conftest import assert_rel_close
from nets import COLOUR_ARGS, colour_images, write_colour_net, write_random_net

from cam_caffe import CAMNet
from cam_caffe.cam import upsample
from cam_caffe.errors import CamError, ImageError
from cam_caffe.limits import max_batch
from cam_caffe.output import encode_image
from cam_caffe.tencrop import merge_ten_crops, ten_crops


@pytest.fixture(scope="module")
def colour_net(tmp_path_factory):
    return write_colour_net(tmp_path_factory.mktemp("colour"))


def load(colour_net, **kwargs):
    prototxt, weights, labels = colour_net
    return CAMNet(prototxt, weights, backend="opencv", labels=labels, **COLOUR_ARGS, **kwargs)


@pytest.mark.parametrize("method", ["cam", "scorecam"])
def test_ten_crop_is_the_merge_of_each_crops_own_maps(colour_net, method):
    """24x24 net: resize 27 (= round(24·256/224)), crops of 24; probabilities are the
    crops' mean, the maps of each image's own top-2 classes merged from its crops'."""
    net = load(colour_net, method=method)
    images = colour_images(3)
    results = net.predict(images, top_k=2, ten_crop=True)
    assert [r.ten_crop for r in results] == [True] * 3                # what JSON reports
    assert not net.predict(images[:1])[0].ten_crop
    for image, result in zip(images, results, strict=True):
        crops = net.predict(list(ten_crops(image, 27, 24)), classes=result.classes)
        probs = np.mean([c.probs for c in crops], axis=0)
        assert_rel_close(result.probs, probs, 1e-5)
        assert result.classes == [int(c) for c in np.argsort(-probs, kind="stable")[:2]]
        assert result.cams.shape == (2, 27, 27)
        for m in range(2):
            merged = merge_ten_crops(np.stack([c.cams[m] for c in crops]), 27, 24)
            assert_rel_close(result.cams[m], merged, 1e-5)
        top_class, label, _ = result.top(1)[0]
        assert label == net.labels[top_class]
    assert len({r.classes[0] for r in results}) == 3


def test_ten_crop_needs_a_square_net(tmp_path):
    prototxt, weights = write_random_net(tmp_path, """
name: "Wide" input: "data" input_shape { dim: 1 dim: 3 dim: 20 dim: 24 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "gap" type: "Pooling" bottom: "conv" top: "gap" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "gap" top: "fc" inner_product_param { num_output: 3 } }
""", "wide")
    net = CAMNet(prototxt, weights, backend="opencv", mean="0")
    with pytest.raises(CamError, match=r"^--ten-crop needs a square net input, this one is 20x24$"):
        net.predict([np.zeros((30, 30, 3), np.uint8)], ten_crop=True)


def test_prediction_maps_raw_or_upsampled(colour_net):
    result = load(colour_net).predict(colour_images(1), top_k=2)[0]
    first, second = result.classes
    np.testing.assert_array_equal(result.cam(second), result.cams[1])
    assert result.cam(first).shape == (12, 12)
    np.testing.assert_array_equal(result.cam(first, (40, 50)), upsample(result.cams[0], (40, 50)))
    assert result.top(1) == [(first, load(colour_net).labels[first], float(result.probs[first]))]
    missing = ({0, 1, 2, 3, 4} - {first, second}).pop()
    with pytest.raises(CamError, match=f"^no CAM computed for class {missing} .*: this "
                                       f"prediction has {first} .*, {second} .*; ask "
                                       rf"predict\(\) for it with classes=\[{missing}\]$"):
        result.cam(missing)


def test_load_decodes_given_bytes_and_asks_admit_first(colour_net, tmp_path):
    net = load(colour_net)
    image = colour_images(1)[0]
    data = encode_image("x.png", image)
    np.testing.assert_array_equal(net.load(tmp_path / "not-there.png", data=data), image)
    seen = []

    def refuse(width, height):
        seen.append((width, height))
        raise ImageError(f"{width}x{height}: refused")
    with pytest.raises(ImageError, match="refused"):
        net.load(tmp_path / "not-there.png", data=data, admit=refuse)
    assert seen == [(image.shape[1], image.shape[0])]


def test_max_batch_counts_ten_crops_as_ten_inputs(colour_net):
    net = load(colour_net, max_memory=64 << 20)
    one, ten = net.max_batch(), net.max_batch(10)
    assert one == max_batch(net.netdef, 64 << 20) and one >= 20
    assert ten == max_batch(net.netdef, 64 << 20, 10) and ten <= one // 10


def test_memory_check_counts_ten_crops(colour_net):
    """A limit that fits two inputs: two images pass, one image's ten crops do not."""
    from cam_caffe.errors import ModelError
    from cam_caffe.limits import forward_bytes
    net = load(colour_net)
    net.max_memory = forward_bytes(net.netdef, 2)
    images = colour_images(2)
    assert len(net.predict(images)) == 2
    with pytest.raises(ModelError, match="a batch of 3 inputs"):
        net.predict(colour_images(3))
    with pytest.raises(ModelError, match="a batch of 10 inputs"):
        net.predict(images[:1], ten_crop=True)


def test_arguments_rebuild_the_same_net(colour_net, tmp_path, monkeypatch):
    """CAMNet.arguments (what a Dask worker gets) make an equal net from another folder."""
    net = load(colour_net, max_memory=1 << 30, batch_size=4, method="cam")
    monkeypatch.chdir(tmp_path)
    again = CAMNet(**net.arguments)
    assert again.arguments == net.arguments and again.backend_name == "opencv"
    assert (again.labels, again.max_memory, again.batch_size, again.method) == (
        net.labels, 1 << 30, 4, "cam")
    image = colour_images(1)[0]
    a, b = net.predict([image], top_k=2)[0], again.predict([image], top_k=2)[0]
    assert a.classes == b.classes
    np.testing.assert_array_equal(a.cams, b.cams)
    np.testing.assert_array_equal(net.preprocess([image]), again.preprocess([image]))


def test_top_k_among_equal_probabilities_is_the_lower_class_first(colour_net):
    """A confident net gives many classes exactly 0 in float32; which of them a top-5
    maps must not depend on the sort (NumPy's default quicksort put class 984 before 0
    among 1,000 zeros), so runs, backends and shards agree."""
    net = load(colour_net)
    probs = np.zeros((2, 1000), np.float32)
    probs[0, 500] = 1
    probs[1, [7, 900]] = 0.5
    assert net._choose(probs, None, 4).tolist() == [[500, 0, 1, 2], [7, 900, 0, 1]]
    assert net._choose(probs, None, 0).tolist() == [[500], [7]]      # at least one


def test_score_cam_through_the_api_draws_its_progress(colour_net, capsys):
    """--progress reaches the methods' bar for Score-CAM's forwards (one a channel: 6)."""
    net = load(colour_net, method="scorecam", progress=True)
    net.predict(colour_images(1))
    assert re.search(r"\rmasked forwards: +100%\|[^|]*\| 6/6 \[", capsys.readouterr().err)
    load(colour_net, method="scorecam").predict(colour_images(1))
    assert capsys.readouterr().err == ""
