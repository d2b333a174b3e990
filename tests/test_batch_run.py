"""What a batch run tells its user and how it treats each image, in this process
(where mutation testing sees it): the lines printed for people, the JSON line of a
skipped image, the summary and the exit code, the images refused before any work,
the one-line error of an image a bug hit, the memory an image reserves, and the
threads that decode and write."""
from __future__ import annotations

import io
import json
import os
import pty
import signal
import sys
import threading
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import IN_CI, read_terminal
from nets import COLOUR_ARGS, colour_images, write_colour_net

from cam_caffe import CAMNet
from cam_caffe import batch as batch_module
from cam_caffe import signals as signals_module
from cam_caffe.batch import (
    ChunkResult,
    Options,
    Report,
    failure,
    image_cost,
    output_paths,
    pending_inputs,
    print_record,
    process_chunk,
    run_batch,
    step_pool,
)
from cam_caffe.budget import MemoryBudget
from cam_caffe.errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_MODEL, CamError, Terminated
from cam_caffe.inputs import Input, collect
from cam_caffe.output import write_image


@pytest.fixture(scope="module")
def net(tmp_path_factory) -> CAMNet:
    prototxt, weights, labels = write_colour_net(tmp_path_factory.mktemp("colour"))
    return CAMNet(prototxt, weights, backend="opencv", labels=labels, **COLOUR_ARGS)


def inputs(folder: Path, count: int = 3) -> list[Input]:
    """``count`` colour images written as 0.png, 1.png… in ``folder``, collected."""
    for i, image in enumerate(colour_images(count)):
        write_image(folder / f"{i}.png", image)
    return collect([str(folder)])


def run(net: CAMNet, items: list[Input], **options) -> tuple[Report, str, list[ChunkResult]]:
    """run_batch in this process: its report, what it printed, what on_chunk got."""
    out, chunks = io.StringIO(), []
    report = run_batch(net, items, Options(**options), out, on_chunk=chunks.append)
    return report, out.getvalue(), chunks


# ---- the lines printed for people --------------------------------------------------

def entry(class_id: int, prob: float, label: str, boxes=()) -> dict:
    return {"class": class_id, "prob": prob, "label": label, "boxes": [list(b) for b in boxes]}


def printed(record: dict) -> list[str]:
    out = io.StringIO()
    print_record(record, out)
    return out.getvalue().splitlines()


def test_printed_record_names_the_files_of_each_map_by_its_rank():
    """Two maps, the second class mapped first: each top-k line points at the overlay
    and heatmap of its own rank (-2 for the class mapped second), each box is on a
    line of its own, and the files holding no single map are listed at the end."""
    record = {"image": "in/a.png",
              "top_k": [entry(0, 0.9, "blue"), entry(3, 0.0625, "white")],
              "maps": [entry(3, 0.0625, "white", [(1, 2, 3, 4), (5, 6, 7, 8)]),
                       entry(0, 0.9, "blue")],
              "files": {"overlay-1": "o/a.cam-1.png", "heatmap-1": "o/a.heatmap-1.png",
                        "overlay-2": "o/a.cam-2.png", "heatmap-2": "o/a.heatmap-2.png",
                        "json": "o/a.json", "npy": "o/a.cam.npy"}}
    assert printed(record) == [
        "in/a.png",
        "      0  0.9000  blue -> o/a.cam-2.png, o/a.heatmap-2.png",
        "      3  0.0625  white -> o/a.cam-1.png, o/a.heatmap-1.png",
        "  box 3: x=1 y=2 w=3 h=4",
        "  box 3: x=5 y=6 w=7 h=8",
        "  files: o/a.json, o/a.cam.npy"]


