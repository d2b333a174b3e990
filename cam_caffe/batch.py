"""Run a CAM net over many images: batches, prefetching, outputs, and a failure report.

Per image it writes, under the output directory and mirroring the inputs'
relative paths (``stem`` = the image's relative path without extension):

- ``stem.cam.png`` the overlay (``stem.cam-R.png`` for the R-th of several maps),
- ``stem.heatmap.png`` the coloured map (same numbering),
- ``stem.cam.npy`` the raw maps (M, h, w) and ``stem.cam-full.npy`` at image size,
- ``stem.json`` the predictions, maps and boxes, ``stem.montage.png`` with --montage,
- ``stem.thumb.jpg`` a small overlay without boxes (``--report``'s cards).

One bad image never stops the batch: it is reported at the end.
"""
from __future__ import annotations

import io
import json
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import BrokenExecutor, Executor, Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import cv2
import numpy as np

from .api import CAMNet, Prediction
from .boxes import Box, draw_boxes, dt_boxes_from_cam, paper_box
from .budget import MemoryBudget, Postponed, memory_budget
from .errors import (
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_MODEL,
    EXIT_OK,
    EXIT_SOME_FAILED,
    CamError,
    OutputError,
    one_line,
)
from .files import TEXT_LIMIT, read_limited
from .inputs import Input, identity
from .labels import class_name
from .output import OutputLedger, remove_stale, write_bytes, write_image
from .progress import finish, on_terminal, progress_bar
from .render import DEFAULT_ALPHA, heatmap, overlay_paper, overlay_seed
from .signals import held, interrupt_for

if TYPE_CHECKING:
    import distributed

SAVE_KINDS = ("overlay", "heatmap", "npy", "json", "thumb")
THUMB_SIDE = 192                # a thumbnail's longest side, pixels


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
    jsonl: bool = False
    quiet: bool = False

    @property
    def maps(self) -> int:
        """How many maps each image gets: one per class asked for, else the top-k."""
        return len(self.classes) if self.classes else self.top_k


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
    """Every file ``item`` gets, by kind (``overlay-2`` for the second map…)."""
    base = options.output_dir / item.stem
    ext = options.image_format

    def numbered(kind: str, suffix: str, ext: str = ext) -> dict[str, Path]:
        if maps == 1:
            return {kind: base.with_name(f"{base.name}.{suffix}.{ext}")}
        return {f"{kind}-{r}": base.with_name(f"{base.name}.{suffix}-{r}.{ext}")
                for r in range(1, maps + 1)}

    paths: dict[str, Path] = {}
    if "overlay" in options.save:
        paths.update(numbered("overlay", "cam"))
    if "heatmap" in options.save:
        paths.update(numbered("heatmap", "heatmap"))
    if "thumb" in options.save:
        paths.update(numbered("thumb", "thumb", "jpg"))
    if "npy" in options.save:
        paths["npy"] = base.with_name(f"{base.name}.cam.npy")
        paths["npy-full"] = base.with_name(f"{base.name}.cam-full.npy")
    if "json" in options.save:
        paths["json"] = base.with_name(f"{base.name}.json")
    if options.montage:
        paths["montage"] = base.with_name(f"{base.name}.montage.{ext}")
    return paths


def find_boxes(cam_full: np.ndarray, options: Options) -> list[Box]:
    """Boxes of one class's map at the image's size, by the chosen method."""
    if options.boxes == "paper":
        box = paper_box(cam_full, options.box_threshold)
        return [box] if box else []
    if options.boxes == "dt":
        return dt_boxes_from_cam(cam_full, options.dt_thresholds)
    return []


def render_overlay(net: CAMNet, image: np.ndarray, cam_full: np.ndarray, boxes: list[Box],
                   options: Options) -> np.ndarray:
    """The overlay of one map in the chosen style, with its boxes drawn."""
    alpha = DEFAULT_ALPHA[options.style] if options.alpha is None else options.alpha
    if options.style == "seed":
        h, w = net.input_size
        small = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        cam_small = cv2.resize(cam_full, (w, h), interpolation=cv2.INTER_LINEAR)
        sy, sx = h / image.shape[0], w / image.shape[1]
        scaled = [Box(round(b.x * sx), round(b.y * sy), round(b.w * sx), round(b.h * sy))
                  for b in boxes]
        return draw_boxes(overlay_seed(small, cam_small, options.colormap, alpha), scaled)
    return draw_boxes(overlay_paper(image, cam_full, options.colormap, alpha), boxes)


