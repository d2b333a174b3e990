"""Run a CAM net over many images: batches, prefetching, outputs, and a failure report.

Per image it writes, under the output directory and mirroring the inputs'
relative paths (``stem`` = the image's relative path without extension):

- ``stem.cam.png`` the overlay (``stem.cam-R.png`` for the R-th of several maps),
- ``stem.heatmap.png`` the coloured map (same numbering),
- ``stem.cam.npy`` the raw maps (M, h, w) and ``stem.cam-full.npy`` at image size,
- ``stem.json`` the predictions, maps and boxes, ``stem.montage.png`` with --montage.

One bad image never stops the batch: it is reported at the end.
"""
from __future__ import annotations

import io
import json
import os
import sys
import threading
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, TextIO

import cv2
import numpy as np

from .api import CAMNet, Prediction
from .boxes import Box, draw_boxes, dt_boxes_from_cam, paper_box
from .errors import EXIT_OK, EXIT_SOME_FAILED, CamError, OutputError
from .inputs import Input
from .labels import class_name
from .output import write_bytes, write_image
from .progress import Progress
from .render import DEFAULT_ALPHA, heatmap, overlay_paper, overlay_seed

if TYPE_CHECKING:
    import distributed

SAVE_KINDS = ("overlay", "heatmap", "npy", "json")


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
    batch_size: int = 16
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
        """0; the shared code of the failures when nothing was done; else 1 (some failed)."""
        if not self.failed:
            return EXIT_OK
        codes = {error.exit_code for _, error in self.failed}
        if self.done == 0 and self.skipped == 0 and len(codes) == 1:
            return codes.pop()
        return EXIT_SOME_FAILED


def output_paths(item: Input, options: Options, maps: int) -> dict[str, Path]:
    """Every file ``item`` gets, by kind (``overlay-2`` for the second map…)."""
    base = options.output_dir / item.stem
    ext = options.image_format

    def numbered(kind: str, suffix: str) -> dict[str, Path]:
        if maps == 1:
            return {kind: base.with_name(f"{base.name}.{suffix}.{ext}")}
        return {f"{kind}-{r}": base.with_name(f"{base.name}.{suffix}-{r}.{ext}")
                for r in range(1, maps + 1)}

    paths: dict[str, Path] = {}
    if "overlay" in options.save:
        paths.update(numbered("overlay", "cam"))
    if "heatmap" in options.save:
        paths.update(numbered("heatmap", "heatmap"))
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


def montage(image: np.ndarray, overlays: list[np.ndarray], captions: list[str],
            height: int = 224) -> np.ndarray:
    """The image and its overlays side by side, each captioned (like the demo's result.jpg)."""
    def tile(picture: np.ndarray, caption: str) -> np.ndarray:
        width = max(1, round(picture.shape[1] * height / picture.shape[0]))
        body = cv2.resize(picture, (width, height), interpolation=cv2.INTER_AREA)
        strip = np.full((28, width, 3), 255, np.uint8)
        cv2.putText(strip, caption[:max(4, width // 8)], (4, 19), cv2.FONT_HERSHEY_SIMPLEX,
                    0.45, (0, 0, 0), 1, cv2.LINE_AA)
        return np.vstack([strip, body])
    tiles = [tile(image, "input")] + [tile(o, c) for o, c in zip(overlays, captions)]
    gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
    return np.hstack([part for t in tiles for part in (t, gap)][:-1])


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, np.float32))
    return buffer.getvalue()


def process(net: CAMNet, item: Input, image: np.ndarray, result: Prediction,
            options: Options) -> dict:
    """Boxes, renders and files for one image; returns its JSON record."""
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
    overlays = [render_overlay(net, image, cam_full, boxes, options)
                for _, cam_full, boxes in maps] if ("overlay" in options.save
                                                    or options.montage) else []
    for rank, (_, cam_full, _) in enumerate(maps, 1):
        suffix = "" if len(maps) == 1 else f"-{rank}"
        if "overlay" in options.save:
            write_image(paths["overlay" + suffix], overlays[rank - 1])
        if "heatmap" in options.save:
            write_image(paths["heatmap" + suffix], heatmap(cam_full, options.colormap))
    if "npy" in options.save:
        write_bytes(paths["npy"], npy_bytes(result.cams))
        write_bytes(paths["npy-full"], npy_bytes(np.stack([m for _, m, _ in maps])))
    if options.montage:
        captions = [f"{m['label']} {m['prob']:.3f}" for m in record["maps"]]
        write_image(paths["montage"], montage(image, overlays, captions))
    record["files"] = {kind: str(path) for kind, path in paths.items()}
    if "json" in options.save:
        write_bytes(paths["json"], (json.dumps(record, indent=2) + "\n").encode())
    return record