def test_printed_record_of_one_map_and_of_a_class_outside_the_top_k():
    """One map: its files have no rank. A class asked for outside the top-k gets its
    own "map" line; a top-k class that was not mapped gets no arrow; a map with no
    file of its own says so, unless a .npy or the montage holds every map."""
    one = {"image": "b.png", "top_k": [entry(2, 0.5, "red")], "maps": [entry(2, 0.5, "red")],
           "files": {"overlay": "b.cam.png"}}
    assert printed(one) == ["b.png", "      2  0.5000  red -> b.cam.png"]
    outside = {"image": "c\nd.png", "top_k": [entry(1, 0.75, "green")],
               "maps": [entry(4, 0.125, "black\tdark")]}
    assert printed(outside) == ["c\\nd.png", "      1  0.7500  green",
                                "  map 4  0.1250  black\\tdark (map not written)"]
    for kind in ("npy", "montage"):
        held = {**outside, "files": {kind: f"c.{kind}"}}
        assert printed(held) == ["c\\nd.png", "      1  0.7500  green",
                                 "  map 4  0.1250  black\\tdark", f"  files: c.{kind}"]
    two = {**outside, "maps": [entry(1, 0.75, "green"), entry(4, 0.125, "black")],
           "files": {"heatmap-2": "c.heatmap-2.png"}}
    assert printed(two)[1:] == ["      1  0.7500  green (map not written)",
                                "  map 4  0.1250  black -> c.heatmap-2.png"]


# ---- the summary and the exit code -------------------------------------------------

def failed(*codes: int) -> list[tuple[Path, CamError]]:
    return [(Path(f"{i}.png"), CamError(f"{i}.png: bad", code)) for i, code in enumerate(codes)]


def test_summary_counts_every_image_once_with_the_rate():
    """The last line of every run: done + failed + skipped images, the time, and the
    rate of images done (0 when no time passed)."""
    assert Report(done=3, skipped=2, failed=failed(4)).summary(2.0) == \
        "6 images: 3 done, 1 failed, 2 skipped in 2.0 s (1.5 images/s)"
    assert Report(done=1).summary(0.5) == "1 image: 1 done, 0 failed, 0 skipped in 0.5 s " \
                                          "(2.0 images/s)"
    assert Report(skipped=2).summary(0.0) == "2 images: 0 done, 0 failed, 2 skipped in 0.0 s " \
                                             "(0.0 images/s)"


@pytest.mark.parametrize(("report", "code"), [
    (Report(done=2), 0),
    (Report(failed=failed(EXIT_INPUT, EXIT_INPUT)), EXIT_INPUT),   # every image, one cause
    (Report(failed=failed(EXIT_MODEL)), EXIT_MODEL),
    (Report(failed=failed(EXIT_INPUT, EXIT_MODEL)), 1),            # two causes
    (Report(done=1, failed=failed(EXIT_INPUT)), 1),                # some were done
    (Report(skipped=1, failed=failed(EXIT_INPUT)), 1),             # some were done before
    (Report(done=5, failed=failed(EXIT_INPUT, EXIT_INTERNAL)), EXIT_INTERNAL),
])
def test_exit_code_says_whether_anything_was_done_and_why_not(report, code):
    """A script tells "all done" (0), "some failed" (1), one shared cause of a run
    where nothing was done (its own code), and a bug (70, never hidden behind 1)."""
    assert report.exit_code() == code


# ---- one image's error ---------------------------------------------------------------

def test_an_image_that_hits_a_bug_fails_alone_with_one_line(net, tmp_path, monkeypatch):
    """A bug (not a CamError) while decoding one image: that image fails with one line
    naming it, the exception and how to see the traceback, code 70; a broken file
    fails as not an image (4); the others, image bytes from stdin among them, are
    done. Out of memory is the input's problem (4). With CAM_CAFFE_DEBUG the bug
    is raised as it is."""
    items = inputs(tmp_path / "in")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    stdin = Input(Path("-"), Path("stdin"), (tmp_path / "in" / "2.png").read_bytes())
    items = [*items, *collect([str(tmp_path / "broken.png")]), stdin]
    real = net.load

    def load(path, *args):
        if Path(path).name == "1.png":
            raise ZeroDivisionError("a bug")
        return real(path, *args)
    monkeypatch.setattr(net, "load", load)
    monkeypatch.delenv("CAM_CAFFE_DEBUG", raising=False)
    report, out, _ = run(net, items, jsonl=True, top_k=2)
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in records] == [str(items[0].path), str(items[2].path), "-"]
    assert records[2]["maps"] == records[1]["maps"]           # the same bytes as 2.png
    assert [len(r["top_k"]) for r in records] == [2, 2, 2]
    assert [(path, str(error), error.exit_code) for path, error in report.failed] == [
        (items[1].path, f"{items[1].path}: internal error: ZeroDivisionError: a bug "
                        "(set CAM_CAFFE_DEBUG=1 for the traceback)", EXIT_INTERNAL),
        (items[3].path, f"{items[3].path}: not an image (unknown or unsupported format)",
         EXIT_INPUT)]
    assert report.exit_code() == EXIT_INTERNAL

    memory = failure(items[0], MemoryError())
    assert (str(memory), memory.exit_code) == (
        f"{items[0].path}: out of memory (see CAM_CAFFE_MEMORY in README.md)", EXIT_INPUT)
    own = CamError("x.png: not an image", EXIT_INPUT)
    assert failure(items[0], own) is own
    monkeypatch.setenv("CAM_CAFFE_DEBUG", "1")
    with pytest.raises(ZeroDivisionError, match="a bug"):
        run(net, items)


