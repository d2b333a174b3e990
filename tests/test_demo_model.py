"""The embedded demo model, the demo data generator, and ``cam-caffe evaluate``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT, TEST_SEED, load_script, require_pycaffe
from nets import square_image, write_square_net

from cam_caffe import CAMNet
from cam_caffe.boxes import Box
from cam_caffe.commands import main
from cam_caffe.errors import CamError
from cam_caffe.evaluate import error_rates, first_hits, image_key, read_truth

DEMO = ROOT / "models" / "demo"
DEMO_ARGS = ["--prototxt", str(DEMO / "deploy.prototxt"), "--weights",
             str(DEMO / "demo.caffemodel"), "--labels", str(DEMO / "labels.txt")]


data = load_script("make_demo_data")


def evaluate(capsys, *args: str) -> dict:
    code = main(["evaluate", *map(str, args), "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


# ---- the data generator ----------------------------------------------------

def test_generator_is_deterministic_and_boxes_are_tight():
    a, b = data.generate(10, seed=5), data.generate(10, seed=5)
    assert all(np.array_equal(x.image, y.image) and x.box == y.box for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0].image, data.generate(1, seed=6)[0].image)
    assert [s.label for s in a] == [i % len(data.CLASSES) for i in range(10)]
    for sample in a:
        assert sample.image.shape == (data.IMAGE_SIZE, data.IMAGE_SIZE, 3)
        x, y, w, h = sample.box
        lo, hi = (data.IMAGE_SIZE * f for f in data.SIZE_RANGE)
        assert x >= 0 and y >= 0 and x + w <= data.IMAGE_SIZE and y + h <= data.IMAGE_SIZE
        assert lo * 0.5 <= max(w, h) <= hi + 2


def test_write_split(tmp_path):
    csv_path = data.write_split(tmp_path, 5, seed=1)
    truth = read_truth(csv_path)
    assert sorted(truth) == [f"img_{i:04d}" for i in range(5)]
    first = data.generate(1, seed=1)[0]
    assert truth["img_0000"] == [(data.CLASSES[first.label], Box(*first.box))]
    assert np.array_equal(cv2.imread(str(tmp_path / "img_0000.png")), first.image)


# ---- the shipped demo model --------------------------------------------------

def test_demo_model_files():
    assert (DEMO / "demo.caffemodel").stat().st_size <= 2 * 1024 * 1024
    labels = (DEMO / "labels.txt").read_text().split()
    assert labels == list(data.CLASSES)
    net = CAMNet(DEMO / "deploy.prototxt", DEMO / "demo.caffemodel", backend="opencv",
                 labels=DEMO / "labels.txt")
    assert net.spec.feature_blob == "CAM_conv" and net.spec.fc_layer == "CAM_fc"
    assert net.spec.feature_size == (16, 16)
    demos = sorted((ROOT / "images").glob("demo_*.png"))
    assert len(demos) >= 4
    for path in demos:    # each demo image is named after its class, and recognised
        result = net.predict([net.load(path)])[0]
        assert result.top(1)[0][1] == path.stem.split("_")[1]


def test_demo_model_classifies_and_localizes_held_out_images(tmp_path, capsys):
    csv_path = data.write_split(tmp_path, 120, seed=TEST_SEED)
    result = evaluate(capsys, tmp_path, "--boxes-file", csv_path, "--boxes", "paper",
                      "--backend", "opencv", *DEMO_ARGS)
    assert result["images"] == 120 and result["failed"] == 0
    assert result["top1_cls_error"] <= 0.05
    assert result["top1_loc_error"] <= 0.20
    assert result["top5_loc_error"] <= result["top1_loc_error"]


# ---- the metric on a hand-checked case ---------------------------------------
#
# The square net (tests/nets.py) on 64x64 black images with white squares:
#   a: a 48-px square at (8, 8) → top-1 "square", CAM box (7, 7, 50, 50);
#   b: the same image, but the ground truth puts the square elsewhere;
#   c: a 16-px square at (36, 40) → top-1 "background", top-2 "square" with
#      the CAM box (35, 39, 18, 18).
# a is right; b is classified but not localized; c is right only in the top 2.

CASE = {"a": ((8, 8, 48), [(0, 0, 20, 20), (8, 8, 48, 48)]),   # a wrong and a right box
        "b": ((8, 8, 48), [(40, 40, 20, 20)]),
        "c": ((40, 36, 16), [(36, 40, 16, 16)])}
EXPECTED = {"top1_cls_error": 1 / 3, "top5_cls_error": 0.0,
            "top1_loc_error": 2 / 3, "top5_loc_error": 1 / 3}


@pytest.fixture
def square_case(tmp_path):
    prototxt, model, _ = write_square_net(tmp_path)
    labels = tmp_path / "wnids.txt"
    labels.write_text("n00000001 square\nn00000002 background\n")
    images = tmp_path / "images"
    images.mkdir()
    for name, ((top, left, size), _) in CASE.items():
        cv2.imwrite(str(images / f"{name}.png"), square_image(top, left, size, (64, 64)))
    args = ["--prototxt", prototxt, "--weights", model, "--labels", labels, "--mean", "0",
            "--scale", str(1 / 255), "--backend", "opencv"]
    return tmp_path, images, args


def write_csv(folder: Path) -> Path:
    path = folder / "truth.csv"
    rows = ["image,label,x,y,w,h"] + [f"images/{name}.png,square,{x},{y},{w},{h}"
                                      for name, (_, boxes) in CASE.items()
                                      for x, y, w, h in boxes]
    path.write_text("\n".join(rows) + "\n")
    return path


def write_json(folder: Path) -> Path:
    path = folder / "truth.json"
    path.write_text(json.dumps([{"image": f"{name}.png", "label": 0, "boxes": boxes}
                                for name, (_, boxes) in CASE.items()]))
    return path


def write_xml(folder: Path) -> Path:
    xml_dir = folder / "xml"
    xml_dir.mkdir()
    for name, (_, boxes) in CASE.items():
        objects = "".join(
            f"<object><name>n00000001</name><bndbox><xmin>{x}</xmin><ymin>{y}</ymin>"
            f"<xmax>{x + w - 1}</xmax><ymax>{y + h - 1}</ymax></bndbox></object>"
            for x, y, w, h in boxes)
        (xml_dir / f"{name}.xml").write_text(
            f"<annotation><folder>val</folder><filename>{name}</filename>"
            f"<size><width>64</width><height>64</height></size>{objects}</annotation>")
    return xml_dir


@pytest.mark.parametrize("writer", [write_csv, write_json, write_xml])
def test_evaluate_matches_hand_computed_errors(square_case, capsys, writer):
    folder, images, args = square_case
    result = evaluate(capsys, images, "--boxes-file", writer(folder), *args)
    assert result["images"] == 3
    assert result == pytest.approx({**result, **EXPECTED})


def test_evaluate_table_and_unmatched_images(square_case, capsys):
    folder, images, args = square_case
    cv2.imwrite(str(images / "extra.png"), square_image(0, 0, 8, (64, 64)))
    code = main(["evaluate", str(images), "--boxes-file", str(write_csv(folder)),
                 *map(str, args)])
    out = capsys.readouterr().out
    assert code == 0
    assert "3 images (0 failed, 1 without ground truth)" in out
    assert "classification    33.33%   0.00%" in out
    assert "localization      66.67%  33.33%" in out


def test_evaluate_errors(square_case, capsys, tmp_path):
    _folder, images, args = square_case
    bad = tmp_path / "bad.csv"
    bad.write_text("image,label\na.png,square\n")
    assert main(["evaluate", str(images), "--boxes-file", str(bad), *map(str, args)]) == 2
    assert "columns image,label,x,y,w,h" in capsys.readouterr().err
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("image,label,x,y,w,h\na.png,n09999999,0,0,4,4\n")
    assert main(["evaluate", str(images), "--boxes-file", str(unknown), *map(str, args)]) == 2
    assert "n09999999" in capsys.readouterr().err
    assert main(["evaluate", str(images), "--boxes-file", str(tmp_path / "none.csv"),
                 *map(str, args)]) == 4


@pytest.mark.parametrize("corners", ["<xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>",
                                     "<xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>five</ymax>"])
def test_an_xml_box_without_four_numeric_corners_is_refused(tmp_path, corners):
    path = tmp_path / "a.xml"
    path.write_text(f"<annotation><filename>a.png</filename><object><name>n00000001</name>"
                    f"<bndbox>{corners}</bndbox></object></annotation>")
    with pytest.raises(CamError, match=r"a\.xml: a <bndbox> needs xmin, ymin, xmax, ymax"):
        read_truth(path)


def test_first_hits_and_error_rates():
    gt = [(3, Box(10, 10, 20, 20)), (3, Box(50, 50, 10, 10)), (7, Box(0, 0, 5, 5))]
    right, wrong = Box(11, 11, 20, 20), Box(30, 30, 10, 10)
    assert first_hits([(3, right)], gt) == (0, 0)
    assert first_hits([(3, wrong), (7, Box(0, 0, 5, 6))], gt) == (0, 1)
    assert first_hits([(1, right), (2, None), (3, None), (4, wrong), (5, right)], gt) == (2, None)
    assert first_hits([(1, right), (2, right)], gt) == (None, None)
    hits = [(0, 0), (0, 1), (2, None), (None, None), (4, 4), (0, None)]
    assert error_rates(hits) == pytest.approx({"top1_cls_error": 3 / 6, "top5_cls_error": 1 / 6,
                                               "top1_loc_error": 5 / 6, "top5_loc_error": 3 / 6})
    assert image_key("dir/n01_2.JPEG") == "n01_2" and image_key("ILSVRC2012_val_1") == \
        "ILSVRC2012_val_1"


# ---- the training script ------------------------------------------------------

def test_training_script_runs(tmp_path):
    require_pycaffe()
    out, images = tmp_path / "model", tmp_path / "images"
    env = {**os.environ, "GLOG_minloglevel": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_demo_model.py"),
                           "--out-dir", str(out), "--images-dir", str(images),
                           "--warmup", "2", "--iterations", "3", "--batch-size", "4"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "trained 5 iterations" in proc.stdout
    for name in ("deploy.prototxt", "demo.caffemodel", "labels.txt", "train.prototxt",
                 "solver.prototxt", "train_warmup.prototxt"):
        assert (out / name).is_file(), name
    assert len(list(images.glob("demo_*.png"))) == 6
    net = CAMNet(out / "deploy.prototxt", out / "demo.caffemodel", backend="opencv",
                 labels=out / "labels.txt")
    result = net.predict([net.load(next(images.glob("*.png")))])[0]
    assert result.probs.shape == (len(data.CLASSES),)
