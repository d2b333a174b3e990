"""Caffe's protobuf messages, built from the vendored ``caffe.proto``.

The classes live in a private descriptor pool, so they never clash with the
``caffe_pb2`` module of an installed pycaffe in the same process.
``caffe.desc`` is generated from ``caffe.proto`` by ``scripts/gen_proto.sh``.
"""
from __future__ import annotations

import pkgutil
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_desc = pkgutil.get_data(__name__, "caffe.desc")
if _desc is None:                   # a loader that cannot read package data
    raise ImportError("cam_caffe.proto: caffe.desc cannot be read")
_pool = descriptor_pool.DescriptorPool()
for _file in descriptor_pb2.FileDescriptorSet.FromString(_desc).file:
    _pool.Add(_file)


def _message(name: str) -> type:
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName("caffe." + name))


if TYPE_CHECKING:      # built at run time from caffe.desc: no static types to check
    NetParameter: TypeAlias = Any
    LayerParameter: TypeAlias = Any
    V1LayerParameter: TypeAlias = Any
    BlobProto: TypeAlias = Any
else:
    NetParameter = _message("NetParameter")
    LayerParameter = _message("LayerParameter")
    V1LayerParameter = _message("V1LayerParameter")
    BlobProto = _message("BlobProto")
TEST = _pool.FindEnumTypeByName("caffe.Phase").values_by_name["TEST"].number


def blob(array: np.ndarray) -> BlobProto:
    """A BlobProto holding ``array`` (as float32) with its shape."""
    array = np.asarray(array, np.float32)
    message = BlobProto()
    message.shape.dim.extend(array.shape)
    message.data.extend(array.ravel().tolist())
    return message