# ---- skipped images and images refused before any work --------------------------------

def test_skipped_images_print_their_saved_record_once(net, tmp_path):
    """--skip-existing --jsonl: an image whose files all exist is not run again; its
    line is its saved JSON record marked "skipped", or, when that record is missing
    from the outputs, unreadable (not strict JSON: a NaN) or another image's, its name
    and files. on_chunk
    gets those lines first. Without --jsonl nothing is printed for a skipped image."""
    items = inputs(tmp_path / "in", 5)
    out = tmp_path / "out"
    report, _, _ = run(net, items, output_dir=out, save=("overlay", "json"), quiet=True)
    assert report.done == 5
    saved = [json.loads((out / f"{i}.json").read_text()) for i in range(5)]
    (out / "1.json").write_text("not json")
    (out / "2.json").write_text("[1, 2]")
    (out / "3.json").write_text(json.dumps(saved[0]))         # image 0's record
    (out / "4.json").write_text(json.dumps({**saved[4], "maps": float("nan")}))
    report, lines, chunks = run(net, items, output_dir=out, save=("overlay", "json"),
                                skip_existing=True, jsonl=True)
    assert (report.done, report.skipped, report.failed) == (0, 5, [])
    records = [json.loads(line) for line in lines.splitlines()]

    def short(i: int) -> dict:
        return {"image": str(items[i].path), "skipped": True,
                "files": {"overlay": str(out / f"{i}.cam.png"), "json": str(out / f"{i}.json")}}
    assert records == [{**saved[0], "skipped": True}, short(1), short(2), short(3), short(4)]
    assert (chunks[0].size, chunks[0].records, chunks[0].failed) == (0, records, [])
    assert len(chunks) == 1

    (out / "0.cam.png").unlink()
    report, lines, _ = run(net, items, output_dir=out, save=("overlay",), skip_existing=True)
    assert (report.done, report.skipped) == (1, 4)
    assert lines.splitlines() == printed({**saved[0], "files": {"overlay": str(out / "0.cam.png")}})
    report, lines, _ = run(net, items[:1], output_dir=out, save=("overlay",),
                           skip_existing=True, jsonl=True)
    assert json.loads(lines) == {"image": str(items[0].path), "skipped": True,
                                 "files": {"overlay": str(out / "0.cam.png")}}


