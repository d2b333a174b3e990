"""Every blob of a converted net, ONNX Runtime against pycaffe on the same prototxt.

test_onnx.py compares what the backend outputs (probabilities and the CAM blob);
here each layer type's variants get their own nets and *every* top blob is an
ONNX output, run at batch 3 (so that a reshape that loses the dynamic batch
shows) and compared with pycaffe's blob after its own forward of the prototxt
as written. Also: gradients of the layers whose VJP has variants against
pycaffe's backward pass, ONNX node names, and what ``convert`` adds and refuses.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import IN_CI, require_pycaffe
from nets import ELTWISE, input_block, layer, nontrivial_weights

if IN_CI:
    import onnx
    import onnxruntime as ort
else:
    onnx = pytest.importorskip("onnx", reason="the 'onnx' extra is not installed")
    ort = pytest.importorskip("onnxruntime", reason="the 'onnx' extra is not installed")

from synthetic import save_caffemodel

from cam_caffe.camspec import find_cam_layers
from cam_caffe.errors import ModelError
from cam_caffe.netdef import NetDef, load_netdef, read_caffemodel
from cam_caffe.onnx_export import CONVERTER_VERSION, convert, gradient_names

Weights = dict[str, list[np.ndarray]]


def write(tmp_path: Path, text: str, change: Callable[[Weights], None] | None = None,
          ) -> tuple[Path, Path, NetDef]:
    """The prototxt and a caffemodel of non-trivial random weights (``change`` edits them)."""
    prototxt, weights = tmp_path / "net.prototxt", tmp_path / "net.caffemodel"
    prototxt.write_text(text)
    netdef = load_netdef(prototxt)
    blobs = nontrivial_weights(netdef)
    if change:
        change(blobs)
    save_caffemodel(netdef, blobs, weights)
    return prototxt, weights, netdef


def tops(netdef: NetDef) -> list[str]:
    """Every blob a layer writes, in order."""
    return list(dict.fromkeys(t for layer in netdef.net.layer if layer.type != "Input"
                              for t in layer.top))


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def pycaffe_net(prototxt: Path, weights: Path, x: np.ndarray):
    caffe = require_pycaffe()
    net = caffe.Net(str(prototxt), caffe.TEST, weights=str(weights))
    name = net.inputs[0]
    net.blobs[name].reshape(*x.shape)
    net.reshape()
    net.blobs[name].data[...] = x
    net.forward()
    return net


def assert_named_after_layers(model: onnx.ModelProto, netdef: NetDef,
                              gradient: str | None = None) -> None:
    """Each node is named after the Caffe layer it computes (``layer``, ``layer_1``,
    ``layer/what``; in a VJP ``layer/grad/Op``), and each converted layer has a node
    of exactly its name: ONNX Runtime's errors and graph viewers then name the layer.
    A gradient model also has ``grad/sum`` nodes and ends in ``<blob>/grad``."""
    names = [layer.name for layer in netdef.net.layer]
    allowed = "|".join(re.escape(n) for n in names)
    extra = rf"|grad/sum(_\d+)?|{re.escape(gradient)}/grad" if gradient else ""
    nodes = [node.name for node in model.graph.node]
    assert len(set(nodes)) == len(nodes)
    for node in model.graph.node:
        assert re.fullmatch(rf"({allowed})(_\d+|/.+)?{extra}", node.name), \
            f"{node.op_type} node '{node.name}' is not named after a layer"
    converted = {n for n in names if any(re.fullmatch(rf"{re.escape(n)}(_\d+|/.+)?", m)
                                         for m in nodes)}
    assert converted <= set(nodes)
    if gradient:
        assert f"{gradient}/grad" in nodes


def compare_blobs(tmp_path: Path, text: str, n: int = 3,
                  change: Callable[[Weights], None] | None = None,
                  scale: float = 1.0) -> dict[str, np.ndarray]:
    """Every top blob through ONNX Runtime against pycaffe's; returns ours."""
    prototxt, weights, netdef = write(tmp_path, text, change)
    names = tops(netdef)
    model = convert(netdef, read_caffemodel(weights), outputs=names)
    assert_named_after_layers(model, netdef)
    assert [o.name for o in model.graph.output] == names
    x = np.random.default_rng(1).normal(0, scale, (n, *netdef.input_shape[1:])).astype(np.float32)
    ours = dict(zip(names, session(model).run(names, {netdef.input_name: x}), strict=True))
    net = pycaffe_net(prototxt, weights, x)
    for name in names:
        expected = net.blobs[name].data
        assert ours[name].shape == expected.shape, (name, ours[name].shape, expected.shape)
        np.testing.assert_allclose(ours[name], expected, rtol=1e-4,
                                   atol=1e-5 * max(1.0, float(np.abs(expected).max())),
                                   err_msg=f"blob '{name}'")
    return ours


