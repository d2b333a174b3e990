"""The Caffe → ONNX converter and the ONNX Runtime backend.

Tiny nets, written here as prototxt text with random weights saved as real
caffemodels, cover every layer type the converter handles. Each runs through
the ``onnxruntime`` backend and is compared with the OpenCV backend, with
pycaffe when it is importable (required when CI=true), and, where cheap, with
an independent NumPy version of Caffe's own loops (pooling, LRN). Then the
real GoogLeNet-CAM prototxt (random weights) and the real CIFAR-10 ResNet-20
from ``../shared/fixtures``.

"Within 1e-4" means max |a - b| <= 1e-4 · max |b| over the whole tensor.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import GOOGLENET, IN_CI, shared
from nets import CONV, ELTWISE, SLICE_NET, cam_head, input_block, nontrivial_weights
from numpy_net import caffe_lrn, caffe_pool

if IN_CI:       # CI installs the "onnx" extra: a missing package is an error there
    import onnx
    import onnxruntime as ort
else:
    onnx = pytest.importorskip("onnx", reason="the 'onnx' extra is not installed")
    ort = pytest.importorskip("onnxruntime", reason="the 'onnx' extra is not installed")

from synthetic import random_weights, save_caffemodel

from cam_caffe import proto
from cam_caffe.backends import create_backend
from cam_caffe.backends.onnxruntime import OnnxRuntimeBackend, cache_dir
from cam_caffe.backends.opencv import OpenCVBackend
from cam_caffe.cam import cam_weights
from cam_caffe.camspec import find_cam_layers
from cam_caffe.commands import main
from cam_caffe.errors import BackendError, ModelError
from cam_caffe.netdef import CaffeModel, layer_shapes, load_netdef, read_caffemodel
from cam_caffe.onnx_export import SUPPORTED, convert
from cam_caffe.onnx_export.pool import pool_windows

TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test converts into its own ONNX cache, never the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


# ------------------------------------------------------------------ helpers


class Model:
    """A net written to disk with its caffemodel, and its CAM spec."""

    def __init__(self, tmp_path: Path, text: str | None = None, *, prototxt: Path | None = None,
                 weights: Path | None = None, input_size=None, feature_blob=None, seed=0):
        if prototxt is None:
            prototxt = tmp_path / "net.prototxt"
            prototxt.write_text(text)
        self.netdef = load_netdef(prototxt, input_size=input_size)
        if weights is None:
            weights = tmp_path / "net.caffemodel"
            save_caffemodel(self.netdef, nontrivial_weights(self.netdef, seed), weights)
        self.weights = weights
        self.spec = find_cam_layers(self.netdef, feature_blob)

    def batch(self, n: int = 2, seed: int = 1, scale: float = 1.0) -> np.ndarray:
        shape = (n, *self.netdef.input_shape[1:])
        return (np.random.default_rng(seed).normal(0, 1, shape) * scale).astype(np.float32)

    def cam_weights(self) -> np.ndarray:
        """The CAM weights cam-caffe reads from the caffemodel."""
        return cam_weights(self.netdef, read_caffemodel(self.weights), self.spec)

    def onnxruntime(self) -> OnnxRuntimeBackend:
        return OnnxRuntimeBackend(self.netdef, CaffeModel(self.weights), self.spec)

    def reference(self, name: str):
        if name == "opencv":
            return OpenCVBackend(self.netdef, CaffeModel(self.weights), self.spec)
        return caffe_backend(self.netdef, self.weights, self.spec)


def caffe_backend(netdef, weights, spec):
    """pycaffe's backend; the comparison is skipped without pycaffe, except in CI."""
    try:
        from cam_caffe.backends.caffe import CaffeBackend, import_caffe
        import_caffe()
    except BackendError as e:
        if IN_CI:
            pytest.fail(f"CI=true but pycaffe is not importable: {e}")
        pytest.skip(f"pycaffe is not importable here ({e}); CI runs this comparison")
    return CaffeBackend(netdef, CaffeModel(weights), spec)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.abs(expected).max()), 1e-12)
    return float(np.abs(actual.astype(np.float64) - expected).max()) / scale


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str) -> float:
    error = relative_error(actual, expected)
    assert error <= TOLERANCE, f"{what}: max relative error {error:.3g} > {TOLERANCE}"
    return error


