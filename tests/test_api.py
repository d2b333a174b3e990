"""The Python API checks classes the way the command line does: ids in range, label
names (refused when ambiguous), and a clear error for a map that was not computed."""
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, shared
from nets import TINY, VGG_LIKE, input_block, write_random_net

from cam_caffe import CAMNet, models, proto
from cam_caffe.cam import upsample
from cam_caffe.errors import CamError, ModelError
from cam_caffe.labels import read_labels, resolve_class
from cam_caffe.limits import forward_bytes
from cam_caffe.netdef import load_netdef


@pytest.fixture(scope="module")
def demo():
    prototxt, weights, labels = models.model_path("demo")
    return CAMNet(prototxt, weights, backend="opencv", labels=labels)


@pytest.fixture(scope="module")
def star(demo):
    return demo.load(ROOT / "images" / "demo_star_4.png")


@pytest.mark.parametrize("bad", [-1, 5, 5000, np.int64(-3)])
def test_class_ids_out_of_range_are_refused(demo, star, bad):
    with pytest.raises(CamError, match=rf"^class {int(bad)}: out of range, the net has 5 "
                                       r"classes \(0–4\)$"):
        demo.predict([star], classes=[bad])


@pytest.mark.parametrize(("bad", "words"), [(2.0, "2.0: not a class id or a label name"),
                                       (True, "True: not a class id or a label name"),
                                       ("giraffe", "'giraffe': no such label")])
def test_other_classes_are_refused(demo, star, bad, words):
    with pytest.raises(CamError, match=words):
        demo.predict([star], classes=[bad])


def test_label_names_give_the_same_maps_as_ids(demo, star):
    circle = demo.load(ROOT / "images" / "demo_circle_0.png")
    by_name = demo.predict([star, circle], classes=["star", "Circle", np.int32(3)])
    by_id = demo.predict([star, circle], classes=[4, 0, 3])
    single = demo.predict([circle], classes="circle")[0]      # one name, not its letters
    for a, b in zip(by_name, by_id, strict=True):
        assert a.classes == b.classes == [4, 0, 3]
        np.testing.assert_array_equal(a.cams, b.cams)
        np.testing.assert_array_equal(a.probs, b.probs)
    assert single.classes == [0]
    np.testing.assert_allclose(single.cam(0), by_id[1].cam("circle"), rtol=1e-5, atol=1e-6)


def test_cam_of_a_class_that_was_not_computed(demo, star):
    result = demo.predict([star], top_k=2)[0]
    assert result.classes == [4, 2] and result.top(1)[0][:2] == (4, "star")
    with pytest.raises(CamError, match=r"^no CAM computed for class 0 \(circle\): this "
                                       r"prediction has 4 \(star\), 2 \(triangle\); ask "
                                       r"predict\(\) for it with classes=\[0\]$"):
        result.cam("circle")
    with pytest.raises(CamError, match="out of range"):
        result.cam(968)
    full = result.cam("triangle", result.image_size)
    np.testing.assert_array_equal(full, upsample(result.cams[1], result.image_size))


def test_imagenet_crane_is_ambiguous():
    labels = read_labels(shared("imagenet", "synset_words.txt"))
    with pytest.raises(CamError, match=r"^class 'crane' is ambiguous: classes 134 \(crane\), "
                                       r"517 \(crane\); give the id$"):
        resolve_class("crane", labels, 1000)
    assert resolve_class("coffee mug", labels, 1000) == 504
    assert resolve_class("bull mastiff", labels, 1000) == 243
    assert resolve_class("243", labels, 1000) == 243


def test_non_finite_scale_is_refused():
    prototxt, weights, _labels = models.model_path("demo")
    with pytest.raises(CamError, match="scale nan: not a finite number"):
        CAMNet(prototxt, weights, backend="opencv", scale=float("nan"))


def test_its_arguments_rebuild_the_same_net_from_another_folder(tmp_path, monkeypatch, star):
    """What a worker process or a Dask worker receives: paths given relative to this
    folder (a mean file too) made absolute, every setting kept, the same results."""
    prototxt, weights, labels = models.model_path("demo")
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "mean.npy", np.array([10.0, 20.0, 30.0], np.float32))
    rel = [os.path.relpath(p, tmp_path) for p in (prototxt, weights, labels)]
    net = CAMNet(rel[0], rel[1], backend="opencv", labels=rel[2], mean="mean.npy",
                 input_size=(64, 80), batch_size=3)
    assert net.input_size == (64, 80)
    assert net.arguments["mean"] == tmp_path / "mean.npy"
    assert [net.arguments[k] for k in ("prototxt", "weights", "labels")] == [
        Path(prototxt), Path(weights), Path(labels)]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rebuilt = CAMNet(**net.arguments)
    a, b = net.predict([star], top_k=2)[0], rebuilt.predict([star], top_k=2)[0]
    assert a.classes == b.classes
    np.testing.assert_array_equal(a.cams, b.cams)
    assert CAMNet(prototxt, weights, backend="opencv", mean="1,2,3").arguments["mean"] == "1,2,3"


def test_defaults_are_the_command_lines_and_quiet(capsys):
    """The API's defaults are the command's: batches of --batch-size's default, Python
    layers refused, nothing on stderr (not even which backend auto chose)."""
    from cam_caffe.commands.options import DEFAULT_BATCH
    prototxt, weights, _ = models.model_path("demo")
    net = CAMNet(prototxt, weights)
    assert net.batch_size == DEFAULT_BATCH
    assert capsys.readouterr().err == ""