def test_images_refused_before_the_run_leave_the_others_alone(net, tmp_path):
    """An image whose output would overwrite another input, and one whose output name
    holds a file cam-caffe did not write, fail before any work (the first foreign file
    named); the images after them are done; --overwrite replaces the foreign file."""
    folder = tmp_path / "in"
    images = colour_images(3)
    for name, image in zip(("a.png", "a.cam.png", "b.png"), images, strict=True):
        write_image(folder / name, image)
    items = collect([str(folder / "a.png"), str(folder / "a.cam.png"), str(folder / "b.png")])
    report, _, chunks = run(net, items, output_dir=folder, quiet=True)
    assert report.done == 2
    assert [(p, str(e)) for p, e in report.failed] == [
        (items[0].path, f"{items[0].path}: an output would overwrite an input image")]
    assert chunks[0].failed == report.failed
    assert (folder / "b.cam.png").is_file() and (folder / "a.cam.cam.png").is_file()

    out = tmp_path / "out"
    out.mkdir()
    for name in ("0.heatmap.png", "0.cam.png"):
        (out / name).write_bytes(b"the user's own")
    items = inputs(tmp_path / "more", 2)
    options = {"output_dir": out, "save": ("overlay", "heatmap"), "quiet": True}
    report, _, _ = run(net, items, **options)
    assert report.done == 1 and (out / "1.cam.png").is_file()
    assert [str(e) for _, e in report.failed] == [
        f"{out / '0.cam.png'}: exists and was not written by cam-caffe; --overwrite replaces it"]
    report, _, _ = run(net, items, overwrite=True, **options)
    assert (report.done, report.failed) == (2, [])
    assert cv2.imread(str(out / "0.cam.png")) is not None


def test_pending_inputs_counts_skipped_images_without_a_listener(tmp_path):
    """pending_inputs alone (as evaluate and the cluster use it): every image whose
    outputs exist is counted once as skipped, the others are left to run."""
    items = [Input(tmp_path / f"{i}.png", Path(str(i))) for i in range(3)]
    options = Options(output_dir=tmp_path / "out", skip_existing=True)
    for item in items[:2]:
        for path in output_paths(item, options, 1).values():
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(b"done")
    report = Report()
    assert pending_inputs(items, options, report) == items[2:]
    assert report.skipped == 2


# ---- memory and threads -------------------------------------------------------------

def test_image_cost_is_what_the_readme_says_each_image_reserves():
    """README, "Limits and failures" (test_readme checks its words): about 21 bytes a
    pixel, +7 a further map, +4 (a map) with npy, +7 (a map) with --boxes dt, and its
    worked example (9000x9000 needs about 1622 MiB); a heatmap's colour image adds 3
    bytes a pixel."""
    assert round(image_cost(9000, 9000, Options()) / 2 ** 20) == 1622
    pixels = 30 * 20
    assert image_cost(30, 20, Options()) == 21 * pixels
    assert image_cost(20, 30, Options(top_k=3)) == (21 + 2 * 7) * pixels
    assert image_cost(30, 20, Options(classes=[0, 1], methods=2)) == (21 + 3 * 7) * pixels
    assert image_cost(30, 20, Options(save=("npy",), top_k=2)) == (21 + 7 + 2 * 4) * pixels
    assert image_cost(30, 20, Options(boxes="dt", top_k=2)) == (21 + 7 + 2 * 7) * pixels
    assert image_cost(30, 20, Options(boxes="paper")) == 21 * pixels
    assert image_cost(30, 20, Options(save=("overlay", "heatmap"))) == 24 * pixels


@pytest.mark.parametrize(("cores", "threads"), [(1, 2), (None, 2), (2, 2), (4, 3), (9, 8),
                                                (64, 8)])
def test_step_threads_leave_a_core_to_the_forward(monkeypatch, cores, threads):
    """Without worker processes the images are decoded and written by threads: one
    fewer than the cores (the forward pass takes one), at least 2, at most 8."""
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    pool, budget = step_pool(None, 0, None)
    with pool:
        assert pool._max_workers == threads and budget is None


def test_no_overlay_is_drawn_when_none_is_written(net, tmp_path, monkeypatch):
    """Overlays are drawn only for the overlay files or the montage."""
    drawn = []

    def counted(*args):
        drawn.append(1)
        return real(*args)
    real = batch_module.render_overlay
    monkeypatch.setattr(batch_module, "render_overlay", counted)
    items = inputs(tmp_path / "in", 2)
    report, _, _ = run(net, items, output_dir=tmp_path / "out", save=("npy",), quiet=True)
    assert report.done == 2 and drawn == []
    run(net, items, output_dir=tmp_path / "out", save=("npy",), montage=True, quiet=True)
    assert len(drawn) == 2
    assert np.load(tmp_path / "out" / "0.cam.npy").shape[0] == 1


