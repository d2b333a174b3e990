"""Killed and interrupted runs (README, "Limits and failures"), as ``make`` and
``rsync`` treat interrupted work: nothing half-done is mistaken for done.

- Ctrl-C or SIGTERM at any moment: one line, exit 130 or 143, no traceback, no
  temporary file left, and a JSON line for every image whose outputs exist;
  a second signal during that final bookkeeping changes nothing.
- The resumed run (--skip-existing) prints a line for each skipped image, so the
  two runs together cover every image exactly once.
- A run killed outright (SIGKILL) leaves temporaries; the next run removes those
  it can prove abandoned, and no others.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT

from cam_caffe import output
from cam_caffe.errors import Terminated
from cam_caffe.signals import deferred

COMMAND = [sys.executable, "-m", "cam_caffe", "--model", "demo"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """120 images, enough for a run of a second or two to be stopped midway."""
    folder = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    for i in range(120):
        blobs = rng.integers(0, 256, (6, 8, 3), np.uint8)
        cv2.imwrite(str(folder / f"{i:03d}.jpg"), cv2.resize(blobs, (320, 240)))
    return folder


def start(images, out, *extra):
    return subprocess.Popen([*COMMAND, str(images), "--output-dir", str(out), "--save",
                             "overlay,json", "--jsonl", "--batch-size", "8", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)


def stop_after(child, lines: int, signals: list[int], gap: float = 0.0) -> tuple[list, str]:
    """Send ``signals`` once ``lines`` JSON lines were printed; return all lines, stderr."""
    seen = []
    while len(seen) < lines:
        line = child.stdout.readline()
        if not line:
            break
        seen.append(line)
    for signum in signals:
        child.send_signal(signum)
        time.sleep(gap)
    rest = child.stdout.read()        # (communicate() would skip what readline buffered)
    err = child.stderr.read()
    child.wait(timeout=120)
    return seen + rest.splitlines(keepends=True), err.decode()


def records(lines) -> list[dict]:
    assert all(line.endswith(b"\n") for line in lines), "a line was cut short"
    return [json.loads(line) for line in lines]


def complete(out: Path) -> set[str]:
    """Images whose every output exists (overlay and JSON)."""
    return {str(p.with_suffix("")) for p in out.glob("*.json")
            if p.with_name(p.stem + ".cam.png").is_file()}


@pytest.mark.parametrize(("signals", "code", "word"), [
    ([signal.SIGINT], 130, "interrupted"),
    ([signal.SIGTERM], 143, "terminated"),
    ([signal.SIGINT, signal.SIGINT, signal.SIGTERM], 130, "interrupted"),   # impatient
])
def test_interrupted_batch_reports_what_it_did(images, tmp_path, signals, code, word):
    out = tmp_path / "out"
    child = start(images, out)
    lines, err = stop_after(child, 20, signals, gap=0.01)
    assert child.returncode == code, err
    assert err == f"cam-caffe: {word}\n"
    done = records(lines)
    assert 20 <= len(done) < 120
    # every image with outputs has its line, and no line lacks its outputs
    printed = {str(Path(r["files"]["json"]).with_suffix("")) for r in done}
    assert printed == complete(out)
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    # the resumed run: a line for every image, exactly once, the skipped marked so
    resumed = subprocess.run([*COMMAND, str(images), "--output-dir", str(out), "--save",
                              "overlay,json", "--jsonl", "--skip-existing"],
                             capture_output=True, cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    again = records(resumed.stdout.splitlines(keepends=True))
    assert sorted(r["image"] for r in again) == sorted(str(p) for p in images.iterdir())
    skipped = [r for r in again if r.get("skipped")]
    assert {r["image"] for r in skipped} == {r["image"] for r in done}
    # the skipped lines are the saved records: same maps as the interrupted run printed
    first = {r["image"]: r for r in done}
    assert all(r["maps"] == first[r["image"]]["maps"] for r in skipped)


def catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a SIGTERM handler: cam-caffe's first step."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:                 # already gone
        return False
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.parametrize("delay", [0, 0.05, 0.2, 0.6])
def test_ctrl_c_at_any_moment(images, tmp_path, delay):
    """From cam-caffe's first step on (the interpreter's own start-up is Python's),
    a Ctrl-C is one line and exit 130, or the run was already done."""
    out = tmp_path / "out"
    child = start(images, out)
    while child.poll() is None and not catches_sigterm(child.pid):
        time.sleep(0.001)
    time.sleep(delay)
    child.send_signal(signal.SIGINT)
    lines, err = child.communicate(timeout=120)
    assert child.returncode in (0, 130), err
    assert "Traceback" not in err.decode() and "not installed" not in err.decode()
    if child.returncode == 130:
        assert err == b"cam-caffe: interrupted\n"
        printed = {str(Path(r["files"]["json"]).with_suffix(""))
                   for r in records(lines.splitlines(keepends=True))}
        assert printed == (complete(out) if out.exists() else set())


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_next_run_removes_abandoned_temporaries_only(tmp_path):
    """Temporaries of a dead process of this host, or older than an hour, go; those
    of a live process, of another host (recent), and files not named like ours stay."""
    image = ROOT / "images" / "demo_circle_0.png"
    out = tmp_path / "out"
    assert subprocess.run([*COMMAND, str(image), "--output-dir", str(out)], cwd=ROOT).returncode == 0
    host = output._HOST
    other = "0123abcd" if host != "0123abcd" else "fedc4321"
    names = {
        f".demo_circle_0.cam.png.abcd1234.{host}-{dead_pid()}.tmp": False,     # dead: removed
        f".x.png.abcd1234.{host}-{os.getpid()}.tmp": True,                      # alive: kept
        f".x.png.efgh5678.{other}-{dead_pid()}.tmp": True,                      # other host
        f".y.png.ijkl9012.{other}-1.tmp": False,                                # … but old
        ".notes.tmp": True,                                                     # not ours
        f"kept.abcd1234.{host}-{dead_pid()}.tmp": True,                         # no dot first
    }
    for name in names:
        (out / name).write_bytes(b"partial")
    old = time.time() - 2 * 3600
    os.utime(out / f".y.png.ijkl9012.{other}-1.tmp", (old, old))
    resumed = subprocess.run([*COMMAND, str(image), "--output-dir", str(out), "--skip-existing"],
                             capture_output=True, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.startswith(b"cam-caffe: 1 image: 0 done, 0 failed, 1 skipped in ")
    assert resumed.stderr.count(b"\n") == 1                    # the summary, nothing else
    for name, kept in names.items():
        assert (out / name).exists() == kept, name


def test_killed_run_leaves_nothing_that_looks_done(images, tmp_path):
    """SIGKILL mid-batch: every output under its final name is complete (decodes),
    and the next run removes the killed run's temporaries."""
    out = tmp_path / "out"
    child = start(images, out)
    stop_after(child, 30, [signal.SIGKILL])
    assert child.returncode == -signal.SIGKILL
    for path in out.glob("*.cam.png"):
        assert cv2.imread(str(path)) is not None, path
    for path in out.glob("*.json"):
        json.loads(path.read_text())
    resumed = subprocess.run([*COMMAND, str(images), "--output-dir", str(out), "--save",
                              "overlay,json", "--skip-existing", "-q"], cwd=ROOT, timeout=300)
    assert resumed.returncode == 0
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    assert len(list(out.glob("*.json"))) == 120


@pytest.mark.parametrize(("signum", "raised"), [(signal.SIGINT, KeyboardInterrupt),
                                                (signal.SIGTERM, Terminated)])
def test_deferred_finishes_the_block_then_raises_the_signal(signum, raised):
    """What the commands parse and import under: a signal during the block (an import)
    does not cut it short, and is raised right after it."""
    steps = []

    def block() -> None:
        with deferred():
            os.kill(os.getpid(), signum)
            steps.append("after the signal")
        steps.append("after the block")
    with pytest.raises(raised):
        block()
    assert steps == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler     # restored

