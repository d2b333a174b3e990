"""Localization error against ground-truth boxes, and faithfulness: what
``cam-caffe evaluate`` (:mod:`cam_caffe.commands.evaluate`) computes.

As in ILSVRC and the CAM paper: each of an image's top-k predictions is a
class with one box, from the CAM of that class at the image's size
(``--boxes paper``: the largest region ≥ threshold·max; ``dt``: the largest
box of the official generator). The image is classified correctly within k
when one of its k guesses is a ground-truth class, and localized correctly
when one guess has a ground-truth class *and* IoU ≥ 0.5 with a ground-truth
box of that class. Errors are the fractions of images that are not.

Ground truth (``--boxes-file``), matched to the inputs by file name without
extension:

- CSV with a header ``image,label,x,y,w,h``, a row per box;
- JSON: ``[{"image": …, "label": …, "boxes": [[x, y, w, h], …]}, …]``;
- ILSVRC / Pascal-VOC XML: a file or a folder of them, ``<filename>`` and
  ``<object><name>…<bndbox><xmin>…`` (inclusive pixel corners).

A label is a class id, a label of ``--labels`` or a WordNet id (``n01440764``)
looked up by the first word of the labels file's lines.

``--faithfulness`` (with or without ground truth) adds Average Drop, Increase
in Confidence and Deletion/Insertion AUC of each image's top-1 class and its
map (``cam_caffe.metrics``): per image with ``--json``, averaged in the table.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import xml.etree.ElementTree as ET
from pathlib import Path

from .api import CAMNet
from .batch import ChunkResult, Options, run_batch
from .boxes import Box
from .errors import EXIT_INPUT, CamError
from .files import IMAGE_EXTENSIONS
from .inputs import Input, collect
from .labels import WNID, resolve_class
from .metrics import faithfulness, summary

IOU = 0.5
TOP_K = 5

Truth = list[tuple[str, Box]]          # (label as written, box) of one image


def image_key(name: str) -> str:
    """How ground truth finds an image: its file name without an image extension."""
    path = Path(name.replace("\\", "/"))
    return path.stem if path.suffix.lower() in IMAGE_EXTENSIONS else path.name


def _box(values, where: str) -> Box:
    try:
        x, y, w, h = (round(float(v)) for v in values)
    except (TypeError, ValueError):
        raise CamError(f"{where}: a box needs four numbers x,y,w,h, got {values!r}") from None
    return Box(x, y, w, h)


def read_csv(path: Path) -> dict[str, Truth]:
    truth: dict[str, Truth] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"image", "label", "x", "y", "w", "h"} - set(reader.fieldnames or ())
        if missing:
            raise CamError(f"{path}: CSV needs the columns image,label,x,y,w,h "
                           f"(missing {','.join(sorted(missing))})")
        for n, row in enumerate(reader, 2):
            box = _box([row["x"], row["y"], row["w"], row["h"]], f"{path}:{n}")
            truth.setdefault(image_key(row["image"]), []).append((row["label"].strip(), box))
    return truth


def read_json(path: Path) -> dict[str, Truth]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CamError(f"{path}: not JSON: {e}") from None
    truth: dict[str, Truth] = {}
    for n, entry in enumerate(entries if isinstance(entries, list) else [None]):
        if not isinstance(entry, dict) or not {"image", "label", "boxes"} <= entry.keys():
            raise CamError(f"{path}: expected a list of {{image, label, boxes}} objects "
                           f"(entry {n})")
        boxes = [_box(b, f"{path}: entry {n}") for b in entry["boxes"]]
        truth.setdefault(image_key(str(entry["image"])), []).extend(
            (str(entry["label"]).strip(), box) for box in boxes)
    return truth


def read_xml(path: Path) -> dict[str, Truth]:
    files = sorted(path.rglob("*.xml")) if path.is_dir() else [path]
    if not files:
        raise CamError(f"{path}: no .xml annotation files")
    truth: dict[str, Truth] = {}
    for file in files:
        try:
            root = ET.parse(file).getroot()
        except ET.ParseError as e:
            raise CamError(f"{file}: not XML: {e}") from None
        name = (root.findtext("filename") or "").strip() or file.stem
        boxes = truth.setdefault(image_key(name), [])
        for obj in root.iter("object"):
            bb = obj.find("bndbox")
            if bb is None:
                continue
            try:
                x0, y0, x1, y1 = (float(bb.findtext(corner, ""))
                                  for corner in ("xmin", "ymin", "xmax", "ymax"))
            except ValueError:                  # a corner missing ("") or not a number
                raise CamError(f"{file}: a <bndbox> needs xmin, ymin, xmax, ymax") from None
            box = _box([x0, y0, x1 - x0 + 1, y1 - y0 + 1], str(file))     # inclusive corners
            boxes.append(((obj.findtext("name") or "").strip(), box))
    return truth


def read_truth(path: Path) -> dict[str, Truth]:
    """Ground truth by image key, from a CSV, JSON or XML file or a folder of XML files."""
    if not path.exists():
        raise CamError(f"{path}: boxes file not found", EXIT_INPUT)
    if path.is_dir() or path.suffix.lower() == ".xml":
        return read_xml(path)
    try:
        return read_json(path) if path.suffix.lower() == ".json" else read_csv(path)
    except (OSError, UnicodeDecodeError) as e:
        raise CamError(f"{path}: cannot read boxes file: {e}") from None


def class_resolver(labels_file: Path | None, labels: list[str] | None, num_classes: int):
    """label text → class id: a number, a label, or a wnid from the labels file."""
    wnids = {}
    if labels_file:
        lines = [line.split() for line in labels_file.read_text(encoding="utf-8").splitlines()]
        wnids = {words[0]: i for i, words in enumerate(w for w in lines if w)
                 if WNID.fullmatch(words[0])}

    def resolve(label: str) -> int:
        if WNID.fullmatch(label):
            if label not in wnids:
                raise CamError(f"ground-truth class {label!r}: no such WordNet id in the "
                               f"labels file (--labels)")
            return wnids[label]
        try:
            return resolve_class(label, labels, num_classes)
        except CamError:
            raise CamError(f"ground-truth label {label!r} is not a class of the net "
                           f"(give --labels)") from None
    return resolve


def first_hits(guesses: list[tuple[int, Box | None]],
               truth: list[tuple[int, Box]]) -> tuple[int | None, int | None]:
    """The rank (0-based) of the first right class and of the first right class+box."""
    cls = loc = None
    for rank, (class_id, box) in enumerate(guesses):
        targets = [b for c, b in truth if c == class_id]
        if targets and cls is None:
            cls = rank
        if targets and loc is None and box is not None and any(
                box.iou(t) >= IOU for t in targets):
            loc = rank
    return cls, loc


def error_rates(hits: list[tuple[int | None, int | None]]) -> dict[str, float]:
    """Top-1 and top-5 classification and localization error of per-image first hits."""
    def error(which: int, k: int) -> float:
        ranks = [hit[which] for hit in hits]
        return sum(rank is None or rank >= k for rank in ranks) / len(hits)
    return {"top1_cls_error": error(0, 1), "top5_cls_error": error(0, 5),
            "top1_loc_error": error(1, 1), "top5_loc_error": error(1, 5)}


def select(images: list[str], truth: dict[str, Truth] | None) -> tuple[list[Input], int]:
    """The inputs to evaluate (those with ground truth, when there is some) and the
    number left out for lack of it."""
    inputs: list[Input] = []
    seen: dict[str, Path] = {}          # image key → the first input with it
    unmatched = 0
    for item in collect(images):
        key = image_key(item.path.name)
        if truth is not None and key in seen:
            raise CamError(f"{item.path} and {seen[key]}: ground truth is matched by file name, "
                           "and these two have the same")
        seen[key] = item.path
        if truth is None or key in truth:
            inputs.append(item)
        else:
            unmatched += 1
    return inputs, unmatched


def localization(net: CAMNet, inputs: list[Input], truth: dict[str, Truth],
                 labels_file: Path | None, options: Options
                 ) -> tuple[dict, list[tuple[Path, CamError]]]:
    """Top-1/top-5 classification and localization error, and the images that failed.

    ``labels_file`` resolves ground-truth WordNet ids; ``options`` says how boxes
    are made (``boxes``, ``box_threshold``, ``dt_thresholds``), ``ten_crop`` and
    ``batch_size``; the top-5 classes are always mapped."""
    resolve = class_resolver(labels_file, net.labels, net.spec.num_classes)
    targets = {str(item.path): [(resolve(label), box) for label, box in
                                truth[image_key(item.path.name)]] for item in inputs}
    options = dataclasses.replace(options, top_k=min(TOP_K, net.spec.num_classes))
    hits = []

    def score(chunk: ChunkResult) -> None:
        for image_result in chunk.results:
            assert image_result.item is not None
            guesses = [(c, boxes[0] if boxes else None)
                       for c, boxes in zip(image_result.classes, image_result.boxes, strict=True)]
            hits.append(first_hits(guesses, targets[str(image_result.item.path)]))
    report = run_batch(net, inputs, options, on_chunk=score, records=False)
    result = {"images": len(hits), "boxes": options.boxes, **error_rates(hits)} if hits else {}
    return result, report.failed


def faithfulness_run(net: CAMNet, inputs: list[Input], steps: int, substrate: str,
                     batch_size: int) -> tuple[dict, list[tuple[Path, CamError]]]:
    """Each image's faithfulness for its top-1 class and map, and their averages
    (:func:`cam_caffe.metrics.faithfulness`), ``batch_size`` images at a time."""
    results, failed = [], []
    for start in range(0, len(inputs), batch_size):
        loaded = []
        for item in inputs[start:start + batch_size]:
            try:
                loaded.append((item, net.load(item.path)))
            except CamError as e:
                failed.append((item.path, e))
        predictions = net.predict([image for _, image in loaded], top_k=1)
        for (item, image), prediction in zip(loaded, predictions, strict=True):
            class_id = prediction.classes[0]
            results.append((item, faithfulness(net, image, class_id, prediction.cam(class_id),
                                               steps, substrate, batch_size)))
    if not results:
        return {}, failed
    return {"images": len(results), "map": f"{net.method} map of the top-1 class",
            "substrate": substrate, "steps": steps,
            **summary([r for _, r in results]),
            "per_image": [{"image": str(item.path), **r.as_dict()} for item, r in results]
            }, failed
