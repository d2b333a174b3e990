"""``cam-caffe INPUT…``: Class Activation Maps of images, one image (-o, --show) or
a batch (--output-dir, --jsonl, --dask): a thin layer over :class:`cam_caffe.CAMNet`.

The modules that run the net and write its outputs (``api``, ``batch``,
``report``, ``cluster``: NumPy, OpenCV, Pillow, a backend) are imported where
they are used, once the arguments are read: ``--help``, ``--version`` and a
usage error never load them. Parsing and those imports run with SIGINT and
SIGTERM held back (``signals.deferred``): a Ctrl-C meanwhile is acted on after
them, never lost inside the import machinery.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..budget import MemoryBudget, memory_budget
from ..errors import EXIT_CODES, EXIT_INPUT, EXIT_OK, CamError, OutputError, one_line
from ..inputs import Input, collect, in_shard, parse_shard
from ..labels import class_name, resolve_class
from ..launch import say
from ..models import DEFAULT_MODEL
from ..output import check_writable, image_format, write_image
from ..render import DEFAULT_ALPHA, STYLES
from ..signals import deferred
from .options import (
    ArgumentParser,
    add_backend_options,
    add_box_options,
    add_method_option,
    add_model_options,
    batch_size,
    count,
    fraction,
    load_net,
    positive_int,
)

if TYPE_CHECKING:
    import numpy as np

    from ..api import CAMNet
    from ..batch import Options
    from ..report import ReportWriter
    from ..result import ImageResult


def _image_path(text: str) -> Path:
    """-o: a file name whose extension names an image format."""
    try:
        image_format(text)
    except CamError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return Path(text)


def parse_shard_arg(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except CamError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_dask(text: str) -> str:
    from ..cluster import check_address
    try:
        return check_address(text)
    except CamError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--dask ")) from None


def parse_save(text: str) -> tuple[str, ...]:
    from ..batch import SAVE_KINDS
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in SAVE_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(SAVE_KINDS)}")
    return kinds


EPILOG = """\
other commands (each has its own --help):
  cam-caffe models list | download NAME | path NAME    the model registry
  cam-caffe evaluate INPUT... --boxes-file FILE        classification, localization error
  cam-caffe export --prototxt P --weights W -o M.onnx  the net as an ONNX model

