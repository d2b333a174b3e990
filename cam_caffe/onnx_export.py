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
from typing import Callable, Sequence

import numpy as np

from . import proto
from .camspec import CamSpec, find_cam_layers
from .errors import BackendError, ModelError
from .netdef import NetDef, Shape, _layer_shapes, _pair, blob_shape, param_shapes

# Bump when the converter's output changes: it keys the ONNX cache of the backend.
CONVERTER_VERSION = "4"
OPSET = 17
IR_VERSION = 8          # the IR of opset 17: loadable by onnxruntime >= 1.13

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


def convert(netdef: NetDef, weights: "proto.NetParameter", spec: CamSpec | None = None,
            outputs: Sequence[str] | None = None, check: bool = True):
    """The ONNX ModelProto of ``netdef`` with ``weights`` (a parsed caffemodel).

    ``outputs`` are Caffe blob names; by default the CAM's score and feature
    blobs from ``spec`` (found with :func:`find_cam_layers` when not given).
    Raises ModelError for layers or parameters ONNX cannot express here.
    """
    onnx = _onnx()
    if outputs is None:
        spec = spec or find_cam_layers(netdef)
        outputs = [spec.score_blob, spec.feature_blob]
    outputs = list(dict.fromkeys(outputs))
    model = _Converter(onnx, netdef, weights).run(outputs)
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


def stored_layers(weights: "proto.NetParameter") -> dict[str, object]:
    """The caffemodel's layers that hold blobs, by name (Caffe copies weights by name)."""
    return {l.name: l for l in weights.layer if l.blobs}


def layer_blobs(netdef: NetDef, stored: dict[str, object], layer) -> list[np.ndarray]:
    """The blobs of ``layer`` (``stored``: from :func:`stored_layers`) as float32 arrays.

    They get the shapes Caffe gives the layer's parameters, so legacy 4-D blob
    shapes (``1 × 1 × out × in`` for an InnerProduct) come out right.
    """
    source = stored.get(layer.name)
    if source is None:
        raise ModelError(f"{netdef.path}: layer '{layer.name}' ({layer.type}) has no weights "
                         "in the caffemodel")
    expected = param_shapes(netdef, layer) or []
    arrays = []
    for i, b in enumerate(source.blobs):
        data = np.array(b.data if len(b.data) else b.double_data, np.float32)
        shape = expected[i] if i < len(expected) else blob_shape(b)
        if data.size != math.prod(shape):
            raise ModelError(f"layer '{layer.name}' blob {i} holds {data.size} values, "
                             f"its shape {list(shape)} needs {math.prod(shape)}")
        arrays.append(data.reshape(shape))
    return arrays


