"""pycaffe's CPU forward over the images of a batch on several threads
(patches/pycaffe/05-openmp-batch.patch) gives the results of one thread, bit for bit.

Each configuration runs in a child process: OpenBLAS reads OMP_NUM_THREADS when it
loads, and the patch takes its thread count from OpenBLAS (``openblas_set_num_threads``,
which cam-caffe's ``--threads`` calls, so counts above the machine's cores are tested
on any machine). Every blob of the net is compared, not only the output, and a float64
NumPy forward (``numpy_net``) checks that the common result is right.

These tests need pycaffe (scripts/install_pycaffe.sh); under CI=true they never skip.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import GOOGLENET, ROOT, assert_rel_close, require_pycaffe
from nets import write_random_net
from numpy_net import layer_forward, stored_weights
from synthetic import random_weights, save_caffemodel

from cam_caffe.netdef import load_netdef

# Every CPU loop the patch threads, in the shapes that take its branches: a 3x3 and a
# strided 7x7 convolution with im2col (group 2, bias), a 1x1 without im2col or bias,
# MAX pooling with Caffe's rounded-up windows, AVE pooling with padding, LRN across
# channels, Concat (the inception join), ReLU, InnerProduct, Softmax.
LAYERS_PROTOTXT = """
name: "ThreadsNet"
input: "data"
input_shape { dim: 5 dim: 3 dim: 33 dim: 31 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 7 stride: 2 pad: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1"
        lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 k: 2 } }
layer { name: "a" type: "Convolution" bottom: "norm1" top: "a"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 group: 2 } }
layer { name: "b" type: "Convolution" bottom: "norm1" top: "b"
        convolution_param { num_output: 4 kernel_size: 1 bias_term: false } }
layer { name: "c" type: "Pooling" bottom: "norm1" top: "c"
        pooling_param { pool: AVE kernel_size: 3 stride: 1 pad: 1 } }
layer { name: "join" type: "Concat" bottom: "a" bottom: "b" bottom: "c" top: "join" }
layer { name: "gap" type: "Pooling" bottom: "join" top: "gap"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "gap" top: "fc"
        inner_product_param { num_output: 7 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""

# The child: the net's every blob after a forward of a fixed batch, at the thread
# counts given (0: OpenBLAS's own count, from the environment), and each image alone.
CHILD = """
import ctypes, json, os, sys
import numpy as np
from cam_caffe.backends.caffe import import_caffe, set_blas_threads
caffe = import_caffe()
caffe.set_mode_cpu()
prototxt, weights, batch, counts, alone, out = sys.argv[1:7]
batch = int(batch)
net = caffe.Net(prototxt, caffe.TEST, weights=weights)
name = net.inputs[0]
shape = (batch, *net.blobs[name].data.shape[1:])
data = np.random.default_rng(0).normal(0, 50, shape).astype(np.float32)
openblas = ctypes.CDLL("libopenblas.so.0", mode=os.RTLD_NOLOAD)
results, seen = {}, []

def forward(images, key):
    net.blobs[name].reshape(*images.shape)
    net.reshape()
    net.blobs[name].data[...] = images
    net.forward()
    results.update({f"{key}/{blob}": b.data.copy() for blob, b in net.blobs.items()})

for count in map(int, counts.split(",")):
    if count:
        set_blas_threads(count)
    seen.append(openblas.openblas_get_num_threads())
    forward(data, f"batch@{count}")
if alone == "1":
    for i in range(batch):
        forward(data[i:i + 1], f"image{i}")
np.savez(out, **results)
maps = open("/proc/self/maps").read()
print(json.dumps({"threads": seen, "libgomp": "libgomp" in maps}))
"""


def run_child(prototxt: Path, weights: Path, batch: int, counts: str, out: Path,
              omp_threads: str, alone: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """Run CHILD with OMP_NUM_THREADS=``omp_threads``; its report and its blobs."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    env["OMP_NUM_THREADS"] = omp_threads
    child = subprocess.run([sys.executable, "-c", CHILD, str(prototxt), str(weights),
                            str(batch), counts, "1" if alone else "0", str(out)],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    with np.load(out) as blobs:
        return json.loads(child.stdout.splitlines()[-1]), dict(blobs)


def assert_same_blobs(blobs: dict[str, np.ndarray], key: str, reference: str) -> None:
    """Every blob of run ``key`` equals run ``reference``'s, bit for bit."""
    names = [name.split("/", 1)[1] for name in blobs if name.startswith(reference + "/")]
    assert names
    for name in names:
        a, b = blobs[f"{key}/{name}"], blobs[f"{reference}/{name}"]
        assert a.tobytes() == b.tobytes(), f"{name}: {key} differs from {reference} " \
            f"(max |diff| {np.abs(a.astype(np.float64) - b).max():.3g})"


@pytest.fixture(scope="module")
def layers_net(tmp_path_factory):
    require_pycaffe()
    folder = tmp_path_factory.mktemp("threads")
    return write_random_net(folder, LAYERS_PROTOTXT, "threads", seed=3)


def test_threads_give_the_blobs_of_one_thread(layers_net, tmp_path):
    prototxt, weights = layers_net
    one_report, one = run_child(prototxt, weights, 5, "0", tmp_path / "one.npz", "1")
    report, many = run_child(prototxt, weights, 5, "0,2,3,4", tmp_path / "many.npz", "2",
                             alone=True)
    assert one_report["threads"] == [1]
    assert report["threads"][1:] == [2, 3, 4]          # 5 images: uneven shares too
    assert report["libgomp"], "_caffe.so is not the OpenMP build (patch 05)"
    blobs = {**{k.replace("batch@0", "one"): v for k, v in one.items()}, **many}
    for key in ("batch@0", "batch@2", "batch@3", "batch@4"):
        assert_same_blobs(blobs, key, "one")
    # each image alone (Caffe's own path: OpenBLAS's threads inside the GEMMs)
    for i in range(5):
        for name in ("conv1", "norm1", "join", "prob"):
            assert_rel_close(blobs[f"image{i}/{name}"][0], blobs[f"one/{name}"][i], rel=1e-6)


def test_threaded_blobs_match_numpy(layers_net, tmp_path):
    """The threaded forward is right, not only equal to itself: a float64 NumPy
    forward of the same weights agrees with every blob."""
    prototxt, weights = layers_net
    _, blobs = run_child(prototxt, weights, 5, "3", tmp_path / "three.npz", "1")
    netdef = load_netdef(prototxt)
    params = stored_weights(weights)
    values = {"data": blobs["batch@3/data"].astype(np.float64)}
    for layer in netdef.net.layer:
        if not layer.bottom:                           # the input
            continue
        outs = layer_forward(layer, [values[b] for b in layer.bottom], params.get(layer.name, []))
        values.update(zip(layer.top, outs, strict=True))
    assert len(values) == 11
    for name, value in values.items():            # in-place blobs: their last value
        assert_rel_close(blobs[f"batch@3/{name}"], value)


def test_googlenet_cam_threads_bit_for_bit(tmp_path):
    """GoogLeNet-CAM (random weights, the benchmarks' model) at batch 3 on 1 and 2
    threads: every blob the same."""
    require_pycaffe()
    prototxt = GOOGLENET
    weights = tmp_path / "googlenet.caffemodel"
    netdef = load_netdef(prototxt)
    save_caffemodel(netdef, random_weights(netdef, 0), weights)
    _, one = run_child(prototxt, weights, 3, "1", tmp_path / "one.npz", "1")
    _, two = run_child(prototxt, weights, 3, "2", tmp_path / "two.npz", "2")
    assert_same_blobs({**one, **two}, "batch@2", "batch@1")
