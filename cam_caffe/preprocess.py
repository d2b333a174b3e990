"""Turn BGR images into the float32 NCHW batch a Caffe net was trained on.

Per image: resize (bilinear) to the net's input size, subtract the BGR mean
(numbers, or a mean image from .npy / .binaryproto), multiply by ``scale`` —
Caffe's DataTransformer order: (pixel − mean) × scale.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import cv2
import numpy as np

from . import proto
from .errors import ModelError
from .models import IMAGENET_MEAN_BGR
from .netdef import blob_shape, read_bytes


def mean_values(text: str) -> list[float] | None:
    """The numbers of a ``--mean`` like "104,117,123" (None when it names a file);
    ModelError when one is not finite."""
    try:
        values = [float(v) for v in re.split(r"[\s,]+", text.strip())]
    except ValueError:
        return None
    if not all(math.isfinite(v) for v in values):
        raise ModelError(f"--mean {text!r}: every value must be a finite number")
    return values


def parse_mean(spec: str | Path | None, channels: int = 3) -> np.ndarray:
    """A BGR mean: ``None`` (ImageNet's), numbers ("104,117,123" or one value), or a file.

    Returns shape (C,) for values, (C, H, W) for a mean image.
    """
    if spec is None:                  # other channel counts: ImageNet's green mean in each
        return np.array(IMAGENET_MEAN_BGR if channels == 3 else [IMAGENET_MEAN_BGR[1]] * channels,
                        np.float32)
    text = str(spec)
    values = mean_values(text)
    if values is not None:
        if len(values) == 1:
            values *= channels
        if len(values) != channels:
            raise ModelError(f"--mean {text!r}: gives {len(values)} values, the net has "
                             f"{channels} input channels")
        return np.array(values, np.float32)
    path = Path(text)
    if path.suffix.lower() == ".npy":
        try:
            mean = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise ModelError(f"{path}: mean file not found") from None
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: not a NumPy mean file: {e}") from None
    elif path.suffix.lower() == ".binaryproto":
        blob = proto.BlobProto()
        try:
            blob.ParseFromString(read_bytes(path, "mean"))
        except Exception as e:  # protobuf raises several types for corrupt data
            raise ModelError(f"{path}: not a Caffe mean .binaryproto: {e}") from None
        shape = [d for d in blob_shape(blob) if d != 1] or [1]
        data = np.array(blob.data or blob.double_data, np.float32)
        if data.size != np.prod(shape):
            raise ModelError(f"{path}: mean blob holds {data.size} values for shape {shape}")
        mean = data.reshape(shape)
    else:
        raise ModelError(f"--mean {text!r}: expected numbers, a .npy or a .binaryproto file")
    mean = np.asarray(mean, np.float32)
    if (mean.ndim == 1 and mean.shape[0] == channels) or (
            mean.ndim == 3 and mean.shape[0] == channels):
        return mean
    raise ModelError(f"{path}: mean has shape {list(mean.shape)}, expected ({channels},) "
                     f"or ({channels}, H, W)")


class Preprocessor:
    """Callable: list of (H, W, 3) uint8 BGR images → (N, C, h, w) float32 batch."""

    def __init__(self, size: tuple[int, int], mean: np.ndarray, scale: float = 1.0,
                 channels: int = 3) -> None:
        if not np.isfinite(scale):
            raise ModelError(f"--scale {scale}: not a finite number")
        if not np.isfinite(mean).all():
            raise ModelError("the mean holds NaN or infinity")
        self.size = size
        self.scale = float(scale)
        self.channels = channels
        h, w = size
        if mean.ndim == 3 and mean.shape[1:] != (h, w):
            mean = mean.mean(axis=(1, 2))   # a mean image of another size: its channel means
        self.mean = (mean.reshape(-1, 1, 1) if mean.ndim == 1 else mean).astype(np.float32)

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        h, w = self.size
        batch = np.empty((len(images), self.channels, h, w), np.float32)
        for i, image in enumerate(images):
            resized = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
            if self.channels == 1:
                resized = cv2.cvtColor(resized, cv2.COLOR_BGR2GRAY)[:, :, None]
            chw = resized.transpose(2, 0, 1).astype(np.float32)
            np.subtract(chw, self.mean, out=batch[i])
        if self.scale != 1.0:
            batch *= self.scale
        return batch