# ------------------------------------------------------------ forward, blob by blob
ACTIVATIONS = input_block(4, 5, 6) + "".join([
    layer("sig", "Sigmoid", "data", "a1"), layer("tanh", "TanH", "data", "a2"),
    layer("abs", "AbsVal", "data", "a3"), layer("bnll", "BNLL", "data", "a4"),
    layer("relu", "ReLU", "data", "a5"),
    layer("leaky", "ReLU", "data", "a6", "relu_param { negative_slope: 0.2 }"),
    layer("prelu", "PReLU", "data", "a7"),
    layer("prelu_one", "PReLU", "data", "a8", "prelu_param { channel_shared: true }"),
    layer("elu", "ELU", "data", "a9", "elu_param { alpha: 0.7 }"),
    layer("identity", "Power", "data", "a10"),
    layer("times", "Power", "data", "a11", "power_param { scale: -2 }"),
    layer("plus", "Power", "data", "a12", "power_param { shift: 0.5 }"),
    layer("cube", "Power", "data", "a13", "power_param { power: 3 }"),
    layer("double", "Power", "data", "a16", "power_param { scale: 2 }"),
    layer("all", "Power", "data", "a14", "power_param { power: 2 scale: 0.5 shift: 1 }"),
    layer("drop", "Dropout", "data", "a15", "dropout_param { dropout_ratio: 0.3 }"),
    # in place, three times over: each value has its own tensor, the last is the output
    layer("conv", "Convolution", "data", "c", "convolution_param { num_output: 3 kernel_size: 1 }"),
    layer("c_relu", "ReLU", "c", "c", "relu_param { negative_slope: 0.1 }"),
    layer("c_tanh", "TanH", "c", "c"), layer("c_pow", "Power", "c", "c",
                                             "power_param { scale: 3 }"),
])


def test_activations_and_power_every_variant(tmp_path):
    ours = compare_blobs(tmp_path, ACTIVATIONS, scale=2.0)
    assert (ours["a3"] >= 0).all() and (ours["a1"] < 1).all()


def test_eltwise_every_operation(tmp_path):
    compare_blobs(tmp_path, ELTWISE + layer("ones", "Eltwise", "c1 c2", "ones",
                                            "eltwise_param { coeff: 1 coeff: 1 }")
                  + layer("twice", "Eltwise", "c1 c2", "twice", "eltwise_param { coeff: 2 coeff: 1 }"))


def test_eltwise_with_a_coefficient_per_input_or_none(tmp_path):
    """Caffe aborts on a coefficient count other than the inputs'; the export says so."""
    _, weights, netdef = write(tmp_path, input_block(3, 4, 5) + layer(
        "e", "Eltwise", "data data data", "e", "eltwise_param { coeff: 1 coeff: 2 }"))
    with pytest.raises(ModelError, match=r"layer 'e' of type 'Eltwise' cannot be converted to "
                                         r"ONNX: 2 coefficients for 3 inputs$"):
        convert(netdef, read_caffemodel(weights), outputs=["e"])


# Scale and Bias: learned factors along (axis, num_axes), and factors from a second
# bottom with fewer axes than the rest of the first (then unsqueezed at the end).
AFFINE = input_block(3, 4, 5) + "".join([
    layer("s_c", "Scale", "data", "s_c", "scale_param { bias_term: true }"),
    layer("s_hw", "Scale", "data", "s_hw", "scale_param { axis: 2 num_axes: 2 }"),
    layer("s_hw_neg", "Scale", "data", "s_hw_neg", "scale_param { axis: -2 num_axes: -1 }"),
    layer("s_one", "Scale", "data", "s_one", "scale_param { num_axes: 0 bias_term: true }"),
    layer("b_c", "Bias", "data", "b_c"),
    layer("b_hw", "Bias", "data", "b_hw", "bias_param { axis: 2 num_axes: 2 }"),
    layer("gap", "Pooling", "data", "gap", "pooling_param { pool: AVE global_pooling: true }"),
    layer("flat", "Flatten", "gap", "flat"),
    layer("gate", "Sigmoid", "flat", "gate"),                              # (N, C)
    layer("rows", "Pooling", "data", "rows",
          "pooling_param { pool: MAX kernel_h: 1 kernel_w: 5 stride: 1 }"),
    layer("rows3", "Reshape", "rows", "rows3",
          "reshape_param { shape { dim: 0 dim: 0 dim: -1 } }"),           # (N, C, H)
    layer("by_gate", "Scale", "data gate", "by_gate", "scale_param { axis: 0 }"),
    layer("by_rows", "Scale", "data rows3", "by_rows", "scale_param { axis: 0 }"),
    layer("square", "Scale", "data data", "square", "scale_param { axis: 0 }"),
    layer("plus_gate", "Bias", "data gate", "plus_gate", "bias_param { axis: 0 }"),
])


