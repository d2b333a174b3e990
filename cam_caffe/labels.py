"""Class labels: synset_words.txt-style files, and looking classes up by id or name."""
from __future__ import annotations

import re
from pathlib import Path

from .errors import CamError, ModelError
from .files import TEXT_LIMIT, read_limited

_WNID = re.compile(r"^n\d{8}\s+")


def read_labels(path: str | Path) -> list[str]:
    """One label a line; a leading WordNet id ("n07930864 cup") is dropped."""
    path = Path(path)
    try:
        text = read_limited(path, "labels file", TEXT_LIMIT, ModelError).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelError(f"{path}: cannot read labels file: {e}") from None
    labels = [_WNID.sub("", line.strip()) for line in text.splitlines() if line.strip()]
    if not labels:
        raise ModelError(f"{path}: labels file is empty")
    return labels


def class_name(labels: list[str] | None, index: int) -> str:
    """The label of class ``index``, or "class N" without labels."""
    if labels and index < len(labels):
        return labels[index]
    return f"class {index}"


def resolve_class(spec: str | int, labels: list[str] | None, num_classes: int) -> int:
    """A class id from a number or a label name (full label or its first comma part)."""
    text = str(spec).strip()
    if re.fullmatch(r"-?\d+", text):
        index = int(text)
        if not 0 <= index < num_classes:
            raise CamError(f"--class {index}: out of range, the net has {num_classes} "
                           f"classes (0–{num_classes - 1})")
        return index
    wanted = text.lower()
    for i, label in enumerate(labels or []):
        names = [label.lower()] + [part.strip().lower() for part in label.split(",")]
        if wanted in names:
            return i
    if not labels:
        raise CamError(f"--class {text!r}: a class name needs --labels")
    raise CamError(f"--class {text!r}: no such label")
