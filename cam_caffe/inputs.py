"""Expand the command line's inputs into image files, each with a unique output name.

An input is a file, a directory (searched recursively by image extension), a
glob pattern, ``@list.txt`` (one input a line) or ``-`` (inputs on stdin, one
a line, or the bytes of one image, named ``stdin``).
Output names mirror each file's path relative to the directory or pattern it
came from, so ``photos/a/x.jpg`` from ``photos`` becomes ``a/x`` under the
output directory; files with the same name get ``-2``, ``-3``… suffixes.
"""
from __future__ import annotations

import glob
import io
import itertools
import os
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import BinaryIO, TextIO

from .errors import EXIT_INPUT, CamError
from .files import IMAGE_EXTENSIONS, LIST_LIMIT, MiB, read_limited
from .naming import OUTPUT_NAME


@dataclass(frozen=True)
class Input:
    """One image to process and the stem of its output files (relative); ``data``
    holds the encoded image when it came on stdin rather than from a file."""

    path: Path
    stem: PurePath
    data: bytes | None = field(default=None, repr=False)


STDIN_NAME = Path("-")


def _lines(data: bytes, origin: str) -> Iterator[tuple[str, CamError | None]]:
    """(entry, problem) per non-blank, non-comment line of a list. Bytes that are
    not UTF-8 stay the file-name bytes they were (as ``os.fsdecode`` keeps them);
    a line with a NUL byte cannot name a file and is a problem of its own."""
    for number, raw in enumerate(data.split(b"\n"), 1):
        line = os.fsdecode(raw.strip())
        if not line or line.startswith("#"):
            continue
        if "\0" in line:
            yield line, CamError(f"{origin}:{number}: the line contains a NUL byte, "
                                 "which no file name can", EXIT_INPUT)
        else:
            yield line, None


def _read_stdin(stdin: TextIO | BinaryIO | None) -> bytes:
    """All of stdin, at most LIST_LIMIT bytes."""
    source = getattr(stdin, "buffer", stdin)
    if source is None:
        raise CamError("stdin: closed, so '-' has no inputs to read", EXIT_INPUT)
    try:
        data = source.read(LIST_LIMIT + 1)
    except OSError as e:
        raise CamError(f"stdin: cannot read: {e.strerror or e}", EXIT_INPUT) from None
    if isinstance(data, str):                     # a text stream without a buffer (tests)
        data = os.fsencode(data)
    if len(data) > LIST_LIMIT:
        raise CamError(f"stdin: larger than {LIST_LIMIT // MiB} MiB, the limit for a list "
                       "of inputs", EXIT_INPUT)
    return data


def _is_image(data: bytes) -> bool:
    """Whether ``data`` is an image Pillow recognises (for image bytes piped to ``-``)."""
    from .image import open_image  # here, not at the top: the commands' start-up loads no Pillow
    try:
        with open_image(io.BytesIO(data)):
            return True
    except Exception:   # any failure to identify means "not an image": read it as a list
        return False


def identity(path: Path) -> Path:
    """``path`` with symlinks resolved, to tell files apart; a path that cannot be
    resolved (a symlink loop, too long, a NUL byte) stands for itself."""
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):
        return Path(os.path.abspath(path))


def _walk(folder: Path, skip: Path | None) -> list[Path]:
    """Image files under ``folder``, leaving out the output directory ``skip``."""
    root = identity(folder)
    holds_output = skip is not None and (skip == root or root in skip.parents)
    found = []
    for path in sorted(folder.rglob("*")):
        if holds_output and (OUTPUT_NAME.search(path.name)
                             or (skip != root and skip in identity(path).parents)):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS and not path.is_dir():
            found.append(path)
    return found


