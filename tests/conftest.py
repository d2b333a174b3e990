"""Shared fixtures and helpers: paths to the checkout (``ROOT``) and ../shared
(``SHARED``, :func:`shared`), the pycaffe rule, a private home, the command in a
child process (:func:`run_cli`, :func:`error_lines`), :func:`assert_rel_close`,
and the repository's scripts as modules (:func:`load_script`). Nets and images
the tests write are in ``nets.py``; the NumPy reference forward in ``numpy_net.py``.

``IN_CI`` is the one definition of "in CI" (``CI=true``, any case): tests that need
../shared skip only when it is absent, and fail instead in CI; tests that need
pycaffe never skip in CI. Every test runs with ``HOME`` and ``XDG_CACHE_HOME`` in a
temporary folder of the session, so no test reads or writes the user's caches
(ONNX models, downloads) or dotfiles; ``USER_CACHE`` is the user's real cache root,
for the few tests that read what scripts/install_pycaffe.sh left there.
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "fixtures"
GOOGLENET = ROOT / "prototxt" / "deploy_googlenetCAM.prototxt"    # the default model's
IN_CI = os.environ.get("CI", "").lower() == "true"
USER_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")

# Hypothesis tests: 60 examples each; scripts/mutation.sh runs fewer and does not shrink a
# failing example (a killed mutant would otherwise take long enough to count as a timeout).
settings.register_profile("cam-caffe", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("mutation", settings.get_profile("cam-caffe"), max_examples=12,
                          phases=[Phase.explicit, Phase.generate], database=None)  # no shrinking
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "cam-caffe"))


def restore_environment(saved: dict[str, str | None]) -> None:
    """Put back environment variables as ``saved`` (None: it was not set)."""
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session", autouse=True)
def private_home(tmp_path_factory):
    """HOME and XDG_CACHE_HOME in a session temporary folder (children inherit them)."""
    home = tmp_path_factory.mktemp("home")
    saved = {name: os.environ.get(name) for name in ("HOME", "XDG_CACHE_HOME")}
    os.environ["HOME"] = str(home)
    os.environ["XDG_CACHE_HOME"] = str(home / ".cache")
    yield home
    restore_environment(saved)


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@pytest.fixture(autouse=True)
def thread_environment():
    """Each test sees the session's thread variables: an embedded Dask cluster sets
    OMP_NUM_THREADS=1 in this process, which changes --workers' default later."""
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    yield
    restore_environment(saved)


def shared(*parts: str) -> Path:
    """A fixture file under ../shared/fixtures (skip, or fail in CI, when absent)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        if IN_CI or SHARED.exists():
            pytest.fail(f"fixture {path} is missing")
        pytest.skip(f"../shared fixtures are absent ({SHARED})")
    return path


def require_pycaffe():
    """Import pycaffe, or skip (outside CI only) when it is not installed."""
    try:
        from cam_caffe.backends.caffe import import_caffe
        return import_caffe()
    except Exception as e:  # BackendError when missing
        if IN_CI:
            pytest.fail(f"pycaffe must be installed in CI: {e}")
        pytest.skip(f"pycaffe not installed: {e}")


def output_files(folder: Path) -> list[Path]:
    """The files a run wrote under ``folder``, without the lists of what each process
    wrote (``.cam-caffe/``: one per process, so they differ between runs)."""
    from cam_caffe.output import OutputLedger
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and OutputLedger.DIRECTORY not in p.relative_to(folder).parts)


def run_cli(*args, preexec=None, wrapper=()) -> subprocess.CompletedProcess:
    """``python -m cam_caffe ARGS`` in a child (under ``wrapper``, e.g. a prlimit): it
    must print no traceback and not die by a signal."""
    child = subprocess.run([*wrapper, sys.executable, "-m", "cam_caffe", *map(str, args)],
                           capture_output=True, text=True, preexec_fn=preexec, timeout=300)
    assert "Traceback" not in child.stderr, child.stderr
    assert child.returncode >= 0, f"killed by signal {-child.returncode}: {child.stderr}"
    return child


def error_lines(child: subprocess.CompletedProcess) -> list[str]:
    """The child's one-line errors."""
    return [line for line in child.stderr.splitlines() if line.startswith("cam-caffe: error: ")]


def assert_rel_close(actual, expected, rel: float = 1e-4, what: str = "") -> None:
    """max |a − e| ≤ rel · max |e|: relative to the array's scale."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12)
    assert err <= rel, f"{what}{': ' * bool(what)}relative error {err:.3g} > {rel}"


TEST_SEED = 3          # demo data: training uses seed 1, the documented evaluation seed 2


def load_script(name: str):
    """scripts/NAME.py as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- terminals

def terminal_screen(data: bytes) -> list[str]:
    """The lines a terminal shows for ``data``: \\r returns to the start of the line,
    ESC[K erases to its end, other text overwrites what is under the cursor (trailing
    spaces, which look like nothing, are dropped)."""
    lines, line, col = [], [], 0
    for token in re.findall(rb"\x1b\[K|\r|\n|[^\r\n\x1b]+|\x1b", data):
        if token == b"\r":
            col = 0
        elif token == b"\n":
            lines.append("".join(line))
            line, col = [], 0
        elif token == b"\x1b[K":
            del line[col:]
        else:
            for ch in token.decode():
                line[col:col + 1] = [ch]
                col += 1
    return [text.rstrip(" ") for text in lines + (["".join(line)] if line else [])]


def read_terminal(main_fd: int) -> bytes:
    """What was written to a pseudo-terminal, read from its main side (then closed)
    until every writer has closed the other side."""
    data = b""
    while True:
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:                  # EIO: the writers closed the terminal
            break
        if not chunk:
            break
        data += chunk
    os.close(main_fd)
    return data


def draw_on_terminal(monkeypatch, draw, columns: int = 80) -> list[str]:
    """The screen after ``draw()`` ran with stderr on a pseudo-terminal of ``columns``."""
    main_fd, other_fd = pty.openpty()
    fcntl.ioctl(other_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    with open(other_fd, "w", encoding="utf-8") as terminal, monkeypatch.context() as patch:
        patch.setattr(sys, "stderr", terminal)
        draw()
    return [line for line in terminal_screen(read_terminal(main_fd)) if line]
