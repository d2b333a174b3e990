"""One exception type for every problem a user can fix, with its exit code."""
from __future__ import annotations

# Exit codes of the `cam-caffe` command (documented in README.md).
EXIT_OK = 0
EXIT_SOME_FAILED = 1   # a batch ran, but some images could not be processed
EXIT_USAGE = 2         # bad command-line arguments
EXIT_MODEL = 3         # the model files cannot be used
EXIT_INPUT = 4         # no usable input image at all
EXIT_OUTPUT = 5        # an output could not be written
EXIT_BACKEND = 6       # the backend failed (missing library, GPU, crash)
EXIT_CLUSTER = 7       # the Dask cluster cannot be used or was lost (--dask)
EXIT_INTERNAL = 70     # a bug in cam-caffe (CAM_CAFFE_DEBUG=1 shows the traceback)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_BROKEN_PIPE = 141  # stdout was closed by its reader (128 + SIGPIPE, as shells report)
EXIT_TERMINATED = 143   # SIGTERM (128 + SIGTERM), e.g. a job scheduler's time limit

# What each exit code means, for `cam-caffe --help` (README.md has the same table).
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_SOME_FAILED: "a batch ran, but some images failed (each is reported)",
    EXIT_USAGE: "bad command-line arguments",
    EXIT_MODEL: "a model file (prototxt, caffemodel, mean, labels) cannot be used",
    EXIT_INPUT: "no usable input image",
    EXIT_OUTPUT: "an output could not be written",
    EXIT_BACKEND: "the backend failed (missing pycaffe, no GPU, ...)",
    EXIT_CLUSTER: "the Dask cluster cannot be used or was lost (--dask)",
    EXIT_INTERNAL: "a bug in cam-caffe (CAM_CAFFE_DEBUG=1 shows the traceback)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
    EXIT_BROKEN_PIPE: "stdout was closed by its reader (e.g. | head)",
    EXIT_TERMINATED: "terminated (SIGTERM, e.g. a scheduler's time limit)",
}


MAX_MESSAGE = 1000      # characters of a message; longer ones lose their middle


class CamError(Exception):
    """An error with a one-line message meant for the user.

    The message is made one line (unprintable characters escaped, see
    ``one_line``) of at most MAX_MESSAGE characters: a library's multi-line
    report or a 5 MB layer name cannot flood the terminal. ``relayed`` marks a
    message that mostly repeats a library's own words, less clear than
    cam-caffe's own diagnosis (``backends.create_backend`` prefers the latter).
    """

    exit_code = EXIT_USAGE

    def __init__(self, message: str, exit_code: int | None = None, *,
                 relayed: bool = False) -> None:
        super().__init__(shorten(one_line(message)))
        if exit_code is not None:
            self.exit_code = exit_code
        self.relayed = relayed

    def __reduce__(self):
        """Pickled with its exit code (a Dask worker's errors reach the client)."""
        return type(self), (str(self), self.exit_code)


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text``, its middle cut to keep it within ``limit`` characters."""
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} […] {text[-half:]}"


class ModelError(CamError):
    """A prototxt, caffemodel, mean or label file that cannot be used."""

    exit_code = EXIT_MODEL


class ImageError(CamError):
    """An image that cannot be read."""

    exit_code = EXIT_INPUT


class OutputError(CamError):
    """An output file that cannot be written."""

    exit_code = EXIT_OUTPUT


class BackendError(CamError):
    """A backend that is missing or failed."""

    exit_code = EXIT_BACKEND


class ClusterError(CamError):
    """A Dask cluster that cannot be reached, or whose scheduler went away."""

    exit_code = EXIT_CLUSTER


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (clean up, then exit 143)."""


def one_line(text: str) -> str:
    """``text`` with every character that is not printable escaped (``\\n``,
    ``\\x1b``, ``\\u202e``; an undecodable byte of a file name as ``\\xNN``), so a
    message stays one line and a file name shows what it really is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else _escape(c) for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:        # os.fsdecode's stand-in for the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char) or (
        f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000
        else f"\\U{code:08x}")