class _Expansion:
    """Turns input specs into (file, stem) pairs; what cannot be expanded is kept
    in ``problems`` and the rest goes on."""

    def __init__(self, skip: Path | None, stdin: TextIO | BinaryIO | None) -> None:
        self.skip, self.stdin = skip, stdin
        self.problems: list[CamError] = []
        self.open_lists: list[Path] = []       # the chain of @lists being read

    def expand(self, spec: str) -> Iterator[tuple[Path, PurePath, bytes | None]]:
        try:
            if spec == "-":
                yield from self._stdin()
            elif spec.startswith("@"):
                yield from self._list(Path(spec[1:]))
            else:
                yield from ((file, stem, None) for file, stem in self._path(spec))
        except CamError as e:
            self.problems.append(e)
        except (OSError, RuntimeError, ValueError) as e:   # a loop, a name too long…
            self.problems.append(CamError(f"{spec}: cannot list: "
                                          f"{getattr(e, 'strerror', None) or e}", EXIT_INPUT))

    def _stdin(self) -> Iterator[tuple[Path, PurePath, bytes | None]]:
        data = _read_stdin(self.stdin)
        if _is_image(data):
            yield STDIN_NAME, PurePath("stdin"), data
        else:
            yield from self._entries(data, "stdin")

    def _list(self, listing: Path) -> Iterator[tuple[Path, PurePath, bytes | None]]:
        key = identity(listing)
        if key in self.open_lists:
            raise CamError(f"{listing}: list file includes itself")
        data = read_limited(listing, "list file", LIST_LIMIT)
        self.open_lists.append(key)
        try:
            yield from self._entries(data, str(listing))
        finally:
            self.open_lists.pop()

    def _entries(self, data: bytes, origin: str) -> Iterator[tuple[Path, PurePath, bytes | None]]:
        for line, problem in _lines(data, origin):
            if problem:
                self.problems.append(problem)
            elif line == "-":
                self.problems.append(CamError(f"{origin}: '-' (stdin) inside a list", EXIT_INPUT))
            else:
                yield from self.expand(line)

    def _path(self, spec: str) -> Iterator[tuple[Path, PurePath]]:
        path = Path(spec)
        if path.is_dir():
            for file in _walk(path, self.skip):
                yield file, file.relative_to(path).with_suffix("")
            return
        if glob.has_magic(spec) and not os.path.lexists(path):   # "a[1].jpg" may be a name
            fixed = itertools.takewhile(lambda part: not glob.has_magic(part), path.parts)
            base = Path(*fixed)
            for match in sorted(glob.glob(spec, recursive=True)):
                file = Path(match)
                if file.suffix.lower() in IMAGE_EXTENSIONS and not file.is_dir():
                    yield file, file.relative_to(base).with_suffix("")
            return
        yield path, PurePath(path.stem)      # a file, or a bad path reported when loaded


def collect(specs: list[str], output_dir: Path | None = None,
            stdin: TextIO | BinaryIO | None = None,
            problems: list[CamError] | None = None) -> list[Input]:
    """All inputs in order, each file once, with unique output stems.

    A list file or folder that cannot be read, or a list line that cannot name a
    file, goes into ``problems`` and the other inputs are still collected; without
    ``problems`` the first one is raised.
    """
    skip = identity(output_dir) if output_dir else None
    expansion = _Expansion(skip, stdin if stdin is not None else sys.stdin)
    inputs: list[Input] = []
    seen: set[Path] = set()
    stems: set[str] = set()
    counters: dict[str, int] = {}     # the last -N suffix tried per stem: linear, not quadratic
    for spec in specs:
        for file, stem, data in expansion.expand(spec):
            key = identity(file) if data is None else file
            if key in seen:
                continue
            seen.add(key)
            base = str(stem).lower()
            n = counters.get(base, 1)
            unique = stem if n == 1 else stem.with_name(f"{stem.name}-{n}")
            while str(unique).lower() in stems:
                n += 1
                unique = stem.with_name(f"{stem.name}-{n}")
            counters[base] = n
            stems.add(str(unique).lower())
            inputs.append(Input(file, unique, data))
    if problems is None and expansion.problems:
        raise expansion.problems[0]
    if problems is not None:
        problems.extend(expansion.problems)
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