def compare(model: Model, reference: str, batch: np.ndarray) -> tuple[float, float]:
    """ONNX Runtime against ``reference``: probabilities and features; CAM weights too."""
    ours = model.onnxruntime()
    theirs = model.reference(reference)
    a, b = ours.forward(batch), theirs.forward(batch)
    np.testing.assert_allclose(a.probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(model.cam_weights(), expected_cam_weights(model))
    return (assert_close(a.probs, b.probs, "probabilities"),
            assert_close(a.features, b.features, "features"))


def expected_cam_weights(model: Model) -> np.ndarray:
    """(C, K) straight from the caffemodel's FC blob (stored (C, K), or (K, C) if transposed)."""
    fc = model.netdef.layer(model.spec.fc_layer)
    stored = next(layer for layer in read_caffemodel(model.weights).layer if layer.name == fc.name)
    blob = np.array(stored.blobs[0].data, np.float32)
    if fc.inner_product_param.transpose:
        return blob.reshape(model.spec.channels, model.spec.num_classes).T
    return blob.reshape(model.spec.num_classes, model.spec.channels)


# ------------------------------------------------------- NumPy references


# ----------------------------------------------------------- the tiny nets
def pool_net(c, h, w, params: str) -> str:
    return (input_block(c, h, w)
            + f'layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool" '
              f'pooling_param {{ {params} }} }}\n' + cam_head("pool"))


def pool_case(shape, mode: str, kernel, stride, pad, ceil_mode: bool = True):
    """(input C, H, W), the pooling_param text, and the arguments of ``caffe_pool``."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    params = (f"pool: {mode} kernel_h: {kh} kernel_w: {kw} stride_h: {sh} stride_w: {sw} "
              f"pad_h: {ph} pad_w: {pw}" + ("" if ceil_mode else " ceil_mode: false"))
    return shape, params, (kernel, stride, pad, mode, ceil_mode)


POOL_CASES = {}
for _mode in ("MAX", "AVE"):
    _m = _mode.lower()
    POOL_CASES.update({
        # 7x7, kernel 2, stride 2: Caffe's ceil gives 4x4 where floor gives 3x3; AVE
        # divides the last row/column by 1·2, not 2·2.
        f"{_m}_7_k2_s2": pool_case((3, 7, 7), _mode, (2, 2), (2, 2), (0, 0)),
        # padded: 8x8 k3 s2 p1 → 5x5 (floor: 4x4); the last window is clipped to H + pad,
        # so AVE divides by 2·3 there.
        f"{_m}_8_k3_s2_p1": pool_case((3, 8, 8), _mode, (3, 3), (2, 2), (1, 1)),
        # 5x5 k3 s3 p1: ceil gives 3, but the 3rd window would start in the padding → 2.
        f"{_m}_5_k3_s3_p1": pool_case((2, 5, 5), _mode, (3, 3), (3, 3), (1, 1)),
        # rectangular: along H ceil gives 6 (floor 5) and the last window is clipped to
        # H + pad (2 rows, not 3); along W ceil gives 5, but the 5th window would start
        # in the padding, so 4.
        f"{_m}_10x11_rect": pool_case((2, 10, 11), _mode, (3, 2), (2, 3), (1, 1)),
        # the fork's ceil_mode: false (floor rounding).
        f"{_m}_floor": pool_case((3, 8, 8), _mode, (3, 3), (2, 2), (1, 1), ceil_mode=False),
    })


DECONV = input_block(3, 6, 5) + """
layer { name: "up" type: "Deconvolution" bottom: "data" top: "up"
  convolution_param { num_output: 4 kernel_size: 4 stride: 2 pad: 1 } }
layer { name: "up2" type: "Deconvolution" bottom: "up" top: "up2"
  convolution_param { num_output: 4 kernel_size: 3 stride: 1 group: 2 bias_term: false } }
""" + cam_head("up2")

V1 = """name: "v1net"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 19 input_dim: 19
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1" blobs_lr: 1 blobs_lr: 2
  convolution_param { num_output: 8 kernel_size: 3 stride: 2 } }
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers { name: "pool1" type: POOLING bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layers { name: "norm1" type: LRN bottom: "pool1" top: "norm1"
  lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 } }
layers { name: "split" type: SPLIT bottom: "norm1" top: "a" top: "b" }
layers { name: "conv_a" type: CONVOLUTION bottom: "a" top: "conv_a"
  convolution_param { num_output: 6 kernel_size: 1 } }
