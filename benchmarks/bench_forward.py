"""Forward throughput of each backend on GoogLeNet-CAM: ms/image, GFLOP/s, % of SGEMM peak,
at several batch sizes; then the settings that change it (threads, OpenCV DNN options,
OpenBLAS kernel, ONNX Runtime session options, one process per core).

Each configuration runs in its own child process (thread counts and OpenBLAS
variables only take effect before the libraries load). Only the backend's
``forward`` on a preprocessed batch is timed.

    python benchmarks/bench_forward.py [--batches 1,8,16,32] [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import sgemm_peak
from common import (
    PROTOTXT,
    PYTHON,
    WORK,
    available_backends,
    googlenet_weights,
    median,
    run_json,
    table,
    times,
    title,
    wait_for_quiet,
)

GFLOP = None   # per image, filled in by main()
ORT_SETTINGS = {"threads", "opt_level", "spinning", "mem_pattern"}   # need a new session


def configure(net, config: dict) -> dict:
    """Apply a configuration's in-process settings to a loaded CAMNet; return what holds."""
    import cv2
    backend = net.backend
    applied: dict = {}
    if net.backend_name == "opencv":
        if config.get("fusion") is not None:
            backend.net.enableFusion(config["fusion"])
        if config.get("winograd") is not None:
            backend.net.enableWinograd(config["winograd"])
        if config.get("target"):
            backend.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
            backend.net.setPreferableTarget(getattr(cv2.dnn, "DNN_TARGET_" + config["target"]))
            applied["target"] = config["target"]
        if config.get("threads"):
            cv2.setNumThreads(config["threads"])
        applied["cv2 threads"] = cv2.getNumThreads()
    elif net.backend_name == "onnxruntime" and not ORT_SETTINGS & set(config):
        applied["intra_op"] = "backend default"
    elif net.backend_name == "onnxruntime":
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = config.get("threads") or os.cpu_count() or 1
        level = config.get("opt_level", "ORT_ENABLE_ALL")
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        # as the backend sets them, unless the configuration says otherwise
        options.enable_mem_pattern = bool(config.get("mem_pattern"))
        options.add_session_config_entry("session.intra_op.allow_spinning",
                                         "1" if config.get("spinning") else "0")
        backend.session = ort.InferenceSession(str(backend.model_path), options,
                                               providers=["CPUExecutionProvider"])
        applied["intra_op"] = options.intra_op_num_threads
    elif net.backend_name == "caffe":
        import ctypes
        lib = ctypes.CDLL("libopenblas.so.0")
        lib.openblas_get_corename.restype = ctypes.c_char_p
        applied["openblas"] = (f"{lib.openblas_get_corename().decode()}, "
                               f"{lib.openblas_get_num_threads()} threads")
    return applied


def profile(net, data: np.ndarray, repeat: int = 3) -> dict[str, float]:
    """Forward seconds per image by layer type, from each backend's own per-layer timing."""
    import collections
    by_type: dict[str, float] = collections.defaultdict(float)
    backend, n = net.backend, len(data)
    backend.forward(data)
    if net.backend_name == "opencv":
        import cv2
        runs = []
        for _ in range(repeat):
            backend.forward(data)
            runs.append(backend.net.getPerfProfile()[1].ravel() / cv2.getTickFrequency())
        timings = np.median(np.array(runs), axis=0)
        for name, seconds in zip(backend.net.getLayerNames(), timings, strict=True):
            by_type[backend.net.getLayer(backend.net.getLayerId(name)).type] += seconds / n
    elif net.backend_name == "caffe":
        caffe_net = backend.net
        names = list(caffe_net._layer_names)
        for name, layer in zip(names, caffe_net.layers, strict=True):
            if layer.type == "Input":
                continue
            seconds = times(lambda: caffe_net.forward(start=name, end=name), repeat, warmup=0)
            by_type[layer.type] += median(seconds) / n
    else:                                   # onnxruntime: its profiler's per-node times
        import json as json_module

        import onnxruntime as ort
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = os.cpu_count() or 1
        options.enable_profiling = True
        options.enable_mem_pattern = False             # as the backend sets them
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.profile_file_prefix = str(Path(WORK) / "ort_profile")
        session = ort.InferenceSession(str(backend.model_path), options,
                                       providers=["CPUExecutionProvider"])
        for _ in range(repeat + 1):
            session.run(backend.outputs, {backend.input: data})
        events = json_module.loads(Path(session.end_profiling()).read_text())
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                by_type[event["args"]["op_name"]] += event["dur"] / 1e6 / (repeat + 1) / n
    return dict(by_type)


