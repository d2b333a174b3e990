"""An independent float64 NumPy forward of a Caffe net, layer by layer, for the tests.

Written from Caffe's layer definitions with plain loops and einsum (no code of
cam_caffe's backends or exporter): the reference for finite differences and
for the forward-only CAM methods.
"""
from __future__ import annotations

import math

import numpy as np

from cam_caffe.netdef import hw_param, read_caffemodel


def stored_weights(path) -> dict[str, list[np.ndarray]]:
    """The caffemodel's blobs, float64, by layer name."""
    return {layer.name: [np.array(b.data, np.float64).reshape(tuple(b.shape.dim)) for b in layer.blobs]
            for layer in read_caffemodel(path).layer if layer.blobs}


def conv(x, w, b, stride, pad, dilation, group):
    n, _c, h, wid = x.shape
    out_c, per_group, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wid + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out = np.zeros((n, out_c, oh, ow))
    per_out = out_c // group
    for g in range(group):
        xs = padded[:, g * per_group:(g + 1) * per_group]
        ws = w[g * per_out:(g + 1) * per_out]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh,
                           j * dw:j * dw + sw * (ow - 1) + 1:sw]
                out[:, g * per_out:(g + 1) * per_out] += np.einsum("ncyx,oc->noyx", patch,
                                                                   ws[:, :, i, j])
    return out + (b.reshape(1, -1, 1, 1) if b is not None else 0)


def layer_forward(layer, ins: list[np.ndarray], params: list[np.ndarray]) -> list[np.ndarray]:
    t = layer.type
    x = ins[0]
    if t == "Convolution":
        p = layer.convolution_param
        dil = list(p.dilation) or [1]
        return [conv(x, params[0], params[1] if p.bias_term else None, hw_param(p, "stride", 1),
                     hw_param(p, "pad", 0), (dil[0], dil[-1]), p.group)]
    if t == "Pooling":
        p = layer.pooling_param
        mode = "MAX" if p.pool == p.MAX else "AVE"
        if p.global_pooling:
            return [caffe_pool(x, x.shape[2:], (1, 1), (0, 0), mode)]
        return [caffe_pool(x, hw_param(p, "kernel", 0), hw_param(p, "stride", 1),
                           hw_param(p, "pad", 0), mode, p.ceil_mode)]
    if t == "LRN":
        p = layer.lrn_param
        region = "ACROSS_CHANNELS" if p.norm_region == p.ACROSS_CHANNELS else "WITHIN_CHANNEL"
        return [caffe_lrn(x, p.local_size, p.alpha, p.beta, p.k, region)]
    if t == "ReLU":
        return [np.where(x > 0, x, x * layer.relu_param.negative_slope)]
    if t == "Sigmoid":
        return [1 / (1 + np.exp(-x))]
    if t == "TanH":
        return [np.tanh(x)]
    if t == "InnerProduct":
        p = layer.inner_product_param
        w = params[0].reshape(params[0].shape[-2:])
        flat = x.reshape(len(x), -1)
        y = flat @ (w if p.transpose else w.T)
        return [y + params[1].ravel() if p.bias_term else y]
    if t == "Concat":
        return [np.concatenate(ins, axis=layer.concat_param.axis)]
    if t == "Eltwise":
        p = layer.eltwise_param
        if p.operation == p.SUM:
            coeffs = list(p.coeff) or [1.0] * len(ins)
            return [sum(c * a for c, a in zip(coeffs, ins, strict=True))]
        if p.operation == p.PROD:
            return [math.prod(ins)]
        return [np.max(ins, axis=0)]
    if t == "BatchNorm":
        factor = 0 if params[2][0] == 0 else 1 / params[2].ravel()[0]
        mean, var = params[0].ravel() * factor, params[1].ravel() * factor
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return [(x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) +
                                                    layer.batch_norm_param.eps)]
    if t in ("Scale", "Bias"):
        p = layer.scale_param if t == "Scale" else layer.bias_param
        factor = params[0]
        factor = factor.reshape((1, *factor.shape) + (1,) * (x.ndim - 1 - factor.ndim))
        if t == "Bias":
            return [x + factor]
        y = x * factor
        if p.bias_term:
            y = y + params[1].reshape(factor.shape)
        return [y]
    if t in ("Dropout",):
        return [x]
    if t == "Split":
        return [x] * len(layer.top)
    if t == "Flatten":
        return [x.reshape(len(x), -1)]
    if t == "Reshape":
        dims = list(layer.reshape_param.shape.dim)
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return [x.reshape(shape)]
    if t == "Softmax":
        axis = layer.softmax_param.axis
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return [e / e.sum(axis=axis, keepdims=True)]
    raise NotImplementedError(t)


