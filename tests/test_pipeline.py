"""Worker processes (``--workers N``, pipeline.py) and the forward's threads (``--threads``).

- The same outputs (byte for byte, PNGs pixel for pixel: ISA-L's deflate may
  encode the same pixels differently from one call to the next) and the same
  JSON lines in the same order as a run in one process; a bad image in a worker (undecodable, over --max-pixels or
  over the memory budget, which the workers share) is reported for that image.
- Ctrl-C and SIGTERM stop the workers with the run: no worker left, no temporary,
  each image's files all written or none; a killed parent's workers exit too.
- Memory stays flat: every process's peak over 2,000 images within 1.1× of 20.
- ``--threads`` reaches each backend's own thread setting.
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
from conftest import ROOT, output_files, require_pycaffe

from cam_caffe import CAMNet
from cam_caffe.backends import cpu_threads, usable_cores
from cam_caffe.batch import Options, image_cost
from cam_caffe.budget import Postponed
from cam_caffe.commands import main
from cam_caffe.pipeline import ProcessPool, SharedBudget, default_workers

DEMO = ROOT / "models" / "demo"
DEMO_NET = [DEMO / "deploy.prototxt", DEMO / "demo.caffemodel"]
COMMAND = [sys.executable, "-m", "cam_caffe", "--model", "demo"]


def write_images(folder: Path, count: int, size: tuple[int, int] = (48, 64)) -> list[Path]:
    """``count`` smooth random colour images (PNG), in two sub-folders."""
    rng = np.random.default_rng(count)
    paths = []
    for i in range(count):
        path = folder / f"part{i % 2}" / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.resize(rng.integers(0, 256, (4, 5, 3), np.uint8),
                                          (size[1], size[0]), interpolation=cv2.INTER_CUBIC))
        paths.append(path)
    return paths


def tree(folder: Path) -> dict[str, bytes]:
    """Each output file's bytes; a PNG's decoded pixels and shape instead."""
    def content(path: Path) -> bytes:
        if path.suffix != ".png":
            return path.read_bytes()
        pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        return repr(pixels.shape).encode() + pixels.tobytes()
    return {str(p.relative_to(folder)): content(p) for p in output_files(folder)}


def test_workers_write_the_same_bytes_and_lines_in_order(tmp_path, capsys, monkeypatch):
    images = tmp_path / "in"
    paths = write_images(images, 45)
    paths[7].write_bytes(b"not an image")                    # fails in a worker: decode
    cv2.imwrite(str(paths[30]), np.zeros((300, 400, 3), np.uint8))   # over --max-pixels
    cv2.imwrite(str(paths[41]), np.zeros((240, 400, 3), np.uint8))   # over the memory budget
    out = tmp_path / "out"
    args = [str(images), "--output-dir", str(out), "--save", "overlay,heatmap,npy,json",
            "--top-k", "2", "--boxes", "dt", "--montage", "--jsonl", "--batch-size", "8",
            "--max-pixels", "100000", "--backend", "opencv",
            *["--prototxt", str(DEMO_NET[0]), "--weights", str(DEMO_NET[1])]]
    # room for the two chunks in flight (workers reserve it), not for the large image
    cost = image_cost(64, 48, Options(save=("overlay", "heatmap", "npy", "json"), top_k=2,
                                      boxes="dt"))
    monkeypatch.setenv("CAM_CAFFE_MEMORY", str(20 * cost))
    runs = {}
    for workers in (0, 2):
        code = main([*args, "--workers", str(workers)])
        captured = capsys.readouterr()
        errors, summary = captured.err.rsplit("cam-caffe: 45 images: ", 1)  # its time differs
        assert summary.startswith("42 done, 3 failed, 0 skipped in "), summary
        runs[workers] = (code, captured.out, errors, tree(out))
        os.rename(out, tmp_path / f"out-{workers}")
    code, lines, err, files = runs[0]
    assert code == 1
    bad = (paths[7], paths[30], paths[41])
    assert [json.loads(line)["image"] for line in lines.splitlines()] == [
        str(p) for p in sorted(paths) if p not in bad]
    assert f"{paths[7]}: not an image" in err and f"{paths[30]}: 400x300 pixels" in err
    assert f"{paths[41]}: 400x240 pixels would need about" in err
    assert len(files) == 42 * 8                               # 2 maps: 2 overlays, 2 heatmaps…
    assert runs[2] == runs[0]                                 # same exit, lines, errors, files


def test_a_call_sends_the_net_by_reference_and_the_budget_is_shared():
    net = CAMNet(*DEMO_NET, backend="opencv")
    budget = SharedBudget(1000)
    pool = ProcessPool(net, 1, budget)
    try:
        assert pool.submit(budget.reserve, 300, Path("a"), 10, 30).result() == 300
        assert budget.used == 300                        # a worker's reservation, seen here
        with pytest.raises(Postponed):
            pool.submit(budget.reserve, 800, Path("b"), 20, 40).result()
        budget.release(300)
        assert pool.submit(getattr, budget, "used").result() == 0
        image = pool.submit(net.load, ROOT / "images" / "demo_star_4.png").result()
        assert np.array_equal(image, net.load(ROOT / "images" / "demo_star_4.png"))
        # the worker's copy has the net's settings, not its backend
        assert pool.submit(getattr, net, "max_pixels").result() == net.max_pixels
        assert pool.submit(getattr, net, "backend").result() is None
        assert pool.submit(os.getpid).result() != os.getpid()
        assert pool.submit(cv2.getNumThreads).result() == 1      # a worker per core
    finally:
        pool.shutdown()


def test_workers_start_with_the_signals_blocked():
    """Each worker has SIGINT and SIGTERM blocked from its first instruction (read
    from /proc as soon as the pool exists, while a worker may still be importing):
    a Ctrl-C to the process group never interrupts one into a traceback."""
    pool = ProcessPool(CAMNet(*DEMO_NET, backend="opencv"), 2)
    try:
        for pid in pool._pool._processes:
            status = Path(f"/proc/{pid}/status").read_text()
            blocked = int(next(line for line in status.splitlines()
                               if line.startswith("SigBlk:")).split()[1], 16)
            for signum in (signal.SIGINT, signal.SIGTERM):
                assert blocked >> (signum - 1) & 1, f"worker {pid}: {signum.name} not blocked"
        assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])   # not here
    finally:
        pool.shutdown()


def test_default_workers_are_the_cores_the_forward_leaves():
    cores = usable_cores()
    assert default_workers(0, None) == cores - 1                  # a GPU forward
    assert default_workers(None, None) == max(0, cores - cpu_threads())
    assert default_workers(None, 1) == cores - 1
    assert default_workers(None, cores + 4) == 0


def start(images: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*COMMAND, str(images), "--output-dir", str(out), "--save",
                             "overlay,heatmap,json", "--jsonl", "--batch-size", "4",
                             "--workers", "2", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            start_new_session=True)


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid``."""
    found = set()
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found.update(int(c) for c in (task / "children").read_text().split())
    except FileNotFoundError:                   # a thread, or the process, ended meanwhile
        pass
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_gone(pids: set[int], timeout: float = 10) -> set[int]:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return {p for p in pids if alive(p)}


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("many")
    write_images(folder, 160, (240, 320))
    return folder


