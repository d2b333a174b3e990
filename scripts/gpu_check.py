#!/usr/bin/env python3
"""GPU check for a CUDA build of pycaffe: GoogLeNet-CAM on GPU vs CPU.

Builds GoogLeNet-CAM (prototxt/deploy_googlenetCAM.prototxt) with random
He-initialised weights (tests/synthetic.py), runs one batch of random
images on the GPU and on the CPU and compares the class probabilities and
the CAMs of each image's top-1 class, then times forward passes at several
batch sizes. Prints a markdown report naming the card. It also runs a small
net of the six layers this Caffe fork has no CUDA code for (MaxUnPool,
ReLU6, HardSwish, HardSigmoid, Upsample, PixelShuffle: in GPU mode they fall
back to their CPU code) on the GPU and the CPU, in a child process.

    scripts/gpu_check.py                 # GPU 0 vs CPU (needs a CUDA pycaffe)
    scripts/gpu_check.py --cpu-only      # CPU only: proves the script works
    ./run.sh --gpu-check                 # the same, inside the GPU bundle

Relative errors are max|GPU - CPU| / max|CPU| over the whole array (scale
relative, so tiny probabilities do not blow them up). The check fails
(exit 1) when the probabilities differ by more than --prob-tol or the CAMs
by more than --cam-tol; exit 2 when pycaffe or the GPU cannot be used (the
message is Caffe's reason, caught by cam_caffe's probe child process).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path and (ROOT / "cam_caffe").is_dir():
    sys.path.insert(0, str(ROOT))   # run from a checkout without installing
sys.path.append(str(ROOT / "tests"))   # tests/synthetic.py: random weights

DEFAULT_PROTOTXT = ROOT / "prototxt" / "deploy_googlenetCAM.prototxt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prototxt", type=Path, default=DEFAULT_PROTOTXT,
                   help="deploy prototxt (default: GoogLeNet-CAM)")
    p.add_argument("--gpu", type=int, default=0, help="CUDA device id (default 0)")
    p.add_argument("--cpu-only", action="store_true",
                   help="no GPU: time the CPU only (checks the script and the CPU path)")
    p.add_argument("--batches", default="1,8,64",
                   help="batch sizes to time, comma-separated (default 1,8,64)")
    p.add_argument("--compare-batch", type=int, default=8,
                   help="images compared GPU vs CPU (default 8)")
    p.add_argument("--no-cpu-timing", action="store_true",
                   help="with a GPU: time the GPU only")
    p.add_argument("--min-time", type=float, default=1.0,
                   help="time each batch size for at least this many seconds (default 1)")
    p.add_argument("--min-repeats", type=int, default=2,
                   help="and at least this many timed passes (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and images")
    p.add_argument("--prob-tol", type=float, default=1e-5,
                   help="max relative error of the probabilities (default 1e-5)")
    p.add_argument("--cam-tol", type=float, default=1e-5,
                   help="max relative error of the CAMs (default 1e-5)")
    p.add_argument("--fork-tol", type=float, default=1e-5,
                   help="max abs difference of the fork-layer net, GPU vs CPU (default 1e-5)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--verbose", action="store_true", help="show Caffe's log")
    args = p.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batches {args.batches!r}: want comma-separated integers")
    if not args.batch_sizes or min(args.batch_sizes) < 1 or args.compare_batch < 1:
        p.error("batch sizes must be positive")
    return args


def gpu_name(gpu: int) -> str:
    """The card's name and details, from nvidia-smi, else from the CUDA runtime."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "-i", str(gpu), "--query-gpu=name,compute_cap,memory.total,driver_version",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and out.stdout.strip():
                name, cap, mem, driver = [s.strip() for s in out.stdout.strip().split(",")[:4]]
                return f"{name} (sm_{cap.replace('.', '')}, {mem}, driver {driver})"
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    return cudart_name(gpu) or f"GPU {gpu} (name unknown: no nvidia-smi)"


def cudart_name(gpu: int) -> str | None:
    """cudaGetDeviceProperties' name (the struct's first field) through ctypes."""
    import ctypes
    for lib in ("libcudart.so.13", "libcudart.so"):
        try:
            cudart = ctypes.CDLL(lib)
        except OSError:
            continue
        buf = ctypes.create_string_buffer(16384)   # larger than any cudaDeviceProp
        for fn in ("cudaGetDeviceProperties_v2", "cudaGetDeviceProperties"):
            f = getattr(cudart, fn, None)
            if f is not None and f(buf, gpu) == 0:
                major, minor = ctypes.c_int(), ctypes.c_int()
                # attributes 75 and 76: the compute capability's major and minor
                cudart.cudaDeviceGetAttribute(ctypes.byref(major), 75, gpu)
                cudart.cudaDeviceGetAttribute(ctypes.byref(minor), 76, gpu)
                return f"{buf.value.decode(errors='replace')} (sm_{major.value}{minor.value})"
    return None


