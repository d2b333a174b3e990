"""pycaffe backend: ``caffe.Net`` on CPU, or on a CUDA device with ``gpu``.

Caffe aborts the whole process (glog CHECK) on many bad inputs. So the net
is first loaded, and run once, in a child process (``python -m
cam_caffe.backends.caffe``); if that child dies, the user gets Caffe's own
reason as a one-line error instead of a core dump.
"""
from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format

from .. import proto
from ..camspec import CamSpec
from ..errors import BackendError, ModelError
from ..netdef import CaffeModel, NetDef, tail
from . import Forward, cpu_threads, one_hot, rows, scores_to_probs

PROBE_TIMEOUT_S = 600


def import_caffe(verbose: bool = False):
    """Import pycaffe; its glog output is silenced unless ``verbose``."""
    if not verbose:
        os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        import caffe
    except ImportError as e:
        raise BackendError(f"pycaffe is not installed ({e}); run scripts/install_pycaffe.sh "
                           "or use --backend opencv") from None
    return caffe


def set_device(caffe, gpu: int | None) -> None:
    """CPU mode, or GPU mode on device ``gpu``."""
    if gpu is None:
        caffe.set_mode_cpu()
    else:
        caffe.set_mode_gpu()
        caffe.set_device(gpu)


def set_blas_threads(threads: int) -> None:
    """Caffe's CPU forward is its GEMMs on OpenBLAS threads: use ``threads`` of them
    (the OpenBLAS that _caffe.so loaded; nothing to do for another BLAS)."""
    try:
        openblas = ctypes.CDLL("libopenblas.so.0", mode=os.RTLD_NOLOAD)
    except OSError:
        return
    openblas.openblas_set_num_threads(threads)


class CaffeBackend:
    name = "caffe"

    def __init__(self, netdef: NetDef, weights: CaffeModel, spec: CamSpec,
                 gpu: int | None = None, verbose: bool = False,
                 threads: int | None = None) -> None:
        self.spec = spec
        self.netdef, self.weights = netdef, weights
        self.input = netdef.input_name
        self.caffe = import_caffe(verbose)
        self.tail_net: Any = None           # a caffe.Net of the logits' tail, built on first use
        set_blas_threads(cpu_threads(threads))
        with tempfile.TemporaryDirectory(prefix="cam-caffe-") as tmp:
            prototxt = Path(tmp) / "deploy.prototxt"
            prototxt.write_text(backward_ready(netdef))
            probe(prototxt, weights.path, gpu, verbose)
            set_device(self.caffe, gpu)
            self.net = self.caffe.Net(str(prototxt), self.caffe.TEST,
                                      weights=str(weights.path))
        self.backward_end = first_reader(self.net, spec.feature_blob)

    def forward(self, batch: np.ndarray) -> Forward:
        run(self.net, self.input, batch)
        scores = self.net.blobs[self.spec.score_blob].data
        logits = rows(self.net.blobs[self.spec.logit_blob].data).copy()
        features = self.net.blobs[self.spec.feature_blob].data
        # the features stay in the blob (no 51 MB copy per batch of 64): see Forward
        return Forward(scores_to_probs(scores, self.spec), logits, features)

    def gradients(self, classes: np.ndarray) -> np.ndarray:
        """One backward pass per column of ``classes``, from the logits' layer down to
        the first layer reading the target blob (not through the in-place layers that
        share it, so the gradient is the one at the blob's value as that layer reads it)."""
        logits = self.net.blobs[self.spec.logit_blob]
        target = self.net.blobs[self.spec.feature_blob]
        grads = np.empty((classes.shape[0], classes.shape[1], *target.data.shape[1:]),
                         np.float32)
        for m, seed in enumerate(one_hot(classes, self.spec.num_classes)):
            logits.diff[...] = seed.reshape(logits.diff.shape)
            self.net.backward(start=self.spec.logit_layer, end=self.backward_end)
            grads[:, m] = target.diff
        return grads

    def tail_logits(self, features: np.ndarray) -> np.ndarray:
        if self.tail_net is None:
            part = tail(self.netdef, self.spec.feature_blob, [self.spec.logit_blob])
            with tempfile.TemporaryDirectory(prefix="cam-caffe-") as tmp:
                prototxt = Path(tmp) / "tail.prototxt"
                prototxt.write_text(part.prototxt())
                self.tail_net = self.caffe.Net(str(prototxt), self.caffe.TEST,
                                               weights=str(self.weights.path))
        run(self.tail_net, self.spec.feature_blob, features)
        return rows(self.tail_net.blobs[self.spec.logit_blob].data).copy()


