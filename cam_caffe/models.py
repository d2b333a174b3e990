"""Known CAM models, and checked downloads of their files (the command that lists,
downloads and locates them: :mod:`cam_caffe.commands.models`).

Files go to ``${XDG_CACHE_HOME:-~/.cache}/cam-caffe/models/<name>/``. A download
lands under its final name only once checked: its size and SHA-256 where the
registry knows them, and always that the prototxt has a CAM structure, that the
weights parse as a caffemodel that fits the prototxt, and that the labels count
the net's classes. A bad file is deleted; an interrupted one is kept as
``<file>.part`` and resumed (HTTP Range) by the next try. A file put into that
folder by hand is used as it is, and checked by the next download.

The files cam-caffe ships (the demo model, the GoogLeNet-CAM prototxt) are
read from the installed package (``cam_caffe/data/``) or, in a source
checkout, from its ``models/`` and ``prototxt/``: :func:`data_root`.

``CAM_CAFFE_MODEL_BASE_URL`` (or ``--base-url``) fetches every remote file of a
model from that folder instead, by its file name: a mirror, or a test server.
"""
from __future__ import annotations

import difflib
import hashlib
import os
import re
import sys
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import __version__
from .errors import ModelError, OutputError
from .output import cache_home, publish

PROJECT_ROOT = Path(__file__).resolve().parent.parent    # a source checkout's top level
BASE_URL_ENV = "CAM_CAFFE_MODEL_BASE_URL"
DEFAULT_MODEL = "googlenet-cam"

# The official CAM weights (github.com/zhoubolei/CAM, README "Pre-trained models").
# Early versions of that README and of models/download.sh spelled the GoogLeNet
# files "…googleletCAM…"; the current README names them "…googlenetCAM…".
CAM_MODELS_URL = "http://cnnlocalization.csail.mit.edu/demoCAM/models/"
# The official deploy files, pinned to the commits that hold them (they were
# later deleted from the repository's master branch).
CAM_REPO_RAW = "https://raw.githubusercontent.com/zhoubolei/CAM/"
# The 1000 ILSVRC-2012 labels in Caffe's class order (synset_words.txt without
# the WordNet ids), from OpenCV's samples, pinned to a commit.
IMAGENET_LABELS_URL = ("https://raw.githubusercontent.com/opencv/opencv/"
                       "ab110c0ad1b3ca22fc65d150b9acff68b2295ac8/"
                       "samples/data/dnn/classification_classes_ILSVRC2012.txt")
IMAGENET_MEAN_BGR = (104.0, 117.0, 123.0)      # channel means of Caffe's ILSVRC-2012 mean image
PLACES205_MEAN_BGR = (105.487823486, 113.741088867, 116.060394287)

CHUNK = 1 << 16
TIMEOUT = 30.0          # seconds without data before a request fails
RETRIES = 3             # tries per file; each one resumes where the last one stopped
RETRY_DELAY = 1.0       # seconds, times the try number
USER_AGENT = f"cam-caffe/{__version__} (+urllib)"


@dataclass(frozen=True)
class FileSpec:
    """One file of a model: a URL, or a path relative to :func:`data_root`."""

    location: str
    size: int | None = None          # bytes, where known
    sha256: str | None = None        # hex digest, where known

    @property
    def remote(self) -> bool:
        return urllib.parse.urlsplit(self.location).scheme in ("http", "https", "ftp", "file")

    @property
    def filename(self) -> str:
        """The file's name (the last part of its URL or path)."""
        path = urllib.parse.urlsplit(self.location).path if self.remote else self.location
        return urllib.parse.unquote(path.rstrip("/").rsplit("/", 1)[-1])


@dataclass(frozen=True)
class Model:
    """A registry entry: where the files come from and how images are prepared."""

    name: str
    description: str
    prototxt: FileSpec
    weights: FileSpec
    labels: FileSpec | None                  # None: no known label file
    num_classes: int | None                  # None: whatever the prototxt says
    mean: tuple[float, ...] | None           # BGR, subtracted before scaling; None: CAMNet's
    scale: float = 1.0                       # multiplies (pixel - mean)
    input_size: tuple[int, int] | None = None   # (H, W); None: the prototxt's
    source: str = ""                         # where the files and facts come from

    def files(self) -> list[tuple[str, FileSpec]]:
        """(kind, file) in download order: the prototxt first, the others are checked with it."""
        files = [("prototxt", self.prototxt)]
        if self.labels is not None:
            files.append(("labels", self.labels))
        files.append(("weights", self.weights))
        return files

    @property
    def local(self) -> bool:
        """True when every file ships with cam-caffe (nothing to download)."""
        return not any(f.remote for _, f in self.files())

    @property
    def mean_arg(self) -> str | None:
        """``mean`` as CAMNet's ``mean=`` argument ("104.0,117.0,123.0"), or None."""
        return None if self.mean is None else ",".join(repr(float(v)) for v in self.mean)