def thumbnail(net: CAMNet, image: np.ndarray, cam_full: np.ndarray,
              options: Options) -> np.ndarray:
    """A small overlay without boxes (the report draws them): longest side THUMB_SIDE."""
    scale = min(1.0, THUMB_SIDE / max(image.shape[:2]))
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return render_overlay(net, small, cv2.resize(cam_full, size, interpolation=cv2.INTER_AREA),
                          [], options)


CAPTION_FONT = (cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)   # face, scale, thickness


def fit_caption(label: str, prob: float | None, width: int) -> str:
    """``label`` and ``prob`` ("garter snake 0.812") within ``width`` pixels: the label
    is shortened (to its first comma part, then cut, with ".."), never the probability."""
    tail = "" if prob is None else f" {prob:.3f}"

    def fits(text: str) -> bool:
        return cv2.getTextSize(text + tail, *CAPTION_FONT)[0][0] <= width

    if fits(label):
        return label + tail
    label = label.split(",")[0].strip()
    if fits(label):
        return label + tail
    while label and not fits(label + ".."):
        label = label[:-1].rstrip()
    return label + ".." + tail if label else tail.strip()


def montage(image: np.ndarray, overlays: list[np.ndarray],
            captions: list[tuple[str, float]], height: int = 224) -> np.ndarray:
    """The image and its overlays side by side, each captioned with its (label,
    probability) (like the demo's result.jpg)."""
    def tile(picture: np.ndarray, label: str, prob: float | None) -> np.ndarray:
        width = max(1, round(picture.shape[1] * height / picture.shape[0]))
        body = cv2.resize(picture, (width, height), interpolation=cv2.INTER_AREA)
        strip = np.full((28, width, 3), 255, np.uint8)
        cv2.putText(strip, fit_caption(label, prob, width - 8), (4, 19), CAPTION_FONT[0],
                    CAPTION_FONT[1], (0, 0, 0), CAPTION_FONT[2], cv2.LINE_AA)
        return np.vstack([strip, body])
    tiles = [tile(image, "input", None)] + [tile(o, *c) for o, c in zip(overlays, captions)]
    gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
    return np.hstack([part for t in tiles for part in (t, gap)][:-1])


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, np.float32))
    return buffer.getvalue()


