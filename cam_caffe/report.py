"""``--report``: an HTML page of a batch run, ``<output-dir>/index.html``.

The page works from ``file://`` with no network. It is static (``index.html``,
``_report/app.js``, ``_report/style.css``, copied from the package) and reads
the run through ``<script>`` tags, since ``file://`` pages cannot fetch:

- ``_report/run.js``: ``CAM_RUN = {…}``, the header (model, backend, methods,
  counts, failures, wall time, images/s, whether the run finished) and the
  number of data chunks;
- ``_report/data-NNNN.js``: ``CAM_CHUNK(N, [card, …])``, up to ``CHUNK`` cards.

With ``--shard I/N`` each shard writes its part into ``_report/shard-I-of-N/``,
and every shard writes the same ``index.html``, which names all N parts
(``CAM_PARTS``): the shards of a job array that share an output folder make one
page. Every file of the page is listed in the folder's ledger before it is
written, and an existing page that cam-caffe did not write is never replaced
(unless ``--overwrite``).

The page is written incrementally: after each batch the current chunk and
then ``run.js`` are replaced atomically, so an interrupted run leaves a page
of what it finished. With ``--skip-existing`` the skipped images' cards come
from the report already there, else from their saved ``.json``.
"""
from __future__ import annotations

import json
import os
import re
import time
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from urllib.parse import quote

from .batch import ChunkResult, Options
from .errors import CamError, OutputError
from .output import OutputLedger, write_bytes

ASSETS = ("app.js", "style.css")
REPORT_KINDS = ("overlay", "heatmap", "thumb")     # files the cards show and link to
FOLDER = "_report"
CHUNK = 256                     # cards per data file
_CHUNK_FILE = re.compile(r"data-(\d{4,})\.js")
_CHUNK_TEXT = re.compile(r"CAM_CHUNK\(\d+, (.*)\);\s*", re.S)
_RUN_TEXT = re.compile(r"CAM_RUN = (.*);\s*", re.S)
_PARTS = '<script>window.CAM_PARTS = ["_report"];</script>'


def part_folder(shard: tuple[int, int] | None) -> str:
    """Where a run's part of the page goes, relative to the output folder: ``_report``,
    or ``_report/shard-I-of-N`` for shard I of N."""
    return f"{FOLDER}/shard-{shard[0]}-of-{shard[1]}" if shard else FOLDER


def page(shard: tuple[int, int] | None) -> bytes:
    """``index.html``, naming the parts it reads: this run's, or all N shards'."""
    parts = ([part_folder((i, shard[1])) for i in range(shard[1])] if shard
             else [FOLDER])
    text = files(__package__).joinpath("report_assets", "index.html").read_text("utf-8")
    return text.replace(_PARTS, f"<script>window.CAM_PARTS = {json.dumps(parts)};</script>"
                        ).encode()


def url(target: str | Path, start: Path) -> str:
    """``target`` as a URL relative to the folder ``start`` (forward slashes, quoted)."""
    relative = os.path.relpath(os.path.abspath(target), os.path.abspath(start))
    return quote(relative.replace(os.sep, "/"))


def card(record: dict, root: Path) -> dict:
    """The page's view of one image's JSON record: names, numbers and relative URLs."""
    files = record.get("files", {})
    maps = record.get("maps", [])

    def file(kind: str, rank: int) -> str | None:
        name = files.get(kind if len(maps) == 1 else f"{kind}-{rank}")
        return url(name, root) if name else None

    return {"name": record["image"], "src": url(record["image"], root),
            "size": [record["size"]["width"], record["size"]["height"]],
            "top": [[t["class"], t["label"], t["prob"]] for t in record["top_k"]],
            "maps": [{"method": m.get("method", record.get("method", "cam")), "class": m["class"],
                      "label": m["label"], "prob": m["prob"], "boxes": m["boxes"],
                      "thumb": file("thumb", r), "overlay": file("overlay", r),
                      "heatmap": file("heatmap", r)} for r, m in enumerate(maps, 1)]}


def failed_card(path: Path, error: CamError, root: Path) -> dict:
    return {"name": str(path), "src": url(path, root), "error": str(error), "failed": True}


def _payload(pattern: re.Pattern[str], path: Path) -> str:
    """The JSON inside the script ``path`` that ``pattern`` matches; ValueError if
    it does not match."""
    found = pattern.fullmatch(path.read_text("utf-8"))
    if found is None:
        raise ValueError(f"{path}: not a report script")
    return found.group(1)


