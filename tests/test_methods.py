"""The CAM methods (``--method``) and the gradients they build on, on every backend.

- Gradients at the target blob, from pycaffe's backward pass and from the
  VJPs the ONNX export emits, equal central finite differences of the logit
  computed by an independent float64 NumPy forward (``numpy_net``), on small
  nets covering every layer type with a VJP.
- On a GAP → FC net, Grad-CAM = ReLU(CAM) / (h·w).
- Score-CAM, Ablation-CAM and Eigen-CAM equal NumPy loops over the channels.
- pycaffe and ONNX Runtime agree on the real GoogLeNet-CAM prototxt.
- A batch of N images × top-k classes gives the maps of one image and one
  class at a time.

"Within r" means max |a − b| ≤ r · max |b|. pycaffe is required under CI=true.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import GOOGLENET, ROOT, assert_rel_close, require_pycaffe
from nets import TINY, noise_images, nontrivial_weights, pycaffe_googlenet_weights
from numpy_net import bilinear, finite_differences, run_from, stored_weights
from synthetic import save_caffemodel

from cam_caffe import CAMNet
from cam_caffe.camspec import find_target
from cam_caffe.errors import CamError, ModelError
from cam_caffe.methods import METHODS, Evidence, compute
from cam_caffe.netdef import load_netdef

GRADIENT_BACKENDS = ("caffe", "onnxruntime")
ALL_BACKENDS = ("caffe", "onnxruntime", "opencv")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def write_net(folder, text: str, name: str, seed: int = 0, **changes):
    """The prototxt and a caffemodel of non-trivial weights (``changes``: layer → blobs)."""
    prototxt = folder / f"{name}.prototxt"
    prototxt.write_text(text)
    netdef = load_netdef(prototxt)
    weights = nontrivial_weights(netdef, seed)
    weights.update(changes)
    model = folder / f"{name}.caffemodel"
    save_caffemodel(netdef, weights, model)
    return prototxt, model


def load(backend: str, prototxt, weights, **kwargs) -> CAMNet:
    if backend == "caffe":
        require_pycaffe()
    return CAMNet(prototxt, weights, backend=backend, **kwargs)


# conv → pool → LRN → FC → ReLU → FC, no global pooling; the ReLU after conv1 is
# in place, so the target blob conv1 is its output (zeros where conv1 < 0).
NO_GAP = """
name: "NoGap" input: "data" input_shape { dim: 1 dim: 3 dim: 17 dim: 15 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 5 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1"
        lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 2 } }
layer { name: "fc1" type: "InnerProduct" bottom: "norm1" top: "fc1"
        inner_product_param { num_output: 7 } }
layer { name: "relu2" type: "ReLU" bottom: "fc1" top: "fc1" }
layer { name: "fc2" type: "InnerProduct" bottom: "fc1" top: "fc2"
        inner_product_param { num_output: 4 } }
layer { name: "prob" type: "Softmax" bottom: "fc2" top: "prob" }
"""

# NO_GAP with LRN's k = 1, which OpenCV's LRN also computes.
NO_GAP_K1 = NO_GAP.replace("k: 2 }", "k: 1 }")

# Every other layer type with a VJP, after the target blob "t" (no ReLU on it:
# MAX pooling and Eltwise MAX have no ties there).
MIXED = """
name: "Mixed" input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "conv0" type: "Convolution" bottom: "data" top: "t"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "split" type: "Split" bottom: "t" top: "t_a" top: "t_b" }
layer { name: "ca" type: "Convolution" bottom: "t_a" top: "ca"
        convolution_param { num_output: 6 kernel_size: 3 pad: 2 dilation: 2 group: 2 } }
layer { name: "bn" type: "BatchNorm" bottom: "ca" top: "ca" }
layer { name: "sc" type: "Scale" bottom: "ca" top: "ca" scale_param { bias_term: true } }
layer { name: "leaky" type: "ReLU" bottom: "ca" top: "ca" relu_param { negative_slope: 0.1 } }
layer { name: "cb" type: "Convolution" bottom: "t_b" top: "cb"
        convolution_param { num_output: 6 kernel_size: 1 } }
