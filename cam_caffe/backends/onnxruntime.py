"""ONNX Runtime backend: the Caffe net converted to ONNX (``cam_caffe.onnx_export``).

The conversion runs once per model: the ONNX file is cached under
``${XDG_CACHE_HOME:-~/.cache}/cam-caffe/onnx/``, named by the SHA-256 of the
normalised prototxt, the caffemodel's digest, the converter version and the
blobs it outputs. On the CPU, the graph ONNX Runtime optimises from it (fused
and re-laid-out for this CPU) is cached beside it, per ONNX Runtime version
and CPU: loading that one saves about 60 ms of every start-up. A cache that
cannot be written is skipped, not an error.
"""
from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import numpy as np

from ..camspec import CamSpec
from ..errors import BackendError, ModelError, OutputError
from ..netdef import CaffeModel, NetDef, tail
from ..output import cache_home, publish, temporary_beside, write_bytes
from . import Forward, cpu_threads, one_hot, rows, scores_to_probs


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendError(f"onnxruntime is not installed ({e}); run: "
                           "pip install 'cam-caffe[onnx]', or use --backend opencv") from None
    return onnxruntime


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cam-caffe/onnx``, ``~/.cache`` when the variable is unset or empty."""
    return cache_home("onnx")


def cache_key(prototxt: str, caffemodel: CaffeModel, outputs: list[str]) -> str:
    """SHA-256 of what the ONNX file depends on (length-prefixed, so unambiguous)."""
    from ..onnx_export import CONVERTER_VERSION
    digest = hashlib.sha256()
    for part in (prototxt.encode(), caffemodel.digest.encode(), CONVERTER_VERSION.encode(),
                 "\0".join(outputs).encode()):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, netdef: NetDef, weights: CaffeModel, spec: CamSpec,
                 gpu: int | None = None, gradients: bool = False) -> None:
        ort = import_onnxruntime()
        self.spec = spec
        self.netdef, self.weights, self.gpu = netdef, weights, gpu
        self.input = netdef.input_name
        self.outputs = list(dict.fromkeys([spec.score_blob, spec.logit_blob, spec.feature_blob]))
        self.tails: dict[bool, object] = {}     # tail sessions: with the gradient or without
        self.features: np.ndarray | None = None
        key = cache_key(netdef.prototxt(), weights, self.outputs)
        self.model_path = cache_dir() / f"{key}.onnx"
        self.optimized_path = (cache_dir() / f"{key}.{machine_tag(ort)}.opt.onnx"
                               if gpu is None else None)

        providers: list = ["CPUExecutionProvider"]
        if gpu is not None:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError(f"--gpu {gpu}: this onnxruntime has no CUDA support "
                                   "(install onnxruntime-gpu instead of onnxruntime)")
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": gpu}))

        options = session_options(ort, gpu)
        self.ort, self.providers = ort, providers
        from ..onnx_export import convert
        self.session = _open_cached(ort, self.optimized_path, options, providers)
        if self.session is None:
            saved = _empty_temporary(self.optimized_path)
            if saved:
                options.optimized_model_filepath = saved
            self.session = _open_cached(ort, self.model_path, options, providers)
            if self.session is None:
                data = convert(netdef, weights.net, spec, self.outputs).SerializeToString()
                try:
                    write_bytes(self.model_path, data)
                except OutputError:
                    pass               # read-only home, full disk: run from memory
                self.session = self._session(data, options)
            if saved:
                _publish(saved, self.optimized_path)
        if gpu is not None and "CUDAExecutionProvider" not in self.session.get_providers():
            raise BackendError(f"--gpu {gpu}: onnxruntime could not start CUDA on device {gpu} "
                               "(missing CUDA/cuDNN libraries?)")
        if gradients:          # a layer without a VJP fails now (auto then takes pycaffe)
            self._tail(gradient=True)

    def _session(self, data: bytes, options):
        try:
            return self.ort.InferenceSession(data, options, providers=self.providers)
        except Exception as e:
            error = ModelError if self.gpu is None else BackendError
            raise error(f"{self.weights.path}: onnxruntime cannot load the converted net: "
                        f"{_first_line(e)}") from None

    def _run(self, session, outputs: list[str], feeds: dict) -> list[np.ndarray]:
        try:
            return session.run(outputs, feeds)
        except Exception as e:
            raise BackendError(f"onnxruntime forward failed: {_first_line(e)}") from None

    def forward(self, batch: np.ndarray) -> Forward:
        values = dict(zip(self.outputs, self._run(
            self.session, self.outputs, {self.input: np.ascontiguousarray(batch, np.float32)})))
        self.features = np.asarray(values[self.spec.feature_blob], np.float32)
        return Forward(scores_to_probs(values[self.spec.score_blob], self.spec),
                       rows(values[self.spec.logit_blob]), self.features)

    def _tail(self, gradient: bool):
        """The ONNX session of the net after the target blob (its input), outputting the
        logits, and with ``gradient`` also the gradient of Σ seed · logits at its input."""
        if gradient not in self.tails:
            from ..onnx_export import convert
            spec = self.spec
            part = tail(self.netdef, spec.feature_blob, [spec.logit_blob])
            model = convert(part, self.weights.net, outputs=[spec.logit_blob],
                            gradient=spec.feature_blob if gradient else None)
            self.tails[gradient] = self._session(model.SerializeToString(),
                                                 session_options(self.ort, self.gpu))
        return self.tails[gradient]

    def gradients(self, classes: np.ndarray) -> np.ndarray:
        """The tail run once on the target blob repeated for each column of ``classes``,
        with one-hot seeds: the exported VJPs give ∂logit_c/∂A for all of them."""
        from ..onnx_export import gradient_names
        features = self.features
        n, m = classes.shape
        seeds = one_hot(classes, self.spec.num_classes).reshape(m * n, -1)
        seed_name, grad_name = gradient_names(self.spec.logit_blob, self.spec.feature_blob)
        grads, = self._run(self._tail(True), [grad_name], {
            self.spec.feature_blob: np.concatenate([features] * m), seed_name: seeds})
        grads = np.asarray(grads, np.float32).reshape(m, n, *features.shape[1:])
        return np.ascontiguousarray(grads.transpose(1, 0, *range(2, grads.ndim)))

    def tail_logits(self, features: np.ndarray) -> np.ndarray:
        logits, = self._run(self._tail(False), [self.spec.logit_blob],
                            {self.spec.feature_blob: np.ascontiguousarray(features, np.float32)})
        return rows(logits)


def session_options(ort, gpu: int | None):
    """ONNX Runtime's options for cam-caffe's sessions."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = cpu_threads()
    options.log_severity_level = 3
    # On the CPU, the memory pattern only cost: a second set of activation buffers
    # (GoogLeNet-CAM at batch 16: 444 instead of 289 MiB peak, 40k more page
    # faults on the second batch) for the same speed (benchmarks/bench_forward.py).
    options.enable_mem_pattern = gpu is not None
    if gpu is None:
        # Idle ORT threads spinning for work took the CPU that cam-caffe's batch
        # workers (decode, render, encode) need: 64 images 1.43 → 1.37 s. The price
        # is a slower lone batch-1 forward (14.6 → 16.5 ms): start-up dwarfs it.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def machine_tag(ort) -> str:
    """What an optimised graph depends on: ONNX Runtime's version and the CPU's features."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        cpu = ""
    text = f"{ort.__version__}\0{platform.machine()}\0{cpu}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _open_cached(ort, path: Path | None, options, providers: list):
    """A session from a cached model file; None when absent, corrupt or foreign."""
    if path is None or not path.is_file():
        return None
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception:
        return None


def _empty_temporary(path: Path | None) -> str | None:
    """An empty temporary file next to ``path`` for ORT to write; None when there is
    no such cache or it cannot be written."""
    if path is None:
        return None
    try:
        fd, temporary = temporary_beside(path)
    except OSError:
        return None
    os.close(fd)
    return temporary


def _publish(temporary: str, path: Path) -> None:
    """Rename what ONNX Runtime wrote into ``temporary`` to ``path``; drop it if empty."""
    try:
        if os.path.getsize(temporary):
            publish(temporary, path)
        else:
            os.unlink(temporary)
    except OSError:
        pass


def _first_line(error: Exception) -> str:
    lines = [l.strip() for l in str(error).splitlines() if l.strip()]
    return lines[-1] if lines else type(error).__name__
