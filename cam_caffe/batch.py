"""Run a CAM net over many images: batches, prefetching, outputs, and a failure report.

Per image: decode, one forward pass per chunk (``CAMNet.predict`` makes each
image's :class:`~cam_caffe.result.ImageResult`), then on a worker its files
(named as ``naming.py`` says, under the output directory, mirroring the
inputs' relative paths) and its JSON record (``result.record``).

One bad image never stops the batch: it is reported at the end.
"""
from __future__ import annotations

import io
import json
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import BrokenExecutor, Executor, Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from . import naming
from .api import CAMNet
from .boxes import BoxRule
from .budget import MemoryBudget, Postponed, memory_budget
from .compose import Look, montage, render_overlay, thumbnail
from .errors import (
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_SOME_FAILED,
    CamError,
    OutputError,
    one_line,
)
from .files import TEXT_LIMIT, read_limited
from .inputs import Input, identity
from .output import OutputLedger, remove_stale, write_bytes, write_image
from .progress import finish, on_terminal, progress_bar
from .render import heatmap
from .result import ImageResult, record
from .signals import held, interrupt_for

if TYPE_CHECKING:
    import distributed

SAVE_KINDS = ("overlay", "heatmap", "npy", "json", "thumb")


@dataclass
class Options:
    """What to compute and write for each image."""

    output_dir: Path | None = None
    save: tuple[str, ...] = ("overlay",)
    image_format: str = "png"
    classes: list[int] | None = None
    top_k: int = 1                  # classes reported, and mapped when no classes are given
    style: str = "paper"
    colormap: str = "jet"
    alpha: float | None = None
    boxes: str | None = None        # "paper" or "dt"
    box_threshold: float = 0.2
    dt_thresholds: tuple[int, ...] = (20, 100, 110)
    ten_crop: bool = False
    montage: bool = False
    skip_existing: bool = False
    overwrite: bool = False         # replace files at output names that cam-caffe did not write
    batch_size: int = 16
    workers: int = 0                # processes that decode and write; 0: threads of this one
    methods: int = 1                # maps per class: one per --method
    jsonl: bool = False
    quiet: bool = False

    def look(self, net_size: tuple[int, int]) -> Look:
        """How each map is drawn, on a net of input size ``net_size`` (H, W)."""
        return Look(self.style, self.colormap, self.alpha, net_size)

    @property
    def box_rule(self) -> BoxRule:
        """How each map's boxes are found."""
        return BoxRule(self.boxes, self.box_threshold, self.dt_thresholds)

    @property
    def maps(self) -> int:
        """How many maps each image gets: one per class asked for, else the top-k,
        times the methods."""
        return (len(self.classes) if self.classes else self.top_k) * self.methods


@dataclass
class Report:
    """The batch's outcome."""

    done: int = 0
    skipped: int = 0
    failed: list[tuple[Path, CamError]] = field(default_factory=list)

    def exit_code(self) -> int:
        """0; 70 if a bug hit an image; the shared code of the failures when nothing
        was done; else 1 (some failed)."""
        if not self.failed:
            return EXIT_OK
        codes = {error.exit_code for _, error in self.failed}
        if EXIT_INTERNAL in codes:          # a bug hit some image: never hidden behind 1
            return EXIT_INTERNAL
        if self.done == 0 and self.skipped == 0 and len(codes) == 1:
            return codes.pop()
        return EXIT_SOME_FAILED

    def summary(self, seconds: float) -> str:
        """One line: images done, failed and skipped, the time and the rate."""
        total = self.done + len(self.failed) + self.skipped
        rate = self.done / seconds if seconds > 0 else 0.0
        return (f"{total} image{'s' * (total != 1)}: {self.done} done, {len(self.failed)} "
                f"failed, {self.skipped} skipped in {seconds:.1f} s ({rate:.1f} images/s)")


def output_paths(item: Input, options: Options, maps: int) -> dict[str, Path]:
    """Every file ``item`` gets under ``options.output_dir`` (``naming.py``), by kind."""
    assert options.output_dir is not None
    return naming.output_paths(options.output_dir / item.stem, options.save, options.montage,
                               options.image_format, maps)