def _cam_prototxt(commit: str, name: str) -> FileSpec:
    return FileSpec(f"{CAM_REPO_RAW}{commit}/models/{name}")


REGISTRY: dict[str, Model] = {m.name: m for m in [
    Model(
        name="googlenet-cam",
        description="GoogLeNet-CAM, ImageNet (1000 classes), 224x224 — the paper's main model",
        prototxt=FileSpec("prototxt/deploy_googlenetCAM.prototxt"),
        weights=FileSpec(CAM_MODELS_URL + "imagenet_googlenetCAM_train_iter_120000.caffemodel"),
        labels=FileSpec(IMAGENET_LABELS_URL),
        num_classes=1000, mean=IMAGENET_MEAN_BGR, input_size=(224, 224),
        source="github.com/zhoubolei/CAM README; prototxt generated in this project"),
    Model(
        name="vgg16-cam",
        description="VGG16-CAM, ImageNet (1000 classes), 224x224",
        prototxt=_cam_prototxt("4c0ad65868a2fd39f94ed92449620552e9ea8e59",
                               "deploy_vgg16CAM.prototxt"),
        weights=FileSpec(CAM_MODELS_URL + "vgg16CAM_train_iter_90000.caffemodel"),
        labels=FileSpec(IMAGENET_LABELS_URL),
        num_classes=1000, mean=IMAGENET_MEAN_BGR, input_size=(224, 224),
        source="github.com/zhoubolei/CAM README and models/ (commit 4c0ad65)"),
    Model(
        name="alexnet-cam",
        description="AlexNet+-CAM, ImageNet (1000 classes), 227x227",
        prototxt=_cam_prototxt("5dd57cc9425819a75709fbe4a63db725bd66b92d",
                               "deploy_alexnetplusCAM_imagenet.prototxt"),
        weights=FileSpec(CAM_MODELS_URL + "alexnetplusCAM_imagenet.caffemodel"),
        labels=FileSpec(IMAGENET_LABELS_URL),
        num_classes=1000, mean=IMAGENET_MEAN_BGR, input_size=(227, 227),
        source="github.com/zhoubolei/CAM README and models/ (commit 5dd57cc)"),
    Model(
        name="googlenet-cam-places205",
        description="GoogLeNet-CAM, Places205 scenes (205 classes), 224x224; no label file",
        prototxt=_cam_prototxt("5e0c134b20eb104f5344a17cbb3d3ab99af384ce",
                               "deploy_googlenetCAM_places205.prototxt"),
        weights=FileSpec(CAM_MODELS_URL + "places_googlenetCAM_train_iter_120000.caffemodel"),
        labels=None,     # upstream ships them only as MATLAB data (categories_places205.mat)
        num_classes=205, mean=PLACES205_MEAN_BGR, input_size=(224, 224),
        source="github.com/zhoubolei/CAM README and models/ (commit 5e0c134); "
               "Places205 mean pixel as used with the Places205 Caffe models"),
    Model(
        name="demo",
        description="small demo net shipped with cam-caffe (models/demo/)",
        prototxt=FileSpec("models/demo/deploy.prototxt"),
        weights=FileSpec("models/demo/demo.caffemodel"),
        labels=FileSpec("models/demo/labels.txt"),
        num_classes=None, mean=None, input_size=None,
        source="this project"),
]}


# ---------------------------------------------------------------- registry API

def list_models() -> list[Model]:
    """Every registry entry, the default first."""
    return sorted(REGISTRY.values(), key=lambda m: (m.name != DEFAULT_MODEL, m.name))


def get(name: str) -> Model:
    """The entry called ``name``; a ModelError listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        pass
    close = difflib.get_close_matches(name, list(REGISTRY), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ModelError(f"unknown model '{name}': {hint}known models: "
                     f"{', '.join(m.name for m in list_models())}")


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/cam-caffe/models`` (``~/.cache`` when unset, empty or relative);
    a ModelError when there is no home to put it in."""
    root = cache_home("models")
    if root is None:
        raise ModelError("no folder for downloaded models: this user has no home directory; "
                         "set XDG_CACHE_HOME (or HOME) to an absolute path")
    return root


def data_root() -> Path:
    """The folder holding the files cam-caffe ships, by their paths in the checkout.

    An installed wheel carries ``models/demo/*`` and ``prototxt/*`` as package
    data under ``cam_caffe/data/``; a source checkout (and its editable
    install) has them at its top level.
    """
    packaged = resources.files(__package__) / "data"
    return packaged if isinstance(packaged, Path) and packaged.is_dir() else PROJECT_ROOT


