"""Draw a CAM over its image.

``paper`` (default): the official repo's look — min–max normalised map, a
colormap, 0.2·image + alpha·heatmap (alpha 0.7), at the image's own size.
``seed``: the original pycaffe script's figure — the image resized to the
net's input, the raw CAM drawn over it by matplotlib with alpha 0.5.
"""
from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from .errors import CamError

STYLES = ("paper", "seed")
IMAGE_WEIGHT = 0.2   # the official overlay's weight of the image
DEFAULT_ALPHA = {"paper": 0.7, "seed": 0.5}


@lru_cache(maxsize=16)
def colormap_lut(name: str) -> np.ndarray:
    """A 256×3 uint8 BGR lookup table for a matplotlib colormap name."""
    import matplotlib                      # imported only when a map is coloured
    try:
        cmap = matplotlib.colormaps[name]
    except KeyError:
        raise CamError(f"--colormap {name!r}: not a matplotlib colormap") from None
    rgb = cmap(np.linspace(0.0, 1.0, 256))[:, :3]
    return np.ascontiguousarray(np.rint(rgb[:, ::-1] * 255).astype(np.uint8))


def normalize(cam: np.ndarray) -> np.ndarray:
    """Min–max scale to [0, 1]; a constant map becomes all zeros."""
    cam = np.asarray(cam, np.float32)
    low, high = float(cam.min()), float(cam.max())
    if not high > low:                       # constant (or NaN) map
        return np.zeros_like(cam)
    return (cam - low) / (high - low)


def heatmap(cam: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """The map normalised and coloured: (H, W, 3) uint8 BGR."""
    index = np.rint(normalize(cam) * 255).astype(np.uint8)
    return cv2.applyColorMap(index, colormap_lut(colormap).reshape(256, 1, 3))


def overlay_paper(image: np.ndarray, cam: np.ndarray, colormap: str = "jet",
                  alpha: float = DEFAULT_ALPHA["paper"]) -> np.ndarray:
    """0.2·image + alpha·heatmap (rounded, saturated); ``cam`` has the image's size."""
    if cam.shape != image.shape[:2]:
        raise ValueError(f"CAM shape {cam.shape} differs from image shape {image.shape[:2]}")
    return cv2.addWeighted(image, IMAGE_WEIGHT, heatmap(cam, colormap), alpha, 0.0)


def seed_figure(image: np.ndarray, cam: np.ndarray, colormap: str = "jet",
                alpha: float = DEFAULT_ALPHA["seed"], title: str | None = None):
    """The original script's matplotlib figure: ``image`` and ``cam`` at the net's size.

    ``image`` is the BGR image already resized to ``cam``'s shape.
    """
    from matplotlib.figure import Figure

    height, width = cam.shape
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(image[:, :, ::-1])
    ax.imshow(cam, cmap=colormap, alpha=alpha, interpolation="bilinear")
    ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=6, color="white", y=0.98)
    return fig


def overlay_seed(image: np.ndarray, cam: np.ndarray, colormap: str = "jet",
                 alpha: float = DEFAULT_ALPHA["seed"]) -> np.ndarray:
    """The seed figure rendered to an (h, w, 3) uint8 BGR array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = seed_figure(image, cam, colormap, alpha)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[:, :, 2::-1])
