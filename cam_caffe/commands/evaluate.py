"""``cam-caffe evaluate``: localization error against ground-truth boxes, and the
maps' faithfulness (what is computed, and the ground-truth formats:
:mod:`cam_caffe.evaluate`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..batch import Options
from ..errors import EXIT_INPUT, EXIT_OK, EXIT_SOME_FAILED, CamError
from ..evaluate import IOU, Truth, faithfulness_run, localization, read_truth, select
from ..metrics import DEFAULT_STEPS, SUBSTRATES
from .options import (
    ArgumentParser,
    add_backend_options,
    add_box_options,
    add_method_option,
    add_model_options,
    batch_size,
    load_net,
    model_files,
    positive_int,
)


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
    p.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS, metavar="N",
                   help=f"--faithfulness: deletion/insertion steps (default {DEFAULT_STEPS})")
    p.add_argument("--substrate", choices=SUBSTRATES, default="mean",
                   help="--faithfulness: what replaces pixels: the net's mean (default) or "
                        "the image blurred (Gaussian 11x11, sigma 5)")
    add_box_options(p, default="paper")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    add_method_option(p)
    add_model_options(p)
    add_backend_options(p)
    return p


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
    """``cam-caffe evaluate INPUT… [options]``: the exit code."""
    args = build_parser().parse_args(argv)
    if not (args.boxes_file or args.faithfulness):
        raise CamError("give --boxes-file (localization error), --faithfulness, or both")
    if args.faithfulness and args.ten_crop:
        raise CamError("--faithfulness masks the net's input: it does not work with --ten-crop")
    if args.method and "," in args.method:
        raise CamError(f"evaluate scores one method at a time, got --method {args.method}: "
                       "run it once per method")
    truth: dict[str, Truth] | None = read_truth(args.boxes_file) if args.boxes_file else None
    inputs, unmatched = select(args.images, truth)
    if not inputs:
        raise CamError(f"none of the input images has ground truth in {args.boxes_file}"
                       if truth is not None else "no input images found", EXIT_INPUT)
    net = load_net(args)
    result: dict = {}
    failed: dict[Path, CamError] = {}
    if truth is not None:
        options = Options(boxes=args.boxes, box_threshold=args.box_threshold,
                          dt_thresholds=args.dt_thresholds, ten_crop=args.ten_crop,
                          batch_size=batch_size(args, net))
        labels_file = args.labels or model_files(args)[2]
        found, errors = localization(net, inputs, truth, labels_file, options)
        result.update(found)
        failed.update(errors)
    if args.faithfulness:
        found, errors = faithfulness_run(net, inputs, args.steps, args.substrate,
                                         args.batch_size)
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
