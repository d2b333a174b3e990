"""Shared helpers of the benchmarks: the model, test images, timing, tables, machine facts.

Everything the benchmarks write goes under ``$CAM_CAFFE_BENCH_DIR`` (default
``$TMPDIR/cam-caffe-bench``), never into the project.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
# tests/synthetic.py (random weights, made-up records) and tests/flops.py: test
# helpers the benchmarks share, not part of the installed package
sys.path.append(str(ROOT / "tests"))
PROTOTXT = ROOT / "prototxt" / "deploy_googlenetCAM.prototxt"
SHARED_IMAGES = ROOT.parent / "shared" / "fixtures" / "googlenet_cam"
WORK = Path(os.environ.get("CAM_CAFFE_BENCH_DIR")
            or Path(tempfile.gettempdir()) / "cam-caffe-bench")
PYTHON = sys.executable
CLI = str(Path(sys.executable).with_name("cam-caffe"))
PHOTO_SIZE = (375, 500)          # (H, W): a typical ImageNet photo
BACKENDS = ("opencv", "caffe", "onnxruntime")


def googlenet_weights(seed: int = 0) -> Path:
    """A GoogLeNet-CAM caffemodel with He-random weights, made once under WORK."""
    path = WORK / f"googlenet_cam_random_{seed}.caffemodel"
    if not path.is_file():
        from synthetic import random_weights, save_caffemodel

        from cam_caffe.netdef import load_netdef
        netdef = load_netdef(PROTOTXT)
        save_caffemodel(netdef, random_weights(netdef, seed), path)
    return path


def source_images() -> list[np.ndarray]:
    """The official demo images from ../shared (BGR), or smooth random pictures."""
    import cv2
    paths = sorted(SHARED_IMAGES.glob("*.jpg"))
    if paths:
        return [cv2.imread(str(p)) for p in paths]
    rng = np.random.default_rng(0)
    return [cv2.resize(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), (400, 300),
                       interpolation=cv2.INTER_CUBIC) for _ in range(3)]


def make_images(folder: Path, count: int, size: tuple[int, int] = PHOTO_SIZE,
                quality: int = 90) -> list[Path]:
    """``count`` JPEGs of ``size`` (H, W) in ``folder``: random crops/flips of the sources."""
    import cv2
    folder.mkdir(parents=True, exist_ok=True)
    sources = source_images()
    rng = np.random.default_rng(1)
    paths = []
    for i in range(count):
        image = sources[i % len(sources)]
        h, w = image.shape[:2]
        ch, cw = int(h * rng.uniform(0.7, 1.0)), int(w * rng.uniform(0.7, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = image[y:y + ch, x:x + cw]
        if i % 2:
            crop = crop[:, ::-1]
        picture = cv2.resize(crop, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        path = folder / f"img{i:05d}.jpg"
        cv2.imwrite(str(path), picture, [cv2.IMWRITE_JPEG_QUALITY, quality])
        paths.append(path)
    return paths


def times(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeat`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    result = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        result.append(time.perf_counter() - start)
    return result


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def run_timed(command: Sequence[str], env: dict[str, str] | None = None,
              check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``command``, return (wall seconds including process start, the result)."""
    start = time.perf_counter()
    result = subprocess.run(list(command), capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed ({result.returncode}):\n"
                           f"{result.stderr[-2000:]}")
    return elapsed, result


def run_json(command: Sequence[str], env: dict[str, str] | None = None) -> object:
    """Run a child that prints one JSON document as its last stdout line; parse it."""
    _, result = run_timed(command, env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def original_script_seconds(prototxt: Path, weights: Path, paths: Sequence[Path],
                            out_dir: Path, extra: Sequence[str] = ()) -> list[float]:
    """The original script's way: one ``original_script.py`` process per image; the
    seconds of each (process start included)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [run_timed([PYTHON, str(BENCH / "original_script.py"), str(prototxt), str(weights),
                       str(p), str(out_dir / f"{p.stem}.png"), *extra])[0] for p in paths]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; floats as given (format them before)."""
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def load_average() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """Date, nproc, CPU, load and library versions: the line under every table title."""
    import cv2
    versions = [f"numpy {np.__version__}", f"OpenCV {cv2.__version__}"]
    try:
        import onnxruntime
        versions.append(f"onnxruntime {onnxruntime.__version__}")
    except ImportError:
        pass
    blas_env = {k: v for k, v in os.environ.items()
                if k.startswith(("OPENBLAS", "OMP_", "MKL_"))}
    return (f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, nproc={os.cpu_count()}"
            f" ({cpu_model()}), load {load_average():.2f}, Python {platform.python_version()}, "
            + ", ".join(versions) + (f", env {blas_env}" if blas_env else ""))


def title(text: str) -> None:
    """Print a table title with the machine line under it."""
    print(f"\n### {text}\n\n_{machine()}_\n", flush=True)


def compile_package() -> None:
    """Byte-compile cam_caffe, as ``pip install`` (not ``-e``) does: process start-up is
    measured, and PYTHONDONTWRITEBYTECODE (set on the project's machine) would
    otherwise recompile the package in every cam-caffe process."""
    import compileall
    compileall.compile_dir(ROOT / "cam_caffe", quiet=1)


def wait_for_quiet(max_load: float | None = None, timeout_s: float = 3600) -> None:
    """Wait until the 1-minute load average is under ``max_load`` (env CAM_CAFFE_BENCH_MAX_LOAD;
    unset: do not wait), so that other jobs do not share the cores with the benchmark."""
    if max_load is None:
        value = os.environ.get("CAM_CAFFE_BENCH_MAX_LOAD")
        if not value:
            return
        max_load = float(value)
    deadline = time.monotonic() + timeout_s
    while load_average() >= max_load:
        if time.monotonic() > deadline:
            print(f"(load still {load_average():.2f} after {timeout_s:.0f} s; measuring anyway)",
                  file=sys.stderr)
            return
        print(f"waiting for load < {max_load} (now {load_average():.2f})", file=sys.stderr,
              flush=True)
        time.sleep(30)


def available_backends(weights: Path | None = None, prototxt: Path = PROTOTXT) -> list[str]:
    """The backends that load the net (default GoogLeNet-CAM) here (a child tries each)."""
    weights = weights or googlenet_weights()
    found = []
    for name in BACKENDS:
        code = ("import sys; from cam_caffe import CAMNet; "
                f"CAMNet({str(prototxt)!r}, {str(weights)!r}, backend={name!r})")
        result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True)
        if result.returncode == 0:
            found.append(name)
        else:
            lines = (result.stderr.strip().splitlines() or ["?"])
            print(f"(backend {name} skipped: {lines[-1]})", file=sys.stderr)
    return found


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"