# ---- a chunk alone, and a run stopped by a signal --------------------------------------

def test_a_chunk_alone_reports_each_image_in_input_order(net, tmp_path):
    """process_chunk as a Dask worker calls it (no stop event or lock): the records of
    the good images in input order, the broken ones failed, the memory budget whole
    again after it; a chunk of broken images only runs no forward and gives no record."""
    items = inputs(tmp_path / "in", 2)
    for name in ("x.png", "y.png"):
        (tmp_path / name).write_bytes(b"broken")
    broken = collect([str(tmp_path / "x.png"), str(tmp_path / "y.png")])
    budget = MemoryBudget(10 ** 9)
    with ThreadPoolExecutor(2) as pool:
        mixed = process_chunk(net, [broken[0], *items], Options(), pool, budget=budget)
        none = process_chunk(net, broken, Options(), pool)
    assert budget.used == 0                       # every image's memory given back
    assert mixed.size == 3 and [r["image"] for r in mixed.records] == [str(i.path) for i in items]
    assert [r.item for r in mixed.results] == items
    assert [p for p, _ in mixed.failed] == [broken[0].path]
    assert (none.size, none.records, none.results, none.postponed) == (2, [], [], [])
    assert [p for p, _ in none.failed] == [b.path for b in broken]


class FirstNowRestQueued(Executor):
    """An executor that runs the first task at once and queues the others until
    ``drain()``: a chunk stopped while its first image decoded, deterministically."""

    def __init__(self) -> None:
        self.queued: list[tuple[Future, Any, tuple]] = []
        self.started = False

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        if self.started:
            self.queued.append((future, fn, args))
            return future
        self.started = True
        future.set_running_or_notify_cancel()
        future.set_result(fn(*args))
        return future

    def drain(self) -> None:
        for future, fn, args in self.queued:
            if future.set_running_or_notify_cancel():
                future.set_result(fn(*args))


def test_a_stopped_chunk_runs_no_forward_and_leaves_no_work_queued(net, tmp_path, monkeypatch):
    """With ``stop`` set, the image already decoded is given back its memory, every
    queued one is cancelled (none decodes later, holding memory), and no forward runs."""
    forwards = []
    monkeypatch.setattr(batch_module, "forward", lambda *a: forwards.append(1))
    items = inputs(tmp_path / "in", 4)
    budget, stop, pool = MemoryBudget(10 ** 9), threading.Event(), FirstNowRestQueued()
    stop.set()
    result = process_chunk(net, items, Options(), pool, stop=stop, budget=budget)
    pool.drain()
    assert budget.used == 0 and forwards == []
    assert (result.records, result.results, result.failed) == ([], [], [])


def test_a_run_on_a_dask_client_gives_the_local_runs_records(net, tmp_path):
    """run_batch with a ``distributed.Client`` (here an in-process cluster of threads;
    test_dask.py runs real schedulers and workers): every chunk goes to the cluster and
    the records are the local run's, whichever chunk ends first."""
    if IN_CI:                 # the dask extra, which scripts/setup.sh installs
        import distributed
    else:
        distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")
    items = inputs(tmp_path / "in", 5)
    local, local_out, local_chunks = run(net, items, batch_size=2, quiet=True, jsonl=True)
    out, chunks = io.StringIO(), []
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2,
                            dashboard_address=None) as client:
        report = run_batch(net, items, Options(batch_size=2, quiet=True, jsonl=True), out,
                           client=client, on_chunk=chunks.append)
    assert report.done == local.done == 5
    assert sorted(c.size for c in chunks) == sorted(c.size for c in local_chunks) == [0, 1, 2, 2]
    assert sorted(out.getvalue().splitlines()) == sorted(local_out.splitlines())


@pytest.mark.parametrize(("count", "batch_size", "workers", "started"), [
    (4, 4, 2, 0),          # one chunk: nothing to overlap, no processes
    (4, 2, 2, 2), (4, 2, 3, 3), (2, 1, 3, 2)])      # never more than the images