def test_scale_and_bias_every_broadcast(tmp_path):
    compare_blobs(tmp_path, AFFINE)


def test_scale_by_a_bottom_with_a_bias_or_without_batch_axis(tmp_path):
    """Nets that only run at batch 1 in Caffe: a second bottom without the batch axis,
    (C, H) scaling (1, C, H, W) along axis 1; a Scale with a second bottom and a bias
    term (its learned bias is shaped like that bottom, batch axis included)."""
    compare_blobs(tmp_path, input_block(3, 4, 5) + "".join([
        layer("gap", "Pooling", "data", "gap", "pooling_param { pool: MAX global_pooling: true }"),
        layer("flat", "Flatten", "gap", "flat"),
        layer("by_flat_b", "Scale", "data flat", "by_flat_b",
              "scale_param { axis: 0 bias_term: true }"),
        layer("rows", "Pooling", "data", "rows",
              "pooling_param { pool: AVE kernel_h: 1 kernel_w: 5 stride: 1 }"),
        layer("ch", "Reshape", "rows", "ch", "reshape_param { shape { dim: 3 dim: 4 } }"),
        layer("by_ch", "Scale", "data ch", "by_ch", "scale_param { axis: 1 }"),
        layer("by_ch_b", "Scale", "data ch", "by_ch_b", "scale_param { axis: 1 bias_term: true }"),
        layer("plus_ch", "Bias", "data ch", "plus_ch", "bias_param { axis: 1 }"),
    ]), n=1)


# Flatten and Reshape over every kind of axis range, the batch axis included
# (Flatten from axis 0 merges the batch: (N·C, H, W) at batch N, as in Caffe).
SHAPES = input_block(3, 4, 5) + "".join([
    layer("f", "Flatten", "data", "f"),
    layer("f_batch", "Flatten", "data", "f_batch", "flatten_param { axis: 0 end_axis: 1 }"),
    layer("f_all", "Flatten", "data", "f_all", "flatten_param { axis: 0 }"),
    layer("f_tail", "Flatten", "data", "f_tail", "flatten_param { axis: 2 }"),
    layer("f_mid", "Flatten", "data", "f_mid", "flatten_param { axis: 1 end_axis: -2 }"),
    layer("r", "Reshape", "data", "r", "reshape_param { shape { dim: 0 dim: -1 dim: 2 } }"),
    layer("r_axis", "Reshape", "data", "r_axis",
          "reshape_param { shape { dim: 3 dim: 1 } axis: 1 num_axes: 1 }"),
    layer("r_neg", "Reshape", "data", "r_neg", "reshape_param { shape { dim: -1 } axis: -3 }"),
    layer("r_insert", "Reshape", "data", "r_insert",
          "reshape_param { shape { dim: 1 } axis: 2 num_axes: 0 }"),
    layer("r_copy", "Reshape", "data", "r_copy",
          "reshape_param { shape { dim: 0 dim: -1 } axis: 0 num_axes: 2 }"),    # batch copied
    layer("cat_h", "Concat", "data data", "cat_h", "concat_param { axis: 2 }"),
    layer("cat_w", "Concat", "data data", "cat_w", "concat_param { axis: -1 }"),
    layer("split", "Split", "data", "s1 s2"),
])


def test_flatten_reshape_concat_split_every_axis(tmp_path):
    ours = compare_blobs(tmp_path, SHAPES)
    assert ours["f_batch"].shape == (9, 4, 5) and ours["f_all"].shape == (180,)


