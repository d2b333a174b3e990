"""Encode images and write files atomically: a temporary file in the same
folder, then a rename.

A crash, a kill, a full disk or an unwritable folder never leaves a
half-written file under the final name. Files are not fsync'ed (no more than
cv2.imwrite or PIL do): that would cost 0.3 ms a file here and far more on
network file systems, for outputs that a rerun recreates.

PNG, the default output format, is encoded here rather than by OpenCV: the
same lossless PNG in a third of the time (ISA-L's deflate instead of zlib's;
``benchmarks/bench_stages.py``).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import re
import secrets
import stat
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

import numpy as np
from isal import isal_zlib

from .errors import OutputError

IMAGE_FORMATS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def cache_home(kind: str) -> Path | None:
    """``$XDG_CACHE_HOME/cam-caffe/<kind>``; ``~/.cache`` when that variable is unset,
    empty or relative. The home is ``$HOME``, or the passwd entry's when HOME is unset
    or empty; None when neither is an absolute path (a uid without a passwd entry in
    a container, ``HOME=relative``): no cache then."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    if not os.path.isabs(base):
        home = os.environ.get("HOME") or _passwd_home()
        if not os.path.isabs(home):
            return None
        base = os.path.join(home, ".cache")
    return Path(base) / "cam-caffe" / kind


def _passwd_home() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return ""


def write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path``, creating its folder. A symlink is
    followed (its target is written); anything but a regular file or a missing
    path (a device, a FIFO, a folder) is refused, never replaced."""
    path = Path(path)
    target = replaceable(path)
    try:
        fd, tmp = temporary_beside(target)
    except OSError as e:
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        publish(tmp, target)
    except BaseException as e:               # a full disk, or Ctrl-C in the middle
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None
        raise


# A temporary file is ".<name>.<random>.<host>-<pid>.tmp": the host and pid of the
# process writing it let a later run prove it abandoned (see remove_stale). <name>
# is the target's name, cut to _NAME_ROOM bytes so the whole fits NAME_MAX.
_HOST = f"{zlib.crc32(os.uname().nodename.encode()):08x}"
_TEMPORARY = re.compile(r"^\.(?P<name>.*)\.[a-z0-9_]{8}\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.tmp$",
                        re.DOTALL)
NAME_MAX = 255             # bytes in a file name, on every common Linux file system
_NAME_ROOM = NAME_MAX - len("..12345678.12345678-4194304.tmp")    # pids have ≤ 7 digits
STALE_AGE = 3600           # seconds after which any host's temporary is abandoned
_cleaned: set[Path] = set()
_cleaned_lock = threading.Lock()


def _temporary_name(name: str) -> str:
    """The <name> part of a temporary for target ``name``: at most _NAME_ROOM bytes
    (cut between bytes; a name is bytes to the file system)."""
    return os.fsdecode(os.fsencode(name)[:_NAME_ROOM])


def replaceable(path: Path) -> Path:
    """The file that writing ``path`` replaces: ``path`` or its symlink's target.
    OutputError when that exists and is not a regular file."""
    target = Path(os.path.realpath(path))
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    except OSError as e:
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a device" if stat.S_ISCHR(mode)
                or stat.S_ISBLK(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a socket")
        via = f" (through a symlink to {target})" if target != path.absolute() else ""
        raise OutputError(f"{path}: is {kind}{via}, not a regular file: not replacing it")
    return target


def temporary_beside(path: Path) -> tuple[int, str]:
    """A new temporary file ``.<name>.*.tmp`` in ``path``'s folder (created if
    missing): (open descriptor, name). OSError when the folder is not writable.

    The name is shortened so the temporary fits in NAME_MAX bytes wherever the
    final name does. Abandoned temporaries of earlier runs there are removed first.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent)
    prefix, suffix = f".{_temporary_name(path.name)}.", f".{_HOST}-{os.getpid()}.tmp"
    # O_EXCL: never an existing file, nor a symlink's target (POSIX: O_CREAT|O_EXCL fails
    # on a symlink); os.open makes the descriptor close-on-exec itself (PEP 446)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
    for _ in range(100):
        name = os.path.join(path.parent, prefix + secrets.token_hex(4) + suffix)
        try:
            # mode 0666 less the umask, as for any new file (mkstemp's would be 0600)
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path.parent))