def process(net: CAMNet, item: Input, image: np.ndarray, result: Prediction,
            options: Options) -> dict:
    """Boxes, renders and files for one image; returns its JSON record. Files go
    under ``options.output_dir``, each listed in the folder's ledger before it is
    written."""
    if not (np.isfinite(result.probs).all() and np.isfinite(result.cams).all()):
        raise CamError(f"{item.path}: the net's output is not finite (NaN or infinity): "
                       "check the weights, --mean and --scale", EXIT_MODEL)
    size = result.image_size
    maps = []
    for class_id in result.classes:
        cam_full = result.cam(class_id, size)
        maps.append((class_id, cam_full, find_boxes(cam_full, options)))
    record = {
        "image": str(item.path),
        "size": {"width": size[1], "height": size[0]},
        "model": {"prototxt": str(net.netdef.path), "weights": str(net.weights)},
        "backend": net.backend_name,
        "method": net.method,
        "feature_blob": net.spec.feature_blob,
        "ten_crop": options.ten_crop,
        "top_k": [{"class": c, "label": label, "prob": round(p, 6)}
                  for c, label, p in result.top(options.top_k)],
        "maps": [{"class": c, "label": class_name(net.labels, c),
                  "prob": round(float(result.probs[c]), 6),
                  "boxes": [[b.x, b.y, b.w, b.h] for b in boxes]} for c, _, boxes in maps],
    }
    if options.output_dir is None:
        return record
    paths = output_paths(item, options, len(maps))
    OutputLedger.of(options.output_dir).record(paths.values())
    overlays = [render_overlay(net, image, cam_full, boxes, options)
                for _, cam_full, boxes in maps] if ("overlay" in options.save
                                                    or options.montage) else []
    for rank, (_, cam_full, _) in enumerate(maps, 1):
        suffix = "" if len(maps) == 1 else f"-{rank}"
        if "overlay" in options.save:
            write_image(paths["overlay" + suffix], overlays[rank - 1])
        if "heatmap" in options.save:
            write_image(paths["heatmap" + suffix], heatmap(cam_full, options.colormap))
        if "thumb" in options.save:
            write_image(paths["thumb" + suffix], thumbnail(net, image, cam_full, options))
    if "npy" in options.save:
        write_bytes(paths["npy"], npy_bytes(result.cams))
        write_bytes(paths["npy-full"], npy_bytes(np.stack([m for _, m, _ in maps])))
    if options.montage:
        captions = [(m["label"], m["prob"]) for m in record["maps"]]
        write_image(paths["montage"], montage(image, overlays, captions))
    record["files"] = {kind: str(path) for kind, path in paths.items()}
    if "json" in options.save:
        write_bytes(paths["json"], (json.dumps(record, indent=2, allow_nan=False)
                                    + "\n").encode())
    return record


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
    order), the images that failed, with why, and those postponed because they
    did not fit in the memory budget next to the others (to be run again)."""

    size: int
    records: list[dict] = field(default_factory=list)
    failed: list[tuple[Path, CamError]] = field(default_factory=list)
    postponed: list[Input] = field(default_factory=list)


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
    result = ChunkResult(len(chunk))
    stop = stop or threading.Event()
    budget = budget or MemoryBudget(None)
    reserved: list[int] = []

    def outcomes(futures: list[tuple[Input, Future]]) -> Iterator[tuple[Input, object]]:
        """Each future's result, or the failure it raised (None: dropped or postponed)."""
        for item, future in futures:
            if stop.is_set() and future.cancel():
                continue
            try:
                yield item, future.result()
            except Postponed:
                result.postponed.append(item)
            except Exception as e:
                result.failed.append((item.path, failure(item, e)))

    try:
        decoded = list(outcomes([(item, pool.submit(load_within, net, item, options, budget))
                                 for item in chunk]))
        reserved.extend(taken for _, (_, taken) in decoded)
        loaded = [(item, image) for item, (image, _) in decoded]
        if stop.is_set() or not loaded:
            return result
        with forward_lock or nullcontext():
            predicted = forward(net, loaded, options, result.failed)
        rendering = [(item, pool.submit(process, net, item, image, prediction, options))
                     for item, image, prediction in predicted]
        result.records.extend(record for _, record in outcomes(rendering))
        return result
    finally:
        budget.release(sum(reserved))


def forward(net: CAMNet, loaded: list[tuple[Input, np.ndarray]], options: Options,
            failed: list[tuple[Path, CamError]]) -> list[tuple[Input, np.ndarray, Prediction]]:
    """One forward pass for the loaded images; when the batch runs out of memory, one
    image at a time (the batch shrinks), an image that still does not fit failing
    alone into ``failed``."""
    def predict(images: list[np.ndarray]) -> list[Prediction]:
        return net.predict(images, options.classes, options.top_k, options.ten_crop)
    try:
        return [(item, image, p) for (item, image), p in
                zip(loaded, predict([image for _, image in loaded]))]
    except MemoryError:
        if len(loaded) == 1:
            failed.append((loaded[0][0].path, failure(loaded[0][0], MemoryError())))
            return []
    return [kept for one in loaded for kept in forward(net, [one], options, failed)]


def skipped_record(item: Input, paths: dict[str, Path]) -> dict:
    """The JSON line of an image a resumed run skips: its saved record when there
    is one, else its name and files; both with ``"skipped": true``."""
    if "json" in paths:
        try:
            record = json.loads(read_limited(paths["json"], "JSON record", TEXT_LIMIT))
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
    folders = set()
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
                 budget: MemoryBudget | None = None) -> Iterator[ChunkResult]:
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
              on_chunk: Callable[[ChunkResult], None] | None = None) -> Report:
    """Process ``inputs`` in chunks of ``options.batch_size``, in this process or, with
    ``client`` (a ``distributed.Client`` or a ``--dask`` address), on a Dask cluster
    (``cluster.py``). Records go to ``out`` as chunks finish: in input order here, in
    the order chunks complete on a cluster. ``on_chunk`` (the report) gets first the
    records of the images skipped and those refused, then each chunk's result.

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