layers { name: "conv_b" type: CONVOLUTION bottom: "b" top: "conv_b"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layers { name: "sig" type: SIGMOID bottom: "conv_a" top: "conv_a" }
layers { name: "tanh" type: TANH bottom: "conv_b" top: "conv_b" }
layers { name: "sum" type: ELTWISE bottom: "conv_a" bottom: "conv_b" top: "sum"
  eltwise_param { operation: SUM coeff: 1.5 coeff: -0.5 } }
layers { name: "cat" type: CONCAT bottom: "sum" bottom: "conv_a" top: "cat" }
layers { name: "pow" type: POWER bottom: "cat" top: "cat" power_param { power: 2 scale: 0.5 shift: 1 } }
layers { name: "drop" type: DROPOUT bottom: "cat" top: "cat" dropout_param { dropout_ratio: 0.5 } }
layers { name: "pool2" type: POOLING bottom: "cat" top: "pool2"
  pooling_param { pool: AVE kernel_size: 4 stride: 1 } }
layers { name: "fc" type: INNER_PRODUCT bottom: "pool2" top: "fc" inner_product_param { num_output: 7 } }
layers { name: "prob" type: SOFTMAX bottom: "fc" top: "prob" }
"""

LRN = input_block(7, 6, 5) + """
layer { name: "across" type: "LRN" bottom: "data" top: "across"
  lrn_param { local_size: 5 alpha: 0.8 beta: 0.75 } }
layer { name: "within" type: "LRN" bottom: "across" top: "within"
  lrn_param { local_size: 3 alpha: 0.6 beta: 0.6 norm_region: WITHIN_CHANNEL } }
""" + cam_head("within")

BATCHNORM = input_block(3, 9, 9) + """
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 6 kernel_size: 3 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" batch_norm_param { eps: 0.001 } }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "bn2" type: "BatchNorm" bottom: "conv" top: "bn2" }
layer { name: "scale2" type: "Scale" bottom: "bn2" top: "bn2" }
""" + cam_head("bn2")


ACTIVATIONS = input_block(4, 7, 6) + """
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 6 kernel_size: 1 } }
layer { name: "prelu" type: "PReLU" bottom: "conv" top: "a1" }
layer { name: "prelu2" type: "PReLU" bottom: "conv" top: "a2" }
layer { name: "leaky" type: "ReLU" bottom: "conv" top: "a3" relu_param { negative_slope: 0.1 } }
layer { name: "elu" type: "ELU" bottom: "conv" top: "a4" elu_param { alpha: 0.7 } }
layer { name: "abs" type: "AbsVal" bottom: "conv" top: "a5" }
layer { name: "bnll" type: "BNLL" bottom: "conv" top: "a6" }
layer { name: "pow" type: "Power" bottom: "conv" top: "a7" power_param { scale: -0.5 shift: 0.25 } }
layer { name: "sig" type: "Sigmoid" bottom: "conv" top: "a8" }
layer { name: "tanh" type: "TanH" bottom: "conv" top: "a9" }
layer { name: "cat" type: "Concat" bottom: "a1" bottom: "a2" bottom: "a3" bottom: "a4" bottom: "a5"
  bottom: "a6" bottom: "a7" bottom: "a8" bottom: "a9" top: "cat" concat_param { axis: 1 } }
""" + cam_head("cat")

# No Softmax: the net ends at the scores (the backend applies softmax);
# Flatten/Reshape/Dropout sit between the pooling and the FC; a Softmax over
# channels (axis 1 of a 4-D blob) inside the net.
NO_SOFTMAX = input_block(3, 6, 6) + """
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 8 kernel_size: 3 } }
layer { name: "chsoft" type: "Softmax" bottom: "conv" top: "chsoft" }
layer { name: "gap" type: "Pooling" bottom: "chsoft" top: "gap" pooling_param { pool: AVE kernel_size: 4 } }
layer { name: "flat" type: "Flatten" bottom: "gap" top: "flat" }
layer { name: "reshape" type: "Reshape" bottom: "flat" top: "reshaped" reshape_param { shape { dim: 0 dim: -1 } } }
layer { name: "drop" type: "Dropout" bottom: "reshaped" top: "reshaped" }
layer { name: "fc" type: "InnerProduct" bottom: "reshaped" top: "fc"
  inner_product_param { num_output: 6 } }
"""
# OpenCV 4.14 ignores InnerProduct's transpose: checked against NumPy and pycaffe.
FC_TRANSPOSE = NO_SOFTMAX.replace("num_output: 6 }", "num_output: 6 transpose: true }")

# A fully connected head before the CAM part: InnerProduct on a 4-D blob (flattened),
# BatchNorm on its 2-D output, Reshape back to 4-D with axis/num_axes, Flatten of
# some axes only.
FC_RESHAPE = input_block(2, 4, 4) + """
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 48 } }
layer { name: "ipbn" type: "BatchNorm" bottom: "ip" top: "ip" }
layer { name: "r" type: "Reshape" bottom: "ip" top: "r" reshape_param { shape { dim: 3 dim: 4 dim: 4 } axis: 1 } }
layer { name: "f" type: "Flatten" bottom: "r" top: "f" flatten_param { axis: 2 } }
layer { name: "ip2" type: "InnerProduct" bottom: "f" top: "ip2"
  inner_product_param { num_output: 8 axis: 2 bias_term: false } }
