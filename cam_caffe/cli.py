"""The ``cam-caffe`` command: a thin layer over :class:`cam_caffe.CAMNet`."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

from . import __version__, models
from .api import CAMNet, Prediction
from .backends import BACKENDS
from .batch import (
    SAVE_KINDS,
    Options,
    Report,
    image_cost,
    print_record,
    process,
    render_overlay,
    run_batch,
)
from .boxes import Box
from .budget import MemoryBudget, memory_budget, parse_size
from .cluster import check_address, dask_client
from .errors import (
    EXIT_CODES,
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_USAGE,
    CamError,
    ModelError,
    OutputError,
    Terminated,
    one_line,
)
from .image import DEFAULT_MAX_PIXELS
from .inputs import Input, collect, in_shard, parse_shard
from .labels import class_name, resolve_class
from .launch import reader_gone, say
from .methods import METHODS
from .models import DEFAULT_MODEL, Model
from .output import check_writable, image_format, write_image
from .pipeline import default_workers
from .preprocess import mean_values
from .render import DEFAULT_ALPHA, STYLES
from .report import REPORT_KINDS, ReportWriter
from .signals import exit_code, ignore_signals

# The original script's layout, in a source checkout: the official weights in models/.
DEFAULT_WEIGHTS = models.PROJECT_ROOT / "models" / models.get(DEFAULT_MODEL).weights.filename
DEFAULT_BATCH = 16


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises CamError instead of exiting, so errors stay one line."""

    def error(self, message: str) -> None:
        raise CamError(f"{message} (see {self.prog} --help)", EXIT_USAGE)


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
    except ValueError:
        h = w = 0
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 224 or 224x224")
    return h, w


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _non_negative(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def _device_id(text: str) -> int:
    return _non_negative(text, "a device ID (0, 1, …)")


def _count(text: str) -> int:
    return _non_negative(text, "a number >= 0")


def _memory_size(text: str) -> int:
    try:
        return parse_size(text)
    except CamError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 8G, 512M or "
                                         "1000000000") from None


def _fraction(low: float, low_open: bool):
    """An argparse type: a number in [low, 1] (or (low, 1] when ``low_open``)."""
    interval = f"{'(' if low_open else '['}{low:g}, 1]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (low < value <= 1 if low_open else low <= value <= 1):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number in {interval}")
        return value
    return parse


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _mean(text: str) -> str:
    """--mean: numbers are checked now; a file when the model loads."""
    try:
        mean_values(text)
    except CamError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--mean ")) from None
    return text


def _model_name(name: str) -> str:
    try:
        return models.get(name).name
    except CamError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    try:
        return check_address(text)
    except CamError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--dask ")) from None


def parse_save(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in SAVE_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(SAVE_KINDS)}")
    return kinds