def test_inner_product_every_axis(tmp_path):
    """Axis 1 on 2-, 3- and 4-D inputs (flattened), later axes with and without a bias
    or transposed weights (a MatMul over the lumped trailing axes)."""
    compare_blobs(tmp_path, input_block(3, 4, 5) + "".join([
        layer("flat", "Flatten", "data", "flat"),
        layer("ip_2d", "InnerProduct", "flat", "ip_2d", "inner_product_param { num_output: 6 }"),
        layer("rows", "Reshape", "data", "rows", "reshape_param { shape { dim: 0 dim: 3 dim: -1 } }"),
        layer("ip_3d", "InnerProduct", "rows", "ip_3d", "inner_product_param { num_output: 6 }"),
        layer("ip_4d", "InnerProduct", "data", "ip_4d",
              "inner_product_param { num_output: 6 transpose: true }"),
        layer("ip_a2", "InnerProduct", "data", "ip_a2", "inner_product_param { num_output: 7 axis: 2 }"),
        layer("ip_a2_t", "InnerProduct", "data", "ip_a2_t",
              "inner_product_param { num_output: 7 axis: 2 transpose: true }"),
        layer("ip_last", "InnerProduct", "data", "ip_last",
              "inner_product_param { num_output: 2 axis: -1 bias_term: false }"),
    ]))


def test_inner_product_over_the_batch_axis(tmp_path):
    """Axis 0 (only at batch 1 in Caffe: the batch is part of its input size)."""
    compare_blobs(tmp_path, input_block(3, 4, 5) + layer(
        "ip", "InnerProduct", "data", "ip", "inner_product_param { num_output: 4 axis: 0 }"), n=1)


@pytest.mark.parametrize(("params", "message"), [
    ("axis: 2", "axis 2 \\(only 1\\)"), ("width_group: 2", "width_group/height_group"),
    ("height_group: 2", "width_group/height_group")])
def test_convolution_variants_onnx_cannot_express_are_refused(tmp_path, params, message):
    _, weights, netdef = write(tmp_path, input_block(2, 6, 6) + layer(
        "c", "Convolution", "data", "c", f"convolution_param {{ num_output: 2 kernel_size: 1 "
        f"{params} }}"))
    with pytest.raises(ModelError, match=rf"layer 'c' of type 'Convolution' cannot be converted "
                                         rf"to ONNX: {message}$"):
        convert(netdef, read_caffemodel(weights), outputs=["c"])


@pytest.mark.parametrize("params", ["shape { dim: 2 } axis: 0 num_axes: 1",
                                    "shape { dim: 1 } axis: -5 num_axes: 1"])
def test_reshape_batch_axis_with_num_axes_is_refused(tmp_path, params):
    """The batch axis (axis 0, or -5 counted from after the last of 4) given a size: the
    export keeps the batch dynamic, so it cannot."""
    _, weights, netdef = write(tmp_path, input_block(3, 4, 5) + layer(
        "r", "Reshape", "data", "r", f"reshape_param {{ {params} }}"))
    with pytest.raises(ModelError, match=r"layer 'r' of type 'Reshape' cannot be converted to "
                                         r"ONNX: reshaping the batch axis with num_axes set"):
        convert(netdef, read_caffemodel(weights), outputs=["r"])


def test_lrn_every_region_and_beta(tmp_path):
    compare_blobs(tmp_path, input_block(7, 5, 6) + "".join([
        layer("across", "LRN", "data", "across", "lrn_param { local_size: 5 alpha: 0.8 beta: 0.75 }"),
        layer("across_b", "LRN", "data", "across_b",
              "lrn_param { local_size: 3 alpha: 0.5 beta: 0.6 k: 2 }"),
        layer("within", "LRN", "data", "within", "lrn_param { local_size: 3 alpha: 0.6 beta: 0.75 "
              "norm_region: WITHIN_CHANNEL }"),
        layer("within_b", "LRN", "data", "within_b", "lrn_param { local_size: 5 alpha: 0.9 "
              "beta: 0.5 norm_region: WITHIN_CHANNEL }"),
    ]), scale=2.0)


@pytest.mark.parametrize(("kind", "params", "message"), [
    ("LRN", "lrn_param { local_size: 4 }", "local_size 4 must be odd \\(as in Caffe\\)"),
    ("BatchNorm", "batch_norm_param { use_alpha_beta: true }", "use_alpha_beta")])
def test_normalisations_onnx_cannot_express_are_refused(tmp_path, kind, params, message):
    _, weights, netdef = write(tmp_path, input_block(3, 4, 5) + layer("n", kind, "data", "n", params))
    with pytest.raises(ModelError, match=rf"layer 'n' of type '{kind}' cannot be converted to "
                                         rf"ONNX: {message}$"):
        convert(netdef, read_caffemodel(weights), outputs=["n"])


