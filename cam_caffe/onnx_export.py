"""Convert a Caffe net (a normalised :class:`NetDef` plus its caffemodel) to ONNX.

The ONNX graph has one input, named like the Caffe input blob, of shape
``(N, C, H, W)`` with a dynamic batch ``N`` and the NetDef's fixed H × W, and
the weights as initializers. Its outputs are Caffe blobs with Caffe's
semantics, named exactly like them: by default the CAM's score blob (the
probabilities, or the raw scores for a net without Softmax) and its feature
blob.

Caffe's in-place layers (``top`` == ``bottom``) rewrite a blob, so one Caffe
blob can stand for several values. Each value gets its own ONNX tensor: the
blob's name for its first value and ``name@1``, ``name@2``, … for later ones;
a blob that is a graph output is named the other way round, its last value
(what Caffe's blob holds after the forward pass) getting the bare name and the
earlier ones ``name@0``, ``name@1``, ….

Only the layers the outputs depend on are converted. Layers are matched to
Caffe's own arithmetic, not to what ONNX's nearest operator does; see
``_pooling`` for Caffe's ceil-mode output size and its average-pooling divisor.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np

from . import proto
from .camspec import CamSpec, find_cam_layers
from .errors import BackendError, ModelError
from .netdef import (
    NetDef,
    Shape,
    hw_param,
    layer_blobs,
    layer_shapes,
    pool_output_size,
    stored_layers,
)

# Bump when the converter's output changes: it keys the ONNX cache of the backend.
CONVERTER_VERSION = "4"
OPSET = 17
IR_VERSION = 8          # the IR of opset 17: loadable by onnxruntime >= 1.13

# Layer types whose vector–Jacobian product ``_Converter`` emits (``gradient=``).
VJP = ("BatchNorm", "Bias", "Concat", "Convolution", "Dropout", "Eltwise", "Flatten",
       "InnerProduct", "LRN", "Pooling", "ReLU", "Reshape", "Scale", "Sigmoid", "Softmax",
       "Split", "TanH")
# Layer types handled by ``_Converter`` (besides Input, which becomes the graph input).
SUPPORTED = ("AbsVal", "BatchNorm", "Bias", "BNLL", "Concat", "Convolution", "Deconvolution",
             "Dropout", "ELU", "Eltwise", "Flatten", "InnerProduct", "LRN", "Pooling", "Power",
             "PReLU", "ReLU", "Reshape", "Scale", "Sigmoid", "Softmax", "Split", "TanH")


def _onnx():
    try:
        import onnx
    except ImportError as e:
        raise BackendError(f"the onnx package is not installed ({e}); "
                           "run: pip install 'cam-caffe[onnx]'") from None
    return onnx


def convert(netdef: NetDef, weights: proto.NetParameter, spec: CamSpec | None = None,
            outputs: Sequence[str] | None = None, check: bool = True,
            gradient: str | None = None):
    """The ONNX ModelProto of ``netdef`` with ``weights`` (a parsed caffemodel).

    ``outputs`` are Caffe blob names; by default the CAM's score and feature
    blobs from ``spec`` (found with :func:`find_cam_layers` when not given).
    With ``gradient`` (a blob name), the model also takes a seed S shaped like
    the first output y and outputs ∂(Σ S·y)/∂B at blob B = ``gradient``, as
    the next layer reads it (names: :func:`gradient_names`): with a one-hot
    seed, the gradient of one class's logit. Raises ModelError for layers or
    parameters ONNX cannot express here, or without a VJP on the way.
    """
    onnx = _onnx()
    if outputs is None:
        spec = spec or find_cam_layers(netdef)
        outputs = [spec.score_blob, spec.feature_blob]
    outputs = list(dict.fromkeys(outputs))
    model = _Converter(onnx, netdef, weights).run(outputs, gradient)
    if spec is not None:
        meta = {"cam_caffe.converter_version": CONVERTER_VERSION,
                "cam_caffe.score_blob": spec.score_blob,
                "cam_caffe.softmax": str(spec.softmax).lower(),
                "cam_caffe.feature_blob": spec.feature_blob,
                "cam_caffe.fc_layer": spec.fc_layer or ""}
        for key, value in meta.items():
            model.metadata_props.add(key=key, value=value)
    if check:
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as e:
            raise ModelError(f"{netdef.path}: the converted ONNX model is invalid: "
                             f"{str(e).splitlines()[0]}") from None
    return model


def gradient_names(output: str, blob: str) -> tuple[str, str]:
    """(seed input, gradient output) names of a model converted with ``gradient=blob``."""
    return f"{output}:seed", f"{blob}:grad"


class _Converter:
    """One conversion: Caffe layers → ONNX nodes, tracking each blob's current tensor."""

    def __init__(self, onnx, netdef: NetDef, weights: proto.NetParameter) -> None:
        self.onnx = onnx
        self.helper = onnx.helper
        self.netdef = netdef
        self.stored = stored_layers(weights)
        self.nodes: list = []
        self.initializers: list = []
        self.shapes: dict[str, Shape | None] = {}      # ONNX tensor → shape at batch 1
        self.taken: set[str] = set()                   # tensor names
        self.node_names: set[str] = set()
        self.saved: dict[tuple[str, str], str] = {}    # (layer, what) → tensor, for VJPs
        self.done: list[tuple] = []                    # (layer, ins, tops, input shapes)
        for layer in netdef.net.layer:
            self.taken.update(layer.top)
            self.taken.update(layer.bottom)
        self.taken.add(netdef.input_name)

    # ----------------------------------------------------------------- naming
    def fresh(self, base: str, taken: set[str] | None = None) -> str:
        """A name derived from ``base`` not yet in ``taken`` (default: the tensor names)."""
        taken = self.taken if taken is None else taken
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    def _plan(self, outputs: list[str]):
        """Each layer's input and output tensor names, and which layers the outputs need."""
        layers = list(self.netdef.net.layer)
        writes: dict[str, int] = defaultdict(int)
        for layer in layers:
            for top in layer.top:
                writes[top] += 1
        for blob in outputs:
            if blob not in writes:
                raise ModelError(f"{self.netdef.path}: no blob named '{blob}' to output")
        if self.netdef.input_name in outputs:
            raise ModelError(f"{self.netdef.path}: cannot output the input blob "
                             f"'{self.netdef.input_name}'")
        outs = set(outputs)
        seen: dict[str, int] = defaultdict(int)
        current: dict[str, str] = {}
        producer: dict[str, int] = {}
        io = []
        for index, layer in enumerate(layers):
            ins = [current[b] for b in layer.bottom]
            tops = []
            for top in layer.top:
                version = seen[top]
                seen[top] += 1
                last = version == writes[top] - 1
                if top in outs:
                    name = top if last else f"{top}@{version}"
                else:
                    name = top if version == 0 else f"{top}@{version}"
                if name != top:
                    name = self.fresh(name)
                current[top] = name
                producer[name] = index
                tops.append(name)
            io.append((ins, tops))
        needed: set[int] = set()
        stack = [producer[current[b]] for b in outputs]
        while stack:
            index = stack.pop()
            if index in needed:
                continue
            needed.add(index)
            stack.extend(producer[t] for t in io[index][0])
        return layers, io, needed, [current[b] for b in outputs], current

    # ------------------------------------------------------------ emitting
    def node(self, op: str, inputs: list[str], outputs: list[str] | None = None,
             name: str | None = None, **attrs) -> str:
        """Append one node; returns its (first) output name."""
        outputs = outputs or [self.fresh(f"{name or op}:out")]
        node_name = self.fresh(name or op, self.node_names)
        self.nodes.append(self.helper.make_node(op, inputs, outputs, name=node_name, **attrs))
        return outputs[0]

    def const(self, base: str, array, dtype=np.float32) -> str:
        name = self.fresh(base)
        self.initializers.append(self.onnx.numpy_helper.from_array(
            np.ascontiguousarray(np.asarray(array, dtype)), name))
        return name

    def run(self, outputs: list[str], gradient: str | None = None):
        layers, io, needed, final, current = self._plan(outputs)
        h = self.helper
        graph_inputs = []
        for index, layer in enumerate(layers):
            ins, tops = io[index]
            if index not in needed:
                continue
            if layer.type == "Input":
                shape = tuple(self.netdef.input_shape)
                for top in tops:
                    self.shapes[top] = shape
                    graph_inputs.append(h.make_tensor_value_info(
                        top, self.onnx.TensorProto.FLOAT, ["N", *shape[1:]]))
                continue
            handler: Callable | None = getattr(self, "_" + layer.type.lower(), None)
            if layer.type not in SUPPORTED or handler is None:
                raise ModelError(f"{self.netdef.path}: layer '{layer.name}' of type "
                                 f"'{layer.type}' cannot be converted to ONNX (supported: "
                                 f"{', '.join(SUPPORTED)})")
            in_shapes = [self.shapes[t] for t in ins]
            try:
                out_shapes = layer_shapes(layer, in_shapes)
            except (ValueError, ZeroDivisionError, IndexError) as e:
                raise ModelError(f"{self.netdef.path}: layer '{layer.name}' ({layer.type}): "
                                 f"{e}") from None
            if any(s is None for s in in_shapes):
                raise ModelError(f"{self.netdef.path}: layer '{layer.name}' ({layer.type}): "
                                 "unknown input shape")
            try:
                handler(layer, ins, tops, in_shapes)
            except _Unsupported as e:
                raise ModelError(f"{self.netdef.path}: layer '{layer.name}' of type "
                                 f"'{layer.type}' cannot be converted to ONNX: {e}") from None
            for top, shape in zip(tops, out_shapes):
                self.shapes[top] = shape
            self.done.append((layer, ins, tops, in_shapes))
        graph_outputs = [h.make_tensor_value_info(t, self.onnx.TensorProto.FLOAT,
                                                  ["N", *self.shapes[t][1:]])
                         for t in final]
        if gradient is not None:
            seed, grad = self._gradient(final[0], current[gradient], gradient)
            graph_inputs.append(h.make_tensor_value_info(
                seed, self.onnx.TensorProto.FLOAT, ["N", *self.shapes[final[0]][1:]]))
            graph_outputs.append(h.make_tensor_value_info(
                grad, self.onnx.TensorProto.FLOAT, ["N", *self.shapes[current[gradient]][1:]]))
        graph = h.make_graph(self.nodes, self.netdef.net.name or "caffe", graph_inputs,
                             graph_outputs, initializer=self.initializers)
        model = h.make_model(graph, producer_name="cam-caffe",
                             producer_version=CONVERTER_VERSION,
                             opset_imports=[h.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        return model

    def params(self, layer) -> list[np.ndarray]:
        return layer_blobs(self.netdef, self.stored, layer)

    # ------------------------------------------------------------- layers
    def _convolution(self, layer, ins, tops, shapes):
        p = layer.convolution_param
        _check_2d(p, shapes[0])
        if p.axis != 1:
            raise _Unsupported(f"axis {p.axis} (only 1)")
        if p.width_group != 1 or p.height_group != 1:
            raise _Unsupported("width_group/height_group")
        kh, kw = hw_param(p, "kernel", 0)
        sh, sw = hw_param(p, "stride", 1)
        ph, pw = hw_param(p, "pad", 0)
        dil = list(p.dilation) or [1]
        blobs = self.params(layer)
        inputs = [ins[0], self.const(f"{layer.name}/weight", blobs[0])]
        self.saved[layer.name, "weight"] = inputs[1]
        if p.bias_term:
            inputs.append(self.const(f"{layer.name}/bias", blobs[1]))
        op = "Conv" if layer.type == "Convolution" else "ConvTranspose"
        self.node(op, inputs, tops, layer.name, kernel_shape=[kh, kw], strides=[sh, sw],
                  pads=[ph, pw, ph, pw], dilations=[dil[0], dil[-1]], group=p.group)

    _deconvolution = _convolution

    def _pooling(self, layer, ins, tops, shapes):
        """Caffe's pooling, exactly.

        Output size: ``ceil((H + 2p - k) / s) + 1`` (floor with ``ceil_mode:
        false``), one less when the last window would start in the bottom/right
        padding. Caffe's MAX takes the window clipped to the image; its AVE
        sums the window clipped to the image and divides by the window clipped
        to the *padded* image, ``min(start + k, H + p) - start``.

        ONNX's ceil_mode and its divisor at the right edge differ between opset
        versions and runtimes, so no ceil_mode is used: the end padding is
        given explicitly so that floor rounding yields Caffe's size, AVE runs
        with count_include_pad (every window then covers k × k cells) and is
        multiplied by a constant k·k / Caffe's divisor where the two differ.
        """
        p = layer.pooling_param
        _n, _c, hgt, wid = shapes[0]
        if p.pool not in (p.MAX, p.AVE):
            raise _Unsupported("only MAX and AVE pooling")
        if p.global_pooling:
            op = "GlobalMaxPool" if p.pool == p.MAX else "GlobalAveragePool"
            self.node(op, ins[:1], tops[:1], layer.name)
            return
        (kh, kw), (sh, sw), (ph, pw) = hw_param(p, "kernel", 0), hw_param(p, "stride", 1), \
            hw_param(p, "pad", 0)
        padded = bool(ph or pw)
        oh = pool_output_size(hgt, kh, sh, ph, p.ceil_mode, padded)
        ow = pool_output_size(wid, kw, sw, pw, p.ceil_mode, padded)
        end_h = max(0, (oh - 1) * sh + kh - hgt - ph)
        end_w = max(0, (ow - 1) * sw + kw - wid - pw)
        attrs = {"kernel_shape": [kh, kw], "strides": [sh, sw], "pads": [ph, pw, end_h, end_w]}
        full_h = (hgt + ph + end_h - kh) // sh + 1
        full_w = (wid + pw + end_w - kw) // sw + 1
        ratio = None
        if p.pool == p.AVE:
            ratio = np.outer(_ave_ratio(hgt, kh, sh, ph, oh), _ave_ratio(wid, kw, sw, pw, ow))
            if np.all(ratio == 1.0):
                ratio = None
        sliced = (full_h, full_w) != (oh, ow)
        out = tops[0] if ratio is None and not sliced else None
        if p.pool == p.MAX:
            pooled = self.node("MaxPool", ins[:1], [out] if out else None, layer.name, **attrs)
        else:
            pooled = self.node("AveragePool", ins[:1], [out] if out else None, layer.name,
                               count_include_pad=1, **attrs)
        if sliced:    # never for pad < kernel (Caffe's rule); kept for safety
            pooled = self.node("Slice", [pooled, self.const("starts", [0, 0], np.int64),
                                         self.const("ends", [oh, ow], np.int64),
                                         self.const("axes", [2, 3], np.int64)],
                               [tops[0]] if ratio is None else None, layer.name + "/crop")
        if ratio is not None:
            self.node("Mul", [pooled, self.const(f"{layer.name}/divisor",
                                                 ratio.reshape(1, 1, oh, ow))],
                      tops[:1], layer.name + "/divisor")

    def _lrn(self, layer, ins, tops, shapes):
        p = layer.lrn_param
        if p.local_size % 2 == 0:
            raise _Unsupported(f"local_size {p.local_size} must be odd (as in Caffe)")
        n, pad = p.local_size, (p.local_size - 1) // 2
        square = self.node("Mul", [ins[0], ins[0]], name=layer.name + "/square")
        if p.norm_region == p.ACROSS_CHANNELS:
            # Caffe: x · (k + alpha · mean of x² over the n channels centred on c)^-beta.
            # The windowed channel sum is a 1×1 convolution with a banded C×C weight:
            # ONNX Runtime's own LRN kernel took a third of GoogLeNet's forward time
            # for 0.2% of its FLOPs (benchmarks/bench_forward.py, LRN table). k is
            # the convolution's bias (ORT does not fuse a scalar Add into a Conv).
            c = shapes[0][1]
            band = np.zeros((c, c, 1, 1), np.float32)
            for i in range(c):
                band[i, max(0, i - pad):i + pad + 1] = p.alpha / n
            self.saved[layer.name, "band"] = self.const(f"{layer.name}/band", band)
            shifted = self.node("Conv", [square, self.saved[layer.name, "band"],
                                         self.const(f"{layer.name}/k", np.full(c, p.k))],
                                name=layer.name + "/window")
        else:
            # WITHIN_CHANNEL, as Caffe composes it: x · (1 + alpha · avgpool_n×n(x²))^-beta,
            # the average over the zero-padded n × n window (always n² cells); k is unused.
            mean = self.node("AveragePool", [square], name=layer.name + "/pool",
                             kernel_shape=[n, n], strides=[1, 1], pads=[pad] * 4,
                             count_include_pad=1)
            scaled = self.node("Mul", [mean, self.const(f"{layer.name}/alpha", p.alpha)],
                               name=layer.name + "/alpha")
            shifted = self.node("Add", [scaled, self.const(f"{layer.name}/one", 1.0)],
                                name=layer.name + "/shift")
        if p.beta == 0.75:
            # s^-0.75 = 1 / (√s · √√s): two square roots are far cheaper than Pow
            root2 = self.node("Sqrt", [shifted], name=layer.name + "/sqrt")
            root4 = self.node("Sqrt", [root2], name=layer.name + "/sqrt2")
            denominator = self.node("Mul", [root2, root4], name=layer.name + "/denominator")
            self.node("Div", [ins[0], denominator], tops, layer.name)
            self.saved[layer.name, "denominator"] = denominator
        else:
            power = self.node("Pow", [shifted, self.const(f"{layer.name}/beta", -p.beta)],
                              name=layer.name + "/pow")
            self.node("Mul", [ins[0], power], tops, layer.name)
            self.saved[layer.name, "power"] = power
        self.saved[layer.name, "shifted"] = shifted

    def _relu(self, layer, ins, tops, shapes):
        slope = layer.relu_param.negative_slope
        if slope:
            self.node("LeakyRelu", ins, tops, layer.name, alpha=slope)
        else:
            self.node("Relu", ins, tops, layer.name)

    def _prelu(self, layer, ins, tops, shapes):
        slope = self.params(layer)[0]
        ndim = len(shapes[0])
        if layer.prelu_param.channel_shared:
            slope = slope.reshape(1)
        else:
            slope = slope.reshape((-1,) + (1,) * (ndim - 2))
        self.node("PRelu", [ins[0], self.const(f"{layer.name}/slope", slope)], tops, layer.name)

    def _elu(self, layer, ins, tops, shapes):
        self.node("Elu", ins, tops, layer.name, alpha=layer.elu_param.alpha)

    def _sigmoid(self, layer, ins, tops, shapes):
        self.node("Sigmoid", ins, tops, layer.name)

    def _tanh(self, layer, ins, tops, shapes):
        self.node("Tanh", ins, tops, layer.name)

    def _absval(self, layer, ins, tops, shapes):
        self.node("Abs", ins, tops, layer.name)

    def _bnll(self, layer, ins, tops, shapes):
        self.node("Softplus", ins, tops, layer.name)    # log(1 + e^x)

    def _power(self, layer, ins, tops, shapes):
        """y = (shift + scale · x) ^ power, skipping the identity steps."""
        p = layer.power_param
        x = ins[0]
        steps = [("Mul", p.scale, 1.0), ("Add", p.shift, 0.0), ("Pow", p.power, 1.0)]
        todo = [(op, v) for op, v, identity in steps if v != identity]
        if not todo:
            self.node("Identity", [x], tops, layer.name)
        for i, (op, value) in enumerate(todo):
            last = i == len(todo) - 1
            x = self.node(op, [x, self.const(f"{layer.name}/{op.lower()}", value)],
                          tops if last else None, layer.name)

    def _dropout(self, layer, ins, tops, shapes):
        # Caffe's Dropout is the identity at test time (it scales while training).
        self.node("Identity", ins[:1], tops[:1], layer.name)

    def _split(self, layer, ins, tops, shapes):
        for top in tops:
            self.node("Identity", ins[:1], [top], layer.name)

    def _concat(self, layer, ins, tops, shapes):
        p = layer.concat_param
        axis = p.axis if p.HasField("axis") else p.concat_dim if p.HasField("concat_dim") else 1
        self.node("Concat", ins, tops, layer.name, axis=axis % len(shapes[0]))

    def _softmax(self, layer, ins, tops, shapes):
        self.node("Softmax", ins, tops, layer.name, axis=layer.softmax_param.axis % len(shapes[0]))

    def _innerproduct(self, layer, ins, tops, shapes):
        p = layer.inner_product_param
        blobs = self.params(layer)
        axis = p.axis % len(shapes[0])
        weight = blobs[0]                 # (out, in), or (in, out) with transpose
        bias = blobs[1] if p.bias_term else None
        if axis == 1:
            flat = ins[0]
            if len(shapes[0]) != 2:
                flat = self.node("Flatten", ins[:1], name=layer.name + "/flatten", axis=1)
            inputs = [flat, self.const(f"{layer.name}/weight", weight)]
            self.saved[layer.name, "weight"] = inputs[1]
            if bias is not None:
                inputs.append(self.const(f"{layer.name}/bias", bias))
            self.node("Gemm", inputs, tops, layer.name, transB=0 if p.transpose else 1)
            return
        # Other axes: keep the leading dims, lump the rest, then a MatMul.
        target = [0] * axis + [-1] if axis > 0 else [-1]
        flat = self.node("Reshape", [ins[0], self.const("shape", target, np.int64)],
                         name=layer.name + "/flatten")
        matrix = weight if p.transpose else weight.T
        out = self.node("MatMul", [flat, self.const(f"{layer.name}/weight", matrix)],
                        None if bias is not None else tops, layer.name)
        if bias is not None:
            self.node("Add", [out, self.const(f"{layer.name}/bias", bias)], tops, layer.name)

    def _batchnorm(self, layer, ins, tops, shapes):
        p = layer.batch_norm_param
        if p.use_alpha_beta:
            raise _Unsupported("use_alpha_beta")
        blobs = self.params(layer)
        if len(blobs) < 3:
            raise _Unsupported(f"{len(blobs)} weight blobs, expected mean, variance, scale factor")
        factor = float(blobs[2].ravel()[0])
        factor = 0.0 if factor == 0 else 1.0 / factor        # as Caffe does
        mean = blobs[0].ravel() * factor
        var = blobs[1].ravel() * factor
        c = mean.size
        self.node("BatchNormalization",
                  [ins[0], self.const(f"{layer.name}/scale", np.ones(c)),
                   self.const(f"{layer.name}/bias", np.zeros(c)),
                   self.const(f"{layer.name}/mean", mean), self.const(f"{layer.name}/var", var)],
                  tops, layer.name, epsilon=p.eps)

    def _affine(self, layer, ins, tops, shapes, op: str, p, bias_term: bool):
        """Scale (Mul) or Bias (Add) along ``p.axis``, from a second bottom or weights."""
        ndim = len(shapes[0])
        axis = p.axis % ndim if ndim else 0
        if len(ins) > 1:
            other_dims = len(shapes[1])
            extra = ndim - axis - other_dims
            other = ins[1]
            if extra > 0:
                other = self.node("Unsqueeze", [other, self.const(
                    "axes", list(range(other_dims, other_dims + extra)), np.int64)],
                    name=layer.name + "/unsqueeze")
            self.saved[layer.name, "factor"] = other
            first = self.node(op, [ins[0], other], tops if not bias_term else None, layer.name)
            blobs = self.params(layer) if bias_term else []
        else:
            blobs = self.params(layer)
            value = blobs[0]
            value = value.reshape(value.shape + (1,) * (ndim - axis - value.ndim))
            self.saved[layer.name, "factor"] = self.const(f"{layer.name}/{op.lower()}", value)
            first = self.node(op, [ins[0], self.saved[layer.name, "factor"]],
                              tops if not bias_term else None, layer.name)
            blobs = blobs[1:]
        if bias_term:
            bias = blobs[-1]
            bias = bias.reshape(bias.shape + (1,) * (ndim - axis - bias.ndim))
            self.node("Add", [first, self.const(f"{layer.name}/bias", bias)], tops,
                      layer.name + "/bias")

    def _scale(self, layer, ins, tops, shapes):
        self._affine(layer, ins, tops, shapes, "Mul", layer.scale_param,
                     layer.scale_param.bias_term)

    def _bias(self, layer, ins, tops, shapes):
        self._affine(layer, ins, tops, shapes, "Add", layer.bias_param, False)

    def _eltwise(self, layer, ins, tops, shapes):
        p = layer.eltwise_param
        if p.operation == p.SUM:
            coeffs = list(p.coeff) or [1.0] * len(ins)
            if len(coeffs) != len(ins):
                raise _Unsupported(f"{len(coeffs)} coefficients for {len(ins)} inputs")
            terms = [x if c == 1.0 else self.node(
                "Mul", [x, self.const(f"{layer.name}/coeff", c)], name=layer.name + "/coeff")
                for x, c in zip(ins, coeffs)]
            self._chain("Add", terms, tops, layer.name)
        elif p.operation == p.PROD:
            self._chain("Mul", ins, tops, layer.name)
        else:
            self.node("Max", ins, tops, layer.name)

    def _chain(self, op: str, inputs: list[str], tops, name: str):
        if len(inputs) == 1:
            self.node("Identity", inputs, tops, name)
            return
        x = inputs[0]
        for i, y in enumerate(inputs[1:]):
            x = self.node(op, [x, y], tops if i == len(inputs) - 2 else None, name)

    def _flatten(self, layer, ins, tops, shapes):
        shape = shapes[0]
        p = layer.flatten_param
        axis, end = p.axis % len(shape), p.end_axis % len(shape)
        if axis == 1 and end == len(shape) - 1:
            self.node("Flatten", ins, tops, layer.name, axis=1)
            return
        out = [*list(shape[:axis]), math.prod(shape[axis:end + 1]), *list(shape[end + 1:])]
        self._reshape_to(layer, ins, tops, out, batch_kept=axis > 0)

    def _reshape(self, layer, ins, tops, shapes):
        p = layer.reshape_param
        dims = list(p.shape.dim)
        if p.axis == 0 and p.num_axes == -1:
            # Caffe's 0 (copy) and -1 (infer) mean the same as ONNX Reshape's here.
            self.node("Reshape", [ins[0], self.const("shape", dims, np.int64)], tops,
                      layer.name)
            return
        out = layer_shapes(layer, shapes)[0]
        axis = p.axis % (len(shapes[0]) + 1) if p.axis < 0 else p.axis
        if axis == 0 and dims and dims[0] != 0:
            raise _Unsupported("reshaping the batch axis with num_axes set")
        self._reshape_to(layer, ins, tops, list(out), batch_kept=True)

    def _reshape_to(self, layer, ins, tops, out: list[int], batch_kept: bool):
        """Reshape to ``out`` (batch-1 shape) keeping the dynamic batch dimension."""
        if batch_kept:
            target = [0, *out[1:]]
        else:            # the batch is lumped into the first dim: infer it
            target = [-1, *out[1:]]
        self.node("Reshape", [ins[0], self.const("shape", target, np.int64)], tops, layer.name)

    # ------------------------------------------------------ gradients (VJPs)
    def _gradient(self, output: str, target: str, blob: str) -> tuple[str, str]:
        """Nodes computing ∂(Σ seed·output)/∂target by the layers' vector–Jacobian
        products, last layer first, summing where a tensor feeds several layers."""
        seed, grad = gradient_names(output, blob)
        self.taken.update((seed, grad))
        depends = self.depends = {target}
        for layer, ins, tops, _ in self.done:
            if any(t in depends for t in ins):
                depends.update(tops)
        grads: dict[str, list[str]] = {output: [seed]}
        for layer, ins, tops, shapes in reversed(self.done):
            if not any(t in depends for t in ins):
                continue             # before the target (its in-place layers included)
            upstream = [self._sum(grads.pop(t)) for t in tops if grads.get(t)]
            if not upstream:
                continue
            handler = getattr(self, "_vjp_" + layer.type.lower(), None)
            if handler is None:
                raise ModelError(
                    f"{self.netdef.path}: layer '{layer.name}' of type '{layer.type}' has no "
                    f"gradient in the ONNX export (VJPs: {', '.join(VJP)}); "
                    "use --backend caffe")
            g = upstream[0] if len(upstream) == 1 else self._sum(upstream)
            try:
                results = handler(layer, ins, tops, shapes, g)
            except _Unsupported as e:
                raise ModelError(f"{self.netdef.path}: layer '{layer.name}' of type "
                                 f"'{layer.type}': no gradient in the ONNX export for {e}; "
                                 "use --backend caffe") from None
            for x, gx in zip(ins, results):
                if gx is not None and x in depends:
                    grads.setdefault(x, []).append(gx)
        if not grads.get(target):
            raise ModelError(f"{self.netdef.path}: '{output}' does not depend on blob '{blob}'")
        self.node("Identity", [self._sum(grads[target])], [grad], blob + "/grad")
        return seed, grad

    def _sum(self, tensors: list[str]) -> str:
        total = tensors[0]
        for other in tensors[1:]:
            total = self.node("Add", [total, other], name="grad/sum")
        return total

    def _g(self, layer, op: str, inputs: list[str], **attrs) -> str:
        """One node of ``layer``'s VJP."""
        return self.node(op, inputs, name=f"{layer.name}/grad/{op}", **attrs)

    def _as_input(self, layer, g: str, x: str) -> str:
        """``g`` reshaped to ``x``'s shape (any batch)."""
        return self._g(layer, "Reshape", [g, self._g(layer, "Shape", [x])])

    def _pad_end(self, layer, g: str, rows: int, cols: int) -> str:
        if not (rows or cols):
            return g
        pads = self.const("pads", [0, 0, 0, 0, 0, 0, rows, cols], np.int64)
        return self._g(layer, "Pad", [g, pads])

    def _vjp_innerproduct(self, layer, ins, tops, shapes, g):
        p = layer.inner_product_param
        if p.axis % len(shapes[0]) != 1:
            raise _Unsupported(f"axis {p.axis}")
        flat = self._g(layer, "Gemm", [g, self.saved[layer.name, "weight"]],
                       transB=1 if p.transpose else 0)
        return [self._as_input(layer, flat, ins[0]) if len(shapes[0]) != 2 else flat]

    def _vjp_convolution(self, layer, ins, tops, shapes, g):
        """The transposed convolution with the same weights, padded back to H × W."""
        p = layer.convolution_param
        (kh, kw), (sh, sw), (ph, pw) = (hw_param(p, "kernel", 0), hw_param(p, "stride", 1),
                                        hw_param(p, "pad", 0))
        dil = list(p.dilation) or [1]
        dh, dw = dil[0], dil[-1]
        _, _, hgt, wid = shapes[0]
        oh = (hgt + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (wid + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        back = self._g(layer, "ConvTranspose", [g, self.saved[layer.name, "weight"]],
                       kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw],
                       dilations=[dh, dw], group=p.group)
        return [self._pad_end(layer, back, hgt - (sh * (oh - 1) + dh * (kh - 1) + 1 - 2 * ph),
                              wid - (sw * (ow - 1) + dw * (kw - 1) + 1 - 2 * pw))]

    def _vjp_relu(self, layer, ins, tops, shapes, g):
        """Caffe's: g · (x > 0) + slope · g · (x ≤ 0)."""
        slope = layer.relu_param.negative_slope
        positive = self._g(layer, "Greater", [ins[0], self.const("zero", 0.0)])
        other = self._g(layer, "Mul", [g, self.const("slope", slope)]) if slope \
            else self.const("zero", 0.0)
        return [self._g(layer, "Where", [positive, g, other])]

    def _vjp_sigmoid(self, layer, ins, tops, shapes, g):
        y = tops[0]
        one_minus = self._g(layer, "Sub", [self.const("one", 1.0), y])
        return [self._g(layer, "Mul", [g, self._g(layer, "Mul", [y, one_minus])])]

    def _vjp_tanh(self, layer, ins, tops, shapes, g):
        y = tops[0]
        one_minus = self._g(layer, "Sub", [self.const("one", 1.0),
                                           self._g(layer, "Mul", [y, y])])
        return [self._g(layer, "Mul", [g, one_minus])]

    def _vjp_pooling(self, layer, ins, tops, shapes, g):
        """MAX: the gradient added at each window's first maximum (ONNX MaxPool's
        indices, scattered with ScatterElements' add). AVE: each output's gradient
        times its window's 1 / Caffe's divisor, spread over the window by a transposed
        depthwise convolution of ones."""
        p = layer.pooling_param
        _n, c, hgt, wid = shapes[0]
        if p.global_pooling:
            (kh, kw), (sh, sw), (ph, pw) = (hgt, wid), (1, 1), (0, 0)
        else:
            (kh, kw), (sh, sw), (ph, pw) = (hw_param(p, "kernel", 0), hw_param(p, "stride", 1),
                                            hw_param(p, "pad", 0))
        padded = bool(ph or pw)
        oh = pool_output_size(hgt, kh, sh, ph, p.ceil_mode, padded)
        ow = pool_output_size(wid, kw, sw, pw, p.ceil_mode, padded)
        if p.global_pooling:
            oh = ow = 1
        end_h = max(0, (oh - 1) * sh + kh - hgt - ph)
        end_w = max(0, (ow - 1) * sw + kw - wid - pw)
        full_h = (hgt + ph + end_h - kh) // sh + 1
        full_w = (wid + pw + end_w - kw) // sw + 1
        attrs = {"kernel_shape": [kh, kw], "strides": [sh, sw], "pads": [ph, pw, end_h, end_w]}
        if p.pool == p.MAX:
            indices = self.fresh(f"{layer.name}/grad/indices")
            self.node("MaxPool", [ins[0]], [self.fresh(f"{layer.name}/grad/max"), indices],
                      f"{layer.name}/grad/MaxPool", **attrs)
            if (full_h, full_w) != (oh, ow):
                indices = self._g(layer, "Slice", [
                    indices, self.const("starts", [0, 0], np.int64),
                    self.const("ends", [oh, ow], np.int64), self.const("axes", [2, 3], np.int64)])
            flat = self.const("flat", [-1], np.int64)
            zeros = self._g(layer, "ConstantOfShape", [self._g(layer, "Shape", [
                self._g(layer, "Reshape", [ins[0], flat])])])
            scattered = self._g(layer, "ScatterElements", [
                zeros, self._g(layer, "Reshape", [indices, flat]),
                self._g(layer, "Reshape", [g, flat])], axis=0, reduction="add")
            return [self._as_input(layer, scattered, ins[0])]
        ratio = np.outer(_ave_ratio(hgt, kh, sh, ph, oh), _ave_ratio(wid, kw, sw, pw, ow))
        if p.global_pooling:
            ratio = np.ones((1, 1))
        weighted = self._g(layer, "Mul", [g, self.const(
            f"{layer.name}/grad/divisor", (ratio / (kh * kw)).reshape(1, 1, oh, ow))])
        weighted = self._pad_end(layer, weighted, full_h - oh, full_w - ow)
        back = self._g(layer, "ConvTranspose", [weighted, self.const(
            f"{layer.name}/grad/window", np.ones((c, 1, kh, kw)))], group=c, **attrs)
        return [self._pad_end(layer, back, hgt - (sh * (full_h - 1) + kh - ph - end_h),
                              wid - (sw * (full_w - 1) + kw - pw - end_w))]

    def _vjp_lrn(self, layer, ins, tops, shapes, g):
        """Caffe's: g · s^-β − (2αβ/n) · x · Σ_window(g · y / s),
        s = k + α/n Σ_window x² (across channels; within a channel the window is
        n × n and the sum's 1/n², as in the forward's average)."""
        p = layer.lrn_param
        x, y = ins[0], tops[0]
        shifted = self.saved[layer.name, "shifted"]
        if (layer.name, "denominator") in self.saved:
            direct = self._g(layer, "Div", [g, self.saved[layer.name, "denominator"]])
        else:
            direct = self._g(layer, "Mul", [g, self.saved[layer.name, "power"]])
        ratio = self._g(layer, "Div", [self._g(layer, "Mul", [g, y]), shifted])
        if p.norm_region == p.ACROSS_CHANNELS:
            window = self._g(layer, "Conv", [ratio, self.saved[layer.name, "band"]])
            factor = 2 * p.beta                         # the band holds α/n
        else:
            pad = (p.local_size - 1) // 2
            window = self._g(layer, "AveragePool", [ratio], kernel_shape=[p.local_size] * 2,
                             strides=[1, 1], pads=[pad] * 4, count_include_pad=1)
            factor = 2 * p.alpha * p.beta
        cross = self._g(layer, "Mul", [x, self._g(layer, "Mul", [
            window, self.const("factor", factor)])])
        return [self._g(layer, "Sub", [direct, cross])]

    def _vjp_concat(self, layer, ins, tops, shapes, g):
        p = layer.concat_param
        axis = p.axis if p.HasField("axis") else p.concat_dim if p.HasField("concat_dim") else 1
        axis %= len(shapes[0])
        sizes = self.const("split", [s[axis] for s in shapes], np.int64)
        outputs = [self.fresh(f"{layer.name}/grad/{i}") for i in range(len(ins))]
        self.node("Split", [g, sizes], outputs, f"{layer.name}/grad/Split", axis=axis)
        return outputs

    def _vjp_eltwise(self, layer, ins, tops, shapes, g):
        """SUM: coefficient · g. PROD: g · the product of the others. MAX: g where the
        input won Caffe's comparison (ties: the second of the first two, else the first)."""
        p = layer.eltwise_param
        if p.operation == p.SUM:
            coeffs = list(p.coeff) or [1.0] * len(ins)
            return [g if c == 1.0 else self._g(layer, "Mul", [g, self.const("coeff", c)])
                    for c in coeffs]
        if p.operation == p.PROD:
            grads = []
            for i in range(len(ins)):
                others = [x for j, x in enumerate(ins) if j != i]
                grads.append(self._g(layer, "Mul", [g, self._product(layer, others)]))
            return grads
        wins = [self._g(layer, "Greater", [ins[0], ins[1]])]
        wins.append(self._g(layer, "Not", [wins[0]]))
        best = self._g(layer, "Max", ins[:2])
        for x in ins[2:]:
            won = self._g(layer, "Greater", [x, best])
            lost = self._g(layer, "Not", [won])
            wins = [self._g(layer, "And", [w, lost]) for w in wins] + [won]
            best = self._g(layer, "Max", [best, x])
        zero = self.const("zero", 0.0)
        return [self._g(layer, "Where", [w, g, zero]) for w in wins]

    def _product(self, layer, tensors: list[str]) -> str:
        total = tensors[0]
        for x in tensors[1:]:
            total = self._g(layer, "Mul", [total, x])
        return total

    def _vjp_batchnorm(self, layer, ins, tops, shapes, g):
        blobs = self.params(layer)
        factor = float(blobs[2].ravel()[0])
        factor = 0.0 if factor == 0 else 1.0 / factor
        var = blobs[1].ravel() * factor
        scale = (1.0 / np.sqrt(var + layer.batch_norm_param.eps))
        scale = scale.reshape((-1,) + (1,) * (len(shapes[0]) - 2))
        return [self._g(layer, "Mul", [g, self.const(f"{layer.name}/grad/scale", scale)])]

    def _second_bottom_fixed(self, ins) -> None:
        if len(ins) > 1 and ins[1] in self.depends:
            raise _Unsupported("a second bottom that depends on the target blob")

    def _vjp_scale(self, layer, ins, tops, shapes, g):
        self._second_bottom_fixed(ins)
        return [self._g(layer, "Mul", [g, self.saved[layer.name, "factor"]]), None]

    def _vjp_bias(self, layer, ins, tops, shapes, g):
        self._second_bottom_fixed(ins)
        return [g, None]

    def _vjp_dropout(self, layer, ins, tops, shapes, g):
        return [g]

    def _vjp_split(self, layer, ins, tops, shapes, g):
        return [g]             # the tops' gradients were summed into g

    def _vjp_flatten(self, layer, ins, tops, shapes, g):
        return [self._as_input(layer, g, ins[0])]

    _vjp_reshape = _vjp_flatten

    def _vjp_softmax(self, layer, ins, tops, shapes, g):
        """y · (g − Σ_axis g·y)."""
        y = tops[0]
        axis = layer.softmax_param.axis % len(shapes[0])
        total = self._g(layer, "ReduceSum", [self._g(layer, "Mul", [g, y]),
                                             self.const("axes", [axis], np.int64)], keepdims=1)
        return [self._g(layer, "Mul", [y, self._g(layer, "Sub", [g, total])])]


class _Unsupported(Exception):
    """A parameter of a supported layer type that the converter cannot express."""


def _check_2d(p, shape) -> None:
    for name in ("kernel_size", "stride", "pad", "dilation"):
        if len(getattr(p, name)) > 2:
            raise _Unsupported(f"{name} with {len(getattr(p, name))} values (only 2-D)")
    if len(shape) != 4:
        raise _Unsupported(f"{len(shape)}-D input (only 4-D N×C×H×W)")


def _ave_ratio(size: int, kernel: int, stride: int, pad: int, out: int) -> np.ndarray:
    """kernel / Caffe's AVE divisor for each output position along one axis."""
    starts = np.arange(out) * stride - pad
    ends = np.minimum(starts + kernel, size + pad)
    # A window wholly past the image (only with stride > kernel) is empty: Caffe
    # divides 0 by 0 or by a negative size there; it stays 0 here.
    sizes = np.where(ends - starts > 0, ends - starts, kernel)
    return (kernel / sizes).astype(np.float64)
