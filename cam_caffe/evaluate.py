"""``cam-caffe evaluate``: localization error against ground-truth boxes, and faithfulness.

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

import argparse
import csv
import io
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from .backends import BACKENDS
from .batch import Options, run_batch
from .boxes import Box
from .cli import (
    DEFAULT_BATCH,
    ArgumentParser,
    _device_id,
    _memory_size,
    _positive_int,
    _size,
    add_method_argument,
    batch_size,
    load_net,
    model_files,
    parse_levels,
)
from .errors import EXIT_INPUT, EXIT_OK, EXIT_SOME_FAILED, CamError
from .image import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS
from .inputs import Input, collect
from .labels import WNID, resolve_class
from .metrics import DEFAULT_STEPS, SUBSTRATES, faithfulness, summary

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
                x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError):
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
        return sum(h[which] is None or h[which] >= k for h in hits) / len(hits)
    return {"top1_cls_error": error(0, 1), "top5_cls_error": error(0, 5),
            "top1_loc_error": error(1, 1), "top5_loc_error": error(1, 5)}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="cam-caffe evaluate",
                       description="Top-1/top-5 classification and localization error "
                                   "(ILSVRC rules, IoU >= 0.5) against ground-truth boxes, "
                                   "and/or the maps' faithfulness (--faithfulness).")
    p.add_argument("images", nargs="+", metavar="INPUT",
                   help="image files, directories, globs, @list.txt or -")
    p.add_argument("--boxes-file", type=Path, metavar="FILE",
                   help="ground truth: CSV (image,label,x,y,w,h), JSON, or ILSVRC XML "
                        "(a file or a folder)")
    p.add_argument("--faithfulness", action="store_true",
                   help="Average Drop, Increase in Confidence, Deletion and Insertion AUC "
                        "of each image's top-1 class")
    p.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS, metavar="N",
                   help=f"--faithfulness: deletion/insertion steps (default {DEFAULT_STEPS})")
    p.add_argument("--substrate", choices=SUBSTRATES, default="mean",
                   help="--faithfulness: what replaces pixels: the net's mean (default) or "
                        "the image blurred (Gaussian 11x11, sigma 5)")
    p.add_argument("--boxes", choices=("paper", "dt"), default="paper",
                   help="box from each CAM: paper (default) or dt (largest official box)")
    p.add_argument("--box-threshold", type=float, default=0.2, metavar="T",
                   help="--boxes paper: fraction of the max (default 0.2)")
    p.add_argument("--dt-thresholds", type=parse_levels, default=(20, 100, 110),
                   metavar="L,L,L", help="--boxes dt: 0-255 levels (default 20,100,110)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    m = p.add_argument_group("model and backend (as for cam-caffe)")
    m.add_argument("--model", metavar="NAME", help="a registered model (e.g. demo)")
    m.add_argument("--prototxt", type=Path, metavar="P")
    m.add_argument("--weights", type=Path, metavar="W")
    m.add_argument("--labels", type=Path, metavar="FILE")
    m.add_argument("--mean", metavar="M")
    m.add_argument("--scale", type=float, metavar="S")
    m.add_argument("--input-size", type=_size, metavar="HxW")
    add_method_argument(m)
    m.add_argument("--feature-blob", metavar="NAME")
    m.add_argument("--fc-layer", metavar="NAME")
    m.add_argument("--allow-python-layers", action="store_true")
    m.add_argument("--backend", choices=BACKENDS, default="auto")
    m.add_argument("--gpu", type=_device_id, metavar="ID")
    m.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH, metavar="B")
    m.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS, metavar="N")
    m.add_argument("--ten-crop", action="store_true")
    m.add_argument("--max-memory", type=_memory_size, metavar="SIZE")
    m.add_argument("-v", "--verbose", action="store_true")
    return p


def select(images: list[str], truth: dict[str, Truth] | None) -> tuple[list[Input], int]:
    """The inputs to evaluate (those with ground truth, when there is some) and the
    number left out for lack of it."""
    inputs, unmatched, seen = [], 0, {}
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


def localization(net, inputs: list[Input], truth: dict[str, Truth],
                 args: argparse.Namespace) -> tuple[dict, list[tuple[Path, CamError]]]:
    """Top-1/top-5 classification and localization error, and the images that failed."""
    labels_file = args.labels or model_files(args)[2]
    resolve = class_resolver(labels_file, net.labels, net.spec.num_classes)
    targets = {str(item.path): [(resolve(label), box) for label, box in
                                truth[image_key(item.path.name)]] for item in inputs}
    k = min(TOP_K, net.spec.num_classes)
    options = Options(top_k=k, boxes=args.boxes, box_threshold=args.box_threshold,
                      dt_thresholds=args.dt_thresholds, ten_crop=args.ten_crop,
                      batch_size=batch_size(args, net), jsonl=True)
    buffer = io.StringIO()
    report = run_batch(net, inputs, options, buffer)
    hits = []
    for line in buffer.getvalue().splitlines():
        record = json.loads(line)
        guesses = [(m["class"], Box(*m["boxes"][0]) if m["boxes"] else None)
                   for m in record["maps"]]
        hits.append(first_hits(guesses, targets[record["image"]]))
    result = {"images": len(hits), "boxes": args.boxes, **error_rates(hits)} if hits else {}
    return result, report.failed


def faithfulness_run(net, inputs: list[Input], args: argparse.Namespace
                     ) -> tuple[dict, list[tuple[Path, CamError]]]:
    """Each image's faithfulness for its top-1 class and map, and their averages."""
    results, failed = [], []
    for start in range(0, len(inputs), args.batch_size):
        loaded = []
        for item in inputs[start:start + args.batch_size]:
            try:
                loaded.append((item, net.load(item.path)))
            except CamError as e:
                failed.append((item.path, e))
        predictions = net.predict([image for _, image in loaded], top_k=1)
        for (item, image), prediction in zip(loaded, predictions):
            class_id = prediction.classes[0]
            results.append((item, faithfulness(net, image, class_id, prediction.cam(class_id),
                                               args.steps, args.substrate, args.batch_size)))
    if not results:
        return {}, failed
    return {"images": len(results), "map": f"{net.method} map of the top-1 class",
            "substrate": args.substrate, "steps": args.steps,
            **summary([r for _, r in results]),
            "per_image": [{"image": str(item.path), **r.as_dict()} for item, r in results]
            }, failed