def npy_bytes(arrays: np.ndarray | list[np.ndarray]) -> bytes:
    """``arrays`` (stacked) as a float32 .npy file."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(arrays, np.float32))
    return buffer.getvalue()


def finish_image(net: CAMNet, result: ImageResult, image: np.ndarray,
                 options: Options) -> dict:
    """What follows an image's forward pass, on a worker: its result checked, its
    files written (with ``options.output_dir``) and its JSON record returned. The
    result then drops its maps at image size (its boxes stay)."""
    assert result.item is not None
    result.check_finite()
    if options.output_dir is None:
        entry = record(result, net, options.top_k)
    else:
        paths = output_paths(result.item, options, len(result.classes))
        OutputLedger.of(options.output_dir).record(paths.values())
        entry = record(result, net, options.top_k, paths)
        write_renders(net, image, result, options, paths)
        if "json" in options.save:
            write_bytes(paths["json"], (json.dumps(entry, indent=2, allow_nan=False)
                                        + "\n").encode())
    result.release()
    return entry


def write_renders(net: CAMNet, image: np.ndarray, result: ImageResult, options: Options,
                  paths: dict[str, Path]) -> None:
    """The image's pictures and maps, each to its path in ``paths``: overlays, heatmaps,
    thumbnails, the maps as .npy, the montage."""
    look = options.look(net.input_size)
    count = len(result.classes)
    overlays = [render_overlay(image, result.full_map(rank), boxes, look)
                for rank, boxes in enumerate(result.boxes)
                ] if "overlay" in options.save or options.montage else []
    for rank in range(count):
        suffix = "" if count == 1 else f"-{rank + 1}"
        if "overlay" in options.save:
            write_image(paths["overlay" + suffix], overlays[rank])
        if "heatmap" in options.save:
            write_image(paths["heatmap" + suffix], heatmap(result.full_map(rank),
                                                           options.colormap))
        if "thumb" in options.save:
            write_image(paths["thumb" + suffix], thumbnail(image, result.full_map(rank), look))
    if "npy" in options.save:
        write_bytes(paths["npy"], npy_bytes(result.cams))
        write_bytes(paths["npy-full"], npy_bytes(result.full_maps))
    if options.montage:
        several = len(result.methods) > 1
        captions = [((f"{result.map_method(rank)}: " if several else "") + result.label(c),
                     result.prob(c)) for rank, c in enumerate(result.classes)]
        write_image(paths["montage"], montage(image, overlays, captions))


def print_record(record: dict, out: TextIO) -> None:
    """An image's classes and what became of its maps, for people: the top-k classes,
    each mapped one with the files that hold its map ("-> x.cam.png") or "(map not
    written)", then mapped classes outside the top-k ("map …"), boxes, other files."""
    files = record.get("files", {})
    maps = record["maps"]
    in_all = any(kind in files for kind in ("npy", "montage"))     # they hold every map

    def where(class_id: int) -> str:
        ranks = [r for r, entry in enumerate(maps, 1) if entry["class"] == class_id]
        if not ranks:
            return ""
        suffix = "" if len(maps) == 1 else f"-{ranks[0]}"
        own = [files[kind + suffix] for kind in ("overlay", "heatmap") if kind + suffix in files]
        return f" -> {', '.join(own)}" if own else "" if in_all else " (map not written)"

    print(one_line(record["image"]), file=out)
    top = [entry["class"] for entry in record["top_k"]]
    for entry in record["top_k"]:
        print(f"  {entry['class']:5d}  {entry['prob']:.4f}  {one_line(entry['label'])}"
              f"{where(entry['class'])}", file=out)
    for entry in maps:
        if entry["class"] not in top:
            print(f"  map {entry['class']}  {entry['prob']:.4f}  {one_line(entry['label'])}"
                  f"{where(entry['class'])}", file=out)
    for entry in maps:
        for box in entry["boxes"]:
            print(f"  box {entry['class']}: x={box[0]} y={box[1]} w={box[2]} h={box[3]}",
                  file=out)
    others = [path for kind, path in files.items() if not kind.startswith(("overlay", "heatmap"))]
    if others:
        print(f"  files: {', '.join(others)}", file=out)


