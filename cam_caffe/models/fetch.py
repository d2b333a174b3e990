"""Downloading a model: each remote file is fetched over HTTP(S) into
``<file>.part``, resumed with a Range request where a try stopped early and
retried, then checked (:mod:`.verify`) and renamed to its final name. A bad
file is deleted; an interrupted one is kept as ``<file>.part`` and resumed by
the next try, or the next run. A file put into the model's folder by hand is
used as it is, and checked by the next download. One download per model folder
at a time (a lock file).
"""
from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..errors import ModelError, OutputError
from ..output import publish
from ..progress import finish, on_terminal, progress_bar
from .registry import (
    BASE_URL_ENV,
    cache_root,
    file_path,
    file_paths,
    get,
    missing_files,
    source_url,
)
from .verify import check_download, check_present, check_prototxt, verify_model

if TYPE_CHECKING:
    from ..camspec import CamSpec
    from ..netdef import NetDef

CHUNK = 1 << 16
TIMEOUT = 30.0          # seconds without data before a request fails
RETRIES = 3             # tries per file; each one resumes where the last one stopped
RETRY_DELAY = 1.0       # seconds, times the try number
USER_AGENT = f"cam-caffe/{__version__} (+urllib)"


def download(name: str, base_url: str | None = None, progress: bool = True,
             force: bool = False) -> tuple[Path, Path, Path | None]:
    """Fetch and check the files of ``name``; return (prototxt, weights, labels).

    Files already present are checked and kept (``force`` fetches them again).
    ``base_url`` (default: ``$CAM_CAFFE_MODEL_BASE_URL``) fetches every remote
    file from that folder by its name. ``progress`` draws a bar on stderr when
    it is a terminal. A model that ships with cam-caffe is only checked.
    """
    model = get(name)
    if model.local:
        missing = missing_files(name)
        if missing:
            raise ModelError(f"model '{name}' is not present: "
                             f"{', '.join(str(p) for p in missing)} missing "
                             "(it ships with cam-caffe, it is not downloaded)")
        verify_model(model, *file_paths(model))
        return file_paths(model)
    folder = cache_root() / model.name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{folder}: cannot create the model folder: {e.strerror or e}") from None
    show = progress and on_terminal()
    with _locked(folder):
        netdef: NetDef | None = None
        spec: CamSpec | None = None
        for kind, file in model.files():
            final = file_path(model, file)
            if file.remote and (force or not final.is_file()):
                url = source_url(file, base_url)
                part = final.with_name(final.name + ".part")
                if force and part.exists():
                    part.unlink()
                _fetch(url, part, final, file.size, show)
                check_download(kind, model, file, part, final, url, netdef, spec)
                publish(part, final)
            elif not final.is_file():
                raise ModelError(f"{final}: {kind} file of model '{name}' is missing")
            elif file.remote:                      # there already: maybe put there by hand
                check_present(kind, model, file, final, netdef, spec)
            if kind == "prototxt":
                netdef, spec = check_prototxt(model, final)
    return file_paths(model)


class _Interrupted(Exception):
    """A transfer that stopped early and may be resumed."""


def _fetch(url: str, part: Path, final: Path, expected: int | None, show: bool) -> None:
    """Download ``url`` into ``part`` (the ``.part`` of ``final``), resuming what is
    there; retry interruptions."""
    for attempt in range(1, RETRIES + 1):
        try:
            _fetch_once(url, part, final, expected, show)
            return
        except _Interrupted as e:
            if attempt == RETRIES:
                have = part.stat().st_size if part.exists() else 0
                kept = (f"{have} bytes kept in {part}, run the command again to resume"
                        if have else f"run the command again to retry, or {_elsewhere(final)}")
                raise ModelError(f"{url}: download interrupted ({e}); {kept}") from None
            time.sleep(RETRY_DELAY * attempt)


def _elsewhere(final: Path) -> str:
    """How else to get ``final`` when its server does not give it."""
    return (f"fetch it from a mirror with --base-url URL (or ${BASE_URL_ENV}), "
            f"or copy it to {final} and run the command again")


def _fetch_once(url: str, part: Path, final: Path, expected: int | None, show: bool) -> None:
    """One request for the rest of ``url`` after what ``part`` holds; _Interrupted when
    the transfer stops early (a later try resumes it)."""
    # imported here: every cam-caffe run imports this module, few download (-15 ms start-up)
    import http.client
    import urllib.error
    import urllib.parse
    import urllib.request
    have = part.stat().st_size if part.exists() else 0
    if expected is not None and have > expected:
        part.unlink()
        have = 0
    if expected is not None and have == expected:
        return                                   # complete: only verification is left
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and have:               # Range Not Satisfiable: nothing after `have`
            total = _content_range(e.headers.get("Content-Range", ""))[2]
            if total == have:
                return                           # the partial file was complete
            part.unlink()
            raise _Interrupted("the partial file does not match the server's; "
                               "restarting") from None
        if e.code >= 500 or e.code in (408, 429):
            raise _Interrupted(f"HTTP {e.code} {e.reason}") from None
        raise ModelError(f"{url}: HTTP {e.code} {e.reason}; {_elsewhere(final)}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (TimeoutError, ConnectionResetError, ConnectionAbortedError)):
            raise _Interrupted(_reason(e.reason)) from None
        if urllib.parse.urlsplit(url).scheme == "file":
            raise ModelError(f"{url}: cannot read: {_reason(e.reason)}") from None
        raise ModelError(f"{url}: cannot reach the server ({_reason(e.reason)}); "
                         f"{_elsewhere(final)}") from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
        raise _Interrupted(_reason(e)) from None
    except ValueError as e:                       # a malformed URL
        raise ModelError(f"{url}: cannot download: {e}") from None
    with response:
        status = response.status or 200           # file:// URLs have no status
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if status == 206:
            start, _, total = _content_range(response.headers.get("Content-Range", ""))
            if start != have:
                part.unlink()
                raise _Interrupted(f"the server resumed at byte {start}, not {have}; restarting")
            mode = "ab"
        else:                                      # 200: a fresh start, or Range ignored
            mode, have = "wb", 0
            total = length
        if total is None and length is not None and mode == "ab":
            total = have + length
        bar = progress_bar(total, show, "B", desc=final.name, initial=have, unit_scale=True)
        try:
            with open(part, mode) as f:
                try:
                    while True:
                        chunk = response.read(CHUNK)
                        if not chunk:
                            break
                        f.write(chunk)
                        have += len(chunk)
                        bar.update(len(chunk))
                except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
                    raise _Interrupted(_reason(e)) from None
                finally:
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as e:
            raise OutputError(f"{part}: cannot write: {e.strerror or e}") from None
        finally:
            finish(bar)                        # an interrupted one is erased
    if total is not None and have < total:
        raise _Interrupted(f"the connection closed after {have} of {total} bytes")


def _content_range(value: str) -> tuple[int | None, int | None, int | None]:
    """(first, last, total) of a Content-Range header; None where absent or '*'."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None, None
    first, last, total = (int(v) if v and v != "*" else None for v in m.groups())
    return first, last, total


def _reason(reason: BaseException | str) -> str:
    """A short reason for a failed transfer."""
    import http.client
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, http.client.IncompleteRead):
        return f"connection closed early ({len(reason.partial)} bytes read)"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One download per model folder at a time (POSIX advisory lock; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        handle = open(folder / ".lock", "a")  # noqa: SIM115 (closed below, after the lock)
    except OSError as e:
        raise OutputError(f"{folder}: cannot write: {e.strerror or e}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"cam-caffe: waiting for another download into {folder}", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