def test_python_layers_are_refused_unless_allowed(tmp_path):
    prototxt, weights, _ = models.model_path("demo")
    text = Path(prototxt).read_text() + ('layer { name: "py" type: "Python" bottom: "prob" '
                                         'top: "py" python_param { module: "m" layer: "L" } }\n')
    (tmp_path / "py.prototxt").write_text(text)
    with pytest.raises(CamError, match="layer 'py' is a Python layer, which would run code"):
        CAMNet(tmp_path / "py.prototxt", weights, backend="opencv")
    with pytest.raises(CamError) as error:           # allowed: OpenCV cannot run it
        CAMNet(tmp_path / "py.prototxt", weights, backend="opencv", allow_python_layers=True)
    assert "Python layer, which would run code" not in str(error.value)


def no_cam_head(channels: int = 3) -> str:
    """conv → ReLU → FC over the whole map → Softmax: no global pooling, no CAM head."""
    return input_block(channels, 8, 8) + """
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def test_a_data_layers_mean_and_scale_are_the_defaults(tmp_path):
    """A train/test file's TEST data layer says how its images were prepared (VGG_LIKE:
    mean 10,20,30 and scale 0.5, or a mean file); the caller's values come first; a net
    that says nothing gets ImageNet's mean, scale 1, per channel of its input."""
    prototxt, weights = write_random_net(tmp_path, VGG_LIKE, "vgg")
    net = CAMNet(prototxt, weights, backend="opencv")
    assert net.preprocess.mean.ravel().tolist() == [10, 20, 30] and net.preprocess.scale == 0.5
    net = CAMNet(prototxt, weights, backend="opencv", mean="1,2,3", scale=2)
    assert net.preprocess.mean.ravel().tolist() == [1, 2, 3] and net.preprocess.scale == 2
    blob = proto.BlobProto()
    blob.shape.dim.extend([1, 3, 2, 2])
    blob.data.extend(float(v) for v in range(12))
    (tmp_path / "mean.binaryproto").write_bytes(blob.SerializeToString())
    text = VGG_LIKE.replace("scale: 0.5 mean_value: 10 mean_value: 20 mean_value: 30",
                            f'mean_file: "{tmp_path / "mean.binaryproto"}"')
    prototxt, weights = write_random_net(tmp_path, text, "meanfile")
    net = CAMNet(prototxt, weights, backend="opencv")
    assert net.preprocess.mean.ravel().tolist() == [1.5, 5.5, 9.5]     # per channel (2x2 file)
    assert net.preprocess.scale == 1
    for channels, mean in ((3, [104, 117, 123]), (1, [117])):
        prototxt, weights = write_random_net(
            tmp_path, no_cam_head(channels), f"plain{channels}")
        net = CAMNet(prototxt, weights, backend="opencv", method="scorecam")
        assert net.preprocess.mean.ravel().tolist() == mean and net.preprocess.scale == 1
        image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)
        assert net.predict([image])[0].probs.shape == (3,)    # a grey net gets grey input


def test_the_default_method_follows_the_head_and_cam_needs_one(tmp_path):
    tiny = write_random_net(tmp_path, TINY, "tiny")
    plain = write_random_net(tmp_path, no_cam_head(), "plain")
    assert CAMNet(*tiny, backend="opencv").methods == ("cam",)
    assert CAMNet(*plain, backend="onnxruntime").methods == ("gradcam",)
    assert CAMNet(*tiny, backend="onnxruntime", method="gradcam").cam_weights is None  # unread
    both = CAMNet(*plain, backend="onnxruntime", method="gradcam,scorecam")
    assert (both.methods, both.method) == (("gradcam", "scorecam"), "gradcam,scorecam")
    with pytest.raises(ModelError, match=r"plain\.prototxt: --method cam needs a global "
                                         r"average pooling → InnerProduct head after blob "
                                         r"'conv'; the other methods \(gradcam, scorecam, …\) "
                                         r"work on any net$"):
        CAMNet(*plain, backend="onnxruntime", method="cam")


def test_what_the_net_is_built_from_is_checked_first(tmp_path):
    """Missing weights, labels of another net, an --fc-layer that is no FC, and a
    net one input of which does not fit in --max-memory: each one error, at once."""
    prototxt, weights = write_random_net(tmp_path, TINY, "tiny")
    _, other = write_random_net(tmp_path, no_cam_head(), "other")
    with pytest.raises(ModelError, match=r"^.*other\.caffemodel: "):      # another net's weights
        CAMNet(prototxt, other, backend="opencv")
    with pytest.raises(ModelError, match=r"none\.caffemodel: weights file not found$"):
        CAMNet(prototxt, tmp_path / "none.caffemodel", backend="opencv")
    (tmp_path / "labels.txt").write_text("a\nb\n")
    with pytest.raises(ModelError, match=r"labels\.txt: has 2 labels, the net has 3 classes$"):
        CAMNet(prototxt, weights, backend="opencv", labels=tmp_path / "labels.txt")
    with pytest.raises(ModelError, match="prob"):
        CAMNet(prototxt, weights, backend="opencv", fc_layer="prob")
    netdef = load_netdef(prototxt)
    one, two = forward_bytes(netdef, 1), forward_bytes(netdef, 2)
    CAMNet(prototxt, weights, backend="opencv", max_memory=(one + two) // 2)   # one fits
    with pytest.raises(ModelError, match="one input of 9x7 needs about"):
        CAMNet(prototxt, weights, backend="opencv", max_memory=one - 1)
