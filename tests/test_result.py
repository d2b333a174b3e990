"""The per-image result (cam_caffe.result): its maps against a NumPy forward of the square
net, its maps at image size computed once per map in a whole batch run, and its JSON
record against what the command prints and writes for the same image."""
import json
from pathlib import Path, PurePath

import cv2
import numpy as np
import pytest
from nets import square_image, write_square_net

from cam_caffe import CAMNet
from cam_caffe import result as result_module
from cam_caffe.batch import Options, output_paths, run_batch
from cam_caffe.boxes import BoxRule
from cam_caffe.cam import upsample
from cam_caffe.commands import main
from cam_caffe.inputs import Input, collect
from cam_caffe.result import record


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    """The square net's files, and two images of it on disk."""
    folder = tmp_path_factory.mktemp("square")
    prototxt, weights, labels = write_square_net(folder)
    paths = []
    for n, (top, left) in enumerate([(10, 20), (100, 140)]):
        paths.append(folder / f"img{n}.png")
        cv2.imwrite(str(paths[-1]), square_image(top, left))
    return prototxt, weights, labels, paths


def load(square) -> CAMNet:
    prototxt, weights, labels, _ = square
    return CAMNet(prototxt, weights, labels=labels, mean="0", backend="opencv")


def numpy_cams(batch: np.ndarray) -> np.ndarray:
    """The square net's CAMs of both classes (N, 2, 16, 16), float64, from its input
    batch: the 1x1 conv (±mean brightness ∓ 0.5), ReLU, 2x2 max pool, then Σ_k w_ck F_k
    with the FC weights diag(8, 8) (tests/nets.py)."""
    brightness = batch.astype(np.float64).mean(axis=1)
    channels = np.maximum(np.stack([brightness - 0.5, 0.5 - brightness], axis=1), 0)
    n, k, h, w = channels.shape
    features = channels.reshape(n, k, h // 2, 2, w // 2, 2).max(axis=(3, 5))
    return np.einsum("ck,nkyx->ncyx", np.diag([8.0, 8.0]), features)


def test_maps_are_the_numpy_cams_and_their_upsampling(square):
    """predict's results: raw maps of the top-2 classes equal the NumPy CAMs, the maps at
    image size equal cam.upsample of those, made once per map (the same read-only
    array on every call) and dropped by release()."""
    net = load(square)
    images = [net.load(p) for p in square[3]]
    items = [Input(p, PurePath(p.stem)) for p in square[3]]
    results = net.predict(images, top_k=2, items=items)
    expected = numpy_cams(net.preprocess(images))
    for i, result in enumerate(results):
        assert result.item is items[i] and result.image_size == (160, 200)
        assert result.method == "cam" and not result.ten_crop
        assert result.classes == [0, 1]                   # a square on black: "square" first
        np.testing.assert_allclose(result.cams, expected[i], rtol=1e-5, atol=1e-6)
        for rank, class_id in enumerate(result.classes):
            full = result.full_map(rank)
            assert full.shape == (160, 200) and not full.flags.writeable
            np.testing.assert_allclose(full, upsample(expected[i, class_id], (160, 200)),
                                       rtol=1e-5, atol=1e-5)
            assert result.full_map(rank) is full
            assert result.cam(class_id, (160, 200)) is full
        assert result.boxes == [[], []]                   # no box rule: no boxes
        result.release()
        assert result.full_map(0) is not full


def test_a_batch_run_upsamples_each_map_once(square, tmp_path, monkeypatch):
    """Every output that needs a map at image size (boxes, overlay, heatmap, thumbnail,
    .cam-full.npy, montage) reads the one upsampled map: images × maps calls."""
    calls = []

    def counted(cam, size):
        calls.append(size)
        return upsample(cam, size)
    monkeypatch.setattr(result_module, "upsample", counted)
    net = load(square)
    options = Options(output_dir=tmp_path / "out", top_k=2, boxes="dt", montage=True,
                      save=("overlay", "heatmap", "thumb", "npy", "json"), workers=0,
                      quiet=True)
    report = run_batch(net, collect([str(p) for p in square[3]]), options)
    assert report.done == 2 and not report.failed
    assert calls == [(160, 200)] * 4


def cli_args(square, *extra: str) -> list[str]:
    prototxt, weights, labels, _ = square
    return ["--prototxt", str(prototxt), "--weights", str(weights), "--labels", str(labels),
            "--mean", "0", "--backend", "opencv", "--top-k", "2", "--boxes", "paper", *extra]


def test_record_equals_what_the_command_prints_and_writes(square, tmp_path, capsys):
    """The record made from the API's result is the JSON line the command prints (with
    --output-dir, also the .json file it writes, files included), and with -o its line
    names the overlay."""
    net = load(square)
    path = square[3][0]
    item = collect([str(path)])[0]
    result = net.predict([net.load(path)], top_k=2, boxes=BoxRule("paper"), items=[item])[0]
    expected = record(result, net, 2)
    assert expected["maps"][0]["boxes"]                  # the square's box is in it

    assert main([str(path), "--jsonl", *cli_args(square)]) == 0
    assert json.loads(capsys.readouterr().out) == expected

    out = tmp_path / "out"
    assert main([str(path), "--jsonl", "--output-dir", str(out), "--save", "overlay,json",
                 *cli_args(square)]) == 0
    files = output_paths(item, Options(output_dir=out, save=("overlay", "json")), 2)
    with_files = record(result, net, 2, files)
    assert json.loads(capsys.readouterr().out) == with_files
    assert json.loads(Path(files["json"]).read_text()) == with_files

    overlay = tmp_path / "one.png"
    assert main([str(path), "--jsonl", "-o", str(overlay), *cli_args(square)]) == 0
    assert json.loads(capsys.readouterr().out) == record(result, net, 2,
                                                         {"overlay-1": overlay})
    assert overlay.is_file()
