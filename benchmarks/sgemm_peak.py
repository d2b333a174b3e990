"""Measured single-precision GEMM peak of this machine, the yardstick of bench_forward.

Two BLAS libraries matter here: NumPy's own OpenBLAS (scipy-openblas, what
``np.matmul`` uses) and the system's ``libopenblas.so.0`` (what pycaffe links).
Each is measured in a child process, with the environment as it is and with
OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE removed (they can make OpenBLAS pick a
slower kernel). "Peak" is the highest GFLOP/s of all.

    python benchmarks/sgemm_peak.py [--sizes 1024,2048,4096] [--repeat 5]
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import sys

import numpy as np
from common import PYTHON, median, run_json, table, times, title

SYSTEM_OPENBLAS = "libopenblas.so.0"
TUNING_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def numpy_corename() -> str:
    """The kernel NumPy's OpenBLAS chose (e.g. SkylakeX), asked through ctypes."""
    import glob
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs",
                                  "libscipy_openblas*"))
    for path in libs:
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename"):
            if hasattr(lib, name):
                fn = getattr(lib, name)
                fn.restype = ctypes.c_char_p
                return fn().decode()
    return "?"


def numpy_gflops(n: int, repeat: int) -> float:
    """GFLOP/s of an n×n×n float32 ``np.matmul``, the median of ``repeat`` runs."""
    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), np.float32), rng.random((n, n), np.float32)
    out = np.empty((n, n), np.float32)
    seconds = times(lambda: np.matmul(a, b, out=out), repeat=repeat, warmup=1)
    return 2 * n ** 3 / median(seconds) / 1e9


def system_blas() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("openblas") or SYSTEM_OPENBLAS)


def system_gflops(n: int, repeat: int) -> float:
    """GFLOP/s of cblas_sgemm from the system OpenBLAS (pycaffe's), median of ``repeat``."""
    lib = system_blas()
    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), np.float32), rng.random((n, n), np.float32)
    c = np.zeros((n, n), np.float32)
    ptr = ctypes.POINTER(ctypes.c_float)
    lib.cblas_sgemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ptr, ctypes.c_int, ptr,
                                                     ctypes.c_int, ctypes.c_float, ptr,
                                                     ctypes.c_int]

    def call() -> None:   # row-major (101), no transposes (111)
        lib.cblas_sgemm(101, 111, 111, n, n, n, 1.0, a.ctypes.data_as(ptr), n,
                        b.ctypes.data_as(ptr), n, 0.0, c.ctypes.data_as(ptr), n)
    return 2 * n ** 3 / median(times(call, repeat=repeat, warmup=1)) / 1e9


def system_corename() -> str:
    lib = system_blas()
    lib.openblas_get_corename.restype = ctypes.c_char_p
    lib.openblas_get_config.restype = ctypes.c_char_p
    return f"{lib.openblas_get_corename().decode()}, {lib.openblas_get_num_threads()} threads"


def child(library: str, sizes: list[int], repeat: int) -> dict:
    """Measure in this process (the parent sets the environment)."""
    if library == "numpy":
        return {"core": numpy_corename(),
                "gflops": {n: numpy_gflops(n, repeat) for n in sizes}}
    return {"core": system_corename(), "gflops": {n: system_gflops(n, repeat) for n in sizes}}


def measure(sizes: tuple[int, ...] = (1024, 2048, 4096), repeat: int = 5) -> list[dict]:
    """Every (library, environment) case, each in a fresh child process."""
    cleaned = {k: v for k, v in os.environ.items() if k not in TUNING_VARIABLES}
    set_here = {k: os.environ[k] for k in TUNING_VARIABLES if k in os.environ}
    cases = []
    for library in ("numpy", "system"):
        for label, env in (("as is" + (f" {set_here}" if set_here else " (none set)"),
                            dict(os.environ)),
                           ("OPENBLAS_CORETYPE/L2_SIZE unset", cleaned)):
            command = [PYTHON, __file__, "--child", library, "--sizes",
                       ",".join(map(str, sizes)), "--repeat", str(repeat)]
            result = run_json(command, env)
            result.update(library=library, env=label)
            cases.append(result)
    return cases


def peak_gflops(cases: list[dict]) -> float:
    """The highest GFLOP/s measured in any case: the machine's SGEMM peak."""
    return max(float(v) for case in cases for v in case["gflops"].values())


def report(cases: list[dict]) -> float:
    """Print the table; return the peak."""
    sizes = list(cases[0]["gflops"])
    rows = [[("NumPy matmul (scipy-openblas)" if c["library"] == "numpy"
              else "system libopenblas.so.0 cblas_sgemm (pycaffe's)"), c["env"], c["core"]]
            + [f"{c['gflops'][n]:.1f}" for n in sizes] for c in cases]
    title("SGEMM peak (float32, GFLOP/s, median of runs)")
    print(table(["library", "OPENBLAS_* tuning", "kernel"] + [f"n={n}" for n in sizes], rows))
    peak = peak_gflops(cases)
    print(f"\nMeasured SGEMM peak: **{peak:.1f} GFLOP/s** (highest of the rows above).")
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,2048,4096")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--child", choices=("numpy", "system"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.child:
        print(json.dumps(child(args.child, sizes, args.repeat)))
        return
    report(measure(tuple(sizes), args.repeat))


if __name__ == "__main__":
    sys.exit(main())