def test_batchnorm_scale_factors(tmp_path):
    """Caffe divides the stored mean and variance by the stored factor, and uses 0
    for both when the factor is 0."""
    def factors(blobs: Weights) -> None:
        for name, factor in (("bn0", 0.0), ("bn1", 1.0), ("bn2", 2.5)):
            blobs[name][2] = np.array([factor])
    compare_blobs(tmp_path, input_block(3, 4, 5) + "".join(
        layer(f"bn{i}", "BatchNorm", "data", f"bn{i}", "batch_norm_param { eps: 0.01 }")
        for i in range(3)), change=factors)


def test_batchnorm_without_its_three_blobs_is_refused(tmp_path):
    def two_blobs(blobs: Weights) -> None:
        blobs["bn"] = blobs["bn"][:2]
    _, weights, netdef = write(tmp_path, input_block(3, 4, 5)
                               + layer("bn", "BatchNorm", "data", "bn"), two_blobs)
    with pytest.raises(ModelError, match=r"layer 'bn' of type 'BatchNorm' cannot be converted "
                                         r"to ONNX: 2 weight blobs, expected mean, variance, "
                                         r"scale factor$"):
        convert(netdef, read_caffemodel(weights), outputs=["bn"])


@pytest.mark.parametrize(("size", "params", "empty"), [
    (4, "kernel_size: 1 stride: 4", "NaN"),    # 2nd window [4, 5) clipped to [4, 4): 0 / 0
    (4, "kernel_size: 1 stride: 5", "0"),      # [5, 6) → [5, 4): 0 / ((4 - 5) · (4 - 5))
])
def test_pooling_with_a_window_outside_the_input_is_refused(tmp_path, size, params, empty):
    """Caffe's ceil rounding can leave a last window wholly outside the input when
    stride > kernel (its rule that drops such a window only applies to padded layers).
    Caffe's output there is meaningless; ONNX cannot even express it (end padding ≥
    kernel)."""
    prototxt, weights, netdef = write(tmp_path, input_block(2, size, size) + "".join(
        layer(mode.lower(), "Pooling", "data", mode.lower(),
              f"pooling_param {{ pool: {mode} {params} }}") for mode in ("AVE", "MAX")))
    net = pycaffe_net(prototxt, weights, np.ones((1, 2, size, size), np.float32))
    assert net.blobs["ave"].data.shape == (1, 2, 2, 2)
    assert str(net.blobs["ave"].data[0, 0, 1, 1]) == {"NaN": "nan", "0": "0.0"}[empty]
    assert net.blobs["max"].data[0, 0, 1, 1] == -np.finfo(np.float32).max
    for mode in ("ave", "max"):
        with pytest.raises(ModelError, match=rf"layer '{mode}' of type 'Pooling' cannot be "
                                             r"converted to ONNX: its last window along H lies "
                                             r"wholly outside the input \(stride \d > kernel "
                                             r"\d\), where Caffe's MAX gives -FLT_MAX and its "
                                             r"AVE 0 or NaN$"):
            convert(netdef, read_caffemodel(weights), outputs=[mode])


def test_pooling_without_stride_or_pad_uses_caffes_defaults(tmp_path):
    compare_blobs(tmp_path, input_block(2, 7, 6) + "".join([
        layer("ave", "Pooling", "data", "ave", "pooling_param { pool: AVE kernel_size: 3 }"),
        layer("max", "Pooling", "data", "max", "pooling_param { pool: MAX kernel_h: 2 kernel_w: 3 }"),
    ]))


def test_max_pooling_with_a_mask_top(tmp_path):
    """A MAX pooling's second top (the argmax mask, for unpooling) is not exported; its
    first top is, and converts as without the mask."""
    text = input_block(2, 7, 6) + "".join([
        layer("p", "Pooling", "data", "p mask", "pooling_param { pool: MAX kernel_size: 3 stride: 2 }"),
        layer("g", "Pooling", "data", "g g_mask", "pooling_param { pool: MAX global_pooling: true }")])
    prototxt, weights, netdef = write(tmp_path, text)
    model = convert(netdef, read_caffemodel(weights), outputs=["p", "g"])
    x = np.random.default_rng(3).normal(0, 1, (3, 2, 7, 6)).astype(np.float32)
    net = pycaffe_net(prototxt, weights, x)
    for ours, name in zip(session(model).run(["p", "g"], {"data": x}), "pg", strict=True):
        np.testing.assert_array_equal(ours, net.blobs[name].data)


