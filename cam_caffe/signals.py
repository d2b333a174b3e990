"""Ctrl-C and SIGTERM: both stop a run the same way (work in flight is finished or
removed, what is done is reported), with exit 130 or 143.

Like ``make`` and ``rsync``, an interrupted cam-caffe never leaves half-done work
that looks done: a file is complete under its final name or absent (see
output.py), and every image whose outputs exist has had its JSON line printed.
While that last bookkeeping runs, further signals are held back, so a second
Ctrl-C cannot cut it short.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Iterator

from .errors import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def raise_on_signals() -> None:
    """From now on SIGINT raises KeyboardInterrupt and SIGTERM Terminated (its subclass)."""
    for signum in SIGNALS:
        signal.signal(signum, _raise)


def ignore_signals() -> None:
    """From now on SIGINT and SIGTERM do nothing (the process is on its way out)."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """130 for Ctrl-C, 143 for SIGTERM."""
    return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED


@contextmanager
def held(received: list[int] | None = None) -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM back during the block: they are recorded in the list
    it yields instead of interrupting. On the main thread only (elsewhere signals
    are not delivered, and nothing changes). The previous handlers come back after."""
    received = [] if received is None else received
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {signum: signal.signal(signum, lambda s, f: received.append(s))
                for signum in SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