def _temporaries(folder: Path) -> list[tuple[os.DirEntry, re.Match]]:
    """The files in ``folder`` named like temporary_beside's, with their name parts."""
    try:
        return [(e, m) for e in os.scandir(folder) if (m := _TEMPORARY.match(e.name))]
    except OSError:
        return []


def _remove(entry: os.DirEntry) -> bool:
    try:
        if entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            return True
    except OSError:
        pass                            # gone meanwhile, or not ours to remove
    return False


def remove_stale(folder: Path) -> int:
    """Remove the temporaries in ``folder`` that a killed cam-caffe left behind: those
    of a process of this host that is gone, and any older than STALE_AGE. Each
    folder is looked at once per process; returns how many were removed."""
    folder = Path(os.path.abspath(folder))
    with _cleaned_lock:
        if folder in _cleaned:
            return 0
        _cleaned.add(folder)
    now, removed = time.time(), 0
    for entry, match in _temporaries(folder):
        try:
            stale = (match["host"] == _HOST and not _alive(int(match["pid"]))) or (
                now - entry.stat(follow_symlinks=False).st_mtime > STALE_AGE)
        except OSError:
            continue
        if stale and _remove(entry):
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:                   # another user's process
        return True
    return True


def remove_temporaries(targets: Iterable[Path]) -> None:
    """Remove the temporaries that :func:`temporary_beside` made for ``targets`` and
    a killed writer (of any host) left behind. Only while no writer of those
    targets runs."""
    by_folder: dict[Path, set[str]] = {}
    for target in targets:
        by_folder.setdefault(target.parent, set()).add(_temporary_name(target.name))
    for folder, names in by_folder.items():
        for entry, match in _temporaries(folder):
            if match["name"] in names:
                _remove(entry)


def publish(temporary: str | Path, path: str | Path) -> None:
    """Rename a finished temporary file (in ``path``'s folder) to ``path``, atomically;
    OutputError naming ``path`` when that fails."""
    try:
        os.replace(temporary, path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None


def image_format(path: str | Path) -> str:
    """The image format ``path``'s extension names (".png"…); OutputError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        what = f"unknown image format {suffix!r}" if suffix else "no extension"
        raise OutputError(f"{path}: {what}; use one of {', '.join(sorted(IMAGE_FORMATS))}")
    return suffix


def check_writable(folder: Path, target: Path | None = None) -> None:
    """Make sure files can be written in ``folder``, or created where it is missing,
    by creating and removing a file in the folder or its nearest existing ancestor:
    OutputError otherwise, naming ``target`` (the file to be written) or the folder.
    Nothing is left behind, so this runs before any work is done."""
    name = target or folder
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{name}: cannot write: {existing} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".cam-caffe-probe.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{name}: cannot write: {e.strerror or e}") from None


def encode_image(path: str | Path, image: np.ndarray) -> bytes:
    """Encode a BGR image in the format named by ``path``'s extension."""
    suffix = image_format(path)
    if suffix == ".png":
        return encode_png(image)
    import cv2  # here, not at the top: the commands' start-up does not load OpenCV
    ok, buffer = cv2.imencode(suffix, image)
    if not ok:
        raise OutputError(f"{path}: could not encode the image")
    return buffer.tobytes()


def encode_png(image: np.ndarray) -> bytes:
    """A BGR (H, W, 3) or grey (H, W) uint8 image as an 8-bit PNG.

    Every row gets PNG filter 1 (Sub: each byte minus the same channel of the
    pixel to its left), then ISA-L deflate level 1.
    """
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
            image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"encode_png takes uint8 BGR or grey images, not {image.dtype} "
                         f"{image.shape}")
    height, width = image.shape[:2]
    channels, colour_type = (3, 2) if image.ndim == 3 else (1, 0)
    import cv2  # here, not at the top: the commands' start-up does not load OpenCV
    pixels = cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if channels == 3 else image
    rows = np.ascontiguousarray(pixels).reshape(height, width * channels)
    filtered = np.empty((height, width * channels + 1), np.uint8)
    filtered[:, 0] = 1
    filtered[:, 1:channels + 1] = rows[:, :channels]
    np.subtract(rows[:, channels:], rows[:, :-channels], out=filtered[:, channels + 1:])
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"".join((b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", header),
                     _chunk(b"IDAT", isal_zlib.compress(filtered, 1)), _chunk(b"IEND", b"")))