def image_cost(width: int, height: int, options: Options) -> int:
    """Bytes one image can take from decoding to its last output file: measured peak
    resident memory over 16-megapixel images (README, "Limits and failures"),
    rounded up: 14 bytes a pixel, and per map 7 more (+4 with npy, +7 with dt boxes)."""
    per_map = 7 + 4 * ("npy" in options.save) + 7 * (options.boxes == "dt")
    per_pixel = 14 + options.maps * per_map + 3 * ("heatmap" in options.save)
    return width * height * per_pixel


def failure(item: Input, error: Exception) -> CamError:
    """Any exception an image raised, as the one-line error reported for it: a bug
    (not a CamError) is reported as an internal error of that image, and the batch
    goes on."""
    if isinstance(error, CamError):
        return error
    if isinstance(error, MemoryError):
        return CamError(f"{item.path}: out of memory (see CAM_CAFFE_MEMORY in README.md)",
                        EXIT_INPUT)
    if os.environ.get("CAM_CAFFE_DEBUG"):
        raise error
    return CamError(f"{item.path}: internal error: {type(error).__name__}: {error} "
                    "(set CAM_CAFFE_DEBUG=1 for the traceback)", EXIT_INTERNAL)


@dataclass
class ChunkResult:
    """What one chunk of inputs gave: the records of the images done (in input
    order) and their results (as the forward made them: with worker threads,
    their boxes are already found; records, not results, cross a process
    boundary), the images that failed, with why, and those postponed because
    they did not fit in the memory budget next to the others (to be run again)."""

    size: int
    records: list[dict] = field(default_factory=list)
    failed: list[tuple[Path, CamError]] = field(default_factory=list)
    postponed: list[Input] = field(default_factory=list)
    results: list[ImageResult] = field(default_factory=list)


def load_within(net: CAMNet, item: Input, options: Options,
                budget: MemoryBudget) -> tuple[np.ndarray, int]:
    """Decode ``item``'s image once ``budget`` has room for it: (image, bytes taken
    from the budget, to give back when the image is done)."""
    taken = 0

    def admit(width: int, height: int) -> None:
        nonlocal taken
        taken = budget.reserve(image_cost(width, height, options), item.path, width, height)
    try:
        return net.load(item.path, item.data, admit), taken
    except BaseException:
        budget.release(taken)
        raise


def process_chunk(net: CAMNet, chunk: list[Input], options: Options, pool: Executor,
                  forward_lock: AbstractContextManager | None = None,
                  stop: threading.Event | None = None,
                  budget: MemoryBudget | None = None) -> ChunkResult:
    """One chunk end to end: decode its images on ``pool``, one forward pass and the
    CAMs (holding ``forward_lock`` if given), then boxes, renders and files on
    ``pool``. A bad image is reported in the result, whatever it raised; the
    others go on.

    Each image's memory is taken from ``budget`` before it is decoded, and given
    back when the chunk ends. Once ``stop`` is set, work not yet started is
    dropped and only what was finished is in the result.

    The single-process run and the Dask workers both run every chunk through here.
    """
    chunk_result = ChunkResult(len(chunk))
    stop = stop or threading.Event()
    budget = budget or MemoryBudget(None)
    reserved: list[int] = []

    def outcomes(futures: list[tuple[Input, Future]]) -> Iterator[tuple[Input, Any]]:
        """Each future's result, or the failure it raised (None: dropped or postponed)."""
        for item, future in futures:
            if stop.is_set() and future.cancel():
                continue
            try:
                yield item, future.result()
            except Postponed:
                chunk_result.postponed.append(item)
            except Exception as e:
                chunk_result.failed.append((item.path, failure(item, e)))

    try:
        decoded = list(outcomes([(item, pool.submit(load_within, net, item, options, budget))
                                 for item in chunk]))
        reserved.extend(taken for _, (_, taken) in decoded)
        loaded = [(item, image) for item, (image, _) in decoded]
        if stop.is_set() or not loaded:
            return chunk_result
        with forward_lock or nullcontext():
            predicted = forward(net, loaded, options, chunk_result.failed)
        results = {id(item): image_result for item, _, image_result in predicted}
        finishing = [(item, pool.submit(finish_image, net, image_result, image, options))
                     for item, image, image_result in predicted]
        for item, entry in outcomes(finishing):
            chunk_result.records.append(entry)
            chunk_result.results.append(results[id(item)])
        return chunk_result
    finally:
        budget.release(sum(reserved))


