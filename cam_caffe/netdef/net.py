"""The normalised deploy net and the types the other ``netdef`` modules share."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from .. import proto

Shape = tuple[int, ...]
Layer = proto.LayerParameter      # a caffe.LayerParameter message (dynamic: Any to mypy)


@dataclass
class Transform:
    """Preprocessing declared by a data layer's ``transform_param``."""

    scale: float = 1.0
    mean_values: list[float] = field(default_factory=list)
    mean_file: str = ""


@dataclass
class NetDef:
    """A normalised deploy net and what is known about its blobs."""

    net: proto.NetParameter
    path: Path
    input_name: str
    input_shape: Shape                     # (1, C, H, W)
    shapes: dict[str, Shape | None]        # every blob's shape at batch 1 (None: unknown)
    producers: dict[str, str]              # blob -> name of the last layer that writes it
    transform: Transform | None = None     # from a data layer, if the file had one

    def layer(self, name: str) -> Layer:
        """The layer called ``name`` (KeyError if none)."""
        for layer in self.net.layer:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def consumers(self, blob: str) -> list[Layer]:
        """Layers that read ``blob`` and are not in-place ops on it."""
        return [layer for layer in self.net.layer
                if blob in layer.bottom and blob not in layer.top]

    def prototxt(self, batch: int = 1) -> str:
        """The net as prototxt text, with the input's batch size set to ``batch``."""
        net = proto.NetParameter()
        net.CopyFrom(self.net)
        net.layer[0].input_param.shape[0].dim[0] = batch
        return text_format.MessageToString(net)
