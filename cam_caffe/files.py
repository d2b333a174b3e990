"""Reading the files a user names, safely: only regular files (and pipes where a
stream makes sense), and never more than a stated limit.

An image must be a regular file: a FIFO would block the run and a device like
``/dev/zero`` never ends. Lists, prototxts and labels may also come from a pipe
(``@<(find …)``, ``--prototxt <(…)``); their reads stop at a limit, so
``@/dev/zero`` or a runaway pipe is an error, not an endless read.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import CamError

MiB = 1 << 20
LIST_LIMIT = 256 * MiB      # @list files and stdin: ~4 million paths
TEXT_LIMIT = 64 * MiB       # prototxt and labels files (GoogLeNet's prototxt: 50 KB)
DEFAULT_MAX_PIXELS = 100_000_000   # an image's pixels (100 megapixels); --max-pixels changes it
# What a directory or glob input takes as images
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".pbm", ".jfif"}

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def kind_of(mode: int) -> str:
    """'a regular file', 'a FIFO', 'a directory'… for a stat mode."""
    return next((name for test, name in _KINDS if test(mode)), "a regular file")


def open_regular(path: Path, what: str, error: type[CamError] = CamError,
                 pipes: bool = False) -> int:
    """A read descriptor for ``path``; anything but a regular file (or, with
    ``pipes``, a FIFO) is refused before a byte is read.

    Regular files are opened non-blocking and checked on the open descriptor, so
    a FIFO swapped in after the check cannot block.
    """
    def refuse(problem: str) -> CamError:
        return error(f"{path}: {problem}")
    try:
        mode = os.stat(path).st_mode
        if pipes and stat.S_ISFIFO(mode):
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)    # a stream: wait for its writer
        if not stat.S_ISREG(mode):
            raise refuse(f"is {kind_of(mode)}, not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise refuse(f"{what} not found") from None
    except PermissionError:
        raise refuse("permission denied") from None
    except OSError as e:
        raise refuse(f"cannot read {what}: {e.strerror or e}") from None
    except ValueError:                                   # a NUL byte in the name
        raise refuse("the file name contains a NUL byte") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise refuse(f"is {kind_of(mode)}, not a regular file")
    os.set_blocking(fd, True)
    return fd


def read_limited(path: Path, what: str, limit: int, error: type[CamError] = CamError,
                 pipes: bool = True) -> bytes:
    """The whole of ``path`` (a regular file or a pipe), at most ``limit`` bytes."""
    fd = open_regular(path, what, error, pipes)
    with open(fd, "rb") as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise error(f"{path}: cannot read {what}: {e.strerror or e}") from None
    if len(data) > limit:
        raise error(f"{path}: {what} is larger than {limit // MiB} MiB, the limit")
    return data
