"""Floating-point operations of one forward pass, per image, counted from the layers.

A multiply-add counts as 2 FLOPs. The dense layers dominate:

- Convolution: 2·out_c·oh·ow·(in_c/group)·kh·kw, plus out_c·oh·ow for the bias;
- Deconvolution: 2·in_c·ih·iw·(out_c/group)·kh·kw, plus out_c·oh·ow for the bias;
- InnerProduct: 2·fan_in·out, plus out for the bias.

The other layers count their element operations (small next to the above):

- Pooling: kh·kw per output element (a global pooling: one per input element);
- LRN: 2·local_size + 3 per element (the windowed sum of squares, then
  scale, power and divide);
- ReLU, Sigmoid, TanH and other element-wise layers: 1 per element
  (BatchNorm 2, Scale 1 or 2 with a bias); Softmax: 3 per element;
- Eltwise: (n − 1) per element for n inputs; 2·n − 1 for a SUM with coefficients.

Layers that move data (Concat, Split, Flatten, Reshape, Dropout at test time,
Input) count 0, and so do layer types this module does not know.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from cam_caffe.netdef import NetDef, Shape, hw_param

ELEMENT_OPS = {"ReLU": 1, "PReLU": 1, "ReLU6": 1, "ELU": 1, "Sigmoid": 1, "TanH": 1,
               "AbsVal": 1, "BNLL": 1, "Power": 1, "Exp": 1, "Log": 1, "Threshold": 1,
               "Clip": 1, "HardSigmoid": 1, "HardSwish": 1, "Swish": 1, "Bias": 1,
               "BatchNorm": 2, "BN": 2, "Softmax": 3}


@dataclass
class LayerFlops:
    """One layer's share: its name, type and FLOPs per image."""

    name: str
    type: str
    flops: int


def _elements(shape: Shape | None) -> int:
    return math.prod(shape) if shape else 0


def _layer_flops(layer, ins: list[Shape | None], outs: list[Shape | None]) -> int:
    t = layer.type
    if any(s is None for s in ins + outs) or not outs:
        return 0
    out = outs[0]
    if t in ("Convolution", "Deconvolution"):
        p = layer.convolution_param
        kh, kw = hw_param(p, "kernel", 0)
        in_c = ins[0][1]
        out_c, oh, ow = out[1], out[2], out[3]
        if t == "Convolution":
            macs = out_c * oh * ow * (in_c // p.group) * kh * kw
        else:
            macs = in_c * ins[0][2] * ins[0][3] * (out_c // p.group) * kh * kw
        return 2 * macs + (out_c * oh * ow if p.bias_term else 0)
    if t == "InnerProduct":
        p = layer.inner_product_param
        axis = p.axis % len(ins[0])
        fan_in = math.prod(ins[0][axis:])
        rows = math.prod(ins[0][:axis])
        return rows * (2 * fan_in * p.num_output + (p.num_output if p.bias_term else 0))
    if t == "Pooling":
        p = layer.pooling_param
        if p.global_pooling:
            return _elements(ins[0])
        kh, kw = hw_param(p, "kernel", 0)
        return _elements(out) * kh * kw
    if t == "LRN":
        return _elements(out) * (2 * layer.lrn_param.local_size + 3)
    if t == "Eltwise":
        n = len(ins)
        return _elements(out) * (2 * n - 1 if layer.eltwise_param.coeff else n - 1)
    if t == "Scale":
        bias = layer.scale_param.bias_term or len(ins) > 2
        return _elements(out) * (2 if bias else 1)
    return _elements(out) * ELEMENT_OPS.get(t, 0)


def layer_flops(netdef: NetDef) -> list[LayerFlops]:
    """Every layer of ``netdef`` with its FLOPs per image (batch 1), in net order.

    In-place layers (Caffe's ReLU on its own input) keep their blob's shape,
    so the blob shapes ``netdef`` inferred hold at every layer.
    """
    result = []
    for layer in netdef.net.layer:
        ins = [netdef.shapes.get(b) for b in layer.bottom]
        outs = [netdef.shapes.get(top) for top in layer.top]
        result.append(LayerFlops(layer.name, layer.type, _layer_flops(layer, ins, outs)))
    return result


def count_flops(netdef: NetDef) -> int:
    """FLOPs of one image's forward pass through ``netdef`` (a multiply-add is 2)."""
    return sum(entry.flops for entry in layer_flops(netdef))
