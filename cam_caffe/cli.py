"""The ``cam-caffe`` command: a thin layer over :class:`cam_caffe.CAMNet`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .api import CAMNet, Prediction
from .backends import BACKENDS
from .errors import EXIT_OK, EXIT_USAGE, CamError, ModelError
from .image import DEFAULT_MAX_PIXELS
from .labels import class_name, resolve_class
from .output import write_image
from .render import DEFAULT_ALPHA, STYLES, overlay_paper, overlay_seed, seed_figure

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROTOTXT = PROJECT_ROOT / "prototxt" / "deploy_googlenetCAM.prototxt"
DEFAULT_WEIGHTS = PROJECT_ROOT / "models" / "imagenet_googlenetCAM_train_iter_120000.caffemodel"
WEIGHTS_URL = ("http://cnnlocalization.csail.mit.edu/demoCAM/models/"
               "imagenet_googlenetCAM_train_iter_120000.caffemodel")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises CamError instead of exiting, so errors stay one line."""

    def error(self, message: str) -> None:
        raise CamError(f"{message} (see cam-caffe --help)", EXIT_USAGE)


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


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="cam-caffe",
        description="Class Activation Maps for Caffe models (Zhou et al., CVPR 2016).")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s)")
    p.add_argument("--class", dest="classes", action="append", metavar="N",
                   help="class id or label name to map (repeatable); default: the top-1 class")
    p.add_argument("--top-k", type=_positive_int, default=5, metavar="K",
                   help="print the K most probable classes (default 5)")
    model = p.add_argument_group("model")
    model.add_argument("--prototxt", type=Path, default=DEFAULT_PROTOTXT, metavar="P",
                       help="deploy or train/test prototxt (V1 or V2 syntax)")
    model.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, metavar="W",
                       help="caffemodel file")
    model.add_argument("--labels", type=Path, metavar="FILE",
                       help="class labels, one a line (synset_words.txt style)")
    model.add_argument("--mean", metavar="M",
                       help="BGR mean: numbers (104,117,123), a .npy or .binaryproto file")
    model.add_argument("--scale", type=float, metavar="S",
                       help="multiply (pixel - mean) by S (e.g. 0.00390625)")
    model.add_argument("--input-size", type=_size, metavar="HxW",
                       help="input size for nets that do not declare one")
    model.add_argument("--feature-blob", metavar="NAME", help="CAM feature blob (override)")
    model.add_argument("--fc-layer", metavar="NAME", help="CAM InnerProduct layer (override)")
    model.add_argument("--allow-python-layers", action="store_true",
                       help="allow Python layers (they run code from the model files)")
    run = p.add_argument_group("backend")
    run.add_argument("--backend", choices=BACKENDS, default="auto",
                     help="auto: pycaffe if installed, else OpenCV")
    run.add_argument("--gpu", type=int, metavar="ID", help="run on CUDA device ID")
    run.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                     metavar="N", help=f"refuse larger images (default {DEFAULT_MAX_PIXELS})")
    run.add_argument("--verbose", action="store_true", help="show the backend's log")
    out = p.add_argument_group("output")
    out.add_argument("-o", "--output", type=Path, metavar="OUT",
                     help="write the overlay image (png, jpg, …); one input image only")
    out.add_argument("--show", action="store_true", help="show the overlay in a window")
    out.add_argument("--style", choices=STYLES, default="paper",
                     help="paper: official repo look at image size (default); "
                          "seed: the original script's 224x224 matplotlib figure")
    out.add_argument("--colormap", default="jet", help="matplotlib colormap (default jet)")
    out.add_argument("--alpha", type=float, metavar="A",
                     help="heatmap weight (paper: 0.7, seed: 0.5)")
    p.add_argument("--version", action="version", version=f"cam-caffe {__version__}")
    return p


def load_net(args: argparse.Namespace) -> CAMNet:
    """Build the CAMNet the arguments describe."""
    if args.weights == DEFAULT_WEIGHTS and not DEFAULT_WEIGHTS.is_file():
        raise ModelError(f"{DEFAULT_WEIGHTS}: the GoogLeNet-CAM weights are not there; download "
                         f"them from {WEIGHTS_URL} into models/, or pass --prototxt and --weights")
    return CAMNet(args.prototxt, args.weights, backend=args.backend, gpu=args.gpu,
                  mean=args.mean, scale=args.scale, input_size=args.input_size,
                  labels=args.labels, feature_blob=args.feature_blob, fc_layer=args.fc_layer,
                  allow_python_layers=args.allow_python_layers, max_pixels=args.max_pixels,
                  verbose=args.verbose)


def render(net: CAMNet, image, result: Prediction, class_id: int, style: str,
           colormap: str, alpha: float | None):
    """The overlay of one class's CAM in ``style``."""
    alpha = DEFAULT_ALPHA[style] if alpha is None else alpha
    if style == "seed":
        import cv2
        h, w = net.input_size
        small = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        return overlay_seed(small, result.cam(class_id, (h, w)), colormap, alpha)
    return overlay_paper(image, result.cam(class_id, result.image_size), colormap, alpha)


def print_top(path: str, result: Prediction, k: int) -> None:
    print(path)
    for class_id, label, prob in result.top(k):
        print(f"  {class_id:5d}  {prob:.4f}  {label}")


def show(net: CAMNet, image, result: Prediction, class_id: int, colormap: str,
         alpha: float | None) -> None:
    """The original script's window: the image with the CAM over it."""
    import cv2
    import matplotlib
    import matplotlib.pyplot as plt
    if matplotlib.get_backend().lower() in ("agg", "pdf", "ps", "svg", "cairo", "template"):
        raise CamError("--show needs a display (no interactive matplotlib backend); use -o")
    h, w = net.input_size
    plt.imshow(cv2.resize(image, (w, h))[:, :, ::-1])
    plt.imshow(result.cam(class_id, (h, w)), cmap=colormap,
               alpha=DEFAULT_ALPHA["seed"] if alpha is None else alpha)
    plt.title(f"{class_name(net.labels, class_id)} ({result.probs[class_id]:.3f})")
    plt.axis("off")
    plt.show()


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.output and len(args.images) > 1:
        raise CamError("-o takes one input image; several images need one output each")
    net = load_net(args)
    classes = ([resolve_class(c, net.labels, net.spec.num_classes) for c in args.classes]
               if args.classes else None)
    for path in args.images:
        image = net.load(path)
        result = net.predict([image], classes=classes, top_k=1)[0]
        print_top(path, result, args.top_k)
        class_id = result.classes[0]
        if args.output:
            write_image(args.output, render(net, image, result, class_id, args.style,
                                            args.colormap, args.alpha))
        if args.show:
            show(net, image, result, class_id, args.colormap, args.alpha)
    return EXIT_OK


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
        print(f"cam-caffe: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("cam-caffe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