def parse_levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(v) for v in text.split(","))
    except ValueError:
        levels = ()
    if not levels or not all(0 <= v < 255 for v in levels):
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0-254 levels like 20,100,110")
    return levels


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
    p.add_argument("--top-k", type=_positive_int, default=1, metavar="K",
                   help="report the K most probable classes and map them (default 1)")
    add_method_argument(p)
    model = p.add_argument_group("model")
    model.add_argument("--model", type=_model_name, metavar="NAME",
                       help=f"a registered model (cam-caffe models list; default {DEFAULT_MODEL})")
    model.add_argument("--prototxt", type=Path, metavar="P",
                       help="deploy or train/test prototxt (V1 or V2 syntax)")
    model.add_argument("--weights", type=Path, metavar="W", help="caffemodel file")
    model.add_argument("--labels", type=Path, metavar="FILE",
                       help="class labels, one a line (synset_words.txt style)")
    model.add_argument("--mean", type=_mean, metavar="M",
                       help="BGR mean: numbers (104,117,123), a .npy or .binaryproto file")
    model.add_argument("--scale", type=_finite, metavar="S",
                       help="multiply (pixel - mean) by S (e.g. 0.00390625)")
    model.add_argument("--input-size", type=_size, metavar="HxW",
                       help="input size for nets that do not declare one")
    model.add_argument("--feature-blob", metavar="NAME",
                       help="the blob whose maps are weighted (default: the CAM head's, else "
                            "the last blob with a spatial size > 1 the classifier reads)")
    model.add_argument("--fc-layer", metavar="NAME", help="CAM InnerProduct layer (override)")
    model.add_argument("--allow-python-layers", action="store_true",
                       help="allow Python layers (they run code from the model files)")
    run = p.add_argument_group("backend")
    run.add_argument("--backend", choices=BACKENDS, default="auto",
                     help="auto (default): the fastest installed backend that can run "
                          "the net: onnxruntime, opencv, caffe (with --gpu: caffe first)")
    run.add_argument("--gpu", type=_device_id, metavar="ID", help="run on CUDA device ID")
    run.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                     metavar="N", help=f"refuse larger images (default {DEFAULT_MAX_PIXELS})")
    run.add_argument("--max-memory", type=_memory_size, metavar="SIZE",
                     help="refuse a net whose forward pass needs more memory (8G, 512M; "
                          "default: half the available memory); "
                          "large batches are made smaller")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="say which blob and backend were chosen (and why, for auto); "
                          "show the backend's log")
    run.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH, metavar="B",
                     help=f"images per forward pass (default {DEFAULT_BATCH})")
    run.add_argument("--threads", type=_positive_int, metavar="T",
                     help="threads of a CPU forward pass (default: one per core)")
    run.add_argument("--workers", type=_count, metavar="N",
                     help="processes that decode images and render and write outputs while "
                          "the forward runs; 0: threads of the main process (default: the "
                          "cores the forward leaves free, see README)")
    run.add_argument("--ten-crop", action="store_true",
                     help="official test-time ten-crop: averaged probabilities, merged CAM")
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
    out.add_argument("--boxes", choices=("paper", "dt"),
                     help="localization boxes: paper (largest region >= threshold·max) or dt "
                          "(the official multi-threshold generator)")
    out.add_argument("--box-threshold", type=_fraction(0, True), default=0.2, metavar="T",
                     help="--boxes paper: fraction of the max, in (0, 1] (default 0.2)")
    out.add_argument("--dt-thresholds", type=parse_levels, default=(20, 100, 110),
                     metavar="L,L,L", help="--boxes dt: 0-255 levels (default 20,100,110)")
    out.add_argument("--jsonl", action="store_true", help="print one JSON line per image")
    out.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    out.add_argument("--show", action="store_true", help="show the overlay in a window")
    out.add_argument("--style", choices=STYLES, default="paper",
                     help="paper: official repo look at image size (default); "
                          "seed: the original script's 224x224 matplotlib figure")
    out.add_argument("--colormap", default="jet", help="matplotlib colormap (default jet)")
    out.add_argument("--alpha", type=_fraction(0, False), metavar="A",
                     help="heatmap weight in [0, 1] (paper: 0.7, seed: 0.5)")
    p.add_argument("--version", action="version", version=f"cam-caffe {__version__}")
    return p


def add_method_argument(parser: argparse.ArgumentParser) -> None:
    """``--method``, shared by cam-caffe and cam-caffe evaluate."""
    parser.add_argument(
        "--method", choices=METHODS, metavar="NAME",
        help="how maps are made: " + ", ".join(METHODS) + " (default: cam where the net has "
             "the global-average-pooling head, else gradcam); gradient methods need "
             "--backend caffe or onnxruntime")


def model_files(args: argparse.Namespace) -> tuple[Path, Path, Path | None, Model | None]:
    """(prototxt, weights, labels, registry entry) the arguments name."""
    if args.prototxt or args.weights:
        if args.model:
            raise CamError("give either --model or --prototxt/--weights, not both")
        if not (args.prototxt and args.weights):
            raise CamError("--prototxt and --weights go together")
        return args.prototxt, args.weights, None, None
    name = args.model or DEFAULT_MODEL
    entry = models.get(name)
    if name == DEFAULT_MODEL and DEFAULT_WEIGHTS.is_file():   # the original script's layout
        return models.file_path(entry, entry.prototxt), DEFAULT_WEIGHTS, None, entry
    try:
        prototxt, weights, labels = models.model_path(name)
    except ModelError as e:
        if name != DEFAULT_MODEL:
            raise
        raise ModelError(f"{e}, or pass --model demo, or --prototxt and --weights") from None
    return prototxt, weights, labels, entry


def load_net(args: argparse.Namespace) -> CAMNet:
    """Build the CAMNet the arguments describe; a registry entry gives the defaults."""
    prototxt, weights, labels, entry = model_files(args)
    mean, scale, size = args.mean, args.scale, args.input_size
    if entry is not None and entry.mean is not None:   # else the prototxt's own transform
        mean = mean if mean is not None else entry.mean_arg
        scale = scale if scale is not None else entry.scale
    if entry is not None:
        size = size or entry.input_size
    net = CAMNet(prototxt, weights, backend=args.backend, gpu=args.gpu, mean=mean,
                 scale=scale, input_size=size, labels=args.labels or labels,
                 feature_blob=args.feature_blob, fc_layer=args.fc_layer,
                 allow_python_layers=args.allow_python_layers, max_pixels=args.max_pixels,
                 max_memory=args.max_memory, verbose=args.verbose,
                 method=args.method, batch_size=args.batch_size,
                 threads=getattr(args, "threads", None),
                 progress=sys.stderr.isatty() and not getattr(args, "quiet", False))
    if args.verbose:
        spec = net.spec
        print(f"cam-caffe: method {net.method} at blob '{spec.feature_blob}' "
              f"({spec.channels}x{spec.feature_size[0]}x{spec.feature_size[1]}), class "
              f"scores '{spec.logit_blob}', backend {net.backend_name}", file=sys.stderr)
    return net


