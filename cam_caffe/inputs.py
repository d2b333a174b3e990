"""Expand the command line's inputs into image files, each with a unique output name.

An input is a file, a directory (searched recursively by image extension), a
glob pattern, ``@list.txt`` (one input a line) or ``-`` (inputs on stdin).
Output names mirror each file's path relative to the directory or pattern it
came from, so ``photos/a/x.jpg`` from ``photos`` becomes ``a/x`` under the
output directory; files with the same name get ``-2``, ``-3``… suffixes.
"""
from __future__ import annotations

import glob
import itertools
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Iterable, TextIO

from .errors import CamError
from .image import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Input:
    """One image to process and the stem of its output files (relative)."""

    path: Path
    stem: PurePath


def _lines(source: TextIO) -> list[str]:
    return [line.strip() for line in source if line.strip() and not line.startswith("#")]


# Names of the files cam-caffe writes (see batch.py), never taken as inputs from
# a folder that holds the output directory.
OUTPUT_NAME = re.compile(r"\.(cam|heatmap)(-\d+)?\.(png|jpg)$|\.montage\.(png|jpg)$")


def _walk(folder: Path, skip: Path | None) -> list[Path]:
    """Image files under ``folder``, leaving out the output directory ``skip``."""
    root = folder.resolve()
    holds_output = skip is not None and (skip == root or root in skip.parents)
    found = []
    for path in sorted(folder.rglob("*")):
        if holds_output and (OUTPUT_NAME.search(path.name)
                             or (skip != root and skip in path.resolve().parents)):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS and not path.is_dir():
            found.append(path)
    return found


def _expand(spec: str, skip: Path | None, stdin: TextIO, seen_lists: set) -> Iterable[tuple[Path, PurePath]]:
    """(file, relative stem source) pairs for one input spec."""
    if spec == "-":
        for line in _lines(stdin):
            yield from _expand(line, skip, stdin, seen_lists)
        return
    if spec.startswith("@"):
        listing = Path(spec[1:])
        if listing.resolve() in seen_lists:
            raise CamError(f"{listing}: list file includes itself")
        seen_lists.add(listing.resolve())
        try:
            with open(listing, encoding="utf-8") as f:
                lines = _lines(f)
        except OSError as e:
            raise CamError(f"{listing}: cannot read list file: {e.strerror}") from None
        for line in lines:
            yield from _expand(line, skip, stdin, seen_lists)
        return
    path = Path(spec)
    if path.is_dir():
        for file in _walk(path, skip):
            yield file, file.relative_to(path).with_suffix("")
        return
    if glob.has_magic(spec):
        fixed = itertools.takewhile(lambda part: not glob.has_magic(part), path.parts)
        base = Path(*fixed)
        for match in sorted(glob.glob(spec, recursive=True)):
            file = Path(match)
            if file.suffix.lower() in IMAGE_EXTENSIONS and not file.is_dir():
                yield file, file.relative_to(base).with_suffix("")
        return
    yield path, PurePath(path.stem)          # a file, or a bad path reported later


def collect(specs: list[str], output_dir: Path | None = None,
            stdin: TextIO | None = None) -> list[Input]:
    """All inputs in order, each file once, with unique output stems."""
    skip = output_dir.resolve() if output_dir else None
    inputs: list[Input] = []
    seen: set[Path] = set()
    stems: set[str] = set()
    for spec in specs:
        for file, stem in _expand(spec, skip, stdin or sys.stdin, set()):
            key = file.resolve()
            if key in seen:
                continue
            seen.add(key)
            unique, n = stem, 1
            while str(unique).lower() in stems:
                n += 1
                unique = stem.with_name(f"{stem.name}-{n}")
            stems.add(str(unique).lower())
            inputs.append(Input(file, unique))
    return inputs


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` with 0 ≤ I < N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise CamError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise CamError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


def in_shard(item: Input, shard: tuple[int, int]) -> bool:
    """Deterministic split by the output stem's CRC-32, independent of input order."""
    index, count = shard
    return zlib.crc32(str(item.stem).encode()) % count == index