def run_from(netdef, weights: dict, blob: str, value: np.ndarray, output: str) -> np.ndarray:
    """``output`` of the net computed from ``blob`` = ``value`` (its value after any in-place
    layers), running the layers after ``blob``'s last writer that can run."""
    layers = list(netdef.net.layer)
    last = max(i for i, layer in enumerate(layers) if blob in layer.top)
    blobs = {blob: np.asarray(value, np.float64)}
    for layer in layers[last + 1:]:
        if not all(b in blobs for b in layer.bottom):
            continue
        outs = layer_forward(layer, [blobs[b] for b in layer.bottom],
                             weights.get(layer.name, []))
        blobs.update(zip(layer.top, outs, strict=True))
    return blobs[output]


def finite_differences(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences at every element of ``x`` of ``f``, a function of a batch of
    inputs shaped like ``x`` returning one value per input (all run as one batch)."""
    x = np.asarray(x, np.float64)
    steps = np.eye(x.size).reshape(x.size, *x.shape) * eps
    values = f(np.concatenate([x + steps, x - steps]))
    return ((values[:x.size] - values[x.size:]) / (2 * eps)).reshape(x.shape)


def bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Half-pixel bilinear resize with clamped edges (what cv2.INTER_LINEAR does)."""
    h, w = image.shape
    out_h, out_w = size

    def axis(out: int, n: int):
        src = np.clip((np.arange(out) + 0.5) * n / out - 0.5, 0, n - 1)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, n - 1)
        return low, high, src - low

    y0, y1, fy = axis(out_h, h)
    x0, x1, fx = axis(out_w, w)
    top = image[y0][:, x0] * (1 - fx) + image[y0][:, x1] * fx
    bottom = image[y1][:, x0] * (1 - fx) + image[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def caffe_pool(x: np.ndarray, kernel, stride, pad, mode: str, ceil_mode: bool = True):
    """Caffe's PoolingLayer::Forward_cpu, loop for loop (pooling_layer.cpp)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    n, c, height, width = x.shape
    rounding = math.ceil if ceil_mode else math.floor
    oh = int(rounding((height + 2 * ph - kh) / sh)) + 1
    ow = int(rounding((width + 2 * pw - kw) / sw)) + 1
    if ph or pw:
        if (oh - 1) * sh >= height + ph:
            oh -= 1
        if (ow - 1) * sw >= width + pw:
            ow -= 1
    out = np.zeros((n, c, oh, ow), np.float64)
    for i in range(oh):
        for j in range(ow):
            hstart, wstart = i * sh - ph, j * sw - pw
            if mode == "MAX":
                hend, wend = min(hstart + kh, height), min(wstart + kw, width)
                hstart, wstart = max(hstart, 0), max(wstart, 0)
                out[:, :, i, j] = x[:, :, hstart:hend, wstart:wend].max(axis=(2, 3))
            else:
                hend, wend = min(hstart + kh, height + ph), min(wstart + kw, width + pw)
                pool_size = (hend - hstart) * (wend - wstart)
                hstart, wstart = max(hstart, 0), max(wstart, 0)
                hend, wend = min(hend, height), min(wend, width)
                window = x[:, :, hstart:hend, wstart:wend].astype(np.float64)
                out[:, :, i, j] = window.sum(axis=(2, 3)) / pool_size
    return out


def caffe_lrn(x: np.ndarray, size: int, alpha: float, beta: float, k: float, region: str):
    """Caffe's LRN: across channels, or within channel (its square/pool/power composition)."""
    x = x.astype(np.float64)
    pad = (size - 1) // 2
    if region == "ACROSS_CHANNELS":
        sq = np.pad(x * x, ((0, 0), (pad, pad), (0, 0), (0, 0)))
        total = sum(sq[:, i:i + x.shape[1]] for i in range(size))
        return x / (k + alpha / size * total) ** beta
    sq = np.pad(x * x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    h, w = x.shape[2:]
    total = sum(sq[:, :, i:i + h, j:j + w] for i in range(size) for j in range(size))
    return x * (1 + alpha * total / size ** 2) ** -beta
