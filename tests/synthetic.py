"""Write caffemodels without Caffe: random weights for any net, or weights given by hand;
and made-up batch records with thumbnails, for a report without a net.

Used by the tests, the benchmarks (benchmarks/common.py puts this folder on
``sys.path``) and scripts/gpu_check.py to make real model files when trained
weights are not available (the official GoogLeNet-CAM caffemodel cannot be
downloaded everywhere). Not part of the installed package.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cam_caffe import proto
from cam_caffe.errors import ModelError
from cam_caffe.netdef import NetDef, param_shapes
from cam_caffe.output import write_bytes


def random_weights(netdef: NetDef, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """He-initialised weights for every learnable layer (BatchNorm/Scale as identity)."""
    rng = np.random.default_rng(seed)
    weights: dict[str, list[np.ndarray]] = {}
    for layer in netdef.net.layer:
        shapes = param_shapes(netdef, layer)
        if shapes is None:
            if layer.type in ("Convolution", "Deconvolution", "InnerProduct", "BatchNorm",
                              "Scale", "Bias", "PReLU"):
                raise ModelError(f"cannot tell the weight shapes of layer '{layer.name}'")
            continue
        if not shapes:                     # e.g. a Scale whose factors are its second bottom
            continue
        if layer.type == "BatchNorm":
            c = shapes[0]
            weights[layer.name] = [np.zeros(c), np.ones(c), np.ones(1)]
        elif layer.type == "Scale" and len(layer.bottom) == 1:
            weights[layer.name] = [np.ones(shapes[0])] + [np.zeros(s) for s in shapes[1:]]
        elif layer.type in ("Scale", "Bias"):  # biases only
            weights[layer.name] = [np.zeros(s) for s in shapes]
        elif layer.type == "PReLU":
            weights[layer.name] = [np.full(shapes[0], 0.25)]
        else:
            w = shapes[0]
            fan_in = math.prod(w[1:]) if layer.type != "InnerProduct" else w[-1]
            main = rng.normal(0.0, math.sqrt(2.0 / fan_in), w)
            weights[layer.name] = [main] + [np.zeros(s) for s in shapes[1:]]
    return weights


def save_caffemodel(netdef: NetDef, weights: dict[str, list[np.ndarray]],
                    path: str | Path) -> None:
    """Write ``weights`` (layer name → blobs) as a binary caffemodel for ``netdef``."""
    net = proto.NetParameter(name=netdef.net.name)
    for layer in netdef.net.layer:
        stored = net.layer.add(name=layer.name, type=layer.type)
        stored.bottom.extend(layer.bottom)
        stored.top.extend(layer.top)
        for array in weights.get(layer.name, []):
            stored.blobs.append(proto.blob(array))
    write_bytes(path, net.SerializeToString())


def synthetic_records(folder: str | Path, count: int, methods: tuple[str, ...] = ("cam",),
                      labels: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star"),
                      seed: int = 0) -> list[dict]:
    """``count`` batch records (as ``batch.finish_image`` makes them) of made-up images
    ``img_NNNNN.png``, one map per method of the top-1 class, each with a real
    32×32 JPEG thumbnail in ``folder``: a report to test and time without a net."""
    import cv2
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    records = []
    for i in range(count):
        probs = rng.dirichlet(np.full(len(labels), 0.3))
        order = np.argsort(-probs, kind="stable")
        top, name = int(order[0]), f"img_{i:05d}"
        files = {}
        for rank, _ in enumerate(methods, 1):
            suffix = "" if len(methods) == 1 else f"-{rank}"
            thumb = folder / f"{name}.thumb{suffix}.jpg"
            colour = rng.integers(0, 256, 3).tolist()
            picture = np.full((32, 32, 3), colour, np.uint8)
            cv2.circle(picture, (int(rng.integers(8, 24)), int(rng.integers(8, 24))), 6,
                       (0, 0, 255), -1)
            write_bytes(thumb, cv2.imencode(".jpg", picture)[1].tobytes())
            files |= {f"thumb{suffix}": str(thumb),
                      f"overlay{suffix}": str(folder / f"{name}.cam{suffix}.png"),
                      f"heatmap{suffix}": str(folder / f"{name}.heatmap{suffix}.png")}
        records.append({
            "image": str(folder / "images" / f"{name}.png"),
            "size": {"width": 64, "height": 64},
            "top_k": [{"class": int(c), "label": labels[c], "prob": round(float(probs[c]), 6)}
                      for c in order[:3]],
            "maps": [{"method": method, "class": top, "label": labels[top],
                      "prob": round(float(probs[top]), 6), "boxes": [[8, 8, 24, 24]]}
                     for method in methods],
            "files": files})
    return records