def print_record(record: dict, out: TextIO) -> None:
    print(record["image"], file=out)
    for entry in record["top_k"]:
        print(f"  {entry['class']:5d}  {entry['prob']:.4f}  {entry['label']}", file=out)
    for entry in record["maps"]:
        for box in entry["boxes"]:
            print(f"  box {entry['class']}: x={box[0]} y={box[1]} w={box[2]} h={box[3]}",
                  file=out)


@dataclass
class ChunkResult:
    """What one chunk of inputs gave: the records of the images done (in input
    order) and the images that failed, with why."""

    size: int
    records: list[dict] = field(default_factory=list)
    failed: list[tuple[Path, CamError]] = field(default_factory=list)


def process_chunk(net: CAMNet, chunk: list[Input], options: Options, pool: Executor,
                  forward_lock: AbstractContextManager | None = None) -> ChunkResult:
    """One chunk end to end: decode its images on ``pool``, one forward pass and the
    CAMs (holding ``forward_lock`` if given), then boxes, renders and files on
    ``pool``. A bad image is reported in the result; the others go on.

    The single-process run and the Dask workers both run every chunk through here.
    """
    result = ChunkResult(len(chunk))
    decoding = [(item, pool.submit(net.load, item.path)) for item in chunk]
    loaded = []
    for item, future in decoding:
        try:
            loaded.append((item, future.result()))
        except CamError as e:
            result.failed.append((item.path, e))
    with forward_lock or nullcontext():
        predictions = net.predict([image for _, image in loaded], options.classes,
                                  options.top_k, options.ten_crop)
    rendering = [(item, pool.submit(process, net, item, image, prediction, options))
                 for (item, image), prediction in zip(loaded, predictions)]
    for item, future in rendering:
        try:
            result.records.append(future.result())
        except CamError as e:
            result.failed.append((item.path, e))
    return result


def pending_inputs(inputs: list[Input], options: Options, report: Report) -> list[Input]:
    """The inputs to process: those whose outputs would overwrite an input fail, and
    with ``skip_existing`` those whose outputs all exist are skipped."""
    protected = {item.path.resolve() for item in inputs}
    todo = []
    for item in inputs:
        if options.output_dir is not None:
            paths = output_paths(item, options, options.maps).values()
            if any(p.resolve() in protected for p in paths):
                report.failed.append((item.path, OutputError(
                    f"{item.path}: an output would overwrite an input image")))
                continue
            if options.skip_existing and paths and all(p.exists() for p in paths):
                report.skipped += 1
                continue
        todo.append(item)
    return todo


def local_chunks(net: CAMNet, chunks: list[list[Input]],
                 options: Options) -> Iterator[ChunkResult]:
    """Each chunk's result in order, two chunks in flight: while one runs its forward
    pass (one at a time, on the GPU or on the cores the workers leave free), worker
    threads decode the other's images or render, encode and write them."""
    workers = max(2, min(8, (os.cpu_count() or 2) - 1))
    forward_lock = threading.Lock()
    with ThreadPoolExecutor(max_workers=workers) as pool, ThreadPoolExecutor(2) as lanes:
        in_flight: deque[Future] = deque()
        for chunk in chunks:
            in_flight.append(lanes.submit(process_chunk, net, chunk, options, pool,
                                          forward_lock))
            if len(in_flight) == 2:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


def run_batch(net: CAMNet, inputs: list[Input], options: Options, out: TextIO | None = None,
              client: distributed.Client | str | None = None) -> Report:
    """Process ``inputs`` in chunks of ``options.batch_size``, in this process or, with
    ``client`` (a ``distributed.Client`` or a ``--dask`` address), on a Dask cluster
    (``cluster.py``). Records go to ``out`` as chunks finish: in input order here, in
    the order chunks complete on a cluster."""
    out = out or sys.stdout
    report = Report()
    todo = pending_inputs(inputs, options, report)
    chunks = [todo[i:i + options.batch_size] for i in range(0, len(todo), options.batch_size)]
    progress = Progress(len(todo), sys.stderr.isatty() and not options.quiet)
    if client is None:
        results = local_chunks(net, chunks, options)
    else:
        from .cluster import cluster_chunks
        results = cluster_chunks(client, net, chunks, options)
    handled = 0
    with closing(results):       # stop the chunks in flight even when printing fails
        for result in results:
            report.failed.extend(result.failed)
            report.done += len(result.records)
            for record in result.records:
                if options.jsonl:
                    print(json.dumps(record), file=out, flush=True)
                elif not options.quiet:
                    print_record(record, out)
            handled += result.size
            progress.update(handled)
    return report