def cpu_name() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} threads"


FORK_LAYERS_NET = """
name: "fork_layers"
input: "data"
input_shape { dim: 2 dim: 8 dim: 8 dim: 8 }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pooled" top: "mask"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "unpool" type: "MaxUnPool" bottom: "pooled" bottom: "mask" top: "unpooled"
        max_unpool_param { dst_h: 8 dst_w: 8 } }
layer { name: "relu6" type: "ReLU6" bottom: "unpooled" top: "relu6" }
layer { name: "hswish" type: "HardSwish" bottom: "relu6" top: "hswish" }
layer { name: "hsigmoid" type: "HardSigmoid" bottom: "hswish" top: "hsigmoid" }
layer { name: "up" type: "Upsample" bottom: "hsigmoid" top: "up" upsample_param { scale: 2 } }
layer { name: "shuffle" type: "PixelShuffle" bottom: "up" top: "out"
        pixelshuffle_param { upscale_factor: 2 } }
"""

FORK_LAYERS_CHILD = """
import json, sys
import numpy as np
import caffe
prototxt, gpu = sys.argv[1], sys.argv[2]
x = np.random.default_rng(0).standard_normal((2, 8, 8, 8)).astype(np.float32) * 4
def run(device):
    if device is None:
        caffe.set_mode_cpu()
    else:
        caffe.set_mode_gpu()
        caffe.set_device(device)
    net = caffe.Net(prototxt, caffe.TEST)
    net.blobs["data"].data[...] = x
    return np.array(net.forward()["out"])
ref = run(None)
out = ref if gpu == "" else run(int(gpu))
print(json.dumps({"shape": list(ref.shape), "max_abs": float(np.abs(out - ref).max()),
                  "finite": bool(np.isfinite(out).all())}))
"""


def fork_layers_check(gpu: int | None, verbose: bool) -> dict:
    """Run FORK_LAYERS_NET on the GPU and the CPU in a child (Caffe aborts on failure)."""
    from cam_caffe.backends.caffe import caffe_failure
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        prototxt = Path(tmp) / "fork_layers.prototxt"
        prototxt.write_text(FORK_LAYERS_NET)
        env = dict(os.environ, GLOG_minloglevel="0" if verbose else "2")
        child = subprocess.run([sys.executable, "-c", FORK_LAYERS_CHILD, str(prototxt),
                                "" if gpu is None else str(gpu)],
                               capture_output=True, text=True, env=env, timeout=600)
    if child.returncode != 0:
        return {"error": caffe_failure(child.stderr)}
    return json.loads(child.stdout.strip().splitlines()[-1])


def rel_error(a, b) -> float:
    """max|a - b| / max|b|."""
    import numpy as np
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    scale = float(np.abs(b).max()) or 1.0
    return float(np.abs(a - b).max()) / scale