def test_pooling_kernel_past_the_padded_input(tmp_path):
    """A kernel past the padded input by less than the stride: Caffe's one window, its
    AVE divisor the window clipped to the padded input (without padding: the mean of the
    whole map, which makes it a CAM head's global pooling)."""
    ours = compare_blobs(tmp_path, input_block(2, 7, 6) + "".join([
        layer("ave", "Pooling", "data", "ave", "pooling_param { pool: AVE kernel_h: 10 "
              "kernel_w: 3 pad_h: 1 pad_w: 1 stride: 3 }"),
        layer("max", "Pooling", "data", "max", "pooling_param { pool: MAX kernel_h: 2 "
              "kernel_w: 7 stride: 2 }"),
        layer("all", "Pooling", "data", "all", "pooling_param { pool: AVE kernel_h: 8 "
              "kernel_w: 7 stride: 2 }"),
    ]))
    x = np.random.default_rng(1).normal(0, 1, (3, 2, 7, 6))       # compare_blobs' input
    np.testing.assert_allclose(ours["all"][:, :, 0, 0], x.mean(axis=(2, 3)), rtol=1e-5)


# --------------------------------------------------------------- gradients (VJPs)
def compare_gradient(tmp_path: Path, text: str, output: str, blob: str, n: int = 2) -> None:
    """∂(Σ seed · output)/∂blob through the exported VJPs against pycaffe's backward;
    the model's inputs and outputs declare their shapes with the batch as N."""
    prototxt, weights, netdef = write(tmp_path, "force_backward: true\n" + text)
    model = convert(netdef, read_caffemodel(weights), outputs=[output], gradient=blob)
    assert_named_after_layers(model, netdef, gradient=blob)
    seed_name, grad_name = gradient_names(output, blob)
    declared = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in [*model.graph.input, *model.graph.output]}
    assert declared == {"data": ["N", *netdef.input_shape[1:]],
                        seed_name: ["N", *netdef.shapes[output][1:]],
                        output: ["N", *netdef.shapes[output][1:]],
                        grad_name: ["N", *netdef.shapes[blob][1:]]}
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (n, *netdef.input_shape[1:])).astype(np.float32)
    net = pycaffe_net(prototxt, weights, x)
    seed = rng.normal(0, 1, net.blobs[output].data.shape).astype(np.float32)
    ours, = session(model).run([grad_name], {"data": x, seed_name: seed})
    net.blobs[output].diff[...] = seed
    net.backward()
    expected = net.blobs[blob].diff
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


TWO_BRANCHES = input_block(3, 5, 4) + "".join([
    layer("t", "Convolution", "data", "t", "convolution_param { num_output: 4 kernel_size: 1 }"),
    layer("u", "Convolution", "t", "u", "convolution_param { num_output: 4 kernel_size: 1 }"),
    layer("v", "Convolution", "t", "v", "convolution_param { num_output: 4 kernel_size: 3 pad: 1 }"),
    layer("side", "Convolution", "data", "side", "convolution_param { num_output: 4 kernel_size: 1 }"),
])


def test_gradient_of_a_product_of_three(tmp_path):
    compare_gradient(tmp_path, TWO_BRANCHES + layer("prod", "Eltwise", "t u v", "out",
                                                    "eltwise_param { operation: PROD }"),
                     "out", "t")


@pytest.mark.parametrize("tail", [
    # rows past the last window: conv k3 s2 on 8 rows reads rows 0-6 (7 columns: all)
    layer("c", "Convolution", "t", "out", "convolution_param { num_output: 2 kernel_size: 3 "
          "stride: 2 }"),
    # AVE with floor rounding: windows over rows 0-5 of 7, columns 0-5 of 7
    layer("p", "Pooling", "t", "out", "pooling_param { pool: AVE kernel_size: 2 stride: 2 "
          "ceil_mode: false }"),
    # a window along W only: rows all read, columns 0-4 of 7
    layer("p", "Pooling", "t", "out", "pooling_param { pool: AVE kernel_h: 1 kernel_w: 5 "
          "stride_h: 1 stride_w: 5 ceil_mode: false }"),
], ids=["conv", "ave_floor", "ave_w"])
def test_gradient_is_zero_where_no_window_reads(tmp_path, tail):
    """The last rows or columns that no window reads get a zero gradient (the VJP
    pads its result back to the input's size)."""
    compare_gradient(tmp_path, input_block(3, 8 if "Convolution" in tail else 7, 7)
                     + layer("t", "Convolution", "data", "t",
                             "convolution_param { num_output: 3 kernel_size: 1 }") + tail,
                     "out", "t")