layer { name: "sig" type: "Sigmoid" bottom: "cb" top: "cbs" }
layer { name: "tanh" type: "TanH" bottom: "t" top: "tt" }
layer { name: "sum" type: "Eltwise" bottom: "ca" bottom: "cbs" top: "sum"
        eltwise_param { operation: SUM coeff: 1 coeff: -0.5 } }
layer { name: "prod" type: "Eltwise" bottom: "sum" bottom: "tt" top: "prod"
        eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "prod" bottom: "ca" bottom: "tt" top: "mx"
        eltwise_param { operation: MAX } }
layer { name: "mp" type: "Pooling" bottom: "mx" top: "mp"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "lrn" type: "LRN" bottom: "mp" top: "lrn"
        lrn_param { local_size: 3 alpha: 0.3 beta: 0.6 norm_region: WITHIN_CHANNEL } }
layer { name: "sm" type: "Softmax" bottom: "lrn" top: "sm" }
layer { name: "bias" type: "Bias" bottom: "sm" top: "bi" }
layer { name: "cat" type: "Concat" bottom: "bi" bottom: "mp" top: "cat" }
layer { name: "drop" type: "Dropout" bottom: "cat" top: "cat" }
layer { name: "gp" type: "Pooling" bottom: "cat" top: "gp"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "flat" type: "Flatten" bottom: "gp" top: "flat" }
layer { name: "rs" type: "Reshape" bottom: "flat" top: "rs"
        reshape_param { shape { dim: 0 dim: -1 dim: 1 dim: 1 } } }