def test_worker_processes_only_when_chunks_overlap(net, tmp_path, monkeypatch, count,
                                                    batch_size, workers, started):
    asked = []

    def spy(net, workers, budget):
        asked.append(workers)
        return real(net, 0, budget)
    real = batch_module.step_pool
    monkeypatch.setattr(batch_module, "step_pool", spy)
    report, _, _ = run(net, inputs(tmp_path / "in", count), batch_size=batch_size,
                       workers=workers, quiet=True)
    assert report.done == count and asked == [started]


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_processes_share_the_memory_budget(net, workers):
    """Worker processes (any number) get a shared budget of the same total."""
    from cam_caffe.pipeline import ProcessPool
    for total in (12345, None):
        pool, shared = step_pool(net, workers, MemoryBudget(total) if total else None)
        with pool:
            assert isinstance(pool, ProcessPool) and shared is not None
            assert shared.total == total


def test_worker_processes_that_cannot_start_fall_back_to_threads(net, monkeypatch, capsys):
    """Processes that cannot start here (no shared memory, process limits): one line,
    then threads and the same budget."""
    import cam_caffe.pipeline as pipeline

    def refuse(*args):
        raise OSError(38, "Function not implemented")
    monkeypatch.setattr(pipeline, "ProcessPool", refuse)
    budget = MemoryBudget(99)
    pool, same = step_pool(net, 2, budget)
    with pool:
        assert isinstance(pool, ThreadPoolExecutor) and same is budget
    assert capsys.readouterr().err == ("cam-caffe: cannot start worker processes (OSError: "
                                       "[Errno 38] Function not implemented); using threads "
                                       "instead\n")


@pytest.mark.parametrize(("signum", "raised"), [(signal.SIGINT, KeyboardInterrupt),
                                                (signal.SIGTERM, Terminated)])
def test_a_signal_stops_the_run_and_every_written_image_has_its_line(net, tmp_path, monkeypatch,
                                                                     signum, raised):
    """Ctrl-C or SIGTERM after the first image: no new chunk starts, the run raises
    KeyboardInterrupt or Terminated, and each image whose overlay was written has
    its JSON line (the chunk in flight is finished or dropped, never lost)."""
    items = inputs(tmp_path / "in", 6)
    out, sink = tmp_path / "out", io.StringIO()
    # as started from a terminal: a signal ignored when cam_caffe.signals was imported
    # (mutmut's runner ignores SIGINT) stays ignored, so both are made ones it handles
    monkeypatch.setattr(signals_module, "SIGNALS", (signal.SIGINT, signal.SIGTERM))
    previous = signal.signal(signum, signal.SIG_DFL)

    def interrupt(chunk: ChunkResult) -> None:
        if chunk.size and not sent:     # one signal, as the OS delivers it: the handler
            sent.append(signum)         # run_batch set
            signal.getsignal(signum)(signum, None)
    sent: list[int] = []
    try:
        with pytest.raises(raised):
            run_batch(net, items, Options(output_dir=out, batch_size=1, jsonl=True), sink,
                      on_chunk=interrupt)
    finally:
        signal.signal(signum, previous)
    printed_images = sorted(json.loads(line)["image"] for line in sink.getvalue().splitlines())
    written = sorted(str(tmp_path / "in" / f"{p.name.split('.')[0]}.png")
                     for p in out.glob("*.cam.png"))
    assert printed_images == written and 1 <= len(written) <= 2


def test_progress_bar_is_drawn_after_each_chunk_on_a_terminal(net, tmp_path):
    """On a terminal, without -q: a bar of images ("img") drawn once after every chunk
    (not only every so often), ending at the total; with -q, none."""
    items = inputs(tmp_path / "in", 3)
    for quiet in (False, True):
        main_fd, other_fd = pty.openpty()
        with open(other_fd, "w", encoding="utf-8") as terminal, \
                pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "stderr", terminal)
            run_batch(net, items, Options(batch_size=1, quiet=quiet), io.StringIO())
        data = read_terminal(main_fd).decode()
        counts = [data.count(f"| {done}/3 [") for done in range(1, 4)]   # 3/3: again at the end
        assert (counts[:2], counts[2] > 0) == (([1, 1], True) if not quiet else ([0, 0], False))
        assert ("img/s]" in data) is not quiet

