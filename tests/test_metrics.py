"""Faithfulness metrics (cam_caffe/metrics.py, `cam-caffe evaluate --faithfulness`).

The hand-computable case: a linear net whose class-0 score is a·(mean
brightness of the input), class 1 scores 0, so p_0 = σ(a·mean). With mean 0
and scale 1 the preprocessed input is the pixels themselves and the "mean"
substrate is black, so every metric has a closed form in the pixel values.
Its CAM of class 0 is a·brightness, so the map orders pixels by brightness.
"""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from conftest import ROOT, TEST_SEED, load_script
from synthetic import save_caffemodel

from cam_caffe import CAMNet
from cam_caffe.commands import main
from cam_caffe.metrics import auc, faithfulness, summary, variants
from cam_caffe.netdef import load_netdef

data = load_script("make_demo_data")

SIDE, A = 12, 0.03
LINEAR_PROTOTXT = f"""
name: "LinearNet"
input: "data"
input_shape {{ dim: 1 dim: 3 dim: {SIDE} dim: {SIDE} }}
layer {{ name: "feat" type: "Convolution" bottom: "data" top: "feat"
        convolution_param {{ num_output: 1 kernel_size: 1 }} }}
layer {{ name: "gap" type: "Pooling" bottom: "feat" top: "gap"
        pooling_param {{ pool: AVE global_pooling: true }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "gap" top: "fc"
        inner_product_param {{ num_output: 2 }} }}
layer {{ name: "prob" type: "Softmax" bottom: "fc" top: "prob" }}
"""


def sigmoid(z):
    return 1 / (1 + np.exp(-np.asarray(z, np.float64)))


@pytest.fixture(scope="module")
def linear_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("linear")
    prototxt = folder / "linear.prototxt"
    prototxt.write_text(LINEAR_PROTOTXT)
    conv = np.full((1, 3, 1, 1), 1 / 3, np.float32)
    fc = np.array([[A], [0.0]], np.float32)
    weights = folder / "linear.caffemodel"
    save_caffemodel(load_netdef(prototxt), {"feat": [conv, np.zeros(1)],
                                            "fc": [fc, np.zeros(2)]}, weights)
    return prototxt, weights


def linear_net(files, backend: str) -> CAMNet:
    return CAMNet(*files, backend=backend, mean="0", scale=1.0)


def grey(brightness: np.ndarray) -> np.ndarray:
    return np.repeat(brightness.astype(np.uint8)[:, :, None], 3, axis=2)


def distinct_brightness(seed: int) -> np.ndarray:
    """SIDE×SIDE distinct values 0–255, so the map's pixel order has no ties."""
    return np.random.default_rng(seed).choice(256, SIDE * SIDE, replace=False).reshape(
        SIDE, SIDE).astype(np.float64)