layer { name: "r2" type: "Reshape" bottom: "ip2" top: "r2" reshape_param { shape { dim: 4 dim: -1 } axis: 2 } }
""" + cam_head("r2")

# Squeeze-and-excitation: a Scale whose factors come from a second bottom (N, C),
# applied along axis 0; the squeeze is a global MAX pooling.
SQUEEZE_EXCITE = input_block(3, 6, 7) + """
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 6 kernel_size: 3 } }
layer { name: "squeeze" type: "Pooling" bottom: "conv" top: "squeeze" pooling_param { pool: MAX global_pooling: true } }
layer { name: "flat" type: "Flatten" bottom: "squeeze" top: "flat" }
layer { name: "gate" type: "Sigmoid" bottom: "flat" top: "gate" }
layer { name: "excite" type: "Scale" bottom: "conv" bottom: "gate" top: "excited" scale_param { axis: 0 } }
""" + cam_head("excited")

# OpenCV has no Bias layer: checked against NumPy (and pycaffe) instead.
BIAS = input_block(3, 4, 5) + """
layer { name: "bias" type: "Bias" bottom: "data" top: "data_b" }
layer { name: "bias_hw" type: "Bias" bottom: "data_b" top: "data_b" bias_param { axis: 2 num_axes: 2 } }
""" + cam_head("data_b")

# OpenCV 4.14 ignores LRN's k (uses 1): k != 1 is checked against NumPy and pycaffe.
LRN_K = LRN.replace("beta: 0.75 }", "beta: 0.75 k: 2 }").replace("norm_region", "k: 3 norm_region")
# across channels with beta 0.75 is exported with square roots, any other beta with Pow
LRN_BETA = LRN.replace("alpha: 0.8 beta: 0.75", "alpha: 0.8 beta: 0.6")

# Caffe stores a shared PReLU slope as a 0-axis blob, which OpenCV 4.14 cannot
# load: checked against NumPy and pycaffe. Also an in-place layer on the input blob.
PRELU_SHARED = input_block(3, 4, 5) + """
layer { name: "shift" type: "Power" bottom: "data" top: "data" power_param { shift: -0.25 } }
layer { name: "prelu" type: "PReLU" bottom: "data" top: "p" prelu_param { channel_shared: true } }
""" + cam_head("p")

NETS = {"conv": CONV, "deconv": DECONV, "v1": V1, "lrn": LRN, "lrn_k": LRN_K, "lrn_beta": LRN_BETA,
        "batchnorm_scale": BATCHNORM, "bias": BIAS, "eltwise": ELTWISE,
        "activations": ACTIVATIONS, "prelu_shared": PRELU_SHARED, "no_softmax": NO_SOFTMAX,
        "fc_transpose": FC_TRANSPOSE, "fc_reshape": FC_RESHAPE,
        "squeeze_excite": SQUEEZE_EXCITE}
NETS.update({f"pool_{name}": pool_net(*shape, params)
             for name, (shape, params, _) in POOL_CASES.items()})
REFERENCES = ["opencv", "caffe"]
NOT_IN_OPENCV = {"bias", "lrn_k", "prelu_shared"}   # see test_opencv_refuses_lrn_k


# ------------------------------------------------------------------ tests
def test_opencv_refuses_lrn_k(tmp_path):
    """OpenCV's across-channel LRN ignores k: refused, never computed wrongly."""
    model = Model(tmp_path, NETS["lrn_k"])
    with pytest.raises(ModelError, match="ignores k="):
        model.reference("opencv")


@pytest.mark.parametrize(("name", "reference"), [
    (name, reference) for name in sorted(NETS) for reference in REFERENCES
    if not (reference == "opencv" and name in NOT_IN_OPENCV)])
def test_tiny_net_matches_reference_backend(tmp_path, name, reference):
    model = Model(tmp_path, NETS[name])
    compare(model, reference, model.batch(3))


@pytest.mark.parametrize("name", sorted(POOL_CASES))
def test_pooling_matches_caffe_loops(tmp_path, name):
    """Caffe's ceil-mode size, its 'last window starts in the image' rule and its AVE divisor."""
    _shape, _, (kernel, stride, pad, mode, ceil_mode) = POOL_CASES[name]
    model = Model(tmp_path, NETS[f"pool_{name}"])
    x = model.batch(2, scale=3.0)
    expected = caffe_pool(x, kernel, stride, pad, mode, ceil_mode)
    assert expected.shape[2:] == model.spec.feature_size
    assert_close(model.onnxruntime().forward(x).features, expected, name)


# The output size of each case, worked out by hand from Caffe's rule (see POOL_CASES):
# ceil rounding, then one window less where the last would start in the padding;
# floor for ceil_mode: false. Floor rounding would give 3x3, 4x4, 2x2, 5x4 and 4x4.
POOL_SIZES = {"7_k2_s2": (4, 4), "8_k3_s2_p1": (5, 5), "5_k3_s3_p1": (2, 2),
              "10x11_rect": (6, 4), "floor": (4, 4)}


@pytest.mark.parametrize("name", sorted(POOL_CASES))
def test_pooling_output_sizes_are_caffes(tmp_path, name):
    """cam-caffe's shape inference, and the NumPy reference above, give Caffe's sizes."""
    shape, params, args = POOL_CASES[name]
    path = tmp_path / "pool.prototxt"
    path.write_text(pool_net(*shape, params))
    expected = POOL_SIZES[name.split("_", 1)[1]]
    assert load_netdef(path).shapes["pool"][2:] == expected
    assert caffe_pool(np.zeros((1, 1, *shape[1:])), *args).shape[2:] == expected


def test_onnx_floor_pooling_gives_caffes_size():
    """The converter pools with floor rounding and explicit end padding: by ONNX's output
    size rule, floor((size + pad + end − kernel) / stride) + 1, that is Caffe's size (shape
    inference) along both axes, so the output never needs cropping. Every size up to 30
    with kernel, stride up to 6 and pad below 6 and below the kernel; the W axis (8 wide, kernel 2, stride 2)
    pads or not: Caffe's rule looks at either axis's padding; and global pooling."""
    cases = [(n, k, s, q, w, c, False) for n in range(1, 31) for k in range(1, 7)
             for s in range(1, 7) for q in range(6) for w in (0, 1) for c in (True, False)
             if k <= n + 2 * q and q < k]          # Caffe refuses a pad as large as the kernel
    cases += [(n, 1, 1, 0, 0, True, True) for n in (1, 7)]
    for n, k, s, q, w, c, g in cases:
        layer = proto.LayerParameter(type="Pooling", top=["p"], pooling_param={
            "kernel_h": k, "kernel_w": 2, "stride_h": s, "stride_w": 2, "pad_h": q, "pad_w": w,
            "ceil_mode": c} if not g else {"global_pooling": True})
        shape = (1, 3, n, 8)
        caffe = layer_shapes(layer, [shape])[0][2:]
        windows = pool_windows(layer.pooling_param, shape)
        onnx_size = tuple((size + pad + end - kernel) // stride + 1 for size, kernel, stride,
                          pad, end in zip(shape[2:], windows.kernel, windows.stride,
                                          windows.pad, windows.end, strict=True))
        assert windows.out == onnx_size == caffe, (n, k, s, q, w, c, g)


