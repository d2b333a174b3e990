"""One conversion: Caffe layers → ONNX nodes, and the registry of layer converters.

A layer converter is a function registered for one or more Caffe types with
``converter("Type")(function)`` (or as a decorator); it emits the layer's nodes
through the :class:`Converter` it gets. A VJP, registered with ``vjp("Type")``,
emits the nodes of the layer's vector–Jacobian product for ``convert(…,
gradient=blob)``. The modules here register theirs by calls at their end: mutmut
does not mutate decorated functions.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from .. import proto
from ..errors import BackendError, ModelError
from ..netdef import Layer, NetDef, Shape, layer_blobs, layer_shapes, stored_layers

if TYPE_CHECKING:
    import onnx

# Bump when the converter's output changes: it keys the ONNX cache of the backend.
CONVERTER_VERSION = "4"
OPSET = 17
IR_VERSION = 8          # the IR of opset 17: loadable by onnxruntime >= 1.13

# (converter, layer, its input tensors, its output tensors, its input shapes)
ConvertFn = Callable[["Converter", Layer, list[str], list[str], list[Shape]], None]
# … and the gradient at its outputs → the gradient at each input (None: none there)
VjpFn = Callable[["Converter", Layer, list[str], list[str], list[Shape], str],
                 Sequence[str | None]]
CONVERTERS: dict[str, ConvertFn] = {}
VJPS: dict[str, VjpFn] = {}


def converter(*types: str) -> Callable[[ConvertFn], ConvertFn]:
    """Register the decorated function as the converter of Caffe layer ``types``."""
    return _register(CONVERTERS, types)


def vjp(*types: str) -> Callable[[VjpFn], VjpFn]:
    """Register the decorated function as the VJP of Caffe layer ``types``."""
    return _register(VJPS, types)


def _register(registry: dict[str, Any], types: tuple[str, ...]) -> Callable[[Any], Any]:
    def register(function: Any) -> Any:
        for name in types:
            if name in registry:
                raise ValueError(f"Caffe layer type {name} is registered twice")
            registry[name] = function
        return function
    return register


def registered(registry: dict[str, Any]) -> tuple[str, ...]:
    """The layer types of ``registry`` (CONVERTERS or VJPS), in alphabetical order."""
    return tuple(sorted(registry, key=str.lower))


class Unsupported(Exception):
    """A parameter of a supported layer type that the converter cannot express."""


def load_onnx() -> ModuleType:
    """The onnx package; a BackendError saying what to install without it."""
    try:
        import onnx
    except ImportError as e:
        raise BackendError(f"the onnx package is not installed ({e}); "
                           "run: pip install 'cam-caffe[onnx]'") from None
    return onnx


def gradient_names(output: str, blob: str) -> tuple[str, str]:
    """(seed input, gradient output) names of a model converted with ``gradient=blob``."""
    return f"{output}:seed", f"{blob}:grad"


class Converter:
    """One conversion: Caffe layers → ONNX nodes, tracking each blob's current tensor."""

    def __init__(self, netdef: NetDef, weights: proto.NetParameter) -> None:
        self.onnx = load_onnx()
        self.helper = self.onnx.helper
        self.netdef = netdef
        self.stored = stored_layers(weights)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.shapes: dict[str, Shape] = {}             # ONNX tensor → shape at batch 1
        self.taken: set[str] = set()                   # tensor names
        self.node_names: set[str] = set()
        self.saved: dict[tuple[str, str], str] = {}    # (layer, what) → tensor, for VJPs
        # (layer, ins, tops, input shapes) of each converted layer, in order
        self.done: list[tuple[Layer, list[str], list[str], list[Shape]]] = []
        self.depends: set[str] = set()                 # tensors that depend on the target
        for layer in netdef.net.layer:
            self.taken.update(layer.top)
            self.taken.update(layer.bottom)

    # ----------------------------------------------------------------- naming
    def fresh(self, base: str, taken: set[str] | None = None) -> str:
        """A name derived from ``base`` not yet in ``taken`` (default: the tensor names)."""
        taken = self.taken if taken is None else taken
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    def _plan(self, outputs: list[str]) -> tuple[list[Layer], list[tuple[list[str], list[str]]],
                                                 set[int], list[str], dict[str, str]]:
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
             name: str | None = None, **attrs: Any) -> str:
        """Append one node; returns its (first) output name."""
        outputs = outputs or [self.fresh(f"{name or op}:out")]
        node_name = self.fresh(name or op, self.node_names)
        self.nodes.append(self.helper.make_node(op, inputs, outputs, name=node_name, **attrs))
        return outputs[0]

    def const(self, base: str, array: ArrayLike, dtype: DTypeLike = np.float32) -> str:
        """An initializer holding ``array`` as ``dtype``; returns its name."""
        name = self.fresh(base)
        self.initializers.append(self.onnx.numpy_helper.from_array(
            np.ascontiguousarray(np.asarray(array, dtype)), name))
        return name

    def params(self, layer: Layer) -> list[np.ndarray]:
        """The layer's weight blobs, shaped as Caffe shapes its parameters."""
        return layer_blobs(self.netdef, self.stored, layer)

    def run(self, outputs: list[str], gradient: str | None = None) -> onnx.ModelProto:
        """The model computing the blobs ``outputs`` (and the gradient at ``gradient``)."""
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
            handler = CONVERTERS.get(layer.type)
            if handler is None:
                raise ModelError(f"{self.netdef.path}: layer '{layer.name}' of type "
                                 f"'{layer.type}' cannot be converted to ONNX (supported: "
                                 f"{', '.join(registered(CONVERTERS))})")
            in_shapes = [self.shapes[t] for t in ins]
            out_shapes = layer_shapes(layer, in_shapes)    # the NetDef's shapes: no error
            try:
                handler(self, layer, ins, tops, in_shapes)
            except Unsupported as e:
                raise ModelError(f"{self.netdef.path}: layer '{layer.name}' of type "
                                 f"'{layer.type}' cannot be converted to ONNX: {e}") from None
            # every converted type has a shape rule: its tops' shapes are known
            self.shapes.update((top, shape) for top, shape in zip(tops, out_shapes, strict=False)
                               if shape is not None)
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

    # ------------------------------------------------------ gradients (VJPs)
    def _gradient(self, output: str, target: str, blob: str) -> tuple[str, str]:
        """Nodes computing ∂(Σ seed·output)/∂target by the layers' vector–Jacobian
        products, last layer first, summing where a tensor feeds several layers."""
        seed, grad = gradient_names(output, blob)
        self.taken.update((seed, grad))
        depends = self.depends = {target}
        for _, ins, tops, _ in self.done:
            if any(t in depends for t in ins):
                depends.update(tops)
        grads: dict[str, list[str]] = {output: [seed]}
        for layer, ins, tops, shapes in reversed(self.done):
            if not any(t in depends for t in ins):
                continue             # before the target (its in-place layers included)
            upstream = [self.sum(grads.pop(t)) for t in tops if grads.get(t)]
            if not upstream:
                continue
            handler = VJPS.get(layer.type)
            if handler is None:
                raise ModelError(
                    f"{self.netdef.path}: layer '{layer.name}' of type '{layer.type}' has no "
                    f"gradient in the ONNX export (VJPs: {', '.join(registered(VJPS))}); "
                    "use --backend caffe")
            try:
                results = handler(self, layer, ins, tops, shapes, self.sum(upstream))
            except Unsupported as e:
                raise ModelError(f"{self.netdef.path}: layer '{layer.name}' of type "
                                 f"'{layer.type}': no gradient in the ONNX export for {e}; "
                                 "use --backend caffe") from None
            for x, gx in zip(ins, results, strict=False):
                if gx is not None:         # (unused unless x depends on the target)
                    grads.setdefault(x, []).append(gx)
        if not grads.get(target):
            raise ModelError(f"{self.netdef.path}: '{output}' does not depend on blob '{blob}'")
        self.node("Identity", [self.sum(grads[target])], [grad], blob + "/grad")
        return seed, grad

    def sum(self, tensors: list[str]) -> str:
        """The sum of ``tensors`` (the one tensor itself if only one)."""
        total = tensors[0]
        for other in tensors[1:]:
            total = self.node("Add", [total, other], name="grad/sum")
        return total

    def grad_node(self, layer: Layer, op: str, inputs: list[str], **attrs: Any) -> str:
        """One node of ``layer``'s VJP."""
        return self.node(op, inputs, name=f"{layer.name}/grad/{op}", **attrs)

    def reshape_like(self, layer: Layer, g: str, x: str) -> str:
        """``g`` reshaped to ``x``'s shape (any batch), in ``layer``'s VJP."""
        return self.grad_node(layer, "Reshape", [g, self.grad_node(layer, "Shape", [x])])

    def pad_end(self, layer: Layer, g: str, rows: int, cols: int) -> str:
        """``g`` (N, C, H, W) with ``rows`` zero rows and ``cols`` zero columns appended,
        in ``layer``'s VJP."""
        if not (rows or cols):
            return g
        pads = self.const("pads", [0, 0, 0, 0, 0, 0, rows, cols], np.int64)
        return self.grad_node(layer, "Pad", [g, pads])
