"""Failures on the model side look the same everywhere: one line, a documented exit code.

OpenCV's own log lines, a 5 MB layer name, a negative GPU id, an output path
that is a FIFO or a symlink, and which backend ``auto`` chose (``-v``) or
which of their errors it reports.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from nets import SLICE_NET, SQUARE_PROTOTXT, square_case
from synthetic import save_caffemodel

from cam_caffe.backends import create_backend
from cam_caffe.camspec import find_cam_layers
from cam_caffe.errors import MAX_MESSAGE, CamError, ModelError, shorten
from cam_caffe.netdef import CaffeModel, load_netdef


def run(*args, env=None):
    child = subprocess.run([sys.executable, "-m", "cam_caffe", *map(str, args)],
                           capture_output=True, text=True, timeout=300, env=env)
    assert "Traceback" not in child.stderr and child.returncode >= 0, child.stderr
    return child


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    folder = tmp_path_factory.mktemp("square")
    image, args = square_case(folder)
    return folder, image, args


def side_reshape_net(folder: Path, name_length: int) -> tuple[Path, Path]:
    """The square net with a side branch that OpenCV cannot shape (a Reshape to 7 values
    of a 2x32x32 blob), in a layer whose name is ``name_length`` characters long.
    OpenCV logs 4 [ERROR] lines repeating the name before it raises."""
    name = "L" * name_length
    text = SQUARE_PROTOTXT.replace(
        'layer { name: "feat"',
        f'layer {{ name: "{name}" type: "Reshape" bottom: "bright" top: "side" '
        'reshape_param { shape { dim: 1 dim: 7 } } }\nlayer { name: "feat"')
    prototxt = folder / f"side{name_length}.prototxt"
    prototxt.write_text(text)
    weights = folder / "square.caffemodel"
    return prototxt, weights


@pytest.mark.parametrize("length", [10, 5_000_000])
def test_opencv_failure_is_one_short_line(square, length):
    folder, image, _ = square
    prototxt, weights = side_reshape_net(folder, length)
    child = run(image, "--prototxt", prototxt, "--weights", weights, "--mean", "0",
                "--backend", "opencv")
    assert child.returncode == 3
    lines = child.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cam-caffe: error: {prototxt}: OpenCV "), \
        child.stderr[:2000]
    assert len(lines[0]) <= len("cam-caffe: error: ") + MAX_MESSAGE
    assert "[ERROR" not in child.stderr


def test_messages_are_one_short_line():
    long = "x: " + "L" * 5_000_000 + " the end"
    short = shorten(long)
    assert len(short) <= MAX_MESSAGE and short.startswith("x: LL") and short.endswith("the end")
    assert str(CamError(long)) == short
    assert str(CamError("two\nlines")) == "two\\nlines"
    assert str(ModelError("a" * 2000, relayed=True)).count("[…]") == 1


@pytest.mark.parametrize("command", [[], ["evaluate", "--boxes-file", "b.csv"]])
@pytest.mark.parametrize("backend", ["opencv", "onnxruntime", "caffe", "auto"])
def test_negative_gpu_is_a_usage_error(square, backend, command):
    """--gpu -1 with OpenCV was exit 70 (cv2.cuda.setDevice(-1))."""
    _folder, image, args = square
    child = run(*command, image, *args, "--backend", backend, "--gpu", "-1")
    assert child.returncode == 2 and len(child.stderr.splitlines()) == 1
    assert "'-1' is not a device ID" in child.stderr


def test_negative_gpu_through_the_api(square):
    folder, _, _ = square
    netdef = load_netdef(folder / "square.prototxt")
    with pytest.raises(CamError, match="--gpu -1: a CUDA device ID is 0 or more"):
        create_backend("opencv", netdef, CaffeModel(folder / "square.caffemodel"),
                       find_cam_layers(netdef), gpu=-1)


def export(folder: Path, target: Path):
    return run("export", "--prototxt", folder / "square.prototxt", "--weights",
               folder / "square.caffemodel", "-o", target)


def test_export_never_replaces_a_fifo_or_a_folder(square, tmp_path):
    folder, _, _ = square
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "link.onnx"
    link.symlink_to(fifo)
    (tmp_path / "dir.onnx").mkdir()
    for target, kind in ((fifo, "a FIFO"), (link, "a FIFO (through a symlink to"),
                         (tmp_path / "dir.onnx", "a folder")):
        child = export(folder, target)
        assert child.returncode == 5, child.stderr
        assert child.stderr.startswith(f"cam-caffe: error: {target}: is {kind}")
        assert len(child.stderr.splitlines()) == 1
    assert fifo.is_fifo() and link.is_symlink() and (tmp_path / "dir.onnx").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.onnx", "link.onnx", "pipe"]


def test_export_through_a_symlink_writes_its_target(square, tmp_path):
    """A symlink to a regular file, or dangling: the link stays, its target is written."""
    folder, _, _ = square
    import onnx
    for existing in (True, False):
        target = tmp_path / f"real{existing}.onnx"
        if existing:
            target.write_bytes(b"old")
        link = tmp_path / f"link{existing}.onnx"
        link.symlink_to(target)
        child = export(folder, link)
        assert child.returncode == 0, child.stderr
        assert link.is_symlink() and os.readlink(link) == str(target)
        onnx.checker.check_model(onnx.load(str(target)))
    assert not list(tmp_path.glob(".*.tmp"))


def test_image_outputs_follow_the_same_rule(square, tmp_path):
    _folder, image, args = square
    fifo = tmp_path / "o.png"
    os.mkfifo(fifo)
    child = run(image, *args, "--backend", "opencv", "-o", fifo)
    assert child.returncode == 5 and f"{fifo}: is a FIFO" in child.stderr
    assert fifo.is_fifo()


def test_verbose_says_which_backend_auto_chose_and_why(square, tmp_path):
    _folder, image, args = square
    child = run(image, *args, "-v", "-q")
    assert child.returncode == 0, child.stderr
    assert ("cam-caffe: backend auto: chose onnxruntime (the first of onnxruntime, opencv, "
            "caffe)") in child.stderr
    prototxt = tmp_path / "slice.prototxt"
    prototxt.write_text(SLICE_NET)
    netdef = load_netdef(prototxt)
    weights = tmp_path / "slice.caffemodel"
    from synthetic import random_weights
    save_caffemodel(netdef, random_weights(netdef, 0), weights)
    child = run(image, "--prototxt", prototxt, "--weights", weights, "--mean", "0", "-v", "-q")
    assert child.returncode == 0, child.stderr
    lines = [line for line in child.stderr.splitlines() if line.startswith("cam-caffe: backend auto")]
    assert lines[0].startswith("cam-caffe: backend auto: onnxruntime cannot run this net (")
    assert "Slice" in lines[0]
    assert lines[1] == ("cam-caffe: backend auto: chose opencv (the first working of "
                        "onnxruntime, opencv, caffe)")
    quiet = run(image, "--prototxt", prototxt, "--weights", weights, "--mean", "0", "-q")
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_auto_reports_the_clearest_error_of_real_backends(square, tmp_path):
    """A layer type (Clip) that none of the three backends has: auto used to report
    the last one's failure (pycaffe's glog CHECK); now it reports the ONNX
    converter's own diagnosis, naming the layer, as --backend onnxruntime does."""
    from conftest import require_pycaffe
    require_pycaffe()
    folder, image, _ = square
    prototxt = tmp_path / "clip.prototxt"
    prototxt.write_text(SQUARE_PROTOTXT.replace(
        'layer { name: "feat"',
        'layer { name: "odd" type: "Clip" bottom: "bright" top: "bright" }\nlayer { name: "feat"'))
    args = [image, "--prototxt", prototxt, "--weights", folder / "square.caffemodel", "-q"]
    lines = {}
    for backend in ("onnxruntime", "opencv", "caffe", "auto"):
        child = run(*args, "--backend", backend)
        assert child.returncode == 3 and len(child.stderr.splitlines()) == 1, child.stderr
        lines[backend] = child.stderr
    assert "Clip" in lines["onnxruntime"] and "'odd'" in lines["onnxruntime"]
    assert "Unknown layer type: Clip" in lines["caffe"]
    assert lines["auto"] == lines["onnxruntime"]