def expected(b: np.ndarray, m: np.ndarray, steps: int) -> dict:
    """Closed forms for brightness b, map m already in [0, 1] (min 0, max 1)."""
    n = b.size
    y = sigmoid(A * b.mean())
    o = sigmoid(A * (m * b).mean())
    ordered = b.ravel()[np.argsort(-m.ravel(), kind="stable")]
    top = np.concatenate([[0.0], np.cumsum(ordered)])[np.arange(steps + 1) * n // steps]
    deletion = sigmoid(A * (b.sum() - top) / n)
    insertion = sigmoid(A * top / n)
    return {"prob": y, "masked_prob": o, "drop": max(0.0, y - o) / y, "increase": o > y,
            "deletion": deletion, "insertion": insertion,
            "deletion_auc": np.trapezoid(deletion, dx=1 / steps),
            "insertion_auc": np.trapezoid(insertion, dx=1 / steps)}


@pytest.mark.parametrize("backend", ["opencv", "onnxruntime"])
def test_closed_form_with_a_given_map(linear_files, backend):
    net = linear_net(linear_files, backend)
    b = distinct_brightness(0)
    ramp = np.arange(SIDE * SIDE, dtype=np.float64).reshape(SIDE, SIDE)[::-1] / (SIDE ** 2 - 1)
    for m in (ramp, (b - b.min()) / (b.max() - b.min()), 1 - ramp):
        result = faithfulness(net, grey(b), 0, m, steps=12, kind="mean", batch_size=7)
        want = expected(b, m, 12)
        assert result.prob == pytest.approx(want["prob"], abs=1e-5)
        assert result.masked_prob == pytest.approx(want["masked_prob"], abs=1e-5)
        assert result.drop == pytest.approx(want["drop"], abs=1e-4)
        assert result.increase == want["increase"]
        np.testing.assert_allclose(result.deletion, want["deletion"], atol=1e-5)
        np.testing.assert_allclose(result.insertion, want["insertion"], atol=1e-5)
        assert result.deletion_auc == pytest.approx(want["deletion_auc"], abs=1e-5)
        assert result.insertion_auc == pytest.approx(want["insertion_auc"], abs=1e-5)
    # the map that follows the brightness deletes the score fastest
    by_map = {name: faithfulness(net, grey(b), 0, m, steps=12) for name, m in
              (("true", b), ("reversed", -b))}
    assert by_map["true"].deletion_auc < by_map["reversed"].deletion_auc
    assert by_map["true"].insertion_auc > by_map["reversed"].insertion_auc


def test_blur_substrate_of_a_uniform_image_changes_nothing(linear_files):
    net = linear_net(linear_files, "opencv")
    b = np.full((SIDE, SIDE), 180.0)
    result = faithfulness(net, grey(b), 0, distinct_brightness(1), steps=6, kind="blur")
    y = sigmoid(A * 180)
    assert result.prob == pytest.approx(y, abs=1e-5) and result.drop == pytest.approx(0, abs=1e-5)
    np.testing.assert_allclose(result.deletion, y, atol=1e-5)
    np.testing.assert_allclose(result.insertion, y, atol=1e-5)


def test_variants_and_auc_by_hand():
    x = np.arange(8, dtype=np.float32).reshape(2, 2, 2) + 1     # (C=2, H=2, W=2)
    cam = np.array([[0.0, 3.0], [1.0, 2.0]])                   # order: (0,1), (1,1), (1,0), (0,0)
    out = variants(x, cam, steps=2, kind="mean")
    assert out.shape == (2 * 2 + 4, 2, 2, 2)
    np.testing.assert_array_equal(out[0], x)
    np.testing.assert_allclose(out[1], x * (cam / 3))           # masked by the normalised map
    np.testing.assert_array_equal(out[2], x)                                   # deletion 0 of 4
    np.testing.assert_array_equal(out[3], x * np.array([[1, 0], [1, 0]]))     # 2 deleted
    np.testing.assert_array_equal(out[4], 0 * x)                               # all deleted
    np.testing.assert_array_equal(out[5], 0 * x)                               # insertion 0
    np.testing.assert_array_equal(out[6], x * np.array([[0, 1], [0, 1]]))
    np.testing.assert_array_equal(out[7], x)
    assert auc(np.array([1.0, 0.5, 0.0])) == pytest.approx(0.5)
    assert auc(np.array([0.0, 1.0, 1.0, 1.0])) == pytest.approx(5 / 6)


def test_evaluate_faithfulness_cli_json_and_table(linear_files, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    truths = {}
    for seed in range(3):
        b = distinct_brightness(10 + seed)
        cv2.imwrite(str(images / f"g{seed}.png"), grey(b))
        # the CAM of class 0 is A·b, the same 12x12 as the input: its normalised map
        truths[f"g{seed}.png"] = expected(b, (b - b.min()) / (b.max() - b.min()), 12)
    (images / "broken.png").write_bytes(b"not a png")
    args = ["evaluate", str(images), "--faithfulness", "--steps", "12", "--prototxt",
            str(linear_files[0]), "--weights", str(linear_files[1]), "--mean", "0",
            "--backend", "opencv"]
    assert main([*args, "--json"]) == 1                      # one image failed
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and captured.err.count("\n") == 1
    result = json.loads(captured.out)
    f = result["faithfulness"]
    assert result["images"] == 3 and result["failed"] == 1
    assert f["substrate"] == "mean" and f["steps"] == 12 and len(f["per_image"]) == 3
    for entry in f["per_image"]:
        want = truths[entry["image"].rsplit("/", 1)[-1]]
        assert entry["class"] == 0
        for key in ("prob", "masked_prob", "drop", "deletion_auc", "insertion_auc"):
            assert entry[key] == pytest.approx(want[key], abs=1e-4), key
        np.testing.assert_allclose(entry["deletion"], want["deletion"], atol=1e-5)
    wants = list(truths.values())
    assert f["average_drop"] == pytest.approx(100 * np.mean([w["drop"] for w in wants]), abs=1e-2)
    assert f["increase_in_confidence"] == pytest.approx(
        100 * np.mean([w["increase"] for w in wants]))
    assert f["deletion_auc"] == pytest.approx(np.mean([w["deletion_auc"] for w in wants]),
                                              abs=1e-5)
    assert main([*args, "--substrate", "blur"]) == 1
    out = capsys.readouterr().out
    assert "substrate blur; 12 steps" in out and "Average Drop" in out and "Insertion AUC" in out


def test_evaluate_argument_errors(linear_files, tmp_path, capsys):
    model = ["--prototxt", str(linear_files[0]), "--weights", str(linear_files[1])]
    assert main(["evaluate", str(tmp_path), *model]) == 2
    assert "--faithfulness" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), "--faithfulness", "--ten-crop", *model]) == 2
    assert "--ten-crop" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_random_map_scores_worse_than_the_method_on_the_demo_model(method):
    demo = ROOT / "models" / "demo"
    net = CAMNet(demo / "deploy.prototxt", demo / "demo.caffemodel", method=method,
                 backend="onnxruntime")
    rng = np.random.default_rng(0)
    cams, randoms = [], []
    for sample in data.generate(24, seed=TEST_SEED):
        prediction = net.predict([sample.image])[0]
        c = prediction.classes[0]
        cams.append(faithfulness(net, sample.image, c, prediction.cam(c), steps=16))
        randoms.append(faithfulness(net, sample.image, c, rng.random((16, 16)), steps=16))
    cam, random = summary(cams), summary(randoms)
    assert cam["deletion_auc"] < random["deletion_auc"] - 0.1
    assert cam["insertion_auc"] > random["insertion_auc"] + 0.1
    assert cam["average_drop"] < random["average_drop"]
