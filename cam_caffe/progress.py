"""A one-line progress bar on stderr, shown only when asked (on a terminal)."""
from __future__ import annotations

import sys
import time


class Progress:
    """``[#####     ] 512/1024 img 12.3/s``, redrawn in place. ``clear()`` takes it
    off its line before other text goes to the terminal (stdout and stderr often
    share one); the next ``update()`` draws it again. At the total it stays, on a
    line of its own."""

    CLEAR_LINE = "\r\033[K"

    def __init__(self, total: int, enabled: bool, unit: str = "img") -> None:
        self.total, self.enabled, self.unit = total, enabled, unit
        self.start = time.monotonic()
        self.shown = False

    def update(self, count: int) -> None:
        if not self.enabled or not self.total:
            return
        rate = count / max(time.monotonic() - self.start, 1e-9)
        filled = round(30 * count / self.total)
        sys.stderr.write(f"{self.CLEAR_LINE}[{'#' * filled}{' ' * (30 - filled)}] "
                         f"{count}/{self.total} {self.unit} {rate:.1f}/s")
        self.shown = count != self.total
        if not self.shown:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write(self.CLEAR_LINE)
            sys.stderr.flush()
            self.shown = False
