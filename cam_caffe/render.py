"""Draw a CAM over its image.

``paper`` (default): the official repo's look — min–max normalised map, a
colormap, 0.2·image + alpha·heatmap (alpha 0.7), at the image's own size.
``seed``: the original pycaffe script's figure — the image resized to the
net's input, the raw CAM drawn over it by matplotlib with alpha 0.5.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .cam import normalize
from .errors import CamError

STYLES = ("paper", "seed")
IMAGE_WEIGHT = 0.2   # the official overlay's weight of the image
DEFAULT_ALPHA = {"paper": 0.7, "seed": 0.5}


# matplotlib's "jet" segments (x, value): the default colormap is built here,
# because importing matplotlib costs about 0.25 s of every run's start-up.
JET_SEGMENTS = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


@lru_cache(maxsize=16)
def colormap_lut(name: str) -> np.ndarray:
    """A 256×3 uint8 BGR lookup table for a matplotlib colormap name."""
    if name == "jet":
        rgb = np.stack([segment_lut(JET_SEGMENTS[c]) for c in ("red", "green", "blue")], axis=1)
    else:
        import matplotlib  # only for the other colormaps
        try:
            cmap = matplotlib.colormaps[name]
        except KeyError:
            raise CamError(f"--colormap {name!r}: not a matplotlib colormap") from None
        rgb = cmap(np.linspace(0.0, 1.0, 256))[:, :3]
    return np.ascontiguousarray(np.rint(rgb[:, ::-1] * 255).astype(np.uint8))


def segment_lut(segments: tuple[tuple[float, float], ...], n: int = 256) -> np.ndarray:
    """n values of a piecewise-linear colour channel, computed as matplotlib does
    (``colors._create_lookup_table``), so that rounding ties fall the same way."""
    x = np.array([p[0] for p in segments]) * (n - 1)
    y = np.array([p[1] for p in segments])
    xind = np.linspace(0.0, 1.0, n) * (n - 1)
    ind = np.searchsorted(x, xind)[1:-1]
    distance = (xind[1:-1] - x[ind - 1]) / (x[ind] - x[ind - 1])
    return np.concatenate([[y[0]], distance * (y[ind] - y[ind - 1]) + y[ind - 1], [y[-1]]])


def heatmap(cam: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """The map normalised and coloured: (H, W, 3) uint8 BGR."""
    import cv2  # here, not at the top: the commands' start-up does not load OpenCV
    index = np.rint(normalize(cam) * 255).astype(np.uint8)
    return cv2.applyColorMap(index, colormap_lut(colormap).reshape(256, 1, 3))


def overlay_paper(image: np.ndarray, cam: np.ndarray, colormap: str = "jet",
                  alpha: float = DEFAULT_ALPHA["paper"]) -> np.ndarray:
    """0.2·image + alpha·heatmap (rounded, saturated); ``cam`` has the image's size."""
    if cam.shape != image.shape[:2]:
        raise ValueError(f"CAM shape {cam.shape} differs from image shape {image.shape[:2]}")
    import cv2  # here, not at the top: the commands' start-up does not load OpenCV
    return cv2.addWeighted(image, IMAGE_WEIGHT, heatmap(cam, colormap), alpha, 0.0)


def seed_figure(image: np.ndarray, cam: np.ndarray, colormap: str, alpha: float):
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
