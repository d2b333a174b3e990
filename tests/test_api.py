"""The Python API checks classes the way the command line does: ids in range, label
names (refused when ambiguous), and a clear error for a map that was not computed."""
import numpy as np
import pytest
from conftest import ROOT, shared

from cam_caffe import CAMNet, models
from cam_caffe.cam import upsample
from cam_caffe.errors import CamError
from cam_caffe.labels import read_labels, resolve_class


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