def check_display() -> None:
    """--show needs an interactive matplotlib backend."""
    import matplotlib
    if matplotlib.get_backend().lower() in ("agg", "pdf", "ps", "svg", "cairo", "template"):
        raise CamError("--show needs a display (no interactive matplotlib backend); use -o")


def show(net: CAMNet, image, result: Prediction, class_id: int, colormap: str,
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
                   else args.workers, jsonl=args.jsonl, quiet=args.quiet)


def batch_size(args: argparse.Namespace, net: CAMNet) -> int:
    """--batch-size, made smaller when that many images would not fit in --max-memory."""
    fits = net.max_batch(10 if args.ten_crop else 1)
    if fits < args.batch_size and args.verbose:
        print(f"cam-caffe: --batch-size {args.batch_size} would exceed --max-memory; "
              f"using {fits}", file=sys.stderr)
    return min(args.batch_size, fits)


def single(net: CAMNet, item: Input, options: Options, args: argparse.Namespace) -> None:
    """-o and --show: one image, its first map."""
    budget = MemoryBudget(memory_budget())
    image = net.load(item.path, item.data, lambda width, height: budget.reserve(
        image_cost(width, height, options), item.path, width, height))
    result = net.predict([image], options.classes, options.top_k, options.ten_crop)[0]
    record = process(net, item, image, result, options)
    class_id = result.classes[0]
    if args.output:
        boxes = [Box(*b) for b in record["maps"][0]["boxes"]]
        cam_full = result.cam(class_id, result.image_size)
        write_image(args.output, render_overlay(net, image, cam_full, boxes, options))
        record["files"] = {"overlay" if len(result.classes) == 1 else "overlay-1":
                           str(args.output)}
    if options.jsonl:
        print(json.dumps(record, allow_nan=False))
    elif not options.quiet:
        print_record(record, sys.stdout)
    if args.show:
        show(net, image, result, class_id, args.colormap, args.alpha)


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
                  count: int) -> ReportWriter:
    """--report's page, headed with what this run of ``count`` inputs is."""
    model = f"{args.prototxt} ({args.weights})" if args.prototxt else args.model or DEFAULT_MODEL
    return ReportWriter(args.output_dir, {
        "model": model, "backend": net.backend_name, "methods": [net.method], "images": count,
        "top_k": options.top_k, "boxes": options.boxes}, options, shard=args.shard)


def run(argv: list[str]) -> int:
    started = time.monotonic()
    args = build_parser().parse_args(argv)
    check_arguments(args)
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
    net = load_net(args)
    options = options_from(args, net)
    writer = report_writer(args, net, options, len(inputs)) if args.report else None
    on_chunk = writer.add if writer else None
    if args.output or args.show:
        single(net, inputs[0], options, args)
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


# Subcommands: the first argument names a module whose ``main(argv) -> int`` runs it.
SUBCOMMANDS = {"models": "cam_caffe.models", "evaluate": "cam_caffe.evaluate",
               "export": "cam_caffe.export"}


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors and documented exit codes, never a traceback."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in SUBCOMMANDS:
            import importlib
            return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
        return run(argv)
    except CamError as e:
        say(f"cam-caffe: error: {one_line(str(e))}")
        return e.exit_code
    except KeyboardInterrupt as e:               # Ctrl-C or SIGTERM (Terminated)
        if threading.current_thread() is threading.main_thread():
            ignore_signals()                     # the process is on its way out
        say(f"cam-caffe: {'terminated' if isinstance(e, Terminated) else 'interrupted'}")
        return exit_code(e)
    except BrokenPipeError:
        return reader_gone()
    except Exception as e:  # a bug: still one line, unless asked for the traceback
        if os.environ.get("CAM_CAFFE_DEBUG"):
            raise
        say(f"cam-caffe: internal error: {type(e).__name__}: {one_line(str(e))} "
            "(set CAM_CAFFE_DEBUG=1 for the traceback)")
        return EXIT_INTERNAL
