"""Sizes and memory checked before anything is allocated (cam_caffe.limits).

The estimate ``netdef.forward_bytes`` is compared with what pycaffe really
allocates for the same net at the same size (an independent implementation of
Caffe's shape rules); absurd sizes, from the prototxt or --input-size, always
give exit 3 and one line, never a MemoryError, an OverflowError or exit 70.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import GOOGLENET, require_pycaffe, shared
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from nets import CONV, ELTWISE, SQUARE_PROTOTXT, square_case, square_image

from cam_caffe import budget
from cam_caffe.api import CAMNet
from cam_caffe.camspec import find_cam_layers
from cam_caffe.commands import main, options
from cam_caffe.commands import run as run_command
from cam_caffe.errors import ModelError
from cam_caffe.limits import default_max_memory, human
from cam_caffe.netdef import forward_bytes, load_netdef

FEW = settings(max_examples=20, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])


def pycaffe_bytes(netdef, batch: int, folder: Path) -> int:
    """Bytes pycaffe holds for the data of every blob and parameter of ``netdef`` at
    ``batch`` after a forward pass (memory shared between blobs counted once: the
    tops of the Split layers Caffe inserts share their bottom's from the forward on)."""
    caffe = require_pycaffe()
    prototxt = folder / "deploy.prototxt"
    prototxt.write_text(netdef.prototxt(batch))
    net = caffe.Net(str(prototxt), caffe.TEST)
    net.forward()
    arrays = [b.data for b in net.blobs.values()]
    arrays += [p.data for params in net.params.values() for p in params]
    return sum({a.ctypes.data: a.nbytes for a in arrays}.values())


NETS = {"square": SQUARE_PROTOTXT, "conv": CONV, "eltwise": ELTWISE}


@FEW
@given(name=st.sampled_from(sorted(NETS)), height=st.integers(8, 48), width=st.integers(8, 48),
       batch=st.integers(1, 5))
def test_forward_bytes_is_what_pycaffe_allocates(tmp_path, name, height, width, batch):
    path = tmp_path / f"{name}.prototxt"
    path.write_text(NETS[name])
    try:
        netdef = load_netdef(path, input_size=(height, width))
    except ModelError:                 # too small for this net's kernels
        assume(False)
    assert forward_bytes(netdef, batch) == pycaffe_bytes(netdef, batch, tmp_path)


@pytest.mark.parametrize("batch", [1, 3])
def test_forward_bytes_of_real_nets(tmp_path, batch):
    """GoogLeNet-CAM (inception, LRN, concat, in-place ReLUs) and the real CIFAR-10
    ResNet-20 train/test file (BatchNorm, Scale, Eltwise)."""
    resnet = shared("cifar10_resnet20", "test_ResNet_20.prototxt")
    for netdef in (load_netdef(GOOGLENET), load_netdef(resnet, input_size=(40, 36))):
        assert forward_bytes(netdef, batch) == pycaffe_bytes(netdef, batch, tmp_path)


def run(*args: str) -> tuple[int, list[str]]:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in args])
    return code, stderr.getvalue().splitlines()


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    folder = tmp_path_factory.mktemp("square")
    image, args = square_case(folder)
    return folder, image, [*args, "--backend", "opencv", "-q"]


BIG = st.one_of(st.integers(1, 64), st.integers(1, 2 ** 64), st.integers(1, 10 ** 30),
                st.just(2 ** 63 - 1), st.just(2 ** 63))


@FEW
@given(height=BIG, width=BIG)
def test_any_input_size_option_runs_or_is_refused_in_one_line(square, height, width):
    """Exit 0 when the forward fits in --max-memory, else exit 3 and one line saying so
    (or that the size is not a 64-bit one, or too small for the net's kernels)."""
    folder, image, args = square
    code, err = run(image, *args, "--input-size", f"{height}x{width}", "--max-memory", "64M")
    try:
        netdef = load_netdef(folder / "square.prototxt", input_size=(height, width))
    except ModelError as e:
        assert code == 3 and err == [f"cam-caffe: error: {e}"], err  # noqa: PT017 (either way)
        return
    need = forward_bytes(netdef, 1)
    if min(height, width) < 2 and need <= 64 << 20:       # 'feat' pools 2x2, stride 2:
        assert code == 3 and len(err) == 1, err          # one window in Caffe, none in OpenCV
        assert "OpenCV gives no output for a pooling kernel 2x2 larger than its padded " \
               f"input {height}x{width}" in err[0], err
        return
    if need <= 64 << 20:
        assert code == 0 and err == [], err
    else:
        assert code == 3 and len(err) == 1 and f"needs about {human(need)}" in err[0], err


