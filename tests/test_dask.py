"""Batches on Dask (--dask, run_batch(client=…)): real clusters on 127.0.0.1 give the
same files as one process, survive a killed worker, and report a lost scheduler.

Every cluster here is started by the test (an embedded LocalCluster, or `dask
scheduler` + `dask worker` processes) and shut down by a fixture finalizer.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import IN_CI, ROOT, output_files

try:
    import distributed  # the dask extra, which scripts/setup.sh installs
    import psutil  # a dependency of distributed
except ImportError:
    if IN_CI:
        raise
    pytest.skip("the dask extra is not installed", allow_module_level=True)

import contextlib

from cam_caffe.api import CAMNet
from cam_caffe.backends import cpu_threads, usable_cores
from cam_caffe.batch import Options, image_cost, run_batch
from cam_caffe.cluster import cached_net, dask_client, worker_budget
from cam_caffe.errors import BackendError, CamError, ModelError
from cam_caffe.inputs import collect
from cam_caffe.output import remove_temporaries, temporary_beside

DEMO = ROOT / "models" / "demo"
RUN = ["--model", "demo", "--save", "overlay,npy,json", "--top-k", "2", "--boxes", "paper",
       "--batch-size", "4", "--jsonl"]
BAD = {"garbage.png": b"not an image at all", "empty.jpg": b""}
ENV = dict(os.environ, DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="3s")


def cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cam_caffe", *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=180, **kwargs)


def make_folder(folder: Path, variants: int = 4, scale: int = 1) -> list[Path]:
    """The demo images in ``variants`` versions each (flips, rotations, sizes), in two
    sub-folders, plus a truncated PNG and the BAD files; returns the bad files."""
    sources = sorted((ROOT / "images").glob("*.png"))
    for i, source in enumerate(sources):
        image = cv2.imread(str(source))
        for v in range(variants):
            picture = [image, image[:, ::-1], np.rot90(image), image[::-1]][v % 4]
            size = (64 + 16 * (v % 3)) * scale
            picture = cv2.resize(np.ascontiguousarray(picture), (size, size + 8 * (i % 2)))
            sub = folder / f"set{v % 2}"
            sub.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(sub / f"{source.stem}_v{v}.png"), picture)
    bad = []
    for name, data in BAD.items():
        (folder / name).write_bytes(data)
        bad.append(folder / name)
    truncated = folder / "set1" / "truncated.png"
    truncated.write_bytes((ROOT / "images" / sources[0].name).read_bytes()[:200])
    return [*bad, truncated]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """(folder of 24 good and 3 bad images, the single-process run's output dir, its JSONL)."""
    root = tmp_path_factory.mktemp("mixed")
    folder = root / "images"
    bad = make_folder(folder)
    reference = root / "one-process"
    child = cli(folder, "--output-dir", reference, *RUN)
    assert child.returncode == 1, child.stderr
    return folder, bad, reference, jsonl(child.stdout)


def jsonl(text: str) -> dict[str, dict]:
    records = [json.loads(line) for line in text.splitlines()]
    by_image = {r["image"]: r for r in records}
    assert len(by_image) == len(records)              # each image reported once
    return by_image


def assert_same_outputs(reference: Path, out: Path) -> None:
    """The same files; .npy within 1e-6, the same classes and boxes in every JSON,
    overlays within one grey level; no temporary left."""
    names = sorted(p.relative_to(reference) for p in output_files(reference))
    assert names == sorted(p.relative_to(out) for p in output_files(out))
    assert len(names) == 24 * 5                      # 2 overlays, 2 .npy, 1 .json per image
    for name in names:
        a, b = reference / name, out / name
        if name.suffix == ".npy":
            np.testing.assert_allclose(np.load(b), np.load(a), rtol=0, atol=1e-6)
        elif name.suffix == ".json":
            assert_same_record(json.loads(a.read_text()), json.loads(b.read_text()),
                               reference, out)
        else:
            diff = cv2.absdiff(cv2.imread(str(a)), cv2.imread(str(b)))
            assert diff.max() <= 1, name


def assert_same_record(a: dict, b: dict, a_root: Path, b_root: Path) -> None:
    """The same record, each naming its files under its own output directory."""
    for key in ("image", "size", "model", "backend"):
        assert a[key] == b[key], key
    assert {kind: Path(path).relative_to(a_root) for kind, path in a["files"].items()} == \
        {kind: Path(path).relative_to(b_root) for kind, path in b["files"].items()}
    for field in ("top_k", "maps"):
        assert [m["class"] for m in a[field]] == [m["class"] for m in b[field]]
        np.testing.assert_allclose([m["prob"] for m in a[field]],
                                   [m["prob"] for m in b[field]], atol=2e-6)
    assert [m["boxes"] for m in a["maps"]] == [m["boxes"] for m in b["maps"]]


def assert_bad_reported(stderr: str, bad: list[Path]) -> None:
    for path in bad:
        assert sum(str(path) in line for line in stderr.splitlines()) == 1, (path, stderr)
    assert "Traceback" not in stderr


# --- an external cluster: `dask scheduler` + `dask worker` processes -------------------

class ExternalCluster:
    """A scheduler and ``workers`` worker processes (each with its nanny unless
    ``nanny`` is false) on 127.0.0.1, each in its own process group."""

    def __init__(self, folder: Path, workers: int = 2, nanny: bool = True,
                 env: dict[str, str] | None = None) -> None:
        self.file = folder / "scheduler.json"
        self.env = dict(ENV, **(env or {}))
        self.processes: list[subprocess.Popen] = []
        self.scheduler = self._start("scheduler", "--host", "127.0.0.1", "--port", "0",
                                     "--dashboard-address", "127.0.0.1:0",
                                     "--scheduler-file", self.file)
        deadline = time.monotonic() + 60
        while True:                      # the scheduler writes its file in several steps
            try:
                self.address = json.loads(self.file.read_text())["address"]
                break
            except (OSError, ValueError, KeyError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        for _ in range(workers):
            self._start("worker", "--scheduler-file", self.file, "--host", "127.0.0.1",
                        "--nthreads", "1", "--dashboard-address", "127.0.0.1:0",
                        "--death-timeout", "5",
                        "--nanny" if nanny else "--no-nanny")
        with distributed.Client(self.address, timeout=30) as client:
            client.wait_for_workers(workers, timeout=60)

    def _start(self, *args) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-m", "dask", *map(str, args)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True, env=self.env)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def external(tmp_path):
    """A fresh scheduler and two workers, for a test that breaks them."""
    cluster = ExternalCluster(tmp_path)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    """A scheduler and two workers that the tests here only use."""
    cluster = ExternalCluster(tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()


def listening(pids: list[int]) -> set[str]:
    """The addresses the processes ``pids`` and their children listen on."""
    found = set()
    for pid in pids:
        parent = psutil.Process(pid)
        for process in [parent, *parent.children(recursive=True)]:
            for c in process.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.add(c.laddr.ip)
    return found


# --- the same outputs as one process --------------------------------------------------

def test_local_cluster_cli_same_outputs_as_one_process(mixed, tmp_path):
    """`--dask local:2`: an embedded LocalCluster of 2 worker processes."""
    folder, bad, reference, records = mixed
    out = tmp_path / "out"
    child = cli(folder, "--output-dir", out, "--dask", "local:2", *RUN)
    assert child.returncode == 1, child.stderr                     # bad images, as today
    assert_bad_reported(child.stderr, bad)
    assert_same_outputs(reference, out)
    streamed = jsonl(child.stdout)
    assert streamed.keys() == records.keys()
    for image, record in records.items():
        assert_same_record(record, streamed[image], reference, out)


def test_scheduler_file_cli_same_outputs_and_one_net_per_worker(mixed, shared_cluster,
                                                                 tmp_path):
    folder, bad, reference, records = mixed
    with distributed.Client(shared_cluster.address) as client:
        client.run(cached_net.cache_clear)
        pids = client.run(os.getpid)
        out = tmp_path / "out"
        child = cli(folder, "--output-dir", out, "--dask", shared_cluster.file, *RUN)
        assert child.returncode == 1, child.stderr
        assert_bad_reported(child.stderr, bad)
        assert_same_outputs(reference, out)
        assert jsonl(child.stdout).keys() == records.keys()
        # Bad images never killed a worker; each built the net once for its chunks.
        assert client.run(os.getpid) == pids
        builds = client.run(lambda: tuple(cached_net.cache_info())[:2])    # hits, misses
        assert sum(info[0] + info[1] for info in builds.values()) == 7    # 27 images / 4
        assert [info[1] for info in builds.values()] == [1, 1]            # misses: builds


def test_api_client_same_outputs(mixed, shared_cluster, tmp_path):
    """run_batch(client=…) with a distributed.Client of a tcp:// scheduler."""
    folder, bad, reference, _records = mixed
    net = CAMNet(DEMO / "deploy.prototxt", DEMO / "demo.caffemodel", labels=DEMO / "labels.txt")
    inputs = collect([str(folder)], tmp_path / "out")
    options = Options(output_dir=tmp_path / "out", save=("overlay", "npy", "json"), top_k=2,
                      boxes="paper", batch_size=4, quiet=True)
    with distributed.Client(shared_cluster.address) as client:
        report = run_batch(net, inputs, options, client=client)
    assert report.done == 24 and {p for p, _ in report.failed} == set(bad)
    assert report.exit_code() == 1
    assert_same_outputs(reference, tmp_path / "out")


def test_method_on_workers(shared_cluster, tmp_path):
    """A --method other than CAM (gradients on the workers' backend) gives the
    same maps on the cluster as in one process."""
    net = CAMNet(DEMO / "deploy.prototxt", DEMO / "demo.caffemodel", method="gradcam")
    inputs = collect([str(ROOT / "images")])
    maps = {}
    for where, client in (("here", None), ("cluster", shared_cluster.address)):
        options = Options(output_dir=tmp_path / where, save=("npy",), batch_size=4, quiet=True)
        assert run_batch(net, inputs, options, client=client).done == 6
        maps[where] = {p.name: np.load(p) for p in (tmp_path / where).glob("*.cam.npy")}
    assert maps["here"].keys() == maps["cluster"].keys() and len(maps["here"]) == 6
    for name, array in maps["here"].items():
        assert array.max() > 0
        np.testing.assert_allclose(maps["cluster"][name], array, rtol=0, atol=1e-6)


def test_memory_budget_on_workers(shared_cluster, tmp_path, monkeypatch):
    """Workers refuse an image over the memory budget before decoding it, with the
    line one process gives."""
    from nets import png_header_only
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(30000, 30000))
    small = tmp_path / "small.png"
    small.write_bytes((ROOT / "images" / "demo_star_4.png").read_bytes())
    net = CAMNet(DEMO / "deploy.prototxt", DEMO / "demo.caffemodel", max_pixels=10 ** 10)
    inputs = collect([str(bomb), str(small)])
    monkeypatch.setenv("CAM_CAFFE_MEMORY", "2G")
    here = run_batch(net, inputs, Options(quiet=True))
    def set_budget(value: str | None) -> None:       # on a worker
        if value is None:
            os.environ.pop("CAM_CAFFE_MEMORY")
        else:
            os.environ["CAM_CAFFE_MEMORY"] = value
        worker_budget.cache_clear()

    with distributed.Client(shared_cluster.address) as client:
        client.run(set_budget, "2G")
        try:
            there = run_batch(net, inputs, Options(quiet=True), client=client)
        finally:
            client.run(set_budget, None)
    assert [(p, str(e)) for p, e in there.failed] == [(p, str(e)) for p, e in here.failed]
    [(path, error)] = there.failed
    assert path == bomb and "over the memory budget of 2048 MiB" in str(error)
    assert there.done == here.done == 1
    # A budget for one demo image at a time: a worker runs the first image of a chunk
    # and postpones the others, which the client submits again; each is done once.
    one = str(image_cost(64, 64, Options()) * 3 // 2)
    with distributed.Client(shared_cluster.address) as client:
        client.run(set_budget, one)
        try:
            out = io.StringIO()
            report = run_batch(net, collect([str(ROOT / "images")]),
                               Options(batch_size=3, jsonl=True), out, client=client)
        finally:
            client.run(set_budget, None)
    assert report.done == 6 and not report.failed
    assert len(jsonl(out.getvalue())) == 6


def test_image_bytes_on_stdin(shared_cluster, tmp_path):
    """`cat img | cam-caffe - --dask …`: the bytes travel to the worker."""
    net = CAMNet(DEMO / "deploy.prototxt", DEMO / "demo.caffemodel")
    image = ROOT / "images" / "demo_cross_3.png"
    out = tmp_path / "out"
    inputs = collect(["-"], out, stdin=io.BytesIO(image.read_bytes()))
    sink = io.StringIO()
    report = run_batch(net, inputs, Options(output_dir=out, jsonl=True), sink,
                       client=shared_cluster.address)
    assert report.done == 1 and json.loads(sink.getvalue())["image"] == "-"
    assert (out / "stdin.cam.png").is_file()


def test_only_loopback(shared_cluster):
    """Every process a test starts listens on 127.0.0.1 only: the scheduler, workers
    and nannies here, and the embedded LocalCluster."""
    assert listening([p.pid for p in shared_cluster.processes]) == {"127.0.0.1"}
    with dask_client("local:2", quiet=True):
        assert listening([os.getpid()]) == {"127.0.0.1"}


def test_local_workers_keep_adaptive_malloc():
    """The embedded cluster's workers run without Dask's MALLOC_TRIM_THRESHOLD_ (it
    turns off glibc's adaptive mmap threshold: ~15% more CPU per image) but keep
    its one-thread settings for the numeric libraries."""
    with dask_client("local:1", quiet=True) as client:
        environ = next(iter(client.run(lambda: dict(os.environ)).values()))
    assert "MALLOC_TRIM_THRESHOLD_" not in environ
    assert environ["OMP_NUM_THREADS"] == "1"


# --- faults -----------------------------------------------------------------------------

def test_worker_killed_mid_run(tmp_path, external):
    """SIGKILL a worker while it runs a chunk: the chunk runs again on the other worker,
    every image is reported and written exactly once, no temporary is left."""
    folder = tmp_path / "images"
    bad = make_folder(folder, variants=8, scale=4)     # 48 larger images
    out = tmp_path / "out"
    with distributed.Client(external.address) as client:
        run = subprocess.Popen(
            [sys.executable, "-m", "cam_caffe", folder, "--output-dir", out, "--dask",
             external.address, *RUN[:-3], "--batch-size", "2", "--jsonl"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        try:
            victim = None
            deadline = time.monotonic() + 120
            while victim is None and time.monotonic() < deadline and run.poll() is None:
                busy = [w for w, tasks in client.processing().items() if tasks]
                if busy and list(out.rglob("*.json")):
                    victim = busy[0]
                time.sleep(0.01)
            assert victim is not None, "the run ended before a worker could be killed"
            pid = client.run(os.getpid, workers=[victim])[victim]
            os.kill(pid, signal.SIGKILL)
            stdout, stderr = run.communicate(timeout=180)
        finally:
            run.kill()
    assert run.returncode == 1, stderr                       # the 3 bad images
    assert_bad_reported(stderr, bad)
    records = jsonl(stdout)
    assert len(records) == 48
    for record in records.values():
        for path in record["files"].values():
            assert Path(path).is_file()
        np.load(record["files"]["npy"])
    assert len(output_files(out)) == 48 * 5
    assert not [p for p in out.rglob(".*") if p.is_file()]    # no temporary left


def test_scheduler_lost_then_resume(tmp_path, external):
    """The scheduler dies mid-run: one line, exit 7, every file present is complete;
    a rerun with --skip-existing on a new cluster completes the work."""
    folder = tmp_path / "images"
    make_folder(folder, variants=8, scale=4)
    out = tmp_path / "out"
    args = [folder, "--output-dir", out, *RUN[:-3], "--batch-size", "2", "--jsonl"]
    run = subprocess.Popen([sys.executable, "-m", "cam_caffe", *map(str, args),
                            "--dask", str(external.file)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        line = run.stdout.readline()                         # the first chunk is done
        os.killpg(external.scheduler.pid, signal.SIGKILL)
        stdout, stderr = run.communicate(timeout=120)
        stdout = line + stdout
    finally:
        run.kill()
    assert run.returncode == 7, stderr
    assert stderr.splitlines() == ["cam-caffe: error: lost the Dask scheduler; rerun with "
                                   "--skip-existing to finish the work"]
    first = jsonl(stdout)
    assert 0 < len(first) < 48
    external.stop()                                          # the workers too
    for record in first.values():                            # what was reported is complete
        np.load(record["files"]["npy"])
        json.loads(Path(record["files"]["json"]).read_text())
    complete = {p.with_suffix("") for p in out.rglob("*.json")}     # .json is written last
    (tmp_path / "again").mkdir()
    again = ExternalCluster(tmp_path / "again")
    try:
        child = cli(*args, "--skip-existing", "--dask", again.address)
    finally:
        again.stop()
    assert child.returncode == 1, child.stderr
    resumed = {Path(path).with_suffix("") for path in
               (r["files"]["json"] for r in jsonl(child.stdout).values())}
    assert len(complete | resumed) == 48                     # together: every image
    assert len(output_files(out)) == 48 * 5
    assert not [p for p in out.rglob(".*") if p.is_file()]


def test_chunk_that_kills_its_workers_is_reported(tmp_path):
    """A chunk whose worker dies on every try (here one try is allowed) is reported
    as failed images, and the run goes on with the other worker."""
    cluster = ExternalCluster(tmp_path, nanny=False,
                              env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"})
    try:
        def poison() -> None:          # on each worker: a chunk with "poison" kills it
            import cam_caffe.cluster as module
            original = module.process_chunk

            def die_on_poison(net, chunk, *args, **kwargs):
                if any("poison" in item.path.name for item in chunk):
                    os._exit(1)
                return original(net, chunk, *args, **kwargs)
            module.process_chunk = die_on_poison

        folder = tmp_path / "images"
        folder.mkdir()
        for source in sorted((ROOT / "images").glob("*.png"))[:4]:
            (folder / source.name).write_bytes(source.read_bytes())
        (folder / "zz_poison.png").write_bytes((ROOT / "images" / "demo_star_4.png").read_bytes())
        net = CAMNet(DEMO / "deploy.prototxt", DEMO / "demo.caffemodel")
        with distributed.Client(cluster.address) as client:
            client.run(poison)
            report = run_batch(net, collect([str(folder)]), Options(batch_size=2, quiet=True),
                               client=client)
        # The poisoned chunk fails; so may a chunk the dying worker held, never more.
        failed = {path.name: str(error) for path, error in report.failed}
        assert "zz_poison.png" in failed and report.done >= 2
        assert report.done + len(failed) == 5
        for path, error in report.failed:
            assert str(error) == f"{path}: the Dask workers running its chunk died"
        assert report.exit_code() == 1
    finally:
        cluster.stop()


def test_model_not_visible_to_workers(tmp_path, shared_cluster):
    """A worker that cannot load the model stops the run with one clear error."""
    model = tmp_path / "model"
    model.mkdir()
    for name in ("deploy.prototxt", "demo.caffemodel"):
        (model / name).write_bytes((DEMO / name).read_bytes())
    net = CAMNet(model / "deploy.prototxt", model / "demo.caffemodel")
    (model / "demo.caffemodel").unlink()                      # gone before the workers look
    inputs = collect([str(ROOT / "images")])
    with (distributed.Client(shared_cluster.address) as client,
          pytest.raises(ModelError, match=r"^on Dask worker tcp://127\.0\.0\.1:\d+: .*"
                                          r"demo\.caffemodel: weights file not found$")):
        run_batch(net, inputs, Options(quiet=True), client=client)


@pytest.mark.parametrize(("address", "code", "message"), [
    ("tcp://127.0.0.1:9", 7, "cannot start or reach the cluster"),
    ("nowhere", 2, "expected local, local:N"),
    ("local:0", 2, "expected local, local:N"),
])
def test_bad_addresses(address, code, message):
    child = cli(ROOT / "images", "--model", "demo", "--dask", address)
    assert child.returncode == code
    assert len(child.stderr.splitlines()) == 1 and message in child.stderr


def test_dask_with_one_image_output_is_refused(tmp_path):
    child = cli(ROOT / "images" / "demo_star_4.png", "--model", "demo", "--dask", "local",
                "-o", tmp_path / "x.png")
    assert child.returncode == 2 and "--dask runs a batch" in child.stderr


def test_missing_dask_is_one_line():
    code = ("import sys; sys.modules['distributed'] = None; from cam_caffe.commands import main; "
            f"sys.exit(main([{str(ROOT / 'images')!r}, '--model', 'demo', '--dask', 'local']))")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert child.returncode == 7
    assert child.stderr == "cam-caffe: error: --dask needs Dask: pip install 'cam-caffe[dask]'\n"


# --- the pieces -------------------------------------------------------------------------

def test_errors_keep_their_exit_code_through_pickle():
    for error in (CamError("x", 4), ModelError("m"), BackendError("b", 7)):
        copy = pickle.loads(pickle.dumps(error))
        assert (type(copy), str(copy), copy.exit_code) == (type(error), str(error),
                                                           error.exit_code)


def test_remove_temporaries_only_of_the_targets(tmp_path):
    mine, other = tmp_path / "a.cam.png", tmp_path / "b.cam.png"
    for target in (mine, mine, other):
        fd, _ = temporary_beside(target)
        os.close(fd)
    (tmp_path / "a.cam.png").write_bytes(b"done")
    remove_temporaries([mine, tmp_path / "missing" / "c.json"])
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left[0] == "." + other.name + left[0][len(other.name) + 1:] and len(left) == 2
    assert left[1] == "a.cam.png"


def test_cpu_threads_follows_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads() == 1
    for value in ("", "0", "x"):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert cpu_threads() == usable_cores()