@pytest.mark.parametrize(("signum", "code", "word", "whole_group"), [
    (signal.SIGINT, 130, "interrupted", True),    # Ctrl-C in a terminal: the whole group
    (signal.SIGTERM, 143, "terminated", False),   # a scheduler's SIGTERM to cam-caffe alone
    (signal.SIGTERM, 143, "terminated", True),
])
def test_signals_stop_the_workers_and_leave_nothing_partial(many, tmp_path, signum, code,
                                                            word, whole_group):
    out = tmp_path / "out"
    child = start(many, out)
    lines = [child.stdout.readline() for _ in range(12)]
    workers = children(child.pid)
    assert len(workers) >= 2                                   # the two workers
    if whole_group:
        os.killpg(child.pid, signum)
    else:
        child.send_signal(signum)
    rest = child.stdout.read()          # (communicate() would skip what readline buffered)
    err = child.stderr.read()
    child.wait(timeout=120)
    assert child.returncode == code, err
    assert err == f"cam-caffe: {word}\n".encode()
    assert not wait_gone(workers), "a worker outlived the run"
    lines += rest.splitlines(keepends=True)
    assert all(line.endswith(b"\n") for line in lines), "a line was cut short"
    printed = {Path(json.loads(line)["image"]).stem for line in lines}
    outputs = {}
    assert not list(out.rglob("*.tmp"))            # no temporary left
    for path in output_files(out):
        outputs.setdefault(path.name.split(".")[0], set()).add(path.name.split(".", 1)[1])
    assert len(outputs) < 160                                  # it stopped early
    assert all(kinds == {"cam.png", "heatmap.png", "json"} for kinds in outputs.values())
    assert printed == set(outputs)                   # a line for every image with files