def test_a_registered_converter_converts_its_layer_type(tmp_path, monkeypatch):
    """The registry is the one list of converters: a layer type converts once a function
    is registered for it with @converter (a second one for the same type is refused)."""
    from cam_caffe.onnx_export import converter as registry
    monkeypatch.setattr(registry, "CONVERTERS", dict(registry.CONVERTERS))
    model = Model(tmp_path, input_block(3, 5, 5) + """
layer { name: "e" type: "Exp" bottom: "data" top: "e" }
""" + cam_head("e"))
    weights = read_caffemodel(model.weights)
    with pytest.raises(ModelError, match="'Exp' cannot be converted"):
        convert(model.netdef, weights, model.spec)

    @registry.converter("Exp")
    def exp(cv, layer, ins, tops, shapes):
        cv.node("Exp", ins, tops, layer.name)

    session = ort.InferenceSession(
        convert(model.netdef, weights, outputs=["e"]).SerializeToString())
    x = model.batch(2)
    np.testing.assert_allclose(session.run(None, {"data": x})[0], np.exp(x), rtol=1e-6)
    with pytest.raises(ValueError, match="Caffe layer type Exp is registered twice"):
        registry.converter("Exp")(exp)

    # … and has a gradient in the export once a VJP is registered for it.
    monkeypatch.setattr(registry, "VJPS", dict(registry.VJPS))
    with pytest.raises(ModelError, match="layer 'e' of type 'Exp' has no gradient"):
        convert(model.netdef, weights, outputs=["e"], gradient="data")

    @registry.vjp("Exp")
    def exp_vjp(cv, layer, ins, tops, shapes, g):
        return [cv.grad_node(layer, "Mul", [g, tops[0]])]

    seed = model.batch(2, seed=5)
    gradient = ort.InferenceSession(convert(model.netdef, weights, outputs=["e"],
                                            gradient="data").SerializeToString())
    np.testing.assert_allclose(gradient.run(["data:grad"], {"data": x, "e:seed": seed})[0],
                               seed * np.exp(x), rtol=1e-6)
    with pytest.raises(ValueError, match="Caffe layer type Exp is registered twice"):
        registry.vjp("Exp")(exp_vjp)


def test_lrn_matches_caffe_formula(tmp_path):
    model = Model(tmp_path, input_block(7, 6, 5) + """
layer { name: "across" type: "LRN" bottom: "data" top: "across"
  lrn_param { local_size: 5 alpha: 0.8 beta: 0.75 k: 2 } }
""" + cam_head("across"))
    x = model.batch(2, scale=2.0)
    expected = caffe_lrn(x, 5, 0.8, 0.75, 2.0, "ACROSS_CHANNELS")
    assert_close(model.onnxruntime().forward(x).features, expected, "LRN across channels")
    model = Model(tmp_path, input_block(3, 6, 5) + """
layer { name: "within" type: "LRN" bottom: "data" top: "within"
  lrn_param { local_size: 3 alpha: 0.6 beta: 0.6 k: 5 norm_region: WITHIN_CHANNEL } }
""" + cam_head("within"))
    expected = caffe_lrn(x[:, :3], 3, 0.6, 0.6, 5.0, "WITHIN_CHANNEL")
    assert_close(model.onnxruntime().forward(x[:, :3]).features, expected, "LRN within channel")


def test_bias_matches_numpy(tmp_path):
    model = Model(tmp_path, BIAS)
    blobs = {layer.name: [np.array(b.data).reshape(b.shape.dim) for b in layer.blobs]
             for layer in read_caffemodel(model.weights).layer if layer.blobs}
    x = model.batch(2)
    expected = x + blobs["bias"][0].reshape(3, 1, 1) + blobs["bias_hw"][0].reshape(4, 5)
    assert_close(model.onnxruntime().forward(x).features, expected, "Bias")


def test_shared_prelu_matches_numpy(tmp_path):
    model = Model(tmp_path, PRELU_SHARED)
    stored = read_caffemodel(model.weights)
    slope = stored.layer[2].blobs[0]
    slope.ClearField("shape")           # Caffe writes a 0-axis blob with no shape at all
    model.weights.write_bytes(stored.SerializeToString())
    x = model.batch(2)
    expected = np.where(x - 0.25 > 0, x - 0.25, slope.data[0] * (x - 0.25))
    assert_close(model.onnxruntime().forward(x).features, expected, "PReLU channel_shared")


