"""What every command shares: the one-line-error argument parser, argument types,
the model and backend options (declared once here), and the net they name.

Light to import: building a parser loads neither OpenCV nor Pillow nor a backend
(``cam-caffe --help`` and ``models list`` start fast); what runs a net is
imported where it is used.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from .. import models
from ..backends import BACKENDS
from ..budget import parse_size
from ..errors import EXIT_USAGE, CamError, ModelError
from ..files import DEFAULT_MAX_PIXELS
from ..methods import METHODS, parse_methods
from ..models import DEFAULT_MODEL, Model
from ..progress import on_terminal

if TYPE_CHECKING:
    from ..api import CAMNet

# The original script's layout, in a source checkout: the official weights in models/.
DEFAULT_WEIGHTS = models.PROJECT_ROOT / "models" / models.get(DEFAULT_MODEL).weights.filename
DEFAULT_BATCH = 16


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises CamError instead of exiting, so errors stay one line."""

    def error(self, message: str) -> NoReturn:
        raise CamError(f"{message} (see {self.prog} --help)", EXIT_USAGE)


# ---------------------------------------------------------------- argument types

def height_width(text: str) -> tuple[int, int]:
    """224 or 224x224 → (H, W)."""
    parts = text.lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
    except ValueError:
        h = w = 0
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 224 or 224x224")
    return h, w


def method_list(text: str) -> str:
    """A ``--method`` value: one method, or a comma list of them (checked)."""
    for name in text.split(","):
        if name.strip() not in METHODS:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {name.strip()!r} (choose from {', '.join(METHODS)}, "
                "or a comma list of them)")
    try:
        return ",".join(parse_methods(text))
    except CamError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--method ")) from None


def positive_int(text: str) -> int:
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


def device_id(text: str) -> int:
    return _non_negative(text, "a device ID (0, 1, …)")


def count(text: str) -> int:
    return _non_negative(text, "a number >= 0")


def memory_size(text: str) -> int:
    try:
        return parse_size(text)
    except CamError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 8G, 512M or "
                                         "1000000000") from None


def fraction(low: float, low_open: bool) -> Callable[[str], float]:
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


def finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def mean_spec(text: str) -> str:
    """--mean: numbers are checked now; a file when the model loads."""
    from ..preprocess import mean_values
    try:
        mean_values(text)
    except CamError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--mean ")) from None
    return text


def model_name(name: str) -> str:
    try:
        return models.get(name).name
    except CamError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def levels(text: str) -> tuple[int, ...]:
    """--dt-thresholds: 0-254 levels like 20,100,110."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(0 <= v < 255 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0-254 levels like 20,100,110")
    return values


# ---------------------------------------------------------------- options declared once

def add_method_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--method``."""
    parser.add_argument(
        "--method", type=method_list, metavar="NAME[,NAME…]",
        help="how maps are made: " + ", ".join(METHODS) + " (default: cam where the net has "
             "the global-average-pooling head, else gradcam); a comma list makes each map "
             "once per method, side by side; gradient methods need --backend caffe or "
             "onnxruntime")