class _Converter:
    """One conversion: Caffe layers → ONNX nodes, tracking each blob's current tensor."""

    def __init__(self, onnx, netdef: NetDef, weights: "proto.NetParameter") -> None:
        self.onnx = onnx
        self.helper = onnx.helper
        self.netdef = netdef
        self.stored = stored_layers(weights)
        self.nodes: list = []
        self.initializers: list = []
        self.shapes: dict[str, Shape | None] = {}      # ONNX tensor → shape at batch 1
        self.taken: set[str] = set()                   # tensor names
        self.node_names: set[str] = set()
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
        return layers, io, needed, [current[b] for b in outputs]

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

    def run(self, outputs: list[str]):
        layers, io, needed, final = self._plan(outputs)
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
                out_shapes = _layer_shapes(layer, in_shapes)
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
        graph_outputs = [h.make_tensor_value_info(t, self.onnx.TensorProto.FLOAT,
                                                  ["N", *self.shapes[t][1:]])
                         for t in final]
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
        kh, kw = _pair(p, "kernel", 0)
        sh, sw = _pair(p, "stride", 1)
        ph, pw = _pair(p, "pad", 0)
        dil = list(p.dilation) or [1]
        blobs = self.params(layer)
        inputs = [ins[0], self.const(f"{layer.name}/weight", blobs[0])]
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
        n, c, hgt, wid = shapes[0]
        if p.pool not in (p.MAX, p.AVE):
            raise _Unsupported("only MAX and AVE pooling")
        if p.global_pooling:
            op = "GlobalMaxPool" if p.pool == p.MAX else "GlobalAveragePool"
            self.node(op, ins[:1], tops[:1], layer.name)
            return
        (kh, kw), (sh, sw), (ph, pw) = _pair(p, "kernel", 0), _pair(p, "stride", 1), \
            _pair(p, "pad", 0)
        padded = bool(ph or pw)
        oh = caffe_pool_size(hgt, kh, sh, ph, p.ceil_mode, padded)
        ow = caffe_pool_size(wid, kw, sw, pw, p.ceil_mode, padded)
        end_h = max(0, (oh - 1) * sh + kh - hgt - ph)
        end_w = max(0, (ow - 1) * sw + kw - wid - pw)
        attrs = dict(kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, end_h, end_w])
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
            shifted = self.node("Conv", [square, self.const(f"{layer.name}/band", band),
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
        else:
            power = self.node("Pow", [shifted, self.const(f"{layer.name}/beta", -p.beta)],
                              name=layer.name + "/pow")
            self.node("Mul", [ins[0], power], tops, layer.name)

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
            first = self.node(op, [ins[0], other], tops if not bias_term else None, layer.name)
            blobs = self.params(layer) if bias_term else []
        else:
            blobs = self.params(layer)
            value = blobs[0]
            value = value.reshape(value.shape + (1,) * (ndim - axis - value.ndim))
            first = self.node(op, [ins[0], self.const(f"{layer.name}/{op.lower()}", value)],
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
        out = list(shape[:axis]) + [math.prod(shape[axis:end + 1])] + list(shape[end + 1:])
        self._reshape_to(layer, ins, tops, out, batch_kept=axis > 0)

    def _reshape(self, layer, ins, tops, shapes):
        p = layer.reshape_param
        dims = list(p.shape.dim)
        if p.axis == 0 and p.num_axes == -1:
            # Caffe's 0 (copy) and -1 (infer) mean the same as ONNX Reshape's here.
            self.node("Reshape", [ins[0], self.const("shape", dims, np.int64)], tops,
                      layer.name)
            return
        out = _layer_shapes(layer, shapes)[0]
        axis = p.axis % (len(shapes[0]) + 1) if p.axis < 0 else p.axis
        if axis == 0 and dims and dims[0] != 0:
            raise _Unsupported("reshaping the batch axis with num_axes set")
        self._reshape_to(layer, ins, tops, list(out), batch_kept=True)

    def _reshape_to(self, layer, ins, tops, out: list[int], batch_kept: bool):
        """Reshape to ``out`` (batch-1 shape) keeping the dynamic batch dimension."""
        if batch_kept:
            target = [0] + out[1:]
        else:            # the batch is lumped into the first dim: infer it
            target = [-1] + out[1:]
        self.node("Reshape", [ins[0], self.const("shape", target, np.int64)], tops, layer.name)


class _Unsupported(Exception):
    """A parameter of a supported layer type that the converter cannot express."""


def _check_2d(p, shape) -> None:
    for name in ("kernel_size", "stride", "pad", "dilation"):
        if len(getattr(p, name)) > 2:
            raise _Unsupported(f"{name} with {len(getattr(p, name))} values (only 2-D)")
    if len(shape) != 4:
        raise _Unsupported(f"{len(shape)}-D input (only 4-D N×C×H×W)")


def caffe_pool_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool = True,
                    padded: bool | None = None) -> int:
    """Caffe's pooled output length along one axis.

    ``padded``: whether the layer pads along either axis (default: ``pad`` > 0);
    only then does Caffe drop a last window that starts outside the image.
    """
    rounding = math.ceil if ceil_mode else math.floor
    out = int(rounding((size + 2 * pad - kernel) / stride)) + 1
    if (pad > 0 if padded is None else padded) and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _ave_ratio(size: int, kernel: int, stride: int, pad: int, out: int) -> np.ndarray:
    """kernel / Caffe's AVE divisor for each output position along one axis."""
    starts = np.arange(out) * stride - pad
    ends = np.minimum(starts + kernel, size + pad)
    # A window wholly past the image (only with stride > kernel) is empty: Caffe
    # divides 0 by 0 or by a negative size there; it stays 0 here.
    sizes = np.where(ends - starts > 0, ends - starts, kernel)
    return (kernel / sizes).astype(np.float64)
