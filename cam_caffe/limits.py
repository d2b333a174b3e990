"""Memory checked before anything is allocated: what a forward pass needs, against a limit.

``netdef.forward_bytes`` estimates, from the inferred blob shapes, the bytes a
forward of a batch needs (every blob and every learned parameter, float32),
in exact Python integers, so that no input size, however absurd, overflows.
A net is refused before any backend is created when one image does not fit
under the limit, and ``max_batch`` tells the batch how many images fit.

The default limit is half the memory available when the net is loaded (within
a cgroup's limit, as ``cam_caffe.budget`` reads it); ``--max-memory`` sets it.
It is apart from ``CAM_CAFFE_MEMORY``, the budget of the images in flight.
"""
from __future__ import annotations

import os

from . import budget
from .errors import ModelError
from .netdef import NetDef, forward_bytes


def default_max_memory() -> int:
    """Half the available memory; half the RAM when that is unknown."""
    available = budget.available_memory()
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return available // 2


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