def child(config: dict) -> dict:
    """Load the net, apply ``config``, time forward at each batch size (ms per image)."""
    from cam_caffe import CAMNet
    net = CAMNet(PROTOTXT, googlenet_weights(), backend=config["backend"])
    applied = configure(net, config)
    rng = np.random.default_rng(0)
    results = {}
    if config.get("profile"):
        data = rng.normal(0, 50, (config["profile"], 3, 224, 224)).astype(np.float32)
        return {"profile": profile(net, data), "applied": applied}
    if config.get("start_at"):                       # line up with a sibling process
        time.sleep(max(0.0, config["start_at"] - time.time()))
    for batch in config["batches"]:
        data = rng.normal(0, 50, (batch, 3, 224, 224)).astype(np.float32)
        repeat = max(3, math.ceil(config.get("images", 48) / batch))
        seconds = times(lambda: net.backend.forward(data), repeat=repeat, warmup=1)
        results[batch] = median(seconds) / batch * 1000
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"ms": results, "applied": applied, "peak_mib": peak_mib}


def run_config(config: dict, env: dict[str, str] | None = None) -> dict:
    """One configuration in a child process (``env`` added to this environment)."""
    return run_json([PYTHON, __file__, "--child", json.dumps(config)],
                    {**os.environ, **(env or {})})


def run_parallel(config: dict, env: dict[str, str], processes: int = 2) -> float:
    """``processes`` children at once, lined up in time: their combined ms per image."""
    config = dict(config, start_at=time.time() + 15)
    command = [PYTHON, __file__, "--child", json.dumps(config)]
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env={**os.environ, **env})
                for _ in range(processes)]
    rates = []
    for c in children:
        out, err = c.communicate()
        if c.returncode != 0:
            raise RuntimeError(err[-2000:])
        ms = json.loads(out.strip().splitlines()[-1])["ms"]
        rates.append(1000 / next(iter(ms.values())))        # images per second
    return 1000 / sum(rates)


def blas_facts() -> list[str]:
    """Which OpenBLAS pycaffe runs on: the library ldd resolves, the Debian alternative
    it points to (pthread, openmp or serial variant), its build configuration."""
    import ctypes
    import shutil
    facts = []
    try:
        import importlib.util
        spec = importlib.util.find_spec("caffe")
        so = next(Path(spec.origin).parent.glob("_caffe*.so"))
        ldd = subprocess.run(["ldd", str(so)], capture_output=True, text=True).stdout
        line = next((entry.strip() for entry in ldd.splitlines() if "blas" in entry),
                    "no BLAS linked?")
        target = line.split("=>")[-1].split("(")[0].strip()
        facts.append(f"ldd _caffe.so: `{line}` → `{os.path.realpath(target)}`")
    except Exception as e:          # no pycaffe: nothing to say about its BLAS
        facts.append(f"pycaffe not found ({e})")
    if shutil.which("update-alternatives"):
        for name in ("libblas.so.3-x86_64-linux-gnu", "libopenblas.so.0-x86_64-linux-gnu"):
            out = subprocess.run(["update-alternatives", "--display", name],
                                 capture_output=True, text=True).stdout.splitlines()
            choices = [line.split(" - ")[0] for line in out if " - priority" in line]
            facts.append(f"update-alternatives {name}: {'; '.join(choices) or 'none'}")
    try:
        lib = ctypes.CDLL("libopenblas.so.0")
        lib.openblas_get_config.restype = ctypes.c_char_p
        facts.append(f"openblas_get_config(): `{lib.openblas_get_config().decode()}`, "
                     f"parallel mode {lib.openblas_get_parallel()} (0 serial, 1 pthread, 2 OpenMP)")
    except OSError:
        pass
    return facts