exit codes:
""" + "\n".join(f"  {code:<4d}{meaning}" for code, meaning in EXIT_CODES.items())


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="cam-caffe",
        usage="cam-caffe INPUT... [options]\n       cam-caffe {models,evaluate,export} ...",
        description="Class Activation Maps for Caffe models (Zhou et al., CVPR 2016).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="INPUT",
                   help="image files, directories (recursive), globs, @list.txt, or - (stdin)")
    p.add_argument("--class", dest="classes", action="append", metavar="N",
                   help="class ids or label names to map (comma-separated or repeated); "
                        "default: the top-k classes")
    p.add_argument("--top-k", type=positive_int, default=1, metavar="K",
                   help="report the K most probable classes and map them (default 1)")
    add_method_option(p)
    add_model_options(p)
    run = add_backend_options(p)
    run.add_argument("--workers", type=count, metavar="N",
                     help="processes that decode images and render and write outputs while "
                          "the forward runs; 0: threads of the main process (default: the "
                          "cores the forward leaves free, see README)")
    run.add_argument("--shard", type=parse_shard_arg, metavar="I/N",
                     help="process only shard I of N (0 <= I < N), for job arrays")
    run.add_argument("--skip-existing", action="store_true",
                     help="with --output-dir: skip images whose outputs all exist "
                          "(resume a run)")
    run.add_argument("--dask", type=parse_dask, metavar="ADDRESS",
                     help="run the batch on a Dask cluster: local[:N] (N worker processes "
                          "here, default one per core), tcp://host:port or a scheduler file")
    out = p.add_argument_group("output")
    out.add_argument("-o", "--output", type=_image_path, metavar="OUT",
                     help="write the first map's overlay to OUT (png, jpg, …); one image only")
    out.add_argument("--output-dir", type=Path, metavar="DIR",
                     help="write outputs here, mirroring the inputs' relative paths")
    out.add_argument("--overwrite", action="store_true",
                     help="with --output-dir: replace files at output names that cam-caffe "
                          "did not write (its own earlier outputs are always replaced)")
    out.add_argument("--save", type=parse_save, default=("overlay",), metavar="KINDS",
                     help="with --output-dir: comma list of overlay,heatmap,npy,json "
                          "(default overlay)")
    out.add_argument("--format", dest="image_format", choices=("png", "jpg"), default="png",
                     help="image format of --output-dir files (default png)")
    out.add_argument("--report", action="store_true",
                     help="with --output-dir: an HTML page of the run, DIR/index.html "
                          "(adds overlay,heatmap,thumb to --save)")
    out.add_argument("--montage", action="store_true",
                     help="with --output-dir: the image and its overlays side by side")
    add_box_options(out, default=None)
    out.add_argument("--jsonl", action="store_true", help="print one JSON line per image")
    out.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    out.add_argument("--show", action="store_true", help="show the overlay in a window")
    out.add_argument("--style", choices=STYLES, default="paper",
                     help="paper: official repo look at image size (default); "
                          "seed: the original script's 224x224 matplotlib figure")
    out.add_argument("--colormap", default="jet", help="matplotlib colormap (default jet)")
    out.add_argument("--alpha", type=fraction(0, False), metavar="A",
                     help="heatmap weight in [0, 1] (paper: 0.7, seed: 0.5)")
    p.add_argument("--version", action="version", version=f"cam-caffe {__version__}")
    return p


def check_display() -> None:
    """--show needs an interactive matplotlib backend."""
    import matplotlib
    if matplotlib.get_backend().lower() in ("agg", "pdf", "ps", "svg", "cairo", "template"):
        raise CamError("--show needs a display (no interactive matplotlib backend); use -o")


def show(net: CAMNet, image: np.ndarray, result: ImageResult, class_id: int, colormap: str,
         alpha: float | None) -> None:
    """The original script's window: the image with the CAM over it."""
    import cv2
    import matplotlib.pyplot as plt
    h, w = net.input_size
    plt.imshow(cv2.resize(image, (w, h))[:, :, ::-1])
    plt.imshow(result.cam(class_id, (h, w)), cmap=colormap,
               alpha=DEFAULT_ALPHA["seed"] if alpha is None else alpha)
    plt.title(f"{class_name(net.labels, class_id)} ({result.probs[class_id]:.3f})")
    plt.axis("off")
    plt.show()


def options_from(args: argparse.Namespace, net: CAMNet) -> Options:
    """The batch's options the arguments give, for ``net``."""
    from ..batch import Options
    from ..pipeline import default_workers
    from ..report import REPORT_KINDS
    classes = None
    if args.classes:
        specs = [c for group in args.classes for c in group.split(",") if c.strip()]
        classes = [resolve_class(c, net.labels, net.spec.num_classes, "--class")
                   for c in specs]
    save = args.save + tuple(k for k in REPORT_KINDS if args.report and k not in args.save)
    return Options(output_dir=args.output_dir, save=save, image_format=args.image_format,
                   classes=classes, top_k=min(args.top_k, net.spec.num_classes),
                   style=args.style,
                   colormap=args.colormap, alpha=args.alpha, boxes=args.boxes,
                   box_threshold=args.box_threshold, dt_thresholds=args.dt_thresholds,
                   ten_crop=args.ten_crop, montage=args.montage,
                   skip_existing=args.skip_existing, overwrite=args.overwrite,
                   batch_size=batch_size(args, net),
                   workers=default_workers(args.gpu, args.threads) if args.workers is None
                   else args.workers, methods=len(net.methods), jsonl=args.jsonl,
                   quiet=args.quiet)


