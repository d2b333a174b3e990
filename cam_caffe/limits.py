"""Memory checked before anything is allocated: what a forward pass needs, against a limit.

``netdef.forward_bytes`` estimates, from the inferred blob shapes, the bytes a
forward of a batch needs (every blob and every learned parameter, float32),
in exact Python integers, so that no input size, however absurd, overflows.
A net is refused before any backend is created when one image does not fit
under the limit, and ``max_batch`` tells the batch how many images fit.

The default limit is half the machine's memory (or of the cgroup's limit in a
container, whichever is smaller); ``--max-memory`` changes it.
"""
from __future__ import annotations

import os
import re

from .errors import CamError, ModelError
from .netdef import NetDef, forward_bytes

DEFAULT_FRACTION = 0.5
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def physical_memory() -> int:
    """Bytes of memory this process may use: RAM, or the cgroup's limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_max_memory() -> int:
    """The default limit: half of ``physical_memory()``."""
    return int(physical_memory() * DEFAULT_FRACTION)


def parse_size(text: str) -> int:
    """Bytes from ``8G``, ``512M``, ``1.5T``, ``64GiB`` or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise CamError(f"{text!r} is not a size like 8G, 512M or 1000000000")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise CamError(f"{text!r}: the size must be more than 0 bytes")
    return size


def human(size: int) -> str:
    """``size`` bytes for people: 1.5 GiB, 112 GiB; a power of ten past 1024 EiB."""
    if size >= 1 << 70:
        return f"10^{len(str(size)) - 1} bytes"
    for unit, scale in (("EiB", 1 << 60), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20),
                        ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"


def check(netdef: NetDef, images: int, limit: int) -> None:
    """ModelError unless a forward of ``images`` inputs fits under ``limit`` bytes."""
    need = forward_bytes(netdef, images)
    if need > limit:
        _, _, h, w = netdef.input_shape
        what = "one input" if images == 1 else f"a batch of {images} inputs"
        raise ModelError(f"{netdef.path}: {what} of {h}x{w} needs about {human(need)} for the "
                         f"forward pass (blobs and weights), over the limit of {human(limit)}; "
                         "use a smaller --input-size or --batch-size, or raise --max-memory")


def max_batch(netdef: NetDef, limit: int, per_image: int = 1) -> int:
    """The most images (of ``per_image`` inputs each, 10 for ten crops) one forward may
    take under ``limit``; ModelError when not even one fits."""
    check(netdef, per_image, limit)
    weights = forward_bytes(netdef, 0)
    per_input = forward_bytes(netdef, 1) - weights
    return (limit - weights) // (per_input * per_image) if per_input else 1 << 30