def _chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 of type and data."""
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Atomically write a BGR image; the format follows the extension."""
    write_bytes(path, encode_image(path, image))


class OutputLedger:
    """Which files under an output folder cam-caffe wrote: a run may replace its own
    earlier outputs (a rerun of the same command), never a file someone else put
    there under an output's name (unless asked, with --overwrite).

    Each process that writes under ``folder`` lists what it writes in a file of its
    own, ``folder/.cam-caffe/written-*.txt`` (one JSON string a line: the path
    relative to ``folder``), before writing it; so shards and workers that share a
    folder never write the same list. What the lists hold is read when an existing
    file at an output's name is not known yet (only what was added since the last
    read). ``OutputLedger.of(folder)`` is the process's one ledger of a folder.
    """

    DIRECTORY = ".cam-caffe"
    _of: ClassVar[dict[str, OutputLedger]] = {}
    _of_lock = threading.Lock()

    def __init__(self, folder: Path) -> None:
        self.folder = Path(os.path.abspath(folder))
        self._known: set[str] = set()
        self._read: dict[str, int] = {}          # bytes of each list read so far
        self._list: int | None = None            # this process's list, once it writes
        self._lock = threading.Lock()

    @classmethod
    def of(cls, folder: Path) -> OutputLedger:
        """This process's ledger of ``folder``."""
        key = os.path.abspath(folder)
        with cls._of_lock:
            if key not in cls._of:
                cls._of[key] = cls(Path(key))
            return cls._of[key]

    def foreign(self, paths: Iterable[Path]) -> list[Path]:
        """The existing files among ``paths`` that no cam-caffe run wrote."""
        existing = [p for p in paths if os.path.lexists(p)]
        if not existing:
            return []
        with self._lock:
            keys = [self._key(p) for p in existing]
            if not self._known.issuperset(keys):
                self._refresh()
            return [p for p, key in zip(existing, keys, strict=True) if key not in self._known]

    def record(self, paths: Iterable[Path]) -> None:
        """List ``paths`` as cam-caffe's, before they are written."""
        with self._lock:
            new = [key for key in map(self._key, paths) if key not in self._known]
            if not new:
                return
            try:
                if self._list is not None and os.fstat(self._list).st_nlink == 0:
                    os.close(self._list)           # the folder was removed meanwhile
                    self._list = None
                if self._list is None:
                    folder = self.folder / self.DIRECTORY
                    folder.mkdir(parents=True, exist_ok=True)
                    self._list, _ = tempfile.mkstemp(prefix="written-", suffix=".txt",
                                                     dir=folder)
                os.write(self._list, "".join(json.dumps(k) + "\n" for k in new).encode())
            except OSError as e:
                raise OutputError(f"{self.folder / self.DIRECTORY}: cannot write: "
                                  f"{e.strerror or e}") from None
            self._known.update(new)

    def _key(self, path: Path) -> str:
        return Path(os.path.abspath(path)).relative_to(self.folder).as_posix()

    def _refresh(self) -> None:
        """Read the lines added to the lists since the last read (whole lines only)."""
        for listing in (self.folder / self.DIRECTORY).glob("written-*.txt"):
            offset = self._read.get(listing.name, 0)
            try:
                with open(listing, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except OSError:
                continue
            data = data[:data.rfind(b"\n") + 1]
            self._read[listing.name] = offset + len(data)
            for line in data.decode("utf-8", "replace").splitlines():
                with contextlib.suppress(ValueError):     # not a record (a damaged list)
                    self._known.add(json.loads(line))
