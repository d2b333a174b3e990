"""A one-line progress bar on stderr, shown only when asked (on a terminal)."""
from __future__ import annotations

import sys
import time


class Progress:
    """``[#####     ] 512/1024 images 12.3/s``, redrawn in place."""

    def __init__(self, total: int, enabled: bool, unit: str = "img") -> None:
        self.total, self.enabled, self.unit = total, enabled, unit
        self.start = time.monotonic()

    def update(self, count: int) -> None:
        if not self.enabled or not self.total:
            return
        rate = count / max(time.monotonic() - self.start, 1e-9)
        filled = round(30 * count / self.total)
        sys.stderr.write(f"\r[{'#' * filled}{' ' * (30 - filled)}] {count}/{self.total} "
                         f"{self.unit} {rate:.1f}/s")
        if count == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()
