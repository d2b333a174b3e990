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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from .errors import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated

# A signal ignored when cam-caffe starts (SIGINT for a background job of a script,
# SIGTERM under some supervisors) stays ignored, as Python itself does for SIGINT.
SIGNALS = tuple(signum for signum in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(signum) != signal.SIG_IGN)


def _raise(signum: int, frame: FrameType | None) -> None:
    raise interrupt_for(signum)


def raise_on_signals() -> None:
    """From now on SIGINT raises KeyboardInterrupt and SIGTERM Terminated (its subclass)."""
    for signum in SIGNALS:
        signal.signal(signum, _raise)


@contextmanager
def blocked() -> Iterator[None]:
    """SIGINT and SIGTERM blocked in this thread during the block: one that comes
    meanwhile is delivered after it. A process started meanwhile inherits the
    block from its first instruction on, so it can never be interrupted, not
    even while Python starts up and imports."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_signals() -> None:
    """From now on SIGINT and SIGTERM do nothing (the process is on its way out)."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """130 for Ctrl-C, 143 for SIGTERM."""
    return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED


def interrupt_for(signum: int) -> KeyboardInterrupt:
    """The exception a signal stands for: Terminated for SIGTERM, else KeyboardInterrupt."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back during the block, then raise the first one received
    (KeyboardInterrupt or Terminated): for imports, where an exception raised by a
    signal handler can land in the import machinery's callbacks and be lost."""
    with held() as received:
        yield
    if received:
        raise interrupt_for(received[0])


@contextmanager
def held(on_signal: Callable[[], None] | None = None) -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM back during the block: they are recorded in the list
    it yields (and ``on_signal`` is called) instead of interrupting. On the main
    thread only (elsewhere signals are not delivered, and nothing changes). The
    previous handlers come back after."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def record(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if on_signal is not None:
            on_signal()
    previous = {signum: signal.signal(signum, record) for signum in SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