def run(net, input_name: str, batch: np.ndarray) -> None:
    """Forward ``batch`` through ``net``, reshaping it to the batch's size first."""
    blob = net.blobs[input_name]
    if blob.data.shape != batch.shape:
        blob.reshape(*batch.shape)
        net.reshape()
    blob.data[...] = batch
    net.forward()


def backward_ready(netdef: NetDef) -> str:
    """The net's prototxt with ``force_backward``: gradients reach every blob. (It also
    makes Caffe compute every weight gradient on the way, whatever the ``lr_mult``:
    Net::Init sets each layer's param_propagate_down, which pycaffe cannot unset.)"""
    net = proto.NetParameter()
    net.CopyFrom(netdef.net)
    net.force_backward = True
    return text_format.MessageToString(net)


def first_reader(net, blob: str) -> str:
    """The first layer of Caffe's net (its Split layers included) that reads ``blob``'s
    final value and is not an in-place layer on it: where a backward pass ends."""
    names = list(net._layer_names)
    writers = [i for i, name in enumerate(names) if blob in net.top_names[name]]
    for name in names[writers[-1] + 1:]:
        if blob in net.bottom_names[name] and blob not in net.top_names[name]:
            return name
    raise ModelError(f"no layer reads blob '{blob}'")


def probe(prototxt: Path, weights: Path, gpu: int | None, verbose: bool) -> None:
    """Load and run the net once in a child process; turn its crash into an error."""
    command = [sys.executable, "-m", __name__, str(prototxt), str(weights),
               "" if gpu is None else str(gpu)]
    env = dict(os.environ, GLOG_minloglevel="0" if verbose else "1")
    try:
        child = subprocess.run(command, capture_output=True, text=True, env=env,
                               timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BackendError(
            f"{weights}: pycaffe did not load the net in {PROBE_TIMEOUT_S} s") from None
    if verbose and child.stderr:
        sys.stderr.write(child.stderr)
    if child.returncode != 0:
        reason = caffe_failure(child.stderr)
        error = BackendError if gpu is not None and _is_gpu_failure(reason) else ModelError
        raise error(f"{weights}: pycaffe cannot run this net: {reason}")


def caffe_failure(stderr: str) -> str:
    """The one line of a dead Caffe child's stderr that says why it died."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        fatal = re.match(r"^F\d{4,8} [\d:.]+\s+\d+ \S+\] (.*)$", line)   # glog FATAL line
        if fatal:
            return fatal.group(1).split(" (known types:")[0]
    for line in reversed(lines):
        if line.startswith("cam-caffe-probe: "):
            return line.removeprefix("cam-caffe-probe: ")
    return lines[-1] if lines else "the process died without a message"


def _is_gpu_failure(reason: str) -> bool:
    return any(s in reason for s in ("CPU-only", "CUDA", "cuda", "device", "GPU"))


def _probe_main(prototxt: str, weights: str, gpu: str) -> None:
    """Child side of ``probe``: exits non-zero (or dies) if Caffe cannot run the net."""
    caffe = import_caffe(verbose=False)
    device = int(gpu) if gpu else None
    try:
        set_device(caffe, device)
        net = caffe.Net(prototxt, caffe.TEST, weights=weights)
        net.forward()
    except Exception as e:      # pycaffe raises plain exceptions for some errors
        print(f"cam-caffe-probe: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _probe_main(*sys.argv[1:4])