def print_tables(result: dict, args: argparse.Namespace) -> None:
    """The human-readable report of ``main``'s result."""
    print(f"{result['images']} images ({result['failed']} failed"
          + (f", {result['no_ground_truth']} without ground truth" if args.boxes_file else "")
          + f"); maps: {result['method']}")
    if args.boxes_file:
        method = (f"paper, threshold {args.box_threshold:g}" if args.boxes == "paper"
                  else f"dt, levels {','.join(map(str, args.dt_thresholds))}")
        print(f"boxes: {method}; IoU >= {IOU}")
        print(f"{'error':<16}{'top-1':>8}{'top-5':>8}")
        for name, key in (("classification", "cls"), ("localization", "loc")):
            print(f"{name:<16}{100 * result[f'top1_{key}_error']:7.2f}%"
                  f"{100 * result[f'top5_{key}_error']:7.2f}%")
    if args.faithfulness:
        f = result["faithfulness"]
        print(f"faithfulness: {f['map']}; substrate {f['substrate']}; {f['steps']} steps")
        rows = (("Average Drop", f"{f['average_drop']:.2f}%", "lower is better"),
                ("Increase in Confidence", f"{f['increase_in_confidence']:.2f}%",
                 "higher is better"),
                ("Deletion AUC", f"{f['deletion_auc']:.4f}", "lower is better"),
                ("Insertion AUC", f"{f['insertion_auc']:.4f}", "higher is better"))
        for name, value, better in rows:
            print(f"{name:<24}{value:>8}  ({better})")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not (args.boxes_file or args.faithfulness):
        raise CamError("give --boxes-file (localization error), --faithfulness, or both")
    if args.faithfulness and args.ten_crop:
        raise CamError("--faithfulness masks the net's input: it does not work with --ten-crop")
    truth = read_truth(args.boxes_file) if args.boxes_file else None
    inputs, unmatched = select(args.images, truth)
    if not inputs:
        raise CamError(f"none of the input images has ground truth in {args.boxes_file}"
                       if truth is not None else "no input images found", EXIT_INPUT)
    net = load_net(args)
    result: dict = {}
    failed: dict[Path, CamError] = {}
    if truth is not None:
        found, errors = localization(net, inputs, truth, args)
        result.update(found)
        failed.update(errors)
    if args.faithfulness:
        found, errors = faithfulness_run(net, inputs, args)
        if found:
            result.setdefault("images", found["images"])
            result["faithfulness"] = found
        failed.update(errors)
    for reason in failed.values():
        print(f"cam-caffe: error: {reason}", file=sys.stderr)
    if "images" not in result:
        raise CamError("no image could be evaluated", EXIT_INPUT)
    result["failed"] = len(failed)
    result["method"] = net.method
    if truth is not None:
        result["no_ground_truth"] = unmatched
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_tables(result, args)
    return EXIT_SOME_FAILED if failed else EXIT_OK