def read_cards(root: Path, shard: tuple[int, int] | None = None) -> list[dict]:
    """The cards of the report in ``root`` (of ``shard``'s part): those of the chunks
    its run.js names (none when there is no readable report)."""
    folder = root / part_folder(shard)
    try:
        run = json.loads(_payload(_RUN_TEXT, folder / "run.js"))
        cards = []
        for n in range(run["chunks"]):
            cards += json.loads(_payload(_CHUNK_TEXT, folder / f"data-{n:04d}.js"))
        return cards
    except (OSError, ValueError, KeyError, TypeError):
        return []


class ReportWriter:
    """Writes the page as a run goes: ``add`` after each batch, ``close`` at the end."""

    def __init__(self, root: Path, header: dict, options: Options,
                 shard: tuple[int, int] | None = None) -> None:
        """``header``: model, backend, methods and images (the run's count);
        ``shard``: (I, N) when this run is shard I of N (``--shard``)."""
        self.root, self.options = Path(root), options
        self.part = self.root / part_folder(shard)
        self.ledger = OutputLedger.of(self.root)
        self.header = {**header, "done": 0, "skipped": 0, "failed": [],
                       "started": datetime.now(UTC).isoformat(timespec="seconds")}
        self.start = time.monotonic()
        pages = [self.root / "index.html", *(self.root / FOLDER / a for a in ASSETS),
                 self.part / "run.js", *self.part.glob("data-*.js")]
        foreign = [] if options.overwrite else self.ledger.foreign(pages)
        if foreign:
            raise OutputError(f"{foreign[0]}: exists and was not written by cam-caffe; "
                              "--overwrite replaces it")
        self.previous = ({c["name"]: c for c in read_cards(self.root, shard)
                          if not c.get("failed")} if options.skip_existing else {})
        self.cards: list[dict] = []
        self.written = 0                 # chunks already final on disk
        for asset in ASSETS:
            self.write(self.root / FOLDER / asset,
                       files(__package__).joinpath("report_assets", asset).read_bytes())
        self.write(self.root / "index.html", page(shard))

    def write(self, path: Path, data: bytes) -> None:
        """``path`` listed as cam-caffe's, then written atomically."""
        self.ledger.record([path])
        write_bytes(path, data)

    def add(self, result: ChunkResult) -> None:
        """One chunk's outcome (``run_batch``'s ``on_chunk``): its records (done, or
        skipped by --skip-existing) and failures get their cards; the page is rewritten."""
        for record in result.records:
            skipped = bool(record.get("skipped"))
            self.cards.append(self.resumed(record) if skipped else card(record, self.root))
            self.header["skipped" if skipped else "done"] += 1
        self.cards += [failed_card(path, error, self.root) for path, error in result.failed]
        self.header["failed"] += [{"image": str(path), "error": str(error)}
                                  for path, error in result.failed]
        self.flush(finished=False)

    def resumed(self, record: dict) -> dict:
        """A skipped image's card: from the page already there, else from its saved
        record (``batch.skipped_record``), else just its name."""
        if record["image"] in self.previous:
            return self.previous[record["image"]]
        if "top_k" in record:
            return card(record, self.root)
        return {"name": record["image"], "src": url(record["image"], self.root), "top": [],
                "maps": [], "note": "done by an earlier run; no record of it"}

    def flush(self, finished: bool) -> None:
        """Replace the chunks that changed, then run.js (which names how many there are)."""
        chunks = max(1, -(-len(self.cards) // CHUNK))
        for n in range(self.written, chunks):
            text = json.dumps(self.cards[n * CHUNK:(n + 1) * CHUNK], ensure_ascii=False,
                              separators=(",", ":"))
            self.write(self.part / f"data-{n:04d}.js", f"CAM_CHUNK({n}, {text});\n".encode())
        self.written = chunks - 1
        wall = time.monotonic() - self.start
        self.header.update(chunks=chunks, finished=finished, wall_s=round(wall, 3),
                           images_per_s=round(self.header["done"] / wall, 2) if wall > 0 else 0)
        self.write(self.part / "run.js",
                   f"CAM_RUN = {json.dumps(self.header, ensure_ascii=False)};\n".encode())
        if finished:
            for stale in self.part.glob("data-*.js"):
                match = _CHUNK_FILE.fullmatch(stale.name)
                if match and int(match.group(1)) >= chunks:
                    stale.unlink()

    def close(self) -> None:
        """The run is over: say so, with its final time."""
        self.flush(finished=True)