def forward(net: CAMNet, loaded: list[tuple[Input, np.ndarray]], options: Options,
            failed: list[tuple[Path, CamError]]) -> list[tuple[Input, np.ndarray, ImageResult]]:
    """One forward pass for the loaded images: (input, image, its result) each; when the
    batch runs out of memory, one image at a time (the batch shrinks), an image that
    still does not fit failing alone into ``failed``."""
    items = [item for item, _ in loaded]
    images = [image for _, image in loaded]
    try:
        results = net.predict(images, options.classes, options.top_k, options.ten_crop,
                              boxes=options.box_rule, items=items)
        return list(zip(items, images, results, strict=True))
    except MemoryError:
        if len(loaded) == 1:
            failed.append((loaded[0][0].path, failure(loaded[0][0], MemoryError())))
            return []
    return [kept for one in loaded for kept in forward(net, [one], options, failed)]


def not_json(constant: str) -> None:
    """Refuse what Python's json reads beyond JSON (NaN, Infinity): a record holding
    one could not be printed again as a JSON line."""
    raise ValueError(f"{constant} is not JSON")


def skipped_record(item: Input, paths: dict[str, Path]) -> dict:
    """The JSON line of an image a resumed run skips: its saved record when there
    is one, else its name and files; both with ``"skipped": true``."""
    if "json" in paths:
        try:
            record = json.loads(read_limited(paths["json"], "JSON record", TEXT_LIMIT),
                                parse_constant=not_json)
            if isinstance(record, dict) and record.get("image") == str(item.path):
                return {**record, "skipped": True}
        except (CamError, ValueError):
            pass                         # unreadable: the short record says enough
    return {"image": str(item.path), "skipped": True,
            "files": {kind: str(path) for kind, path in paths.items()}}


def pending_inputs(inputs: list[Input], options: Options, report: Report,
                   on_skip: Callable[[Input, dict[str, Path]], None] | None = None) -> list[Input]:
    """The inputs to process: those whose outputs would overwrite an input fail, and
    with ``skip_existing`` those whose outputs all exist are skipped (``on_skip``
    is told of each); an existing file at an output's name that cam-caffe did not
    write fails its image unless ``overwrite``. Abandoned temporaries in the output
    folders are removed."""
    protected = {identity(item.path) for item in inputs if item.data is None}
    ledger = OutputLedger.of(options.output_dir) if options.output_dir else None
    todo = []
    folders: set[Path] = set()
    for item in inputs:
        if ledger is not None:
            paths = output_paths(item, options, options.maps)
            folders.update(path.parent for path in paths.values())
            if any(identity(p) in protected for p in paths.values()):
                report.failed.append((item.path, OutputError(
                    f"{item.path}: an output would overwrite an input image")))
                continue
            if options.skip_existing and paths and all(p.exists() for p in paths.values()):
                report.skipped += 1
                if on_skip is not None:
                    on_skip(item, paths)
                continue
            foreign = [] if options.overwrite else ledger.foreign(paths.values())
            if foreign:
                report.failed.append((item.path, OutputError(
                    f"{foreign[0]}: exists and was not written by cam-caffe; "
                    "--overwrite replaces it")))
                continue
        todo.append(item)
    for folder in folders:
        remove_stale(folder)
    return todo


def local_chunks(net: CAMNet, chunks: list[list[Input]], options: Options,
                 stop: threading.Event | None = None,
                 budget: MemoryBudget | None = None) -> Generator[ChunkResult, None, None]:
    """Each chunk's result in order, two chunks in flight: while one runs its forward
    pass (one at a time, on the GPU or on the cores the workers leave free), the
    workers decode the other's images or render, encode and write them: with
    ``options.workers``, that many processes (pipeline.py), else threads of this
    process. Once ``stop`` is set no new chunk starts."""
    stop = stop or threading.Event()
    forward_lock = threading.Lock()
    # one chunk leaves nothing to overlap; more workers than images would stay idle
    workers = min(options.workers, sum(map(len, chunks))) if len(chunks) > 1 else 0
    pool, budget = step_pool(net, workers, budget)
    with pool, ThreadPoolExecutor(2) as lanes:
        in_flight: deque[Future] = deque()
        for chunk in chunks:
            if stop.is_set():
                break
            in_flight.append(lanes.submit(process_chunk, net, chunk, options, pool,
                                          forward_lock, stop, budget))
            if len(in_flight) == 2:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