@FEW
@given(dims=st.lists(st.one_of(st.integers(-3, 40), st.just(2 ** 63 - 1),
                               st.integers(2 ** 31, 2 ** 63 - 1)), min_size=4, max_size=4))
def test_any_declared_input_shape_runs_or_is_refused_in_one_line(square, tmp_path, dims):
    """Shapes written in the prototxt (int64 there): exit 0, 1 (the image failed) or a
    clear one-line refusal, never 70."""
    folder, image, args = square
    text = SQUARE_PROTOTXT.replace("dim: 1 dim: 3 dim: 32 dim: 32",
                                   " ".join(f"dim: {d}" for d in dims))
    prototxt = tmp_path / "odd.prototxt"
    prototxt.write_text(text)
    args = [a if a != folder / "square.prototxt" else prototxt for a in args]
    code, err = run(image, *args, "--max-memory", "64M")
    assert code in (0, 1, 3), (code, err)
    assert len(err) <= 2 and not any("internal error" in line for line in err), err


def test_huge_input_size_is_refused_before_any_allocation(square):
    """The issue's case: 100000x100000 tried to allocate 112 GiB and died with exit 70."""
    _, image, args = square
    code, err = run(image, *args, "--input-size", "100000")
    assert code == 3 and len(err) == 1
    need = forward_bytes(load_netdef(square[0] / "square.prototxt", input_size=(10 ** 5,) * 2), 1)
    assert f"needs about {human(need)}" in err[0] and "--max-memory" in err[0]
    n = 10 ** 10                 # data 3 channels, bright 2 (ReLU in place), feat 2 at n/4,
    blobs = 3 * n + 2 * n + 2 * n // 4 + 2 + 2 + 2          # gap, fc, prob: 2 each
    assert need == 4 * (blobs + 3 * 2 + 2 + 2 * 2 + 2)      # + conv and fc weights, biases


def test_batches_shrink_to_fit_the_limit(square):
    folder, image, _ = square
    netdef = load_netdef(folder / "square.prototxt")
    weights, one = forward_bytes(netdef, 0), forward_bytes(netdef, 1)
    limit = weights + 3 * (one - weights) + 5        # room for 3 images, not 4
    net = CAMNet(folder / "square.prototxt", folder / "square.caffemodel", backend="opencv",
                 mean="0", max_memory=limit)
    assert net.max_batch() == 3
    picture = square_image(10, 10)
    assert len(net.predict([picture] * 3)) == 3
    with pytest.raises(ModelError, match="a batch of 4 inputs"):
        net.predict([picture] * 4)
    with pytest.raises(ModelError, match="a batch of 10 inputs"):
        net.max_batch(crops=10)
    args = run_command.build_parser().parse_args([str(image), "--batch-size", "16"])
    assert options.batch_size(args, net) == 3
    with pytest.raises(ModelError, match="one input of 32x32 needs about"):
        CAMNet(folder / "square.prototxt", folder / "square.caffemodel", backend="opencv",
               mean="0", max_memory=one - 1)


def test_default_limit_is_half_the_available_memory(monkeypatch):
    """Half the available memory, else half the RAM; CAM_CAFFE_MEMORY (the budget of the
    images in flight) does not change it."""
    monkeypatch.setattr(budget, "available_memory", lambda: 10 << 30)
    monkeypatch.setenv("CAM_CAFFE_MEMORY", "100K")
    assert default_max_memory() == 5 << 30
    monkeypatch.setattr(budget, "available_memory", lambda: None)
    assert default_max_memory() == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


@pytest.mark.parametrize(("text", "code"), [("64M", 0), ("1.5G", 0), ("3x", 2), ("0", 2), ("1.5Q", 2),
                                       ("1000", 3)])