def test_gradient_through_batchnorm_with_a_large_epsilon(tmp_path):
    compare_gradient(tmp_path, TWO_BRANCHES + layer("bn", "BatchNorm", "u", "out",
                                                    "batch_norm_param { eps: 0.5 }"), "out", "t")


@pytest.mark.parametrize("params", ["", "eltwise_param { coeff: 2 coeff: 1 }",
                                    "eltwise_param { operation: MAX }"])
def test_gradient_through_eltwise(tmp_path, params):
    """SUM without and with coefficients; MAX of four inputs (its winner tracked past
    the third)."""
    w = layer("w", "Convolution", "t", "w", "convolution_param { num_output: 4 kernel_size: 1 }")
    bottoms = "u v" if "coeff" in params or not params else "u v w side"
    compare_gradient(tmp_path, TWO_BRANCHES + w + layer("e", "Eltwise", bottoms, "out", params),
                     "out", "t")


def test_gradient_through_max_pooling(tmp_path):
    compare_gradient(tmp_path, TWO_BRANCHES + layer(
        "mp", "Pooling", "u", "out", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }"),
        "out", "t")


def test_gradient_through_a_concat(tmp_path):
    compare_gradient(tmp_path, TWO_BRANCHES + layer("cat", "Concat", "u v side", "out"),
                     "out", "t")


def test_gradient_through_an_inner_product_on_three_axes(tmp_path):
    compare_gradient(tmp_path, TWO_BRANCHES + "".join([
        layer("rows", "Reshape", "u", "rows", "reshape_param { shape { dim: 0 dim: 4 dim: -1 } }"),
        layer("tanh", "TanH", "rows", "rows_t"),       # its VJP needs the gradient's 3 axes
        layer("ip", "InnerProduct", "rows_t", "out", "inner_product_param { num_output: 3 }")]),
        "out", "t")


def test_gradient_through_an_inner_product_on_a_later_axis_is_refused(tmp_path):
    _, weights, netdef = write(tmp_path, TWO_BRANCHES + layer(
        "ip", "InnerProduct", "u", "out", "inner_product_param { num_output: 3 axis: 2 }"))
    with pytest.raises(ModelError, match=r"layer 'ip' of type 'InnerProduct': no gradient in "
                                         r"the ONNX export for axis 2; use --backend caffe$"):
        convert(netdef, read_caffemodel(weights), outputs=["out"], gradient="t")


@pytest.mark.parametrize("kind", ["Scale", "Bias"])
def test_gradient_through_factors_from_an_independent_bottom(tmp_path, kind):
    """The second bottom comes from a branch that does not depend on the target."""
    param = "scale_param" if kind == "Scale" else "bias_param"
    compare_gradient(tmp_path, TWO_BRANCHES + layer("aff", kind, "u side", "out",
                                                    f"{param} {{ axis: 0 }}"), "out", "t")


@pytest.mark.parametrize("kind", ["Scale", "Bias"])
def test_gradient_through_factors_that_depend_on_the_target_is_refused(tmp_path, kind):
    param = "scale_param" if kind == "Scale" else "bias_param"
    _, weights, netdef = write(tmp_path, TWO_BRANCHES + layer("aff", kind, "u v", "out",
                                                              f"{param} {{ axis: 0 }}"))
    with pytest.raises(ModelError, match=rf"layer 'aff' of type '{kind}': no gradient in the "
                                         r"ONNX export for a second bottom that depends on "
                                         r"the target blob; use --backend caffe$"):
        convert(netdef, read_caffemodel(weights), outputs=["out"], gradient="t")


# ------------------------------------------------------------------- convert()
CAM_NET = input_block(3, 6, 6) + "".join([
    layer("conv", "Convolution", "data", "conv", "convolution_param { num_output: 4 kernel_size: 3 }"),
    layer("gap", "Pooling", "conv", "gap", "pooling_param { pool: AVE global_pooling: true }"),
    layer("fc", "InnerProduct", "gap", "fc", "inner_product_param { num_output: 5 }"),
    layer("prob", "Softmax", "fc", "prob"),
])


