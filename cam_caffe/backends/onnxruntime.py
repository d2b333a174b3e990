"""ONNX Runtime backend: the Caffe net converted to ONNX (``cam_caffe.onnx_export``).

The conversion runs once per model: the ONNX file is cached under
``${XDG_CACHE_HOME:-~/.cache}/cam-caffe/onnx/``, named by the SHA-256 of the
normalised prototxt, the caffemodel's digest, the converter version and the
blobs it outputs. On the CPU, the graph ONNX Runtime optimises from it (fused
and re-laid-out for this CPU) is cached beside it, per ONNX Runtime version
and CPU: loading that one saves about 60 ms of every start-up.

Both files hold the cache key in their metadata and are used only when it is
this net's: a cached file that is missing, unreadable, corrupt or another
model's is rebuilt. The cache only saves time: without a home for it, or when
it cannot be written (read-only, full disk), the backend runs without it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
from pathlib import Path

import numpy as np

from ..camspec import CamSpec
from ..errors import BackendError, CamError, ModelError, OutputError
from ..netdef import CaffeModel, NetDef, tail
from ..output import cache_home, publish, temporary_beside, write_bytes
from . import Forward, cpu_threads, one_hot, rows, scores_to_probs

# Metadata entry of every model this backend converts: the cache key it was made for.
# A cached file is used only if it holds this backend's key (it survives ORT's
# optimisation), so a file replaced by another net's or other weights' is rebuilt.
CACHE_KEY = "cam_caffe.cache_key"


def import_onnxruntime(verbose: bool = False):
    """Import ONNX Runtime, its telemetry off and, unless ``verbose``, its log quiet."""
    # ORT 1.2x's telemetry writes a device ID under ~/.cache/Microsoft on import, and
    # prints a coloured warning when it cannot (read-only home, no home): off, unless
    # the environment says otherwise.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendError(f"onnxruntime is not installed ({e}); run: "
                           "pip install 'cam-caffe[onnx]', or use --backend opencv") from None
    onnxruntime.set_default_logger_severity(2 if verbose else 4)
    return onnxruntime


def cache_dir() -> Path | None:
    """``$XDG_CACHE_HOME/cam-caffe/onnx`` (``~/.cache`` when the variable is unset or
    empty); None when there is no home for it."""
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
                 gpu: int | None = None, gradients: bool = False,
                 verbose: bool = False, threads: int | None = None) -> None:
        self.ort = ort = import_onnxruntime(verbose)
        self.spec, self.verbose = spec, verbose
        self.netdef, self.weights, self.gpu = netdef, weights, gpu
        self.threads = cpu_threads(threads)
        self.input = netdef.input_name
        self.outputs = list(dict.fromkeys([spec.score_blob, spec.logit_blob, spec.feature_blob]))
        self.tails: dict[bool, object] = {}     # tail sessions: with the gradient or without
        self.features: np.ndarray | None = None
        self.key = cache_key(netdef.prototxt(), weights, self.outputs)
        folder = cache_dir()
        self.model_path = folder / f"{self.key}.onnx" if folder else None
        self.optimized_path = (folder / f"{self.key}.{machine_tag(ort)}.opt.onnx"
                               if folder and gpu is None else None)
        self.providers: list = ["CPUExecutionProvider"]
        if gpu is not None:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError(f"--gpu {gpu}: this onnxruntime has no CUDA support "
                                   "(install onnxruntime-gpu instead of onnxruntime)")
            self.providers.insert(0, ("CUDAExecutionProvider", {"device_id": gpu}))

        # The cache only saves time: a file that is missing, unreadable, corrupt or made
        # for another key is rebuilt, and one that cannot be written is skipped.
        self.session = self._load(self.optimized_path, save=False)
        if self.session is None:
            self.session = self._load(self.model_path, save=True)
        if self.session is None:
            self.session = self._load_converted()
        if gpu is not None and "CUDAExecutionProvider" not in self.session.get_providers():
            raise BackendError(f"--gpu {gpu}: onnxruntime could not start CUDA on device {gpu} "
                               "(missing CUDA/cuDNN libraries?)")
        if gradients:          # a layer without a VJP fails now (auto then takes pycaffe)
            self._tail(gradient=True)

    def _session(self, source: str | bytes, optimized: str | None = None):
        """An ORT session of ``source`` (a file name or a model's bytes), writing its
        optimised graph to the file ``optimized`` if given; raises what ORT raises."""
        options = session_options(self.ort, self.gpu, self.threads, self.verbose)
        if optimized:
            options.optimized_model_filepath = optimized
        return self.ort.InferenceSession(source, options, providers=self.providers)

    def _open(self, source: str | bytes, save: bool):
        """A session of ``source`` whose model was made for this backend's key (else
        ValueError). With ``save``, ORT's optimised graph is cached too; when that
        fails (e.g. a full disk) the session is made without."""
        temporary = _empty_temporary(self.optimized_path) if save else None
        session = saved = None
        try:
            if temporary:
                with contextlib.suppress(Exception):
                    session = saved = self._session(source, temporary)
            if session is None:
                session = self._session(source)
            if session.get_modelmeta().custom_metadata_map.get(CACHE_KEY) != self.key:
                saved = None
                raise ValueError("made for another net, other weights or outputs")
            return session
        finally:
            _finish(temporary, self.optimized_path, keep=saved is not None)

    def _load(self, path: Path | None, save: bool):
        """A session of the cached file ``path``; None when it is absent, unreadable,
        corrupt or made for something else."""
        if path is None or not os.path.isfile(path):
            return None
        try:
            return self._open(str(path), save)
        except Exception:
            return None

    def _load_converted(self):
        """Convert the net, cache the ONNX file (if the cache can be written) and open it."""
        from ..onnx_export import convert
        model = convert(self.netdef, self.weights.net, self.spec, self.outputs)
        model.metadata_props.add(key=CACHE_KEY, value=self.key)
        data = model.SerializeToString()
        if self.model_path is not None:
            # read-only or full cache, odd file there: run from memory
            with contextlib.suppress(OutputError):
                write_bytes(self.model_path, data)
        try:
            return self._open(data, save=True)
        except Exception as e:
            raise self._failure(e) from None

    def _failure(self, error: Exception) -> CamError:
        kind = ModelError if self.gpu is None else BackendError
        return kind(f"{self.weights.path}: onnxruntime cannot load the converted net: "
                    f"{_message(error)}", relayed=True)

    def _run(self, session, outputs: list[str], feeds: dict) -> list[np.ndarray]:
        try:
            return session.run(outputs, feeds)
        except Exception as e:
            raise BackendError(f"onnxruntime forward failed: {_message(e)}") from None

    def forward(self, batch: np.ndarray) -> Forward:
        feed = {self.input: np.ascontiguousarray(batch, np.float32)}
        values = dict(zip(self.outputs, self._run(self.session, self.outputs, feed), strict=True))
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
            try:
                self.tails[gradient] = self._session(model.SerializeToString())
            except Exception as e:
                raise self._failure(e) from None
        return self.tails[gradient]

    def gradients(self, classes: np.ndarray) -> np.ndarray:
        """The tail run once on the target blob repeated for each column of ``classes``,
        with one-hot seeds: the exported VJPs give ∂logit_c/∂A for all of them."""
        from ..onnx_export import gradient_names
        features = self.features
        assert features is not None, "gradients() needs a forward() first"
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


def session_options(ort, gpu: int | None, threads: int, verbose: bool = False):
    """ONNX Runtime's options for cam-caffe's sessions: ``threads`` on the CPU, its
    log (warnings with ``verbose``, else nothing: failures are raised, and said in
    one line)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 2 if verbose else 4
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


def _finish(temporary: str | None, path: Path | None, keep: bool) -> None:
    """Rename what ONNX Runtime wrote into ``temporary`` to ``path`` when ``keep`` and
    it is not empty; otherwise remove it."""
    if temporary is None:
        return
    try:
        if keep and path is not None and os.path.getsize(temporary):
            publish(temporary, path)
        else:
            os.unlink(temporary)
    except (OSError, OutputError):        # a cache that cannot be written: none
        pass


def _message(error: Exception) -> str:
    """ONNX Runtime's message on one line: some span several (an input of the wrong
    shape: what is wrong on the first, which axis on the second, a hint on the last)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) if lines else type(error).__name__