def test_workers_exit_when_the_parent_is_killed(many, tmp_path):
    child = start(many, tmp_path / "out")
    child.stdout.readline()
    workers = children(child.pid)
    child.kill()
    child.wait()
    assert len(workers) >= 2 and not wait_gone(workers)


def peak_memory(images: Path, out: Path) -> dict[int, tuple[int, str]]:
    """Each of the run's processes' peak resident memory (VmHWM, read from /proc while
    it runs; the last reading, as a child's exec starts a new count), in KiB, and
    its command, by pid."""
    child = subprocess.Popen([*COMMAND, str(images), "--output-dir", str(out), "-q",
                              "--workers", "2"], cwd=ROOT)
    peaks: dict[int, tuple[int, str]] = {}
    while child.poll() is None:
        for pid in {child.pid} | children(child.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except (FileNotFoundError, ProcessLookupError):
                continue
            peak = [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")]
            if command and peak:                                # (not once it has exited)
                peaks[pid] = (peak[0], command.decode()[-50:])
        time.sleep(0.02)
    assert child.returncode == 0
    assert len(peaks) >= 3, peaks                              # the run and two workers
    return peaks


def test_memory_stays_flat_over_2000_images(tmp_path):
    images = tmp_path / "in"
    paths = write_images(images, 2000, (64, 64))
    small = tmp_path / "small"
    for path in paths[:20]:
        target = small / path.relative_to(images)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    few = peak_memory(small, tmp_path / "out-20")
    lots = peak_memory(images, tmp_path / "out-2000")
    assert len(list((tmp_path / "out-2000").rglob("*.cam.png"))) == 2000
    total = {n: sum(kib for kib, _ in peaks.values()) for n, peaks in ((20, few), (2000, lots))}
    assert total[2000] <= 1.1 * total[20], (lots, few)


@pytest.mark.parametrize("backend", ["opencv", "onnxruntime", "caffe"])
def test_threads_reach_the_backend(backend):
    if backend == "caffe":
        require_pycaffe()
    net = CAMNet(*DEMO_NET, backend=backend, threads=1)
    if backend == "opencv":
        assert cv2.getNumThreads() == 1
    elif backend == "onnxruntime":
        options = net.backend.session.get_session_options()
        assert options.intra_op_num_threads == 1
    else:
        import ctypes
        openblas = ctypes.CDLL("libopenblas.so.0", mode=os.RTLD_NOLOAD)
        assert openblas.openblas_get_num_threads() == 1
    cv2.setNumThreads(usable_cores())


def test_workers_that_cannot_start_leave_the_run_to_threads(many):
    """Where worker processes cannot start (here: files limited to 200 bytes, so no
    shared-memory semaphore), one line says so and threads give the same lines; a
    run of one chunk, with nothing to overlap, starts no workers at all."""
    import resource

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))
    command = [*COMMAND, str(many), "--jsonl", "-q", "--batch-size", "40"]
    threads = subprocess.run([*command, "--workers", "0"], capture_output=True, cwd=ROOT)
    limited = subprocess.run([*command, "--workers", "2"], capture_output=True, cwd=ROOT,
                             preexec_fn=small_files)
    assert limited.returncode == threads.returncode == 0, limited.stderr
    assert limited.stdout == threads.stdout and len(threads.stdout.splitlines()) == 160
    assert limited.stderr == (b"cam-caffe: cannot start worker processes (OSError: [Errno 27] "
                              b"File too large); using threads instead\n")
    one_chunk = subprocess.run([*command, "--batch-size", "200", "--workers", "2"],
                               capture_output=True, cwd=ROOT, preexec_fn=small_files)
    assert one_chunk.returncode == 0 and one_chunk.stderr == b""
    assert one_chunk.stdout == threads.stdout