def test_auto_reports_the_clearest_error(square, monkeypatch):
    """Every backend fails: cam-caffe's own diagnosis wins over a library's relayed words,
    whatever the order; among equals, the preferred backend's. (The backends are replaced
    by ones that fail as the real ones do: no net makes all three fail in each order.)"""
    import cam_caffe.backends as backends
    folder, _, _ = square
    netdef = load_netdef(folder / "square.prototxt")
    spec = find_cam_layers(netdef)
    weights = CaffeModel(folder / "square.caffemodel")
    monkeypatch.setattr(backends, "installed", lambda name: True)
    own = ModelError("net: layer 'x': the ONNX converter does not support type Mystery")
    relayed = {name: ModelError(f"net: {name} cannot load the net: assertion failed",
                                relayed=True) for name in ("opencv", "caffe", "onnxruntime")}
    for failing in ({"onnxruntime": own, "opencv": relayed["opencv"], "caffe": relayed["caffe"]},
                    {"onnxruntime": relayed["onnxruntime"], "opencv": relayed["opencv"],
                     "caffe": own},
                    {name: relayed[name] for name in relayed}):
        def fail(name, *args, failing=failing):
            raise failing[name]
        monkeypatch.setattr(backends, "_create", fail)
        with pytest.raises(CamError) as error:
            create_backend("auto", netdef, weights, spec)
        best = own if own in failing.values() else relayed["onnxruntime"]
        assert error.value is best

