"""A memory budget for the images in flight, checked before any pixel is decoded
(like ImageMagick's policy limits): an image that could never fit is refused
with one line, one that does not fit now waits for the images ahead of it.

The budget is ``CAM_CAFFE_MEMORY`` (bytes, or with a K, M, G or T suffix), by
default half the memory available when the run starts (MemAvailable, capped
by a cgroup's memory.max).
"""
from __future__ import annotations

import os
import re
import threading
from contextlib import AbstractContextManager
from pathlib import Path

from .errors import EXIT_USAGE, CamError, ImageError

ENV = "CAM_CAFFE_MEMORY"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class Postponed(Exception):
    """An image that does not fit in the budget now, while others are held."""


def parse_size(text: str) -> int:
    """``123``, ``512M``, ``2G``, ``1.5GiB`` → bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise CamError(f"{ENV}={text!r}: expected a size in bytes like 2G or 512M", EXIT_USAGE)
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def available_memory() -> int | None:
    """Bytes of memory this process can still get: MemAvailable, or less under a
    cgroup limit; None when unknown."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    found = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.M)
    if found is None:
        return None
    available = int(found.group(1)) * 1024
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return available


def memory_budget() -> int | None:
    """The budget in bytes: $CAM_CAFFE_MEMORY, else half the available memory."""
    text = os.environ.get(ENV, "").strip()
    if text:
        return parse_size(text)
    available = available_memory()
    return None if available is None else available // 2


def show(size: int) -> str:
    return f"{size / (1 << 20):.0f} MiB"


class MemoryBudget:
    """Bytes reserved by the images in flight, never more than ``total`` (None: no
    limit) — except that one image alone is always let in when it fits at all."""

    def __init__(self, total: int | None) -> None:
        self.total, self.used = total, 0
        self._lock: AbstractContextManager[bool] = threading.Lock()

    def reserve(self, size: int, path: Path, width: int, height: int) -> int:
        """Take ``size`` bytes for image ``path``: ImageError when it can never fit,
        Postponed when it does not fit now. Returns the size, to give back later."""
        if self.total is None:
            return 0
        if size > self.total:
            raise ImageError(f"{path}: {width}x{height} pixels would need about {show(size)}, "
                             f"over the memory budget of {show(self.total)} (set {ENV})")
        with self._lock:
            if self.used and self.used + size > self.total:
                raise Postponed()
            self.used += size
        return size

    def release(self, size: int) -> None:
        """Give back what :meth:`reserve` returned."""
        with self._lock:
            self.used -= size
