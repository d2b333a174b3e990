"""A batch gives each image exactly what a run of that image alone gives.

Every path that batches is covered — plain top-1, top-k, given classes, ten-crop —
on every backend, through the API and through ``run_batch`` several batches deep.
The images have different top-1 classes (the colour net), so mixing up which
image's crops, classes or maps belong together shows.
"""
import json

import numpy as np
import pytest
from conftest import IN_CI, assert_rel_close, require_pycaffe
from nets import COLOUR_ARGS, colour_images, write_colour_net

from cam_caffe import CAMNet
from cam_caffe.batch import Options, run_batch
from cam_caffe.inputs import collect
from cam_caffe.output import write_image

BACKENDS = ["opencv", "onnxruntime", "caffe"]
MODES = {                           # predict() arguments
    "top1": {},
    "top3": {"top_k": 3},
    "classes": {"classes": [3, 0]},
    "ten_crop": {"top_k": 2, "ten_crop": True},
}
REL = 1e-5


@pytest.fixture(scope="module")
def colour_net(tmp_path_factory):
    return write_colour_net(tmp_path_factory.mktemp("colour"))


@pytest.fixture(scope="module")
def nets(colour_net):
    """One CAMNet per backend (pycaffe: skipped outside CI when it is absent)."""
    loaded = {}
    prototxt, weights, labels = colour_net
    for backend in BACKENDS:
        if backend == "caffe":
            try:
                require_pycaffe()
            except pytest.skip.Exception:
                continue
        loaded[backend] = CAMNet(prototxt, weights, backend=backend, labels=labels,
                                 **COLOUR_ARGS)
    return loaded


def get_net(nets, backend):
    if backend not in nets:
        assert not IN_CI
        pytest.skip(f"{backend} is not installed")
    return nets[backend]


def assert_same_prediction(batched, single, what):
    assert batched.classes == single.classes, what
    assert batched.image_size == single.image_size, what
    assert_rel_close(batched.probs, single.probs, REL, f"{what} probabilities")
    assert_rel_close(batched.cams, single.cams, REL, f"{what} maps")


def test_the_images_have_different_top1_classes(nets):
    """What makes the tests below able to see a mix-up."""
    net = get_net(nets, "opencv")
    images = colour_images()
    top1 = [r.classes[0] for r in net.predict(images)]
    assert len(set(top1)) == 5
    top1_ten_crop = [r.classes[0] for r in net.predict(images, ten_crop=True)]
    assert top1_ten_crop == top1


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_equals_single_images(nets, backend, mode):
    net = get_net(nets, backend)
    images = colour_images()
    batched = net.predict(images, **MODES[mode])
    assert len(batched) == len(images)
    for i, image in enumerate(images):
        single = net.predict([image], **MODES[mode])[0]
        assert_same_prediction(batched[i], single, f"{backend} {mode} image {i}")
    if "classes" in MODES[mode]:
        assert all(r.classes == [3, 0] for r in batched)
    else:
        k = MODES[mode].get("top_k", 1)
        for r in batched:   # each image's own top-k, most probable first
            assert r.classes == [int(c) for c in np.argsort(-r.probs, kind="stable")[:k]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_probabilities_survive_the_next_forward(nets, backend):
    """Forward.probs is the caller's to keep (batch writes one batch while the next
    runs): a backend must not hand out a buffer that its next forward overwrites."""
    net = get_net(nets, backend)
    images = colour_images()
    first = net.backend.forward(net.preprocess(images[:3]))
    kept = first.probs.copy()
    second = net.backend.forward(net.preprocess(images[3:6]))
    np.testing.assert_array_equal(first.probs, kept)
    assert np.abs(second.probs - kept).max() > 0.1        # the second batch differs


@pytest.mark.parametrize("mode", ["top3", "ten_crop"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_run_batch_several_batches_deep_equals_single_images(nets, tmp_path, backend, mode):
    """Seven images in batches of two (four forwards, the last one short): each
    image's written maps and JSON equal a run of that image alone."""
    net = get_net(nets, backend)
    images = colour_images()
    folder = tmp_path / "in"
    for i, image in enumerate(images):
        write_image(folder / f"{i}.png", image)
    args = MODES[mode]
    options = Options(output_dir=tmp_path / "out", save=("npy", "json"), batch_size=2,
                      top_k=args["top_k"], ten_crop=args.get("ten_crop", False), quiet=True)
    report = run_batch(net, collect([str(folder)]), options)
    assert (report.done, report.failed) == (len(images), [])
    for i, image in enumerate(images):
        single = net.predict([image], **args)[0]
        raw = np.load(tmp_path / "out" / f"{i}.cam.npy")
        assert_rel_close(raw, single.cams, REL, f"image {i} .cam.npy")
        record = json.loads((tmp_path / "out" / f"{i}.json").read_text())
        assert [m["class"] for m in record["maps"]] == single.classes
        assert [t["class"] for t in record["top_k"]] == [c for c, _, _ in single.top(3)][
            :options.top_k]
        for m in record["maps"]:
            assert m["prob"] == pytest.approx(float(single.probs[m["class"]]), abs=2e-6)