def add_model_options(parser: argparse.ArgumentParser, running: bool = True) -> None:
    """The "model" group: which net (--model or --prototxt/--weights), its input size
    and CAM layers; with ``running``, also what running it takes (labels, --mean,
    --scale, Python layers)."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", type=model_name, metavar="NAME",
                       help=f"a registered model (cam-caffe models list; default {DEFAULT_MODEL})")
    model.add_argument("--prototxt", type=Path, metavar="P",
                       help="deploy or train/test prototxt (V1 or V2 syntax)")
    model.add_argument("--weights", type=Path, metavar="W", help="caffemodel file")
    if running:
        model.add_argument("--labels", type=Path, metavar="FILE",
                           help="class labels, one a line (synset_words.txt style)")
        model.add_argument("--mean", type=mean_spec, metavar="M",
                           help="BGR mean: numbers (104,117,123), a .npy or .binaryproto file")
        model.add_argument("--scale", type=finite, metavar="S",
                           help="multiply (pixel - mean) by S (e.g. 0.00390625)")
    model.add_argument("--input-size", type=height_width, metavar="HxW",
                       help="input size for nets that do not declare one")
    model.add_argument("--feature-blob", metavar="NAME",
                       help="the blob whose maps are weighted (default: the CAM head's, else "
                            "the last blob with a spatial size > 1 the classifier reads)")
    model.add_argument("--fc-layer", metavar="NAME", help="CAM InnerProduct layer (override)")
    if running:
        model.add_argument("--allow-python-layers", action="store_true",
                           help="allow Python layers (they run code from the model files)")


def add_backend_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "backend" group: where and how the net runs; returned for a command's own."""
    run = parser.add_argument_group("backend")
    run.add_argument("--backend", choices=BACKENDS, default="auto",
                     help="auto (default): the fastest installed backend that can run "
                          "the net: onnxruntime, opencv, caffe (with --gpu: caffe first)")
    run.add_argument("--gpu", type=device_id, metavar="ID", help="run on CUDA device ID")
    run.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                     metavar="N", help=f"refuse larger images (default {DEFAULT_MAX_PIXELS})")
    run.add_argument("--max-memory", type=memory_size, metavar="SIZE",
                     help="refuse a net whose forward pass needs more memory (8G, 512M; "
                          "default: half the available memory); "
                          "large batches are made smaller")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="say which blob and backend were chosen (and why, for auto); "
                          "show the backend's log")
    run.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH, metavar="B",
                     help=f"images per forward pass (default {DEFAULT_BATCH})")
    run.add_argument("--threads", type=positive_int, metavar="T",
                     help="threads of a CPU forward pass (default: one per core)")
    run.add_argument("--ten-crop", action="store_true",
                     help="official test-time ten-crop: averaged probabilities, merged CAM")
    return run


def add_box_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                    default: str | None) -> None:
    """--boxes (``default``: none, or a kind), --box-threshold, --dt-thresholds."""
    parser.add_argument("--boxes", choices=("paper", "dt"), default=default,
                        help="localization boxes: paper (largest region >= threshold·max) or "
                             "dt (the official multi-threshold generator)"
                             + (f"; default {default}" if default else ""))
    parser.add_argument("--box-threshold", type=fraction(0, True), default=0.2, metavar="T",
                        help="--boxes paper: fraction of the max, in (0, 1] (default 0.2)")
    parser.add_argument("--dt-thresholds", type=levels, default=(20, 100, 110),
                        metavar="L,L,L", help="--boxes dt: 0-255 levels (default 20,100,110)")


# ---------------------------------------------------------------- the net they name

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


def load_net(args: argparse.Namespace, quiet: bool = False) -> CAMNet:
    """Build the CAMNet the arguments describe; a registry entry gives the defaults.
    A progress bar is drawn when stderr is a terminal, unless ``quiet``."""
    from ..api import CAMNet
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
                 method=args.method, batch_size=args.batch_size, threads=args.threads,
                 progress=on_terminal() and not quiet)
    if args.verbose:
        spec = net.spec
        print(f"cam-caffe: method {net.method} at blob '{spec.feature_blob}' "
              f"({spec.channels}x{spec.feature_size[0]}x{spec.feature_size[1]}), class "
              f"scores '{spec.logit_blob}', backend {net.backend_name}", file=sys.stderr)
    return net


def batch_size(args: argparse.Namespace, net: CAMNet) -> int:
    """--batch-size, made smaller when that many images would not fit in --max-memory."""
    fits = net.max_batch(10 if args.ten_crop else 1)
    if fits < args.batch_size and args.verbose:
        print(f"cam-caffe: --batch-size {args.batch_size} would exceed --max-memory; "
              f"using {fits}", file=sys.stderr)
    return min(args.batch_size, fits)
