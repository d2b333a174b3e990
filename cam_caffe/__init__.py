"""cam-caffe: Class Activation Maps for Caffe models."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["CAMNet", "CamError", "Prediction", "__version__"]


def __getattr__(name: str):
    """CAMNet, Prediction and CamError, imported on first use: the command line sets
    up its signal handling before NumPy and OpenCV load (see launch.py)."""
    if name in ("CAMNet", "Prediction"):
        from . import api
        return getattr(api, name)
    if name == "CamError":
        from .errors import CamError
        return CamError
    raise AttributeError(f"module 'cam_caffe' has no attribute {name!r}")
