"""The ``cam-caffe`` command's process: standard streams and signals are set up
here, before the heavy imports (NumPy, OpenCV, ONNX Runtime: ~0.3 s), so a
Ctrl-C at any moment, a closed stdout or stderr, or a full disk behind stdout
each end in one line and a documented exit code, never a traceback.

Kept light on purpose: only the standard library and cam-caffe's small
errors/signals modules are imported before ``commands``, itself light: a
command imports what runs a net once its arguments are read, when a signal
already raises KeyboardInterrupt (handled by ``commands.main``).
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import TextIO

from .errors import EXIT_BROKEN_PIPE, CamError, OutputError
from .signals import exit_code, held, ignore_signals, raise_on_signals


class GuardedStdout:
    """sys.stdout whose write errors (a full disk, an I/O error) are OutputErrors,
    one line like any other; a reader that went away stays a BrokenPipeError."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise OutputError(f"stdout: cannot write: {e.strerror or e}") from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            raise OutputError(f"stdout: cannot write: {e.strerror or e}") from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def open_missing_streams() -> None:
    """Point closed descriptors 0, 1, 2 at /dev/null (so no file cam-caffe opens can
    take their number and receive stray output), and give Python working
    sys.stdout/sys.stderr for them: what would be printed there is discarded."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)     # the lowest free number: ``fd``
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdout is None:               # open for the process's lifetime
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115
    # A file name's undecodable bytes never make printing fail
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")
    sys.stdout = GuardedStdout(sys.stdout)


def say(line: str) -> None:
    """Print one line on stderr; a stderr that cannot take it is not an error."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)


def reader_gone() -> int:
    """Whoever read stdout stopped (e.g. `| head`): stop quietly, as a shell reports
    a writer killed by SIGPIPE; devnull absorbs what is left to flush."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def entry() -> None:
    """The ``cam-caffe`` command: ``commands.main()``, then exit without the interpreter's
    teardown (unloading ONNX Runtime, OpenCV, NumPy: ~35 ms, paid by every call
    of a shell loop). Every output file is closed by then; stdout and stderr
    are flushed here, with signals ignored."""
    open_missing_streams()
    with held() as received:          # a Ctrl-C during the import is acted on after it
        from .commands import main
    if received:
        ignore_signals()
        say("cam-caffe: interrupted")
        os._exit(128 + received[0])
    started = False
    try:
        raise_on_signals()
        started = True
        code = main()
    except KeyboardInterrupt as e:    # as the handlers were set, or just as main() handled one
        if not started:
            say("cam-caffe: interrupted")
        code = exit_code(e)
    ignore_signals()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = reader_gone()
    except CamError as e:
        say(f"cam-caffe: error: {e}")
        code = e.exit_code
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(code)
