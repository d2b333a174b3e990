"""cam-caffe: Class Activation Maps for Caffe models."""
__version__ = "0.1.0"

from .api import CAMNet, Prediction  # noqa: E402
from .errors import CamError  # noqa: E402

__all__ = ["CAMNet", "Prediction", "CamError", "__version__"]