layer { name: "fc" type: "InnerProduct" bottom: "rs" top: "fc"
        inner_product_param { num_output: 5 transpose: true } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def check_gradients(tmp_path, text, blob, name, changes=None, image_size=(17, 15)):
    """pycaffe's and ONNX Runtime's ∂logit/∂blob against finite differences."""
    prototxt, weights = write_net(tmp_path, text, name, **(changes or {}))
    netdef = load_netdef(prototxt)
    reference = stored_weights(weights)
    image = noise_images(1, image_size, seed=3)
    classes = np.array([[1, 3]])
    for backend in GRADIENT_BACKENDS:
        net = load(backend, prototxt, weights, mean="128", scale=1 / 64, feature_blob=blob,
                   method="gradcam")
        assert net.spec.feature_blob == blob and net.spec.logit_blob in ("fc2", "fc")
        batch = net.preprocess(image)
        features = np.array(net.backend.forward(batch).features)
        grads = net.backend.gradients(classes)
        assert grads.shape == (1, 2, *features.shape[1:])
        for m, c in enumerate(classes[0]):
            def logit(a, c=c, net=net):
                return run_from(netdef, reference, blob, a, net.spec.logit_blob)[:, c]
            expected = finite_differences(logit, features[0])
            assert np.abs(expected).max() > 1e-4
            assert_rel_close(grads[0, m], expected, 1e-4)
    return features, grads


def test_gradients_without_global_pooling_match_finite_differences(tmp_path):
    """conv → in-place ReLU → AVE pool (padded, ceil) → LRN → FC → ReLU → FC."""
    features, grads = check_gradients(tmp_path, NO_GAP, "conv1", "nogap")
    # The gradient is at the ReLU's output, as the pooling reads it: non-zero where
    # the ReLU gave 0 (a gradient through the in-place ReLU would be 0 there).
    zeros = features[0] == 0
    assert zeros.any() and np.abs(grads[0, 0][zeros]).max() > 0


def test_gradients_at_the_default_blob_match_finite_differences(tmp_path):
    spec = find_target(load_netdef(write_net(tmp_path, NO_GAP, "n")[0]))
    assert spec.feature_blob == "norm1" and not spec.cam_head      # last spatial blob
    check_gradients(tmp_path, NO_GAP, "norm1", "nogap")


def test_gradients_through_every_vjp_layer_match_finite_differences(tmp_path):
    check_gradients(tmp_path, MIXED, "t", "mixed", image_size=(8, 8))


def test_every_vjp_layer_type_is_tested():
    from cam_caffe.onnx_export import VJP
    types = {line.split('type: "')[1].split('"')[0]
             for text in (NO_GAP, MIXED) for line in text.splitlines() if 'type: "' in line}
    assert set(VJP) <= types, set(VJP) - types


@pytest.mark.parametrize("backend", GRADIENT_BACKENDS)
def test_gradcam_is_relu_cam_over_hw_on_a_gap_fc_net(tmp_path, backend):
    prototxt, weights = write_net(tmp_path, TINY, "tiny")
    cam = load(backend, prototxt, weights, mean="128", method="cam")
    grad = load(backend, prototxt, weights, mean="128", method="gradcam")
    batch = noise_images(3, (9, 7), seed=4)
    h, w = cam.spec.feature_size
    for a, b in zip(cam.predict(batch, top_k=3), grad.predict(batch, top_k=3), strict=True):
        assert a.classes == b.classes
        assert_rel_close(b.cams, np.maximum(a.cams, 0) / (h * w), 1e-5)


# ------------------------------------------------------- every method, NumPy loops
def loop_maps(method, features, gradients, batch, classes, forward, tail):
    """The maps (M, h, w) of one image by loops over classes, channels and positions,
    in float64, as the papers write them: ``features`` A (K, h, w), ``gradients`` G
    (M, K, h, w) or None, ``batch`` the preprocessed image (3, H, W), ``forward``
    an image → logits (C,), ``tail`` A → logits (C,)."""
    k, h, w = features.shape
    a = features.astype(np.float64)
    logits = tail(a)
    out = []
    for m, c in enumerate(classes):
        weight = np.zeros(k)
        if method == "eigencam":
            x = a.reshape(k, h * w).T
            x = x - x.mean(axis=0)
            _u, _s, vt = np.linalg.svd(x)
            projection = x @ vt[0]
            if np.corrcoef(projection, a.sum(axis=0).ravel())[0, 1] < 0:
                projection = -projection
            out.append(np.maximum(projection.reshape(h, w), 0))
            continue
        if method == "layercam":
            total = np.zeros((h, w))
            for j in range(k):
                for y in range(h):
                    for x in range(w):
                        total[y, x] += max(float(gradients[m, j, y, x]), 0.0) * a[j, y, x]
            out.append(np.maximum(total, 0))
            continue
        for j in range(k):
            g = gradients[m, j].astype(np.float64) if gradients is not None else None
            if method == "gradcam":
                weight[j] = g.sum() / (h * w)
            elif method == "gradcam++":
                for value in g.ravel():
                    if value != 0:
                        alpha = value ** 2 / (2 * value ** 2 + a[j].sum() * value ** 3 + 1e-6)
                        weight[j] += alpha * max(value, 0.0)
            elif method == "xgradcam":
                weight[j] = (g * a[j]).sum() / (a[j].sum() + 1e-7)
            elif method == "scorecam":
                mask = bilinear(a[j], batch.shape[1:])
                span = mask.max() - mask.min()
                mask = (mask - mask.min()) / span if span > 0 else np.zeros_like(mask)
                weight[j] = forward(batch * mask)[c]
            else:                                          # ablationcam
                ablated = a.copy()
                ablated[j] = 0
                weight[j] = (logits[c] - tail(ablated)[c]) / logits[c]
        if method == "scorecam":
            weight = np.exp(weight - weight.max())
            weight /= weight.sum()
        out.append(np.maximum(np.einsum("k,khw->hw", weight, a), 0))
    return np.stack(out)


def reference_maps(method, netdef, weights, spec, batch, features, classes):
    """Score-CAM, Ablation-CAM, Eigen-CAM of one image of a real net (a NumPy forward)."""
    def forward(image):
        return run_from(netdef, weights, netdef.input_name, image[None], spec.logit_blob)[0]

    def tail(a):
        return run_from(netdef, weights, spec.feature_blob, a[None], spec.logit_blob)[0]

    return loop_maps(method, features, None, batch, classes, forward, tail)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("method", ["scorecam", "ablationcam", "eigencam"])
def test_forward_only_methods_match_numpy_loops(tmp_path, backend, method):
    prototxt, weights = write_net(tmp_path, NO_GAP_K1, "nogap", seed=2)
    netdef = load_netdef(prototxt)
    net = load(backend, prototxt, weights, mean="128", scale=1 / 64, method=method,
               feature_blob="conv1", batch_size=3)
    batch = noise_images(2, (17, 15), seed=5)
    results = net.predict(batch, top_k=2)
    preprocessed = net.preprocess(batch)
    features = np.array(net.backend.forward(preprocessed).features)
    reference = stored_weights(weights)
    for i, result in enumerate(results):
        expected = reference_maps(method, netdef, reference, net.spec, preprocessed[i],
                                  features[i], result.classes)
        assert_rel_close(result.cams, expected, 1e-4)


def synthetic_evidence(scale: float = 1.0, batch_size: int = 2, progress: bool = False):
    """Evidence of 2 images, 2 classes each, 5 channels on a linear "net" whose class
    logits lie 2,000 apart (a softmax must subtract each row's own maximum). Channel
    minima differ (Score-CAM scales each mask on its own), image 0's channel 1 is
    constant (a mask of zeros), channel 2 is tiny (Σ A ≈ 1e-6 next to XGrad-CAM's
    1e-7) with large gradients; the gradients hold exact zeros, exact ones and values
    near 1e-3."""
    rng = np.random.default_rng(11)
    n, k, h, w, size, c = 2, 5, 4, 3, (9, 7), 4
    features = rng.uniform(0.2, 2.0, (n, k, h, w)) + np.arange(k)[:, None, None] * 0.3
    features[0, 1] = 3.0
    features[:, 2] *= 1e-7
    features = (features * scale).astype(np.float32)
    gradients = rng.normal(0, 1e-2, (n, 2, k, h, w))
    gradients[rng.random(gradients.shape) < 0.2] = 0
    gradients[rng.random(gradients.shape) < 0.05] = 1
    gradients[0, 0, 3] = rng.normal(0, 1e-3, (h, w))
    gradients[:, :, 2] *= 1e7                  # the tiny channel counts in every map
    image_weights = rng.normal(0, 1, (c, 3 * size[0] * size[1]))
    tail_weights = rng.normal(0, 1, (c, k * h * w)) / scale
    bias = np.array([0.0, 2000.0, -1500.0, 300.0])
    calls: list[int] = []

    def forward(images):
        calls.append(len(images))
        return (images.reshape(len(images), -1) @ image_weights.T + bias).astype(np.float32)

    def tail(a):
        calls.append(len(a))
        return (a.reshape(len(a), -1) @ tail_weights.T + bias).astype(np.float32)

    batch = rng.uniform(-2, 2, (n, 3, *size)).astype(np.float32)
    evidence = Evidence(features, np.array([[3, 0], [1, 2]]), batch,
                        lambda: gradients.astype(np.float32), forward, tail,
                        tail(features), batch_size=batch_size, progress=progress)
    calls.clear()
    return evidence, calls


@pytest.mark.parametrize("method", [m for m in METHODS if m != "cam"])
def test_every_method_matches_numpy_loops_on_synthetic_evidence(method):
    """Each formula against its loop, on values chosen so that each term shows (see
    ``synthetic_evidence``); Score-CAM and Ablation-CAM run ``batch_size`` rows per
    forward; every method's maps are float32."""
    evidence, calls = synthetic_evidence()
    maps = compute(method, evidence)
    assert maps.dtype == np.float32 and maps.shape == (2, 2, 4, 3)
    gradients = evidence.gradients()
    for i in range(2):
        def forward(image):
            return evidence.forward_logits(image[None])[0].astype(np.float64)

        def tail(a):
            return evidence.tail_logits(a[None].astype(np.float32))[0].astype(np.float64)

        expected = loop_maps(method, evidence.features[i], gradients[i], evidence.batch[i],
                             evidence.classes[i], forward, tail)
        assert np.abs(expected).max() > 0
        for m in range(2):
            assert_rel_close(maps[i, m], expected[m], 1e-4)
    if method in ("scorecam", "ablationcam"):
        assert calls[:6] == [2, 2, 1, 2, 2, 1]           # 5 channels, 2 rows a forward


def test_eigencam_sign_does_not_depend_on_the_scale():
    """The projection's sign follows its correlation with Σ_k A_k at any scale."""
    small, _ = synthetic_evidence(scale=1e-4)
    large, _ = synthetic_evidence()
    assert_rel_close(compute("eigencam", small) * 1e4, compute("eigencam", large), 1e-4)


@pytest.mark.parametrize(("method", "what"), [("scorecam", "masked forwards"),
                                              ("ablationcam", "ablated forwards")])
def test_forward_methods_progress_counts_every_forward(method, what, capsys):
    evidence, _ = synthetic_evidence(batch_size=2, progress=True)
    compute(method, evidence)
    err = capsys.readouterr().err
    drawn = [int(n) for n in re.findall(rf"\r{what}: +\d+%\|[^|]*\| (\d+)/10 \[[^]]*fwd/s\]",
                                        err)]
    assert drawn[0] == 0 and drawn[-1] == 10 and drawn == sorted(drawn)   # each one counted
    assert set(drawn) <= {0, 2, 4, 5, 7, 9, 10}            # after whole runs of 2 (or 1)
    assert err.endswith("\n") and err.count("\n") == 1


# ------------------------------------------------------------- batches and classes
@pytest.mark.parametrize("method", [m for m in METHODS if m != "cam"])
def test_batch_and_top_k_equal_one_image_one_class(tmp_path, method):
    prototxt, weights = write_net(tmp_path, NO_GAP_K1, "nogap", seed=4)
    fast = "opencv" if method in ("scorecam", "eigencam") else "onnxruntime"
    for backend in ({fast, "caffe"} if method.startswith(("grad", "xgrad", "layer"))
                    else {fast}):
        net = load(backend, prototxt, weights, mean="128", scale=1 / 64, method=method,
                   feature_blob="conv1", batch_size=4)
        batch = noise_images(3, (17, 15), seed=6)
        together = net.predict(batch, top_k=3)
        for image, result in zip(batch, together, strict=True):
            for c, cam in zip(result.classes, result.cams, strict=True):
                alone = net.predict([image], classes=[c])[0]
                assert_rel_close(cam, alone.cams[0], 1e-5)
                np.testing.assert_allclose(alone.probs, result.probs, rtol=1e-5)


# ---------------------------------------------------------------- GoogLeNet-CAM
@pytest.fixture(scope="module")
def googlenet(tmp_path_factory):
    weights = pycaffe_googlenet_weights(tmp_path_factory.mktemp("gcam"), seed=7)
    return GOOGLENET, weights


@pytest.mark.parametrize("blob", ["CAM_conv", "inception_4e/output"])
def test_googlenet_gradient_methods_agree_on_pycaffe_and_onnxruntime(googlenet, blob,
                                                                     tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    prototxt, weights = googlenet
    batch = noise_images(2, (240, 260), seed=8)
    maps = {}
    for backend in GRADIENT_BACKENDS:
        net = load(backend, prototxt, weights, method="gradcam", feature_blob=blob)
        out = net.backend.forward(net.preprocess(batch))
        classes = np.argsort(-out.probs, axis=1)[:, :2]
        grads = net.backend.gradients(classes)
        evidence = Evidence(np.array(out.features), classes, None, lambda g=grads: g, None, None,
                            out.logits)
        maps[backend] = {m: compute(m, evidence) for m in
                         ("gradcam", "gradcam++", "xgradcam", "layercam")}
        maps[backend]["grads"] = grads
    assert np.abs(maps["caffe"]["grads"]).max() > 0
    for method, expected in maps["caffe"].items():
        assert_rel_close(maps["onnxruntime"][method], expected, 1e-4)


def test_googlenet_cam_blob_below_the_head_has_no_cam(googlenet):
    prototxt, weights = googlenet
    spec = find_target(load_netdef(prototxt), "inception_4e/output")
    assert not spec.cam_head and spec.logit_blob == "CAM_fc" and spec.channels == 832
    with pytest.raises(ModelError, match="--method cam needs"):
        CAMNet(prototxt, weights, backend="opencv", feature_blob="inception_4e/output",
               method="cam")
    assert find_target(load_netdef(prototxt)).cam_head      # the default: the CAM head


# ------------------------------------------------------------------ errors, CLI
def test_bad_feature_blobs_list_candidates(tmp_path):
    prototxt, _ = write_net(tmp_path, NO_GAP, "nogap")
    netdef = load_netdef(prototxt)
    with pytest.raises(ModelError, match=r"'fc1': it is not an N×C×H×W blob.*: conv1, pool1, "
                                         r"norm1$"):
        find_target(netdef, "fc1")
    tiny = load_netdef(write_net(tmp_path, TINY, "tiny")[0])
    with pytest.raises(ModelError, match=r"'gap': its spatial size is 1 \(1x1\); candidates "
                                         r"\(input to output\): conv$"):
        find_target(tiny, "gap")
    with pytest.raises(ModelError, match=r"'nope': no blob of that name; candidates"):
        find_target(netdef, "nope")


def test_opencv_refuses_gradient_methods_but_runs_the_others(tmp_path):
    prototxt, weights = write_net(tmp_path, NO_GAP_K1, "nogap")
    with pytest.raises(CamError, match=r"opencv backend has no backward pass.*caffe or "
                                       "onnxruntime"):
        CAMNet(prototxt, weights, backend="opencv", method="gradcam++")
    net = CAMNet(prototxt, weights, backend="opencv", method="eigencam")
    assert net.predict(noise_images(1, (17, 15)))[0].cams.shape == (1, 5, 5)


def test_auto_backend_for_gradients_skips_opencv(tmp_path):
    prototxt, weights = write_net(tmp_path, NO_GAP, "nogap")
    assert CAMNet(prototxt, weights, method="gradcam").backend_name == "onnxruntime"


# A Python without ONNX Runtime and pycaffe (a pip-only install without the onnx extra):
# a None in sys.modules is how Python marks a module absent (find_spec gives None).
WITHOUT_GRADIENT_BACKENDS = """
import sys
sys.modules["onnxruntime"] = sys.modules["caffe"] = None
from cam_caffe.launch import entry
entry()
"""


def test_gradient_methods_without_their_backends_say_what_to_install():
    child = subprocess.run([sys.executable, "-c", WITHOUT_GRADIENT_BACKENDS, "--model", "demo",
                            str(ROOT / "images" / "demo_star_4.png"), "--method", "gradcam"],
                           capture_output=True, text=True)
    assert child.returncode == 6
    assert child.stderr == ("cam-caffe: error: gradient methods need ONNX Runtime or pycaffe, "
                            "and neither is installed: pip install 'cam-caffe[onnx]', or run "
                            "scripts/install_pycaffe.sh\n")


POWER_TAIL = TINY.replace(
    'layer { name: "gap"',
    'layer { name: "pow" type: "Power" bottom: "conv" top: "p" power_param { power: 2 } }\n'
    'layer { name: "gap"').replace('bottom: "conv" top: "gap"', 'bottom: "p" top: "gap"')


def test_a_layer_without_vjp_is_a_clear_error(tmp_path):
    prototxt, weights = write_net(tmp_path, POWER_TAIL, "power")
    from cam_caffe.onnx_export import VJP
    with pytest.raises(ModelError, match=rf"^{prototxt}: layer 'pow' of type 'Power' has no "
                                         r"gradient in the ONNX export \(VJPs: "
                                         rf"{re.escape(', '.join(VJP))}\); use --backend caffe$"):
        CAMNet(prototxt, weights, backend="onnxruntime", method="gradcam",
               feature_blob="conv")
    require_pycaffe()                                     # auto falls through to pycaffe
    net = CAMNet(prototxt, weights, method="gradcam", feature_blob="conv")
    assert net.backend_name == "caffe"


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cam_caffe", *map(str, args)],
                          capture_output=True, text=True)


def test_cli_method_on_a_net_without_cam_head(tmp_path):
    prototxt, weights = write_net(tmp_path, NO_GAP, "nogap")
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), noise_images(1, (30, 40))[0])
    common = ["--prototxt", prototxt, "--weights", weights, "--mean", "128"]
    child = run_cli(image, *common, "--jsonl", "-v")
    assert child.returncode == 0, child.stderr
    record = json.loads(child.stdout)
    assert record["method"] == "gradcam" and record["feature_blob"] == "norm1"
    assert "method gradcam at blob 'norm1'" in child.stderr
    child = run_cli(image, *common, "--method", "cam")
    assert child.returncode == 3 and child.stderr.count("\n") == 1
    assert "--method cam needs" in child.stderr
    child = run_cli(image, *common, "--method", "layercam", "--backend", "opencv")
    assert child.returncode == 2 and child.stderr.count("\n") == 1
    child = run_cli(image, *common, "--method", "nope")
    assert child.returncode == 2 and "invalid choice" in child.stderr
    out = tmp_path / "out"
    child = run_cli(image, *common, "--method", "scorecam", "--output-dir", out,
                    "--save", "npy,json", "--top-k", "2", "--backend", "onnxruntime")
    assert child.returncode == 0, child.stderr
    raw = np.load(out / "x.cam.npy")
    assert raw.shape == (2, 5, 5) and (raw >= 0).all()
    assert json.loads((out / "x.json").read_text())["method"] == "scorecam"