def file_path(model: Model, spec: FileSpec) -> Path:
    """Where ``spec`` of ``model`` lives: the cache for URLs, :func:`data_root` for paths."""
    if spec.remote:
        return cache_root() / model.name / spec.filename
    return data_root() / spec.location


def _paths(model: Model) -> tuple[Path, Path, Path | None]:
    labels = file_path(model, model.labels) if model.labels is not None else None
    return file_path(model, model.prototxt), file_path(model, model.weights), labels


def missing_files(name: str) -> list[Path]:
    """The files of ``name`` that are not there yet (empty: ready to use)."""
    model = get(name)
    return [file_path(model, spec) for _, spec in model.files()
            if not file_path(model, spec).is_file()]


def is_downloaded(name: str) -> bool:
    """True when every file of ``name`` is present (downloaded files are verified)."""
    return not missing_files(name)


def model_path(name: str) -> tuple[Path, Path, Path | None]:
    """(prototxt, weights, labels) of a downloaded or project-local model.

    ``labels`` is None for a model without a label file. Raises ModelError,
    with the command that fetches them, when files are missing.
    """
    model = get(name)
    missing = missing_files(name)
    if missing:
        if model.local:
            raise ModelError(f"model '{name}' is not present: "
                             f"{', '.join(str(p) for p in missing)} missing")
        raise ModelError(f"model '{name}' is not downloaded (missing "
                         f"{', '.join(p.name for p in missing)} in {missing[0].parent}); "
                         f"run: cam-caffe models download {name}")
    return _paths(model)


def source_url(spec: FileSpec, base_url: str | None = None) -> str:
    """The URL a remote file is fetched from: its own, or ``base_url`` + its name."""
    base = base_url if base_url is not None else os.environ.get(BASE_URL_ENV, "")
    if not base:
        return spec.location
    return base.rstrip("/") + "/" + urllib.parse.quote(spec.filename)


# ---------------------------------------------------------------- download

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
        _verify_model(model, *_paths(model))
        return _paths(model)
    folder = cache_root() / model.name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{folder}: cannot create the model folder: {e.strerror or e}") from None
    show = progress and _isatty(sys.stderr)
    with _locked(folder):
        netdef = spec = None
        for kind, file in model.files():
            final = file_path(model, file)
            if file.remote and (force or not final.is_file()):
                url = source_url(file, base_url)
                part = final.with_name(final.name + ".part")
                if force and part.exists():
                    part.unlink()
                _fetch(url, part, final, file.size, show)
                _check_download(kind, model, file, part, final, url, netdef, spec)
                publish(part, final)
            elif not final.is_file():
                raise ModelError(f"{final}: {kind} file of model '{name}' is missing")
            elif file.remote:                      # there already: maybe put there by hand
                _check_present(kind, model, file, final, netdef, spec)
            if kind == "prototxt":
                netdef, spec = _check_prototxt(model, final)
    return _paths(model)


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
    # imported here: every cam-caffe run imports this module, few download (-15 ms start-up)
    import http.client
    import urllib.error
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
            raise _Interrupted("the partial file does not match the server's; restarting")
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
        bar = _Progress(final.name, total) if show else None
        try:
            with open(part, mode) as f:
                try:
                    while True:
                        chunk = response.read(CHUNK)
                        if not chunk:
                            break
                        f.write(chunk)
                        have += len(chunk)
                        if bar:
                            bar.update(have)
                except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
                    raise _Interrupted(_reason(e)) from None
                finally:
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as e:
            raise OutputError(f"{part}: cannot write: {e.strerror or e}") from None
        finally:
            if bar:
                bar.close()
    if total is not None and have < total:
        raise _Interrupted(f"the connection closed after {have} of {total} bytes")