def test_transposed_fc_matches_numpy(tmp_path):
    model = Model(tmp_path, FC_TRANSPOSE)
    blobs = {layer.name: [np.array(b.data).reshape(b.shape.dim) for b in layer.blobs]
             for layer in read_caffemodel(model.weights).layer if layer.blobs}
    weight, bias = blobs["fc"]
    assert weight.shape == (8, 6)                     # (K, C): transposed storage
    backend = model.onnxruntime()
    out = backend.forward(model.batch(3))
    scores = out.features.mean(axis=(2, 3)) @ weight + bias
    expected = np.exp(scores - scores.max(axis=1, keepdims=True))
    assert_close(out.probs, expected / expected.sum(axis=1, keepdims=True), "probabilities")
    np.testing.assert_array_equal(model.cam_weights(), weight.T.astype(np.float32))


def test_every_converted_layer_type_is_tested():
    tested = {layer.type for text in NETS.values()
              for layer in load_netdef_text(text).net.layer}
    assert set(SUPPORTED) | {"Input"} <= tested, set(SUPPORTED) - tested


def load_netdef_text(text: str):
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "net.prototxt"
        path.write_text(text)
        return load_netdef(path)


def test_onnx_model_structure(tmp_path):
    """Weights are initializers, the batch is dynamic, outputs are named like Caffe blobs."""
    model = Model(tmp_path, BATCHNORM)
    proto = convert(model.netdef, read_caffemodel(model.weights), model.spec)
    onnx.checker.check_model(proto, full_check=True)
    graph = proto.graph
    assert [i.name for i in graph.input] == ["data"]
    assert [o.name for o in graph.output] == ["prob", "bn2"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [3, 9, 9]
    assert {o.type.tensor_type.shape.dim[0].dim_param for o in graph.output} == {"N"}
    assert len(graph.initializer) > 0
    assert not {t.name for t in graph.initializer} & {i.name for i in graph.input}
    # In-place layers: each value of blob 'conv' has its own tensor.
    produced = [o for node in graph.node for o in node.output]
    assert len(produced) == len(set(produced))
    assert {"conv", "conv@1", "conv@2", "conv@3"} <= set(produced)
    assert {"bn2@0", "bn2"} <= set(produced)          # output blob: last value is bare
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["cam_caffe.feature_blob"] == "bn2" and meta["cam_caffe.softmax"] == "true"
    # Dynamic batch: any N runs.
    session = ort.InferenceSession(proto.SerializeToString())
    for n in (1, 5):
        prob, feature = session.run(None, {"data": model.batch(n)})
        assert prob.shape == (n, 5) and feature.shape == (n, 6, 7, 7)


def test_feature_blob_has_caffe_semantics(tmp_path):
    """The feature output is the blob after the in-place ReLU, as in Caffe."""
    model = Model(tmp_path, CONV)
    assert model.spec.feature_blob == "conv3" and model.spec.feature_layer == "relu3"
    features = model.onnxruntime().forward(model.batch(2)).features
    assert features.min() >= 0 and features.max() > 0


def test_unused_branches_are_not_converted(tmp_path):
    """Layers the outputs do not need (an unsupported one here) are left out."""
    model = Model(tmp_path, input_block(3, 5, 5) + """
layer { name: "side" type: "MVN" bottom: "data" top: "side" }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 1 } }
""" + cam_head("conv"))
    proto = convert(model.netdef, read_caffemodel(model.weights), model.spec)
    assert "MeanVarianceNormalization" not in {n.op_type for n in proto.graph.node}
    compare(model, "opencv", model.batch(2))


def test_unsupported_layer_names_layer_and_type(tmp_path):
    model = Model(tmp_path, input_block(3, 5, 5) + """
layer { name: "norm_it" type: "MVN" bottom: "data" top: "mvn" }
layer { name: "conv" type: "Convolution" bottom: "mvn" top: "conv" convolution_param { num_output: 4 kernel_size: 1 } }
""" + cam_head("conv"))
    with pytest.raises(ModelError, match=r"layer 'norm_it' of type 'MVN' cannot be converted "
                                         rf"to ONNX \(supported: {re.escape(', '.join(SUPPORTED))}"
                                         r"\)$"):
        convert(model.netdef, read_caffemodel(model.weights), model.spec)
    assert SUPPORTED[:4] == ("AbsVal", "BatchNorm", "Bias", "BNLL")   # case-insensitive order
    with pytest.raises(ModelError, match="norm_it"):
        model.onnxruntime()


def test_unsupported_parameter_is_a_model_error(tmp_path):
    model = Model(tmp_path, input_block(3, 6, 6) + """
layer { name: "sto" type: "Pooling" bottom: "data" top: "p" pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 } }
""" + cam_head("p"))
    with pytest.raises(ModelError, match=r"layer 'sto' of type 'Pooling' cannot be converted "
                                         r"to ONNX: only MAX and AVE pooling$"):
        convert(model.netdef, read_caffemodel(model.weights), model.spec)


def test_missing_weights_is_a_model_error(tmp_path):
    model = Model(tmp_path, BATCHNORM)
    weights = read_caffemodel(model.weights)
    for layer in weights.layer:
        if layer.name == "bn":
            del layer.blobs[:]
    with pytest.raises(ModelError, match=r"layer 'bn' \(BatchNorm\) has no weights"):
        convert(model.netdef, weights, model.spec)


# ----------------------------------------------------- backend behaviour
def test_an_onnxruntime_error_keeps_every_line_of_its_message_on_one(tmp_path):
    """ONNX Runtime says which axis of an input is wrong on a second line and ends with
    a hint: the error keeps the axis, and stays one line."""
    backend = Model(tmp_path, CONV).onnxruntime()
    with pytest.raises(BackendError) as caught:
        backend.forward(np.zeros((1, 3, 17, 15), np.float32))       # CONV takes 4 channels
    message = str(caught.value)
    assert "\n" not in message
    assert re.search(r"invalid dimensions for input.* index: 1 Got: 3 Expected: 4", message)


def test_backend_caches_the_converted_model(tmp_path, monkeypatch):
    model = Model(tmp_path, CONV)
    first = model.onnxruntime()
    path = first.model_path
    assert path.parent == cache_dir() == tmp_path / "cache" / "cam-caffe" / "onnx"
    assert path.is_file() and len(path.stem) == 64
    import cam_caffe.onnx_export as export_module
    monkeypatch.setattr(export_module, "convert", lambda *a, **k: pytest.fail("converted again"))
    second = model.onnxruntime()
    assert second.model_path == path
    x = model.batch(2)
    np.testing.assert_array_equal(first.forward(x).features, second.forward(x).features)


def test_cache_key_follows_weights_and_outputs(tmp_path):
    model = Model(tmp_path, CONV)
    other = tmp_path / "other.caffemodel"
    save_caffemodel(model.netdef, nontrivial_weights(model.netdef, seed=7), other)
    a = model.onnxruntime().model_path
    b = OnnxRuntimeBackend(model.netdef, CaffeModel(other), model.spec).model_path
    assert a != b
    spec = find_cam_layers(model.netdef)
    assert OnnxRuntimeBackend(model.netdef, CaffeModel(model.weights), spec).model_path == a


def test_backend_caches_the_optimised_graph_per_machine(tmp_path, monkeypatch):
    """The second start loads ORT's optimised graph: it runs with the converted file
    gone bad and the converter disabled, and computes exactly what the first did."""
    import cam_caffe.backends.onnxruntime as backend_module
    import cam_caffe.onnx_export as export_module
    model = Model(tmp_path, CONV)
    first = model.onnxruntime()
    optimized = first.optimized_path
    tag = backend_module.machine_tag(ort)
    assert optimized.name == f"{first.model_path.stem}.{tag}.opt.onnx" and optimized.is_file()
    assert onnx.load(str(optimized)).graph.node != onnx.load(str(first.model_path)).graph.node
    assert optimized.stat().st_mode == first.model_path.stat().st_mode    # not mkstemp's 0600
    x = model.batch(2)
    expected = first.forward(x).features
    first.model_path.write_bytes(b"not an onnx file")
    with monkeypatch.context() as patch:
        patch.setattr(export_module, "convert", lambda *a, **k: pytest.fail("converted again"))
        np.testing.assert_array_equal(model.onnxruntime().forward(x).features, expected)
    # another ONNX Runtime version or CPU: an optimised file of its own
    monkeypatch.setattr(backend_module, "machine_tag", lambda ort: "another-machine")
    other = model.onnxruntime()
    assert other.optimized_path.name.endswith(".another-machine.opt.onnx")
    assert other.optimized_path.is_file() and optimized.is_file()
    np.testing.assert_array_equal(other.forward(x).features, expected)
    assert not list(cache_dir().glob(".*.tmp"))


def test_corrupt_cache_files_are_replaced(tmp_path):
    model = Model(tmp_path, CONV)
    first = model.onnxruntime()
    x = model.batch(1)
    expected = first.forward(x).features
    for corrupt in ([first.optimized_path], [first.optimized_path, first.model_path]):
        for path in corrupt:
            path.write_bytes(b"not an onnx file")
        np.testing.assert_array_equal(model.onnxruntime().forward(x).features, expected)
        onnx.checker.check_model(onnx.load(str(first.model_path)))
        ort.InferenceSession(str(first.optimized_path), providers=["CPUExecutionProvider"])
    assert not list(cache_dir().glob(".*.tmp"))


def test_unwritable_cache_still_runs(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    model = Model(tmp_path, CONV)
    assert model.onnxruntime().forward(model.batch(1)).probs.shape == (1, 5)


def test_cache_dir_defaults_to_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for value in (None, ""):
        if value is None:
            monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        else:
            monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert cache_dir() == tmp_path / ".cache" / "cam-caffe" / "onnx"


def test_gpu_without_cuda_is_a_backend_error(tmp_path):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    model = Model(tmp_path, CONV)
    with pytest.raises(BackendError, match="--gpu 0: this onnxruntime has no CUDA"):
        OnnxRuntimeBackend(model.netdef, CaffeModel(model.weights), model.spec, gpu=0)


def test_create_backend_by_name(tmp_path):
    model = Model(tmp_path, FC_TRANSPOSE)
    backend = create_backend("onnxruntime", model.netdef, CaffeModel(model.weights),
                             model.spec)
    assert backend.name == "onnxruntime"
    assert not model.spec.softmax
    out = backend.forward(model.batch(4))
    assert out.probs.shape == (4, 6) and np.allclose(out.probs.sum(axis=1), 1, atol=1e-5)
    assert model.cam_weights().shape == (6, 8)      # (C, K), from a transposed FC


# ------------------------------------------------------------- export CLI
def test_export_command(tmp_path, capsys):
    model = Model(tmp_path, ELTWISE)
    out = tmp_path / "out" / "model.onnx"
    code = main(["export", "--prototxt", str(model.netdef.path), "--weights",
                     str(model.weights), "-o", str(out)])
    assert code == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and str(out) in line and "'prob'" in line and "'cat'" in line
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(str(out))
    x = model.batch(3)
    prob, feature = session.run(["prob", "cat"], {"data": x})
    reference = OpenCVBackend(model.netdef, CaffeModel(model.weights), model.spec).forward(x)
    assert_close(prob, reference.probs, "probabilities")
    assert_close(feature, reference.features, "features")
    assert not list(out.parent.glob(".*.tmp"))


def test_export_input_size_and_errors(tmp_path, capsys):
    model = Model(tmp_path, ELTWISE)
    out = tmp_path / "m.onnx"
    args = ["export", "--prototxt", str(model.netdef.path), "--weights", str(model.weights)]
    assert main([*args, "-o", str(out), "--input-size", "10x12"]) == 0
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[2:]] == [10, 12]
    capsys.readouterr()
    assert main(args) == 2                                     # no -o
    assert "required" in capsys.readouterr().err
    assert main(["export", "--prototxt", str(model.netdef.path), "--weights",
                     str(tmp_path / "missing.caffemodel"), "-o", str(out)]) == 3
    assert main([*args, "-o", str(out), "--input-size", "ten"]) == 2


def test_export_a_registered_model(tmp_path, capsys):
    out = tmp_path / "demo.onnx"
    assert main(["export", "--model", "demo", "-o", str(out)]) == 0
    assert "'CAM_conv' Nx128x16x16" in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(str(out)))