def test_help_lists_the_methods():
    child = run_cli("--help")
    for method in METHODS:
        assert method in child.stdout


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "data"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_data.py"), "--out",
                    str(folder), "--count", "3", "--seed", "5"], check=True,
                   capture_output=True)
    return folder


@pytest.mark.parametrize("method", METHODS)
def test_evaluate_runs_every_method_on_the_demo_model(demo_data, method):
    child = run_cli("evaluate", demo_data, "--boxes-file", demo_data / "boxes.csv",
                    "--model", "demo", "--method", method, "--json", "--backend", "onnxruntime")
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout)
    assert result["method"] == method and result["images"] == 3


def test_export_gradient_matches_pycaffe(tmp_path, capsys):
    """`cam-caffe export --gradient`: the full net's ONNX model with a seed input and the
    gradient output, on a net without CAM head; equal to pycaffe's backward pass."""
    import onnxruntime as ort

    from cam_caffe.commands import export
    from cam_caffe.onnx_export import gradient_names
    prototxt, weights = write_net(tmp_path, NO_GAP, "nogap", seed=6)
    out = tmp_path / "nogap.onnx"
    assert export.main(["--prototxt", str(prototxt), "--weights", str(weights), "-o", str(out),
                        "--gradient", "--feature-blob", "conv1"]) == 0
    assert "seed 'fc2:seed' → gradient 'conv1:grad'" in capsys.readouterr().out
    net = load("caffe", prototxt, weights, mean="128", scale=1 / 64, feature_blob="conv1",
               method="gradcam")
    batch = net.preprocess(noise_images(3, (17, 15), seed=9))
    net.backend.forward(batch)
    classes = np.array([[2], [0], [3]])
    expected = net.backend.gradients(classes)[:, 0]
    seed_name, grad_name = gradient_names("fc2", "conv1")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    seed = np.eye(4, dtype=np.float32)[classes[:, 0]]
    logits, grads = session.run(["fc2", grad_name], {"data": batch, seed_name: seed})
    assert_rel_close(grads, expected, 1e-5)
    assert_rel_close(logits, net.backend.forward(batch).logits, 1e-5)


