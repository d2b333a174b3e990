#!/usr/bin/env python3
"""Train the embedded demo CAM model on generated shapes (pycaffe, CPU).

The net is small and keeps a 16x16 map at the CAM layer (64x64 input, two
2x2 poolings), so its CAMs localize the shapes of ``make_demo_data.py``.
Each convN is followed by BatchNorm + Scale and ReLU::

    data 3x64x64 ─ input_scale (Power, ×1/128)
    conv1 3x3·32 ─ pool1 max 2x2              → 32x32
    conv2 3x3·64 ─ pool2 max 2x2              → 16x16
    conv3 3x3·64 ─ conv4 3x3·96 (dilation 2)
    CAM_conv 3x3·128 ─ CAM_relu               → 16x16, the CAM feature map
    CAM_pool global AVE ─ CAM_fc 5 ─ prob (Softmax)

Preprocessing is cam-caffe's default, so the model needs no --mean/--scale:
BGR pixels minus the ImageNet mean (104, 117, 123); the net's first layer
multiplies by 1/128.

Training feeds fresh generated batches from memory through an ``Input``
layer (no LMDB), with Adam and fixed seeds, in two phases: a warm-up with
global *max* pooling (its gradient reaches the object's position only; with
average pooling from the start the net sits at chance level for hundreds of
steps on this data), then the CAM net proper with global average pooling,
starting from the warm-up's weights. ``CAM_fc``'s weights are kept ≥ 0 after
every step (projected gradient), so a CAM is a sum of non-negative maps: near
zero on the background instead of a negative offset that would widen the
20%-of-max boxes::

    GLOG_minloglevel=2 .venv/bin/python scripts/train_demo_model.py

writes ``models/demo/{deploy.prototxt,demo.caffemodel,labels.txt}``, the
training nets and solvers beside them, and six demo images into ``images/``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

os.environ.setdefault("GLOG_minloglevel", "2")
SCRIPTS = Path(__file__).resolve().parent
PROJECT_ROOT = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(PROJECT_ROOT))

import make_demo_data as data  # noqa: E402

from cam_caffe.preprocess import Preprocessor, parse_mean  # noqa: E402

INPUT_SCALE = 1 / 128
# (name, outputs, kernel, stride, dilation, 2x2 max pool after) of the convolutions before
# the CAM layer.
CONVS = [("conv1", 32, 3, 1, 1, True), ("conv2", 64, 3, 1, 1, True),
         ("conv3", 64, 3, 1, 1, False), ("conv4", 96, 3, 1, 2, False)]
CAM_CHANNELS, CAM_KERNEL = 128, 3
BATCH_NORM = True
NONNEGATIVE_FC = True
WARMUP, ITERATIONS = 600, 1200
MSRA, GAUSSIAN = 'type: "msra"', 'type: "gaussian" std: 0.01'
DEMO_SEED = 7             # the images/ demo pictures


def body(num_classes: int, train: bool) -> str:
    """The layers from the scaled input to CAM_fc, shared by the train and deploy nets."""
    params = (" param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }"
              if train else "")

    def fillers(weight: str) -> str:
        return (f' weight_filler {{ {weight} }} bias_filler {{ type: "constant" value: 0 }}'
                if train else "")

    layers = [f'layer {{ name: "input_scale" type: "Power" bottom: "data" top: "scaled" '
              f'power_param {{ scale: {INPUT_SCALE} }} }}']
    bottom = "scaled"
    cam_conv = ("CAM_conv", CAM_CHANNELS, CAM_KERNEL, 1, 1, False)
    for name, outputs, kernel, stride, dilation, pool in [*CONVS, cam_conv]:
        relu = "CAM_relu" if name == "CAM_conv" else f"relu_{name}"
        extra = (f" stride: {stride}" if stride > 1 else "") + (
            f" dilation: {dilation}" if dilation > 1 else "")
        layers.append(
            f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}"'
            f'{params}\n'
            f'  convolution_param {{ num_output: {outputs} kernel_size: {kernel} '
            f'pad: {dilation * (kernel // 2)}{extra}{fillers(MSRA)} }} }}')
        if BATCH_NORM and name != "CAM_conv":
            frozen = " param { lr_mult: 0 }" * 3 if train else ""
            layers.append(f'layer {{ name: "{name}_bn" type: "BatchNorm" bottom: "{name}" '
                          f'top: "{name}"{frozen} batch_norm_param {{ moving_average_fraction: '
                          f'0.99 }} }}')
            layers.append(f'layer {{ name: "{name}_scale" type: "Scale" bottom: "{name}" '
                          f'top: "{name}" scale_param {{ bias_term: true }} }}')
        layers.append(f'layer {{ name: "{relu}" type: "ReLU" bottom: "{name}" top: "{name}" }}')
        bottom = name
        if pool:
            pooled = "pool" + name[-1]
            layers.append(f'layer {{ name: "{pooled}" type: "Pooling" bottom: "{bottom}" '
                          f'top: "{pooled}" pooling_param {{ pool: MAX kernel_size: 2 '
                          f'stride: 2 }} }}')
            bottom = pooled
    layers.append('layer { name: "CAM_pool" type: "Pooling" bottom: "CAM_conv" top: "CAM_pool" '
                  'pooling_param { pool: AVE global_pooling: true } }')
    layers.append(
        f'layer {{ name: "CAM_fc" type: "InnerProduct" bottom: "CAM_pool" top: "CAM_fc"{params}\n'
        f'  inner_product_param {{ num_output: {num_classes}'
        f'{fillers(GAUSSIAN)} }} }}')
    return "\n".join(layers)


def deploy_prototxt(num_classes: int, size: int) -> str:
    return (f'name: "DemoCAM"\n'
            f'layer {{ name: "data" type: "Input" top: "data" '
            f'input_param {{ shape {{ dim: 1 dim: 3 dim: {size} dim: {size} }} }} }}\n'
            f'{body(num_classes, train=False)}\n'
            f'layer {{ name: "prob" type: "Softmax" bottom: "CAM_fc" top: "prob" }}\n')


def train_prototxt(num_classes: int, size: int, batch: int, pool: str = "AVE") -> str:
    """The training net: an Input layer fed from Python, the body, SoftmaxWithLoss."""
    net = (f'name: "DemoCAM"\n'
           f'layer {{ name: "data" type: "Input" top: "data" top: "label" input_param {{ '
           f'shape {{ dim: {batch} dim: 3 dim: {size} dim: {size} }} '
           f'shape {{ dim: {batch} }} }} }}\n'
           f'{body(num_classes, train=True)}\n'
           f'layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "CAM_fc" bottom: "label" '
           f'top: "loss" }}\n')
    return net.replace("pool: AVE global_pooling", f"pool: {pool} global_pooling")


def solver_prototxt(net: str, iterations: int, lr: float, seed: int) -> str:
    return (f'net: "{net}"\n'
            f'type: "Adam"\nbase_lr: {lr}\nmomentum: 0.9\nmomentum2: 0.999\n'
            f'lr_policy: "poly"\npower: 1.0\nmax_iter: {iterations}\n'
            f'weight_decay: 0.0001\ndisplay: 0\nsnapshot: 0\n'
            f'random_seed: {seed}\nsolver_mode: CPU\n')


def copy_params(source, target) -> None:
    """Copy the learned blobs of every layer ``target`` shares with ``source``, by name."""
    for name, params in target.params.items():
        for to, frm in zip(params, source.params[name], strict=True):
            to.data[...] = frm.data


def make_solver(caffe, folder: Path, tag: str, net_text: str, iterations: int, lr: float,
                seed: int):
    """Write ``train{tag}.prototxt`` and ``solver{tag}.prototxt`` into ``folder``; load it."""
    (folder / f"train{tag}.prototxt").write_text(net_text)
    (folder / f"solver{tag}.prototxt").write_text(
        solver_prototxt(f"train{tag}.prototxt", iterations, lr, seed))
    cwd = os.getcwd()
    os.chdir(folder)                 # Caffe reads the solver's net path from the working dir
    try:
        return caffe.get_solver(f"solver{tag}.prototxt")
    finally:
        os.chdir(cwd)


def train(out_dir: Path, iterations: int, warmup: int, batch: int, lr: float, seed: int,
          size: int = data.IMAGE_SIZE, images_dir: Path | None = None, log_every: int = 100,
          demo_images: int = 6) -> dict:
    """Train, then write the deploy net, weights, labels (and demo images); returns a summary.

    ``warmup`` steps first train the same net with global *max* pooling, whose
    gradient goes to the object's position only: with average pooling from
    the start, the net sits at chance level for a long time on this data.
    Then ``iterations`` steps train the CAM net proper (average pooling).
    """
    import caffe
    caffe.set_mode_cpu()
    caffe.set_random_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = len(data.CLASSES)
    deploy_path = out_dir / "deploy.prototxt"
    deploy_path.write_text(deploy_prototxt(classes, size))
    preprocess = Preprocessor((size, size), parse_mean(None), 1.0)
    rng = np.random.default_rng(seed)     # held-out sets: seed 2 (README), 3 (tests)
    start = time.monotonic()
    phases = [("_warmup", "MAX", warmup), ("", "AVE", iterations)]
    net = None
    for tag, pool, steps in phases:
        if not steps:
            continue
        solver = make_solver(caffe, out_dir, tag, train_prototxt(classes, size, batch, pool),
                             steps, lr, seed)
        if net is not None:
            copy_params(net, solver.net)
        net = solver.net
        losses, hits = [], []
        for it in range(1, steps + 1):
            images, labels, _ = data.make_batch(rng, batch, size)
            net.blobs["data"].data[...] = preprocess(list(images))
            net.blobs["label"].data[...] = labels
            solver.step(1)
            if NONNEGATIVE_FC:      # projected gradient: keep the CAM weights >= 0
                weights = net.params["CAM_fc"][0].data
                np.maximum(weights, 0, out=weights)
            losses.append(float(net.blobs["loss"].data))
            hits.append(float(np.mean(net.blobs["CAM_fc"].data.argmax(1) == labels)))
            if log_every and (it % log_every == 0 or it == steps):
                print(f"{pool} pooling  iter {it:5d}  loss {np.mean(losses[-log_every:]):.4f}  "
                      f"accuracy {np.mean(hits[-log_every:]):.3f}  "
                      f"{time.monotonic() - start:.0f}s", flush=True)
    seconds = time.monotonic() - start
    deploy = caffe.Net(str(deploy_path), caffe.TEST)
    copy_params(net, deploy)
    weights = out_dir / "demo.caffemodel"
    deploy.save(str(weights))
    (out_dir / "labels.txt").write_text("".join(f"{c}\n" for c in data.CLASSES))
    if images_dir is not None and demo_images:
        images_dir.mkdir(parents=True, exist_ok=True)
        for i, sample in enumerate(data.generate(demo_images, DEMO_SEED, size)):
            cv2.imwrite(str(images_dir / f"demo_{data.CLASSES[sample.label]}_{i}.png"),
                        sample.image)
    return {"iterations": warmup + iterations, "batch": batch, "seconds": seconds,
            "weights": weights, "bytes": weights.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train the demo CAM model (pycaffe, CPU).")
    p.add_argument("--out-dir", type=Path, default=PROJECT_ROOT / "models" / "demo",
                   help="where the model files go (default models/demo)")
    p.add_argument("--images-dir", type=Path, default=PROJECT_ROOT / "images",
                   help="where the demo images go (default images/)")
    p.add_argument("--no-images", action="store_true", help="do not write demo images")
    p.add_argument("--warmup", type=int, default=WARMUP,
                   help=f"steps with global max pooling first (default {WARMUP})")
    p.add_argument("--iterations", type=int, default=ITERATIONS,
                   help=f"steps of the CAM net (average pooling) (default {ITERATIONS})")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--lr", type=float, default=0.002, help="Adam base learning rate")
    p.add_argument("--seed", type=int, default=1, help="Caffe and training data seed (default 1)")
    p.add_argument("--threads", type=int, help="BLAS threads (default: all cores)")
    args = p.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    summary = train(args.out_dir, args.iterations, args.warmup, args.batch_size, args.lr,
                    args.seed, images_dir=None if args.no_images else args.images_dir)
    print(f"trained {summary['iterations']} iterations of {summary['batch']} images in "
          f"{summary['seconds']:.0f}s; wrote {summary['weights']} ({summary['bytes']} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