def cells(ms_per_image: float, peak: float) -> list[str]:
    gflops = GFLOP / (ms_per_image / 1000)
    return [f"{ms_per_image:.1f}", f"{gflops:.1f}", f"{100 * gflops / peak:.0f}%"]


def profile_table(backends: list[str], peak: float, batch: int) -> None:
    """Where the forward time goes, by layer type, per backend (and the FLOPs there)."""
    from flops import layer_flops

    from cam_caffe.netdef import load_netdef
    flops: dict[str, int] = {}
    for entry in layer_flops(load_netdef(PROTOTXT)):
        flops[entry.type] = flops.get(entry.type, 0) + entry.flops
    names = {"Conv": "Convolution", "FusedConv": "Convolution", "MaxPool": "Pooling",
             "AveragePool": "Pooling", "Gemm": "InnerProduct", "Relu": "ReLU"}
    rows = []
    for backend in backends:
        result = run_config({"backend": backend, "profile": batch})["profile"]
        merged: dict[str, float] = {}
        for op, seconds in result.items():
            merged[names.get(op, op)] = merged.get(names.get(op, op), 0.0) + seconds
        total = sum(merged.values())
        for op, seconds in sorted(merged.items(), key=lambda kv: -kv[1]):
            if seconds / total < 0.005:
                continue
            gflops = flops.get(op, 0) / 1e9 / seconds if flops.get(op) else None
            rows.append([backend, op, f"{seconds * 1000:.2f}", f"{100 * seconds / total:.0f}%",
                         f"{100 * flops.get(op, 0) / sum(flops.values()):.1f}%",
                         f"{gflops:.0f}" if gflops else "",
                         f"{100 * gflops / peak:.0f}%" if gflops else ""])
    title(f"Forward time by layer type at batch {batch} (each backend's own per-layer timer; "
          "types with <0.5% left out)")
    print(table(["backend", "layer type", "ms/image", "share of time", "share of FLOPs",
                 "GFLOP/s", "% of SGEMM peak"], rows))


# (label, backend, in-process settings, environment)
VARIANTS = [
    ("OpenCV: default (cv2 threads = nproc, Winograd on, fusion on)", "opencv", {}, {}),
    ("OpenCV: cv2.setNumThreads(1)", "opencv", {"threads": 1}, {}),
    ("OpenCV: enableWinograd(False)", "opencv", {"winograd": False}, {}),
    ("OpenCV: enableFusion(False)", "opencv", {"fusion": False}, {}),
    ("OpenCV: DNN_BACKEND_OPENCV + DNN_TARGET_CPU (explicit)", "opencv", {"target": "CPU"}, {}),
    ("pycaffe: default (OpenBLAS pthread, nproc threads)", "caffe", {}, {}),
    ("pycaffe: OPENBLAS_NUM_THREADS=1", "caffe", {}, {"OPENBLAS_NUM_THREADS": "1"}),
    ("pycaffe: OPENBLAS_CORETYPE=Haswell (AVX2 kernel)", "caffe", {},
     {"OPENBLAS_CORETYPE": "Haswell"}),
    ("ONNX Runtime: default (intra_op = nproc, ORT_ENABLE_ALL)", "onnxruntime", {}, {}),
    ("ONNX Runtime: intra_op_num_threads=1", "onnxruntime", {"threads": 1}, {}),
    ("ONNX Runtime: allow_spinning=1 (ORT's own default)", "onnxruntime", {"spinning": True},
     {}),
    ("ONNX Runtime: enable_mem_pattern=True (ORT's own default)", "onnxruntime",
     {"mem_pattern": True}, {}),
    ("ONNX Runtime: ORT_ENABLE_BASIC", "onnxruntime", {"opt_level": "ORT_ENABLE_BASIC"}, {}),
]