def step_pool(net: CAMNet, workers: int,
              budget: MemoryBudget | None) -> tuple[Executor, MemoryBudget | None]:
    """The executor of the per-image steps and the budget they reserve from: ``workers``
    processes sharing a copy of ``budget`` (pipeline.py), or threads of this process
    when ``workers`` is 0 or processes cannot start here (no shared memory, process
    limits: said in one line, and the results are the same)."""
    if workers > 0:
        from .pipeline import ProcessPool, SharedBudget
        try:
            shared = SharedBudget(budget.total if budget else None)
            return ProcessPool(net, workers, shared), shared
        except (OSError, BrokenExecutor) as e:
            print(f"cam-caffe: cannot start worker processes ({type(e).__name__}: {e}); "
                  "using threads instead", file=sys.stderr)
    return ThreadPoolExecutor(max_workers=max(2, min(8, (os.cpu_count() or 2) - 1))), budget


def write_line(text: str, out: TextIO) -> None:
    """One whole line at once (an interrupt never leaves half a line), flushed."""
    out.write(text + "\n")
    out.flush()


def run_batch(net: CAMNet, inputs: list[Input], options: Options, out: TextIO | None = None,
              client: distributed.Client | str | None = None,
              on_chunk: Callable[[ChunkResult], None] | None = None,
              records: bool = True) -> Report:
    """Process ``inputs`` in chunks of ``options.batch_size``, in this process or, with
    ``client`` (a ``distributed.Client`` or a ``--dask`` address), on a Dask cluster
    (``cluster.py``). Records go to ``out`` (unless not ``records``) as chunks finish:
    in input order here, in the order chunks complete on a cluster. ``on_chunk`` (the
    report, ``evaluate``) gets first the records of the images skipped and those
    refused, then each chunk's result.

    Images that did not fit in the memory budget next to others run again after
    the rest, in as many rounds as it takes (each round runs at least one).
    A Ctrl-C or SIGTERM stops the run: work not yet started is dropped (on a
    cluster, cancelled), what finishes is reported (here, a record for every image
    whose outputs were written), then KeyboardInterrupt (or Terminated) is raised.
    """
    out = out or sys.stdout
    report = Report()
    stop = threading.Event()
    budget = MemoryBudget(memory_budget())
    bar = progress_bar(0, False, "img")

    def emit(record: dict) -> None:
        bar.clear()                      # stdout and the bar may share a terminal
        if not records:
            return
        if options.jsonl:
            write_line(json.dumps(record, allow_nan=False), out)
        elif not options.quiet and not record.get("skipped"):
            print_record(record, out)
            out.flush()                  # before the bar is drawn again

    with held(on_signal=stop.set) as received:
        skipped: list[dict] = []

        def skip(item: Input, paths: dict[str, Path]) -> None:
            skipped.append(skipped_record(item, paths))
            emit(skipped[-1])

        todo = pending_inputs(inputs, options, report, skip)
        if on_chunk is not None:
            on_chunk(ChunkResult(0, records=skipped, failed=list(report.failed)))
        bar = progress_bar(len(todo), on_terminal() and not options.quiet, "img",
                           mininterval=0)      # drawn after each chunk, cleared for records
        while todo and not stop.is_set():
            chunks = [todo[i:i + options.batch_size]
                      for i in range(0, len(todo), options.batch_size)]
            todo = []                                # what is postponed runs next round
            if client is None:
                results = local_chunks(net, chunks, options, stop, budget)
            else:
                from .cluster import cluster_chunks
                results = cluster_chunks(client, net, chunks, options)
            with closing(results):       # stop the chunks in flight even when printing fails
                try:
                    for result in results:
                        report.failed.extend(result.failed)
                        report.done += len(result.records)
                        for record in result.records:
                            emit(record)
                        todo.extend(result.postponed)
                        if on_chunk is not None:
                            on_chunk(result)
                        bar.update(result.size - len(result.postponed))
                        if stop.is_set() and client is not None:
                            break                # a cluster's chunks are all in flight
                except BaseException:
                    stop.set()                   # the chunks in flight here end soon
                    raise
        finish(bar)
    if received:
        raise interrupt_for(received[0])
    return report