# ------------------------------------------------------------- real nets
@pytest.fixture(scope="module")
def googlenet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("googlenet")
    netdef = load_netdef(GOOGLENET)
    weights = tmp / "googlenet.caffemodel"
    save_caffemodel(netdef, random_weights(netdef, seed=3), weights)
    return Model(tmp, prototxt=GOOGLENET, weights=weights)


@pytest.mark.parametrize("reference", REFERENCES)
def test_googlenet_cam(googlenet, reference):
    assert googlenet.spec.feature_blob == "CAM_conv"
    x = googlenet.batch(2, scale=50.0)
    compare(googlenet, reference, x)


def test_googlenet_onnx_names_cam_conv_after_relu(googlenet):
    proto = convert(googlenet.netdef, read_caffemodel(googlenet.weights), googlenet.spec)
    nodes = {o: n for n in proto.graph.node for o in n.output}
    assert nodes["CAM_conv@0"].op_type == "Conv"
    assert nodes["CAM_conv"].op_type == "Relu" and nodes["CAM_conv"].input == ["CAM_conv@0"]
    assert [o.name for o in proto.graph.output] == ["prob", "CAM_conv"]


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """The real CIFAR-10 ResNet-20 of ../shared."""
    return Model(tmp_path_factory.mktemp("resnet"),
                 prototxt=shared("cifar10_resnet20", "test_ResNet_20.prototxt"),
                 weights=shared("cifar10_resnet20", "cifar10_ResNet_20_iter_53500.caffemodel"),
                 input_size=(32, 32))