def main() -> None:
    global GFLOP
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,16,32")
    parser.add_argument("--quick", action="store_true", help="fewer images per measurement")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from flops import count_flops

    from cam_caffe.netdef import load_netdef
    GFLOP = count_flops(load_netdef(PROTOTXT)) / 1e9
    batches = [int(b) for b in args.batches.split(",")]
    images = 16 if args.quick else 48
    backends = available_backends()
    wait_for_quiet()
    peak = sgemm_peak.peak_gflops(sgemm_peak.measure((2048, 4096), 3))

    forward_table(backends, batches, images, peak)
    variants_table(backends, images, peak)
    profile_table(backends, peak, 16)
    if "onnxruntime" in backends:
        lrn_table()
    print("\npycaffe's BLAS:\n" + "\n".join(f"- {fact}" for fact in blas_facts()))


def lrn_graph(kind: str, shape: tuple[int, ...], size: int = 5, alpha: float = 1e-4,
              beta: float = 0.75, bias: float = 1.0) -> bytes:
    """An ONNX model computing Caffe's across-channel LRN of an NCHW input, one way of four:
    ``LRN`` (the ONNX op), ``pool`` (x², AveragePool over the channel axis, then Pow: what
    onnx_export emitted in converter version 2), ``conv`` (x², a 1×1 Conv with a banded
    C×C weight, then Pow) and ``conv-sqrt`` (the same with k as the Conv's bias and
    x^−0.75 as 1/(√s·√√s): what it emits since version 4; version 3 added k apart)."""
    from onnx import TensorProto, helper, numpy_helper
    _n, c, h, w = shape
    consts = {"alpha": np.float32(alpha), "bias": np.float32(bias), "beta": np.float32(-beta),
              "mean": np.float32(alpha / size)}
    if kind == "LRN":
        nodes = [helper.make_node("LRN", ["x"], ["y"], size=size, alpha=alpha, beta=beta,
                                  bias=bias)]
    else:
        nodes = [helper.make_node("Mul", ["x", "x"], ["sq"])]
        if kind == "pool":
            consts.update(column=np.array([0, 1, c, h * w], np.int64),
                          map=np.array([0, c, h, w], np.int64))
            pad = (size - 1) // 2
            nodes += [helper.make_node("Reshape", ["sq", "column"], ["col"]),
                      helper.make_node("AveragePool", ["col"], ["avg"], kernel_shape=[size, 1],
                                       pads=[pad, 0, pad, 0], count_include_pad=1),
                      helper.make_node("Reshape", ["avg", "map"], ["m"]),
                      helper.make_node("Mul", ["m", "alpha"], ["ma"])]
        else:
            band = np.zeros((c, c, 1, 1), np.float32)
            for i in range(c):
                band[i, max(0, i - (size - 1) // 2):i + size // 2 + 1] = alpha / size
            consts["band"] = band
            consts["k"] = np.full(c, bias, np.float32)
            nodes += [helper.make_node("Conv", ["sq", "band"] + ["k"] * (kind == "conv-sqrt"),
                                       ["base" if kind == "conv-sqrt" else "ma"])]
        if kind != "conv-sqrt":
            nodes += [helper.make_node("Add", ["ma", "bias"], ["base"])]
        if kind == "conv-sqrt":
            nodes += [helper.make_node("Sqrt", ["base"], ["r2"]),
                      helper.make_node("Sqrt", ["r2"], ["r4"]),
                      helper.make_node("Mul", ["r2", "r4"], ["den"]),
                      helper.make_node("Div", ["x", "den"], ["y"])]
        else:
            nodes += [helper.make_node("Pow", ["base", "beta"], ["f"]),
                      helper.make_node("Mul", ["x", "f"], ["y"])]
    value = [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))
             for name in ("x", "y")]
    graph = helper.make_graph(nodes, "lrn", value[:1], value[1:],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def lrn_table(batch: int = 16) -> None:
    """GoogLeNet's two LRN layers under ONNX Runtime, four ways (ms per image, in-process)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    rows = []
    for shape in ((batch, 64, 56, 56), (batch, 192, 56, 56)):
        x = np.random.default_rng(0).normal(0, 50, shape).astype(np.float32)
        reference = None
        for kind in ("LRN", "pool", "conv", "conv-sqrt"):
            session = ort.InferenceSession(lrn_graph(kind, shape), options,
                                           providers=["CPUExecutionProvider"])
            y = session.run(None, {"x": x})[0]
            reference = y if reference is None else reference
            seconds = median(times(lambda: session.run(None, {"x": x}), repeat=7))
            rows.append([f"{shape[1]}×{shape[2]}×{shape[3]}", kind,
                         f"{seconds / batch * 1000:.2f}",
                         f"{np.abs(y - reference).max() / np.abs(reference).max():.0e}"])
    title(f"ONNX Runtime: Caffe LRN (size 5, beta 0.75) four ways, batch {batch}")
    print(table(["LRN input", "graph", "ms/image", "max rel diff to LRN op"], rows))


def forward_table(backends: list[str], batches: list[int], images: int, peak: float) -> None:
    """Default settings, every batch size."""
    rows = []
    for backend in backends:
        ms = run_config({"backend": backend, "batches": batches, "images": images})["ms"]
        for batch in batches:
            rows.append([backend, batch, *cells(ms[str(batch)], peak)])
    title(f"Forward throughput, GoogLeNet-CAM ({GFLOP:.3f} GFLOP/image), default settings; "
          f"measured SGEMM peak {peak:.1f} GFLOP/s")
    print(table(["backend", "batch", "ms/image", "GFLOP/s", "% of SGEMM peak"], rows))


def variants_table(backends: list[str], images: int, peak: float) -> None:
    """Each setting of VARIANTS at batch 1 and 16, then two single-thread processes at once."""
    rows = []
    probe = [1, 16]
    for label, backend, settings, env in VARIANTS:
        if backend not in backends:
            continue
        try:
            result = run_config({"backend": backend, "batches": probe, "images": images,
                                 **settings}, env)
        except RuntimeError as e:
            rows.append([label, "failed: " + (str(e).strip().splitlines() or ["?"])[-1][:80],
                         "", "", "", "", ""])
            continue
        rows.append([label, json.dumps(result["applied"]).strip("{}").replace('"', "")]
                    + [c for b in probe for c in cells(result["ms"][str(b)], peak)[:2]]
                    + [f"{result['peak_mib']:.0f}"])
    for backend, settings, env in (("opencv", {"threads": 1}, {}),
                                   ("caffe", {}, {"OPENBLAS_NUM_THREADS": "1"}),
                                   ("onnxruntime", {"threads": 1}, {})):
        if backend not in backends:
            continue
        combined = run_parallel({"backend": backend, "batches": [16], "images": images,
                                 **settings}, env)
        rows.append([f"{backend}: 2 processes × 1 thread (throughput of both)", "1 thread each",
                     "", "", *cells(combined, peak)[:2], ""])
    title("Forward: what changes it (ms/image and GFLOP/s at batch 1 and batch 16, peak "
          "RSS of the process)")
    print(table(["configuration", "in effect", "b=1 ms", "b=1 GFLOP/s", "b=16 ms",
                 "b=16 GFLOP/s", "peak RSS MiB"], rows))


if __name__ == "__main__":
    sys.exit(main())