def test_convert_defaults_to_the_cam_blobs_and_records_them(tmp_path):
    """Without outputs, the CAM's score and feature blobs, found as the backends find
    them; the model's metadata says which blob is which for whoever loads the file."""
    _, weights, netdef = write(tmp_path, CAM_NET)
    model = convert(netdef, read_caffemodel(weights))
    assert [o.name for o in model.graph.output] == ["prob", "conv"]
    assert {p.key: p.value for p in model.metadata_props} == {
        "cam_caffe.converter_version": CONVERTER_VERSION, "cam_caffe.score_blob": "prob",
        "cam_caffe.softmax": "true", "cam_caffe.feature_blob": "conv",
        "cam_caffe.fc_layer": "fc"}
    _, weights, netdef = write(tmp_path, CAM_NET.rsplit("layer {", 1)[0])     # no Softmax
    no_softmax = find_cam_layers(netdef)
    meta = {p.key: p.value for p in convert(netdef, read_caffemodel(weights),
                                            no_softmax).metadata_props}
    assert meta["cam_caffe.score_blob"] == "fc" and meta["cam_caffe.softmax"] == "false"
    assert not convert(netdef, read_caffemodel(weights), outputs=["fc"]).metadata_props
    _, weights, netdef = write(tmp_path, input_block(3, 6, 6) + "".join([   # NIN-like: no FC
        layer("conv", "Convolution", "data", "conv",
              "convolution_param { num_output: 4 kernel_size: 3 }"),
        layer("gap", "Pooling", "conv", "gap", "pooling_param { pool: AVE global_pooling: true }"),
        layer("prob", "Softmax", "gap", "prob")]))
    meta = {p.key: p.value for p in convert(netdef, read_caffemodel(weights)).metadata_props}
    assert meta["cam_caffe.fc_layer"] == "" and meta["cam_caffe.score_blob"] == "prob"


def test_an_invalid_conversion_is_caught_by_the_checker(tmp_path, monkeypatch):
    """A converter bug that yields an invalid ONNX graph is a ModelError naming the net
    and the checker's first line, not a model ONNX Runtime refuses later."""
    from cam_caffe.onnx_export import converter as registry
    monkeypatch.setattr(registry, "CONVERTERS", dict(registry.CONVERTERS))
    registry.CONVERTERS["Sigmoid"] = lambda cv, layer, ins, tops, shapes: cv.node(
        "NoSuchOperator", ins, tops, layer.name)
    prototxt, weights, netdef = write(tmp_path, CAM_NET.replace(
        'top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }',
        'top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }\n'
        'layer { name: "s" type: "Sigmoid" bottom: "conv" top: "conv" }'))
    with pytest.raises(ModelError) as caught:
        convert(netdef, read_caffemodel(weights))
    message = str(caught.value)
    assert message.startswith(f"{prototxt}: the converted ONNX model is invalid: ")
    assert "NoSuchOperator" in message and "\n" not in message
    unchecked = convert(netdef, read_caffemodel(weights), check=False)
    assert "NoSuchOperator" in {node.op_type for node in unchecked.graph.node}


def test_gradient_at_a_blob_the_output_does_not_depend_on_is_refused(tmp_path):
    _, weights, netdef = write(tmp_path, TWO_BRANCHES)
    with pytest.raises(ModelError, match=r"^.*net.prototxt: 'u' does not depend on blob "
                                         r"'side'$"):
        convert(netdef, read_caffemodel(weights), outputs=["u"], gradient="side")


@pytest.mark.parametrize(("outputs", "message"), [
    (["conv", "nothing"], "no blob named 'nothing' to output"),
    (["data"], "cannot output the input blob 'data'"),
])
def test_outputs_must_be_computed_blobs(tmp_path, outputs, message):
    prototxt, weights, netdef = write(tmp_path, CAM_NET)
    with pytest.raises(ModelError, match=f"^{re.escape(str(prototxt))}: {message}$"):
        convert(netdef, read_caffemodel(weights), outputs=outputs)


def test_model_declares_its_producer_opset_and_name(tmp_path):
    from cam_caffe.onnx_export import IR_VERSION, OPSET
    _, weights, netdef = write(tmp_path, CAM_NET)
    model = convert(netdef, read_caffemodel(weights), outputs=["prob"])
    assert (model.producer_name, model.producer_version) == ("cam-caffe", CONVERTER_VERSION)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
    assert (OPSET, model.ir_version, IR_VERSION) == (17, 8, 8)
    assert model.graph.name == "caffe"                     # the net has no name
    _, weights, netdef = write(tmp_path, 'name: "Tiny"\n' + CAM_NET)
    assert convert(netdef, read_caffemodel(weights), outputs=["prob"]).graph.name == "Tiny"


def test_without_the_onnx_package_the_error_says_what_to_install(monkeypatch):
    import sys

    from cam_caffe.errors import BackendError
    from cam_caffe.onnx_export.converter import load_onnx
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(BackendError, match=r"^the onnx package is not installed \(.*\); "
                                           r"run: pip install 'cam-caffe\[onnx\]'$"):
        load_onnx()
