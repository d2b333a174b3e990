"""Class labels: synset_words.txt-style files, and looking classes up by id or name."""
from __future__ import annotations

import operator
import re
from pathlib import Path

from .errors import CamError, ModelError
from .files import TEXT_LIMIT, read_limited

WNID = re.compile(r"n\d{8}")      # a WordNet id, as ImageNet's synset_words.txt begins its lines


def read_labels(path: str | Path) -> list[str]:
    """One label a line; a leading WordNet id ("n07930864 cup") is dropped."""
    path = Path(path)
    try:
        text = read_limited(path, "labels file", TEXT_LIMIT, ModelError).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelError(f"{path}: cannot read labels file: {e}") from None
    labels = [_without_wnid(line.strip()) for line in text.splitlines() if line.strip()]
    if not labels:
        raise ModelError(f"{path}: labels file is empty")
    return labels


def _without_wnid(line: str) -> str:
    """``line`` without a leading WordNet id and the space after it."""
    words = line.split(None, 1)
    return words[1] if len(words) == 2 and WNID.fullmatch(words[0]) else line


def class_name(labels: list[str] | None, index: int) -> str:
    """The label of class ``index``, or "class N" without labels."""
    if labels and index < len(labels):
        return labels[index]
    return f"class {index}"


def resolve_class(spec: str | int, labels: list[str] | None, num_classes: int,
                  option: str = "class") -> int:
    """A class id from an id or a label name (the full label or one of its comma parts).

    ``option`` names the argument in errors ("--class" for the command line).
    An id outside 0…num_classes-1, an unknown name and a name that several
    classes share (ImageNet's "crane" is 134 and 517) are refused.
    """
    if not isinstance(spec, str):
        try:
            if isinstance(spec, bool):
                raise TypeError
            spec = operator.index(spec)       # int and NumPy integers, not floats or bools
        except TypeError:
            raise CamError(f"{option} {spec!r}: not a class id or a label name") from None
    text = str(spec).strip()
    if re.fullmatch(r"[-+]?\d+", text):
        index = int(text)
        if not 0 <= index < num_classes:
            raise CamError(f"{option} {index}: out of range, the net has {num_classes} "
                           f"classes (0–{num_classes - 1})")
        return index
    if not labels:
        raise CamError(f"{option} {text!r}: a class name needs labels (--labels)")
    wanted = text.lower()
    matches = [i for i, label in enumerate(labels)
               if wanted == label.lower()
               or wanted in (part.strip().lower() for part in label.split(","))]
    if len(matches) > 1:
        listed = ", ".join(f"{i} ({labels[i]})" for i in matches)
        raise CamError(f"{option} {text!r} is ambiguous: classes {listed}; give the id")
    if not matches:
        raise CamError(f"{option} {text!r}: no such label")
    return matches[0]
