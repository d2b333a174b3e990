"""Checks of a model's files before they are used: size and SHA-256 where the
registry knows them, and always the structure (the prototxt has a CAM structure
and the registry's class count, the caffemodel parses, fits the prototxt and
holds every learnable layer, the labels count the net's classes).

A downloaded file that fails is deleted (:func:`check_download`); one that was
there before, put there by hand, is kept and reported (:func:`check_present`).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelError
from .registry import FileSpec, Model

if TYPE_CHECKING:                 # imported where used: `import cam_caffe.models` stays light
    from ..camspec import CamSpec
    from ..netdef import NetDef


def _check_file(kind: str, model: Model, file: FileSpec, path: Path, netdef: NetDef | None,
                spec: CamSpec | None) -> None:
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
        check_prototxt(model, path)
    elif kind == "labels":
        _check_labels(path, spec)
    else:
        assert netdef is not None               # the prototxt is checked first
        _check_weights(netdef, path)


def check_download(kind: str, model: Model, file: FileSpec, part: Path, final: Path, url: str,
                   netdef: NetDef | None, spec: CamSpec | None) -> None:
    """Check a downloaded ``part`` file; delete it and raise ModelError on any problem."""
    try:
        _check_file(kind, model, file, part, netdef, spec)
    except ModelError as e:
        part.unlink(missing_ok=True)
        message = str(e).replace(str(part), str(final))
        raise ModelError(f"{message} (downloaded from {url}; the file was deleted)") from None


def check_present(kind: str, model: Model, file: FileSpec, path: Path, netdef: NetDef | None,
                  spec: CamSpec | None) -> None:
    """Check a file that was there before this download; keep it, say how to replace it."""
    try:
        _check_file(kind, model, file, path, netdef, spec)
    except ModelError as e:
        raise ModelError(f"{e} (it was there before this download: delete it, or use --force, "
                         "to download it again)") from None


def check_prototxt(model: Model, path: Path) -> tuple[NetDef, CamSpec]:
    """The prototxt normalises and has a CAM structure: (netdef, camspec)."""
    from ..camspec import find_cam_layers
    from ..netdef import load_netdef
    netdef = load_netdef(path)
    spec = find_cam_layers(netdef)
    if model.num_classes is not None and spec.num_classes != model.num_classes:
        raise ModelError(f"{path}: the net has {spec.num_classes} classes, "
                         f"model '{model.name}' has {model.num_classes}")
    return netdef, spec


def _check_labels(path: Path, spec: CamSpec | None) -> None:
    """The labels file reads, and counts the net's classes."""
    from ..labels import read_labels
    labels = read_labels(path)
    if spec is not None and len(labels) != spec.num_classes:
        raise ModelError(f"{path}: has {len(labels)} labels, "
                         f"the net has {spec.num_classes} classes")


def _check_weights(netdef: NetDef, path: Path) -> None:
    """The caffemodel parses, fits the prototxt, and holds every learnable layer.

    Caffe itself would run a net whose caffemodel lacks some layers (leaving
    their random initial weights); a download that does is incomplete.
    """
    from ..netdef import check_weights, param_shapes, read_caffemodel
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


def verify_model(model: Model, prototxt: Path, weights: Path, labels: Path | None) -> None:
    """The structure checks of a model's files (for one that ships with cam-caffe)."""
    netdef, spec = check_prototxt(model, prototxt)
    if labels is not None:
        _check_labels(labels, spec)
    _check_weights(netdef, weights)


def _sha256(path: Path) -> str:
    """The hex SHA-256 of a file, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