def write_single(net: CAMNet, item: Input, options: Options,
                 args: argparse.Namespace) -> None:
    """-o and --show: one image's result, its first map written to -o and/or shown,
    its record printed."""
    from ..batch import load_within, print_record
    from ..compose import render_overlay
    from ..result import record
    image, _ = load_within(net, item, options, MemoryBudget(memory_budget()))
    result = net.predict([image], options.classes, options.top_k, options.ten_crop,
                         boxes=options.box_rule, items=[item])[0]
    result.check_finite()
    files = None
    if args.output:
        write_image(args.output, render_overlay(image, result.full_map(0), result.boxes[0],
                                                options.look(net.input_size)))
        files = {"overlay" if len(result.classes) == 1 else "overlay-1": args.output}
    entry = record(result, net, options.top_k, files)
    if options.jsonl:
        print(json.dumps(entry, allow_nan=False))
    elif not options.quiet:
        print_record(entry, sys.stdout)
    if args.show:
        show(net, image, result, result.classes[0], args.colormap, args.alpha)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse what cannot work before any input is read or the model loads."""
    if args.output and args.output_dir:
        raise CamError("give either -o (one image) or --output-dir (many), not both")
    if not args.output_dir:
        needs = [option for option, given in [
            ("--save", args.save != ("overlay",)), ("--montage", args.montage),
            ("--skip-existing", args.skip_existing), ("--overwrite", args.overwrite),
            ("--report", args.report)] if given]
        if needs:
            raise CamError(f"{' and '.join(needs)} need{'s' * (len(needs) == 1)} --output-dir")
    if args.show:
        check_display()
    if args.output_dir:
        check_writable(args.output_dir)
    if args.output:
        check_writable(args.output.parent, args.output)


def same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` are one file (through links too)."""
    try:
        return a.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def report_writer(args: argparse.Namespace, net: CAMNet, options: Options,
                  images: int) -> ReportWriter:
    """--report's page, headed with what this run of ``images`` inputs is."""
    from ..report import ReportWriter
    model = f"{args.prototxt} ({args.weights})" if args.prototxt else args.model or DEFAULT_MODEL
    return ReportWriter(args.output_dir, {
        "model": model, "backend": net.backend_name, "methods": list(net.methods), "images": images,
        "top_k": options.top_k, "boxes": options.boxes}, options, shard=args.shard)


def main(argv: list[str]) -> int:
    """``cam-caffe INPUT… [options]``: the exit code."""
    started = time.monotonic()
    with deferred():          # parsing and the imports: a Ctrl-C meanwhile acts after them
        args = build_parser().parse_args(argv)
        check_arguments(args)
        for module in ("api", "boxes", "pipeline", "report"):     # used below: loaded now
            importlib.import_module(f"cam_caffe.{module}")
        from ..batch import Report, run_batch
        from ..cluster import dask_client
    problems: list[CamError] = []           # inputs that could not even be listed
    inputs = collect(args.images, args.output_dir, problems=problems)
    if not inputs and problems:
        for problem in problems:
            say(f"cam-caffe: error: {one_line(str(problem))}")
        return Report(failed=[(Path(), p) for p in problems]).exit_code()
    if args.shard:
        everything = len(inputs)
        inputs = [item for item in inputs if in_shard(item, args.shard)]
        if everything and not inputs:        # an empty shard of a job array is a success
            say(f"cam-caffe: shard {args.shard[0]}/{args.shard[1]}: 0 of {everything} images")
            return EXIT_OK
    if not inputs:
        raise CamError("no input images found", EXIT_INPUT)
    if args.dask and (args.output or args.show):
        raise CamError("--dask runs a batch: use --output-dir instead of -o/--show")
    if args.dask and args.workers:
        raise CamError("--workers is for a run in this process; a Dask worker runs its "
                       "chunks itself (start one per core)")
    if (args.output or args.show) and len(inputs) > 1:
        raise CamError(f"-o and --show take one image, got {len(inputs)}; use --output-dir")
    if args.output and same_file(args.output, inputs[0].path):
        raise OutputError(f"{args.output}: -o would overwrite the input image")
    net = load_net(args, quiet=args.quiet)
    options = options_from(args, net)
    writer = report_writer(args, net, options, len(inputs)) if args.report else None
    on_chunk = writer.add if writer else None
    if args.output or args.show:
        write_single(net, inputs[0], options, args)
        report = Report(done=1)
    elif args.dask:
        with dask_client(args.dask, quiet=not args.verbose) as client:
            report = run_batch(net, inputs, options, client=client, on_chunk=on_chunk)
    else:
        report = run_batch(net, inputs, options, on_chunk=on_chunk)
    if writer:
        writer.close()
    report.failed[:0] = [(Path(), problem) for problem in problems]
    for _, error in report.failed:
        say(f"cam-caffe: error: {one_line(str(error))}")
    if not args.quiet or report.failed:
        say(f"cam-caffe: {report.summary(time.monotonic() - started)}")
    if report.done and not (args.output or args.output_dir or args.show or args.quiet
                            or args.jsonl):
        say("cam-caffe: no file written: -o FILE writes an image's overlay, --output-dir DIR "
            "every image's files; --show shows the map in a window")
    return report.exit_code()
