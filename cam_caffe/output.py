"""Write files atomically: a temporary file in the same folder, then a rename.

A crash, a full disk or an unwritable folder never leaves a half-written file
under the final name.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

from .errors import OutputError

_UMASK = os.umask(0)
os.umask(_UMASK)
IMAGE_FORMATS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def cache_home(kind: str) -> Path:
    """``$XDG_CACHE_HOME/cam-caffe/<kind>`` (``~/.cache`` when unset, empty or relative)."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "cam-caffe" / kind


def write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path``, creating its folder."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)       # mkstemp's 0600 → the usual file mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None


def encode_image(path: str | Path, image: np.ndarray) -> bytes:
    """Encode a BGR image in the format named by ``path``'s extension."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise OutputError(f"{path}: unknown image format {suffix!r}; "
                          f"use one of {', '.join(sorted(IMAGE_FORMATS))}")
    ok, buffer = cv2.imencode(suffix, image)
    if not ok:
        raise OutputError(f"{path}: could not encode the image")
    return buffer.tobytes()


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Atomically write a BGR image; the format follows the extension."""
    write_bytes(path, encode_image(path, image))
