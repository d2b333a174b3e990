"""Known CAM models, and checked downloads of their files (the command that lists,
downloads and locates them: :mod:`cam_caffe.commands.models`).

- :mod:`.registry`: the models, where their files come from and where they live;
- :mod:`.fetch`: downloading them (resumable HTTP, retried, one model at a time);
- :mod:`.verify`: the checks of each file before it is used.
"""
from .fetch import RETRIES, download
from .registry import (
    BASE_URL_ENV,
    DEFAULT_MODEL,
    IMAGENET_MEAN_BGR,
    PROJECT_ROOT,
    REGISTRY,
    FileSpec,
    Model,
    cache_root,
    data_root,
    file_path,
    get,
    is_downloaded,
    list_models,
    missing_files,
    model_path,
    source_url,
)

__all__ = ["BASE_URL_ENV", "DEFAULT_MODEL", "IMAGENET_MEAN_BGR", "PROJECT_ROOT", "REGISTRY",
           "RETRIES", "FileSpec", "Model", "cache_root", "data_root", "download", "file_path",
           "get", "is_downloaded", "list_models", "missing_files", "model_path", "source_url"]
