"""The known CAM models: where each file comes from, where it lives here, and how
images are prepared for the net.

Downloaded files go to ``${XDG_CACHE_HOME:-~/.cache}/cam-caffe/models/<name>/``
(:func:`cache_root`). The files cam-caffe ships (the demo model, the
GoogLeNet-CAM prototxt) are read from the installed package
(``cam_caffe/data/``) or, in a source checkout, from its ``models/`` and
``prototxt/`` (:func:`data_root`).

``CAM_CAFFE_MODEL_BASE_URL`` (or ``--base-url``) fetches every remote file of a
model from that folder instead, by its file name: a mirror, or a test server
(:func:`source_url`).
"""
from __future__ import annotations

import difflib
import os
import urllib.parse
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import ModelError
from ..output import cache_home

PROJECT_ROOT = Path(__file__).resolve().parents[2]    # a source checkout's top level
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
    packaged = resources.files("cam_caffe") / "data"
    return packaged if isinstance(packaged, Path) and packaged.is_dir() else PROJECT_ROOT


def file_path(model: Model, spec: FileSpec) -> Path:
    """Where ``spec`` of ``model`` lives: the cache for URLs, :func:`data_root` for paths."""
    if spec.remote:
        return cache_root() / model.name / spec.filename
    return data_root() / spec.location


def file_paths(model: Model) -> tuple[Path, Path, Path | None]:
    """(prototxt, weights, labels) of ``model``, present or not; labels None without."""
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
    return file_paths(model)


def source_url(spec: FileSpec, base_url: str | None = None) -> str:
    """The URL a remote file is fetched from: its own, or ``base_url`` + its name."""
    base = base_url if base_url is not None else os.environ.get(BASE_URL_ENV, "")
    if not base:
        return spec.location
    return base.rstrip("/") + "/" + urllib.parse.quote(spec.filename)