def _content_range(value: str) -> tuple[int | None, int | None, int | None]:
    """(first, last, total) of a Content-Range header; None where absent or '*'."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None, None
    first, last, total = (int(v) if v and v != "*" else None for v in m.groups())
    return first, last, total


def _reason(reason) -> str:
    import http.client
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, http.client.IncompleteRead):
        return f"connection closed early ({len(reason.partial)} bytes read)"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


# ---------------------------------------------------------------- verification

def _check_file(kind: str, model: Model, file: FileSpec, path: Path, netdef, spec) -> None:
    """Size and SHA-256 where known, and the structure of one file of ``model``
    (``netdef``, ``spec``: its prototxt, for the weights and labels)."""
    size = path.stat().st_size
    if file.size is not None and size != file.size:
        problem = (f"truncated: got {size} of {file.size} bytes" if size < file.size
                   else f"too large: got {size} bytes, expected {file.size}")
        raise ModelError(f"{path}: {problem}")
    if file.sha256 is not None:
        digest = _sha256(path)
        if digest != file.sha256.lower():
            raise ModelError(f"{path}: checksum mismatch: SHA-256 is {digest}, "
                             f"expected {file.sha256.lower()}")
    if kind == "prototxt":
        _check_prototxt(model, path)
    elif kind == "labels":
        _check_labels(path, spec)
    else:
        _check_weights(netdef, path)


def _check_download(kind: str, model: Model, file: FileSpec, part: Path, final: Path, url: str,
                    netdef, spec) -> None:
    """Check a downloaded ``part`` file; delete it and raise ModelError on any problem."""
    try:
        _check_file(kind, model, file, part, netdef, spec)
    except ModelError as e:
        part.unlink(missing_ok=True)
        message = str(e).replace(str(part), str(final))
        raise ModelError(f"{message} (downloaded from {url}; the file was deleted)") from None


def _check_present(kind: str, model: Model, file: FileSpec, path: Path, netdef, spec) -> None:
    """Check a file that was there before this download; keep it, say how to replace it."""
    try:
        _check_file(kind, model, file, path, netdef, spec)
    except ModelError as e:
        raise ModelError(f"{e} (it was there before this download: delete it, or use --force, "
                         "to download it again)") from None


def _check_prototxt(model: Model, path: Path):
    """The prototxt normalises and has a CAM structure: (netdef, camspec)."""
    from .camspec import find_cam_layers
    from .netdef import load_netdef
    netdef = load_netdef(path)
    spec = find_cam_layers(netdef)
    if model.num_classes is not None and spec.num_classes != model.num_classes:
        raise ModelError(f"{path}: the net has {spec.num_classes} classes, "
                         f"model '{model.name}' has {model.num_classes}")
    return netdef, spec


def _check_labels(path: Path, spec) -> None:
    from .labels import read_labels
    labels = read_labels(path)
    if spec is not None and len(labels) != spec.num_classes:
        raise ModelError(f"{path}: has {len(labels)} labels, "
                         f"the net has {spec.num_classes} classes")


def _check_weights(netdef, path: Path) -> None:
    """The caffemodel parses, fits the prototxt, and holds every learnable layer.

    Caffe itself would run a net whose caffemodel lacks some layers (leaving
    their random initial weights); a download that does is incomplete.
    """
    from .netdef import check_weights, param_shapes, read_caffemodel
    weights = read_caffemodel(path)
    try:
        check_weights(netdef, weights, path)
    except ModelError as e:
        # "<weights>: does not fit <prototxt>: …" → "<weights>: does not fit its prototxt (…): …"
        raise ModelError(str(e).replace(f"does not fit {netdef.path}:",
                                        f"does not fit its prototxt ({netdef.path}):")) from None
    stored = {layer.name for layer in weights.layer if layer.blobs}
    missing = [layer.name for layer in netdef.net.layer
               if param_shapes(netdef, layer) and layer.name not in stored]
    if missing:
        shown = ", ".join(f"'{name}'" for name in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelError(f"{path}: incomplete: no weights for layer {shown}{more} of its "
                         f"prototxt ({netdef.path}) (truncated?)")


def _verify_model(model: Model, prototxt: Path, weights: Path, labels: Path | None) -> None:
    netdef, spec = _check_prototxt(model, prototxt)
    if labels is not None:
        _check_labels(labels, spec)
    _check_weights(netdef, weights)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- helpers

def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One download per model folder at a time (POSIX advisory lock; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        handle = open(folder / ".lock", "a")
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


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class _Progress:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    WIDTH = 30

    def __init__(self, label: str, total: int | None) -> None:
        self.label, self.total = label, total
        self.start = self.last = time.monotonic()
        self.done = 0
        self._draw()

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - self.last >= 0.1:
            self.last = now
            self._draw()

    def _draw(self) -> None:
        rate = self.done / max(time.monotonic() - self.start, 1e-6)
        if self.total:
            frac = min(self.done / self.total, 1.0)
            filled = int(frac * self.WIDTH)
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            text = f"{self.label} [{bar}] {frac:4.0%} {_mb(self.done)}/{_mb(self.total)}"
        else:
            text = f"{self.label} {_mb(self.done)}"
        sys.stderr.write(f"\r{text} {_mb(int(rate))}/s\x1b[K")
        sys.stderr.flush()

    def close(self) -> None:
        self._draw()
        sys.stderr.write("\n")
        sys.stderr.flush()