# ------------------------------------------------------------- several methods at once
DEMO = ROOT / "models" / "demo"
DEMO_IMAGES = sorted((ROOT / "images").glob("demo_*.png"))


def demo_net(method: str) -> CAMNet:
    return CAMNet(DEMO / "deploy.prototxt", DEMO / "demo.caffemodel",
                  labels=DEMO / "labels.txt", backend="onnxruntime", method=method)


def test_several_methods_give_each_methods_own_maps():
    """--method scorecam,gradcam,cam: for each class one map per method, in that order,
    each equal to the map of a run of that method alone (the gradients are taken
    before Score-CAM's extra forwards replace the target blob)."""
    images = [cv2.imread(str(p)) for p in DEMO_IMAGES[:2]]
    together = demo_net("scorecam,gradcam,cam").predict(images, top_k=2)
    alone = {m: demo_net(m).predict(images, top_k=2) for m in ("scorecam", "gradcam", "cam")}
    for i, result in enumerate(together):
        assert result.methods == ("scorecam", "gradcam", "cam")
        assert result.classes == [c for c in alone["cam"][i].classes for _ in range(3)]
        for rank in range(6):
            method = result.map_method(rank)
            assert method == ("scorecam", "gradcam", "cam")[rank % 3]
            assert_rel_close(result.cams[rank], alone[method][i].cams[rank // 3], 1e-5)


def test_several_methods_on_the_command_line(tmp_path):
    """Files cam-1… in class-then-method order, the JSON's maps naming their method,
    the report's cards side by side and its header listing the methods."""
    out = tmp_path / "out"
    child = subprocess.run([sys.executable, "-m", "cam_caffe", str(DEMO_IMAGES[0]), "--model",
                            "demo", "--method", "cam,gradcam", "--top-k", "2", "--output-dir",
                            str(out), "--save", "overlay,json", "--report", "-q"],
                           capture_output=True, text=True, cwd=ROOT)
    assert child.returncode == 0, child.stderr
    stem = DEMO_IMAGES[0].stem
    record = json.loads((out / f"{stem}.json").read_text())
    assert [m["method"] for m in record["maps"]] == ["cam", "gradcam"] * 2
    assert [m["class"] for m in record["maps"]] == [record["top_k"][0]["class"]] * 2 + [
        record["top_k"][1]["class"]] * 2
    assert all((out / f"{stem}.cam-{r}.png").is_file() for r in range(1, 5))
    assert '"methods": ["cam", "gradcam"]' in (out / "_report" / "run.js").read_text()
    cards = (out / "_report" / "data-0000.js").read_text()
    assert cards.count('"method":"cam"') == 2 and cards.count('"method":"gradcam"') == 2


def test_parse_methods_names_the_unknown_method_and_the_choices():
    """The API's check (the command line has its own, in argparse's words)."""
    from cam_caffe.errors import CamError
    from cam_caffe.methods import parse_methods
    assert parse_methods("gradcam, cam") == ("gradcam", "cam")
    with pytest.raises(CamError, match=rf"^--method 'nope': choose one of "
                                       rf"{re.escape(', '.join(METHODS))} \(or a comma list "
                                       r"of them\)$"):
        parse_methods("gradcam,nope")
    with pytest.raises(CamError, match=r"^--method 'cam,cam': a method named twice$"):
        parse_methods("cam,cam")


@pytest.mark.parametrize(("command", "message"), [
    ([], "argument --method: 'cam,cam': a method named twice"),
    ([], "argument --method: invalid choice: 'nope'"),
    (["evaluate", "--faithfulness"], "evaluate scores one method at a time"),
])
def test_several_methods_refused(tmp_path, command, message):
    method = "cam,nope" if "nope" in message else "cam,cam" if "twice" in message \
        else "cam,gradcam"
    child = subprocess.run([sys.executable, "-m", "cam_caffe", *command, str(DEMO_IMAGES[0]),
                            "--model", "demo", "--method", method],
                           capture_output=True, text=True, cwd=ROOT)
    assert child.returncode != 0 and len(child.stderr.splitlines()) == 1
    assert message in child.stderr, child.stderr