def test_max_memory_option(square, text, code):
    _, image, args = square
    exit_code, err = run(image, *args, "--max-memory", text)
    assert exit_code == code, err
    if code == 2:
        assert err == [f"cam-caffe: error: argument --max-memory: {text!r} is not a size like "
                       "8G, 512M or 1000000000 (see cam-caffe --help)"]
    if code == 3:
        assert "needs about" in err[0] and "over the limit of 1000 bytes" in err[0]


def test_human():
    assert human(5) == "5 bytes"
    assert human(3 << 30) == "3 GiB"
    assert human(10 ** 100) == "10^100 bytes"


def test_wrong_input_size_for_fixed_layers_says_the_size(tmp_path):
    """#14: --input-size 300 on GoogLeNet-CAM said 'CAM_fc blob 0 has shape [1000, 1024],
    the prototxt needs [1000, 4096]'; it now says which size the net takes."""
    netdef = load_netdef(GOOGLENET)
    prototxt, weights = GOOGLENET, tmp_path / "g.caffemodel"
    from synthetic import random_weights, save_caffemodel
    save_caffemodel(netdef, random_weights(netdef, 1), weights)
    image = tmp_path / "i.png"
    cv2.imwrite(str(image), square_image(10, 10))
    for size in ("300", "240x224", "12000"):
        code, err = run(image, "--prototxt", prototxt, "--weights", weights, "--input-size",
                        size, "--backend", "opencv")
        assert code == 3 and len(err) == 1, err
        assert "this net's fixed layers only take 224x224 inputs" in err[0], err
        assert "'CAM_pool'" in err[0] and "--input-size 224x224" in err[0]


def test_a_fixed_pooling_larger_than_a_smaller_map_averages_all_of_it(tmp_path):
    """Below 224x224 GoogLeNet-CAM's CAM_pool (kernel 14, stride 14) is past its 10x14
    map by less than its stride: Caffe gives one window, clipped to the map, so its
    average, and the CAM head is found. OpenCV gives no output there: refused."""
    netdef = load_netdef(GOOGLENET, input_size=(160, 224))
    assert netdef.shapes["CAM_pool"] == (1, 1024, 1, 1)
    assert find_cam_layers(netdef).feature_blob == "CAM_conv"
    caffe = require_pycaffe()
    net = caffe.Net(str(GOOGLENET), caffe.TEST)
    net.blobs["data"].reshape(1, 3, 160, 224)
    net.reshape()
    net.forward(data=np.random.default_rng(0).normal(0, 50, (1, 3, 160, 224)))
    assert net.blobs["CAM_conv"].data.shape[2:] == (10, 14)
    np.testing.assert_allclose(net.blobs["CAM_pool"].data[:, :, 0, 0],
                               net.blobs["CAM_conv"].data.mean(axis=(2, 3)), rtol=1e-5, atol=1e-7)
    weights, image = tmp_path / "g.caffemodel", tmp_path / "i.png"
    from synthetic import random_weights, save_caffemodel
    save_caffemodel(netdef, random_weights(netdef, 1), weights)
    cv2.imwrite(str(image), square_image(10, 10))
    code, err = run(image, "--prototxt", GOOGLENET, "--weights", weights, "--input-size",
                    "160x224", "--backend", "opencv")
    assert code == 3 and err == [f"cam-caffe: error: {GOOGLENET}: layer 'CAM_pool': OpenCV "
                                 "gives no output for a pooling kernel 14x14 larger than its "
                                 "padded input 10x14; use --backend caffe or onnxruntime"], err


def test_math_of_the_estimate_is_exact_for_absurd_shapes(tmp_path):
    """Python integers: 2^63-1 squared times channels, no float rounding, no overflow."""
    path = tmp_path / "n.prototxt"
    path.write_text(SQUARE_PROTOTXT)
    side = 2 ** 62
    netdef = load_netdef(path, input_size=(side, side))
    pooled = side // 2
    expected = 4 * (3 * side * side + 2 * side * side + 2 * pooled * pooled + 2 + 2 + 2)
    weights = 4 * (2 * 3 + 2 + 2 * 2 + 2)
    assert forward_bytes(netdef, 1) == expected + weights
    assert math.log2(forward_bytes(netdef, 1)) > 126
