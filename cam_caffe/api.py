"""The Python API: load a CAM net once, then get predictions and CAMs per image.

    from cam_caffe import CAMNet
    net = CAMNet("prototxt/deploy_googlenetCAM.prototxt", "weights.caffemodel")
    result = net.predict([net.load("img1.jpg")])[0]
    result.top(5)                       # [(class id, label, probability), …]
    result.cam(result.classes[0], result.image_size)  # the top-1 class's raw CAM, image size

Each result is a :class:`cam_caffe.result.ImageResult`, made once by ``predict``.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .backends import Backend, create_backend
from .boxes import NO_BOXES, BoxRule
from .cam import cam_weights
from .camspec import CamSpec, find_target
from .errors import CamError, ModelError
from .files import DEFAULT_MAX_PIXELS
from .image import load_image
from .inputs import Input
from .labels import read_labels, resolve_class
from .limits import check as check_memory
from .limits import default_max_memory, max_batch
from .methods import GRADIENT_METHODS, Evidence, compute, parse_methods
from .netdef import CaffeModel, check_weights, load_netdef
from .preprocess import Preprocessor, parse_mean
from .result import ImageResult
from .tencrop import merge_ten_crops, ten_crops

Prediction = ImageResult           # the API's earlier name for one image's result


def absolute(path: str | Path) -> Path:
    """``path`` made absolute (not resolved: symbolic links stay as named)."""
    return Path(os.path.abspath(path))


class CAMNet:
    """A Caffe classification network loaded into one backend, with its CAM method.

    ``method`` (``cam_caffe.methods.METHODS``): by default ``cam`` where the net
    has the CAM head at ``feature_blob``, else ``gradcam``; a comma list gives
    each class's map once per method (``methods``), in that order. ``batch_size`` is
    the rows per extra forward of Score-CAM and Ablation-CAM; ``progress``
    shows their progress bar.
    """

    def __init__(self, prototxt: str | Path, weights: str | Path, *, backend: str = "auto",
                 gpu: int | None = None, mean: str | None = None, scale: float | None = None,
                 input_size: tuple[int, int] | None = None, labels: str | Path | None = None,
                 feature_blob: str | None = None, fc_layer: str | None = None,
                 allow_python_layers: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_memory: int | None = None, verbose: bool = False,
                 method: str | None = None, batch_size: int = 16,
                 progress: bool = False, threads: int | None = None) -> None:
        # What rebuilds this net in another process (a Dask worker): paths made absolute.
        self.arguments = {
            "prototxt": absolute(prototxt), "weights": absolute(weights), "backend": backend,
            "gpu": gpu,
            "mean": absolute(mean) if mean and Path(mean).is_file() else mean, "scale": scale,
            "input_size": input_size, "labels": absolute(labels) if labels else None,
            "feature_blob": feature_blob, "fc_layer": fc_layer,
            "allow_python_layers": allow_python_layers, "max_pixels": max_pixels,
            "max_memory": max_memory, "verbose": verbose, "method": method,
            "batch_size": batch_size}   # no progress bar in other processes
        self.netdef = load_netdef(prototxt, input_size=input_size,
                                  allow_python_layers=allow_python_layers)
        weights = self.weights = Path(weights)
        if not weights.is_file():
            raise ModelError(f"{weights}: weights file not found")
        model = CaffeModel(weights)       # read and parsed once, for the check and the backend
        check_weights(self.netdef, model.net, weights)
        # bytes a forward may need (cam_caffe.limits); refused before any backend allocates
        self.max_memory = default_max_memory() if max_memory is None else max_memory
        check_memory(self.netdef, 1, self.max_memory)
        self.spec: CamSpec = find_target(self.netdef, feature_blob, fc_layer)
        self.methods = parse_methods(method) if method else \
            ("cam" if self.spec.cam_head else "gradcam",)
        self.method = ",".join(self.methods)
        if "cam" in self.methods and not self.spec.cam_head:
            raise ModelError(f"{self.netdef.path}: --method cam needs a global average pooling "
                             f"→ InnerProduct head after blob '{self.spec.feature_blob}'; "
                             "the other methods (gradcam, scorecam, …) work on any net")
        self.cam_weights = cam_weights(self.netdef, model.net, self.spec) \
            if "cam" in self.methods else None
        self.batch_size, self.progress = batch_size, progress
        self.labels = read_labels(labels) if labels else None
        if self.labels and len(self.labels) != self.spec.num_classes:
            raise ModelError(f"{labels}: has {len(self.labels)} labels, "
                             f"the net has {self.spec.num_classes} classes")
        _, channels, height, width = self.netdef.input_shape
        transform = self.netdef.transform
        if mean is None and transform and transform.mean_values:
            mean = ",".join(str(v) for v in transform.mean_values)
        elif mean is None and transform and transform.mean_file:
            mean = transform.mean_file
        if scale is None:
            scale = transform.scale if transform else 1.0
        self.preprocess = Preprocessor((height, width), parse_mean(mean, channels), scale,
                                       channels)
        self.max_pixels = max_pixels
        self.backend: Backend = create_backend(backend, self.netdef, model, self.spec,
                                               gpu=gpu, verbose=verbose,
                                               gradients=self.needs_gradients,
                                               threads=threads)
        self.backend_name = self.backend.name

    @property
    def needs_gradients(self) -> bool:
        """Whether one of the methods is a gradient method."""
        return any(m in GRADIENT_METHODS for m in self.methods)

    @property
    def input_size(self) -> tuple[int, int]:
        """The net's (H, W)."""
        return self.preprocess.size

    def max_batch(self, crops: int = 1) -> int:
        """The most images one ``predict`` may take under ``max_memory``, each image being
        ``crops`` inputs (10 with ten crops); ModelError when not even one fits."""
        return max_batch(self.netdef, self.max_memory, crops)

    def load(self, path: str | Path, data: bytes | None = None,
             admit: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Read an image file (or its ``data``) as BGR uint8, within this net's pixel
        limit; see :func:`cam_caffe.image.load_image` for ``admit``."""
        return load_image(path, self.max_pixels, data, admit)

    def class_ids(self, classes: Sequence[int | str]) -> list[int]:
        """Class ids from ids or label names, checked against this net (CamError names
        the valid range, an unknown name, or the classes an ambiguous name fits)."""
        return [resolve_class(c, self.labels, self.spec.num_classes) for c in classes]

    def predict(self, images: Sequence[np.ndarray], classes: Sequence[int | str] | None = None,
                top_k: int = 1, ten_crop: bool = False, *, boxes: BoxRule = NO_BOXES,
                items: Sequence[Input] | None = None) -> list[ImageResult]:
        """Forward a batch of BGR images; CAMs of ``classes`` (ids or label names), else
        of each image's top-k.

        With ``ten_crop``, the official test-time procedure: probabilities
        averaged over ten crops and the CAMs merged back into one map at the
        resize size (256 for a 224 net), instead of one feature-size map.
        Each result finds its boxes by ``boxes`` when asked for them, and
        carries its input from ``items`` (one per image) when given.
        """
        if classes is not None:
            classes = self.class_ids([classes] if isinstance(classes, (str, int)) else classes)
        if not images:
            return []
        crops = 10 if ten_crop else 1
        check_memory(self.netdef, len(images) * crops, self.max_memory)
        if ten_crop:
            resize, crop = self._ten_crop_sizes()
            batch = self.preprocess([c for image in images for c in ten_crops(image, resize, crop)])
        else:
            batch = self.preprocess(list(images))
        out = self.backend.forward(batch)
        probs = out.probs if crops == 1 else out.probs.reshape(len(images), crops, -1).mean(axis=1)
        chosen = self._choose(probs, classes, top_k)
        cams = self._maps(batch, out, np.repeat(chosen, crops, axis=0) if ten_crop else chosen)
        if ten_crop:
            cams = np.stack([[merge_ten_crops(cams[10 * i:10 * i + 10, m], resize, crop)
                              for m in range(cams.shape[1])] for i in range(len(images))])
        mapped = np.repeat(chosen, len(self.methods), axis=1)     # each map's class
        return [ImageResult(probs[i], [int(c) for c in mapped[i]], cams[i], images[i].shape[:2],
                            self.labels, self.methods, ten_crop,
                            items[i] if items is not None else None, boxes)
                for i in range(len(images))]

    def _ten_crop_sizes(self) -> tuple[int, int]:
        """(resize, crop) of the ten-crop procedure for this net's square input."""
        height, width = self.input_size
        if height != width:
            raise CamError(f"--ten-crop needs a square net input, this one is {height}x{width}")
        return round(height * 256 / 224), height

    def _maps(self, batch: np.ndarray, out, classes: np.ndarray) -> np.ndarray:
        """The methods' raw maps (N, M·S, h, w) of ``classes`` (N, M) for one forward
        ``out``: for each class, one map per method (S of them), in --method's order."""
        # the gradients first: the extra forwards of Score-/Ablation-CAM replace the
        # backend's target blob, which the gradients are taken at
        grads = self.backend.gradients(classes) if self.needs_gradients else None

        def gradients() -> np.ndarray:
            assert grads is not None, "only a gradient method asks for the gradients"
            return grads
        evidence = Evidence(out.features, classes, batch, gradients,
                            lambda inputs: self.backend.forward(inputs).logits,
                            self.backend.tail_logits, out.logits, self.cam_weights,
                            self.batch_size, self.progress)
        maps = np.stack([compute(m, evidence) for m in self.methods], axis=2)
        return maps.reshape(maps.shape[0], -1, *maps.shape[3:])

    def _choose(self, probs: np.ndarray, classes: Sequence[int] | None, top_k: int) -> np.ndarray:
        if classes is not None:
            return np.tile(np.asarray(classes, int), (len(probs), 1))
        return np.argsort(-probs, axis=1, kind="stable")[:, :max(1, top_k)]