def time_forward(backend, batch, min_time: float, min_repeats: int) -> float:
    """Median seconds per forward pass (outputs copied to the host), after one warm-up."""
    backend.forward(batch)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        backend.forward(batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np
    from synthetic import random_weights, save_caffemodel

    from cam_caffe.backends.caffe import CaffeBackend, import_caffe, set_device
    from cam_caffe.cam import cam_weights, class_activation_maps
    from cam_caffe.camspec import find_cam_layers
    from cam_caffe.errors import CamError
    from cam_caffe.netdef import CaffeModel, load_netdef

    try:
        caffe = import_caffe(args.verbose)
        netdef = load_netdef(args.prototxt)
        spec = find_cam_layers(netdef)
    except CamError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    gpu = None if args.cpu_only else args.gpu
    device = cpu_name() if gpu is None else gpu_name(gpu)
    print(f"gpu_check: {args.prototxt.name}, random weights (seed {args.seed}); "
          f"device: {'CPU only' if gpu is None else device}", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        weights = Path(tmp) / "random.caffemodel"
        t0 = time.perf_counter()
        save_caffemodel(netdef, random_weights(netdef, seed=args.seed), weights)
        print(f"gpu_check: wrote random weights in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        fc = cam_weights(netdef, CaffeModel(weights).net, spec)
        try:
            cpu = CaffeBackend(netdef, CaffeModel(weights), spec, gpu=None,
                               verbose=args.verbose)
            dev = None if gpu is None else CaffeBackend(netdef, CaffeModel(weights), spec,
                                                        gpu=gpu, verbose=args.verbose)
        except CamError as e:
            print(f"gpu_check: {e}", file=sys.stderr)
            return 2

    rng = np.random.default_rng(args.seed)
    _, c, h, w = netdef.input_shape
    # unit-variance inputs keep the random net's softmax far from saturation
    # (top-1 probability ~0.2), so the probabilities are a sensitive check
    images = rng.standard_normal((max(args.compare_batch, *args.batch_sizes), c, h, w),
                                 dtype=np.float32)

    results: dict = {"device": device, "gpu": gpu, "prototxt": str(args.prototxt),
                     "caffe": os.path.dirname(caffe.__file__), "timings": []}
    ok = True
    if dev is not None:
        batch = images[:args.compare_batch]
        set_device(caffe, None)
        ref = cpu.forward(batch)
        set_device(caffe, gpu)
        out = dev.forward(batch)
        top1 = ref.probs.argmax(axis=1)[:, None]
        cams_ref = class_activation_maps(ref.features, fc, top1)
        cams_gpu = class_activation_maps(out.features, fc, top1)
        results["compare"] = {
            "images": len(batch),
            "prob_max_abs": float(np.abs(out.probs - ref.probs).max()),
            "prob_rel": rel_error(out.probs, ref.probs),
            "cam_rel": rel_error(cams_gpu, cams_ref),
            "feature_rel": rel_error(out.features, ref.features),
            "top1_agree": int((out.probs.argmax(axis=1) == top1[:, 0]).sum()),
            "max_prob": float(ref.probs.max()),
        }
        cmp_ = results["compare"]
        ok = bool(cmp_["prob_rel"] <= args.prob_tol and cmp_["cam_rel"] <= args.cam_tol
                  and np.isfinite([cmp_["prob_rel"], cmp_["cam_rel"]]).all())

    fork = fork_layers_check(gpu, args.verbose)
    results["fork_layers"] = fork
    if "error" in fork or not fork.get("finite") or fork.get("max_abs", 1.0) > args.fork_tol:
        ok = False

    runs = []
    if dev is not None:
        runs.append((f"GPU {gpu}", dev, gpu))
    if dev is None or not args.no_cpu_timing:
        runs.append(("CPU", cpu, None))
    for label, backend, device_id in runs:
        set_device(caffe, device_id)
        for b in args.batch_sizes:
            seconds = time_forward(backend, images[:b], args.min_time, args.min_repeats)
            results["timings"].append({"device": label, "batch": b,
                                       "ms_per_batch": seconds * 1e3,
                                       "ms_per_image": seconds * 1e3 / b,
                                       "images_per_s": b / seconds})
            print(f"gpu_check: {label} batch {b}: {seconds * 1e3 / b:.2f} ms/image",
                  file=sys.stderr)

    print(report(results, args, ok))
    if args.json:
        results["pass"] = ok
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if ok else 1


def report(results: dict, args: argparse.Namespace, ok: bool) -> str:
    gpu = results["gpu"]
    title = "CPU only (--cpu-only)" if gpu is None else f"GPU {gpu}: {results['device']}"
    lines = [f"## cam-caffe GPU check — {title}", "",
             f"- model: `{Path(results['prototxt']).name}`, random weights (seed {args.seed})",
             f"- pycaffe: `{results['caffe']}`"]
    if gpu is None:
        lines.append(f"- CPU: {results['device']}")
    lines.append("")
    if "compare" in results:
        c = results["compare"]
        lines += ["| GPU vs CPU | value | tolerance |", "|---|---|---|",
                  f"| probabilities, max relative error | {c['prob_rel']:.2e} "
                  f"| {args.prob_tol:g} |",
                  f"| probabilities, max abs difference | {c['prob_max_abs']:.2e} | |",
                  f"| CAMs of the top-1 class, max relative error | {c['cam_rel']:.2e} "
                  f"| {args.cam_tol:g} |",
                  f"| CAM feature blob, max relative error | {c['feature_rel']:.2e} | |",
                  f"| same top-1 class | {c['top1_agree']}/{c['images']} | |",
                  f"| result | {'PASS' if ok else 'FAIL'} | |", ""]
    else:
        lines += ["GPU vs CPU comparison: not run (--cpu-only).", ""]
    fork = results.get("fork_layers", {})
    layers = "MaxUnPool, ReLU6, HardSwish, HardSigmoid, Upsample, PixelShuffle"
    if "error" in fork:
        lines += [f"Fork layers ({layers}): FAILED: {fork['error']}", ""]
    elif gpu is None:
        lines += [f"Fork layers ({layers}): ran on the CPU, output {tuple(fork['shape'])}.", ""]
    else:
        lines += [f"Fork layers ({layers}) in GPU mode (CPU fallback): max abs difference "
                  f"{fork['max_abs']:.2e} (tolerance {args.fork_tol:g}).", ""]
    lines += ["| device | batch | ms/batch | ms/image | images/s |", "|---|---:|---:|---:|---:|"]
    for t in results["timings"]:
        lines.append(f"| {t['device']} | {t['batch']} | {t['ms_per_batch']:.1f} | "
                     f"{t['ms_per_image']:.2f} | {t['images_per_s']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