@pytest.mark.parametrize("reference", REFERENCES)
def test_cifar10_resnet20(resnet, reference):
    """Real trained weights (BatchNorm with scale factors, Scale, Eltwise, train/test file)."""
    assert resnet.spec.feature_blob == "conv4_Eltwise_3"
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (4, 3, 32, 32)).astype(np.float32)
    mean = np.array([125.3, 122.9, 113.8], np.float32).reshape(1, 3, 1, 1)
    compare(resnet, reference, (pixels - mean) * 0.00390625)


def test_auto_takes_the_fastest_backend_that_runs_the_net(tmp_path):
    """auto: onnxruntime first; a layer the converter lacks (Slice) falls back to OpenCV."""
    plain = Model(tmp_path, NETS[sorted(NETS)[0]])
    backend = create_backend("auto", plain.netdef, CaffeModel(plain.weights), plain.spec)
    assert backend.name == "onnxruntime"
    (tmp_path / "slice").mkdir()
    sliced = Model(tmp_path / "slice", SLICE_NET)
    with pytest.raises(ModelError, match="Slice"):
        sliced.onnxruntime()
    backend = create_backend("auto", sliced.netdef, CaffeModel(sliced.weights), sliced.spec)
    assert backend.name == "opencv"
    assert backend.forward(sliced.batch(2)).features.shape == (2, 4, 12, 12)
