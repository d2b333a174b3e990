"""Reading net files in-process: V1 layers upgraded as Caffe upgrades them, and every
file a user can get wrong refused in one line naming the file (never a traceback,
never a Caffe abort)."""
import re
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import require_pycaffe
from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from nets import V1_NET

from cam_caffe import proto
from cam_caffe.errors import ModelError
from cam_caffe.netdef import layer_blobs, load_netdef, read_caffemodel, read_prototxt, stored_layers
from cam_caffe.netdef.read import V1_TYPES, _is_repeated, upgrade_v1

V1_ENUM = proto.V1LayerParameter.DESCRIPTOR.enum_types_by_name["LayerType"]
# Caffe's upgrade_proto.cpp names SOFTMAX_LOSS "SoftmaxWithLoss"; these two data layers
# are not built into this pycaffe (no OpenCV), so its layer registry cannot vouch for them.
NOT_BY_NAME = {"SOFTMAX_LOSS": "SoftmaxWithLoss"}
NOT_REGISTERED = {"IMAGE_DATA": "ImageData", "WINDOW_DATA": "WindowData"}


def caffes_v2_type(v1_name: str, registry: list[str]) -> str:
    """The registered Caffe layer type a V1 enum name stands for: the one whose name is
    the V1 name without underscores, ignoring case."""
    if v1_name in NOT_BY_NAME:
        return NOT_BY_NAME[v1_name]
    key = v1_name.replace("_", "").lower()
    found = [t for t in registry if t.lower() == key]
    if not found:
        return NOT_REGISTERED[v1_name]
    assert len(found) == 1
    return found[0]


def test_every_v1_layer_type_becomes_the_caffe_layer_it_names():
    """A V1 type mapped to the wrong V2 type would run another layer on every
    backend; each must be a layer type pycaffe's own registry holds, and V1's
    backend, NONE none (Caffe's upgrade gives it no type, and refuses the layer)."""
    registry = require_pycaffe().layer_type_list()
    net = proto.NetParameter()
    names = [v.name for v in V1_ENUM.values]
    for name in names:
        net.layers.add(name=name.lower(), type=V1_ENUM.values_by_name[name].number)
    upgrade_v1(net)
    assert not net.layers and names[0] == "NONE"
    assert [layer.type for layer in net.layer] == [""] + [
        caffes_v2_type(n, registry) for n in names[1:]]
    assert set(V1_TYPES) == set(names)


def test_v1_fields_are_copied_and_v1_only_fields_dropped():
    """The upgrade keeps what Caffe reads from a V1 layer (names, blobs, phase rules,
    loss weights, the layer's parameters) and drops the V1-only fields (``param``
    names, ``blobs_lr``) that have no V2 field of the same type."""
    old = proto.V1LayerParameter(
        name="conv", type=V1_ENUM.values_by_name["CONVOLUTION"].number,
        bottom=["a", "b"], top=["c"], loss_weight=[0.5], param=["w", "bias"],
        blobs_lr=[1, 2], blobs=[proto.blob(np.arange(3))],
        include=[{"phase": proto.TEST}], exclude=[{"stage": ["x"]}],
        convolution_param={"num_output": 7, "kernel_size": [3], "group": 1})
    net = proto.NetParameter(layers=[old])
    upgrade_v1(net)
    (new,) = net.layer
    assert (new.name, new.type, list(new.bottom), list(new.top)) == ("conv", "Convolution",
                                                                     ["a", "b"], ["c"])
    assert list(new.loss_weight) == [0.5] and not new.param
    assert list(new.blobs[0].data) == [0, 1, 2] and list(new.blobs[0].shape.dim) == [3]
    assert new.include[0].phase == proto.TEST and list(new.exclude[0].stage) == ["x"]
    assert new.convolution_param == old.convolution_param


def test_repeated_fields_are_told_by_the_label_on_older_protobuf():
    """protobuf < 5.29 (pyproject allows 4.22) has no ``is_repeated``: the upgrade then
    reads the field's label. A stand-in descriptor with the label each field of
    LayerParameter has there must give what this protobuf's ``is_repeated`` says."""
    for fd in proto.LayerParameter.DESCRIPTOR.fields:
        label = FieldDescriptor.LABEL_REPEATED if fd.is_repeated else FieldDescriptor.LABEL_OPTIONAL
        old = SimpleNamespace(label=label, LABEL_REPEATED=FieldDescriptor.LABEL_REPEATED)
        assert _is_repeated(old) is fd.is_repeated is _is_repeated(fd), fd.name


def test_a_v1_caffemodel_loads_as_pycaffe_loads_it(tmp_path):
    """A V1 binary caffemodel (``layers``, legacy 4-D blobs): its V2 reading gives the
    arrays pycaffe loads from the same files."""
    caffe = require_pycaffe()
    prototxt = tmp_path / "v1.prototxt"
    prototxt.write_text(V1_NET)
    netdef = load_netdef(prototxt)
    rng = np.random.default_rng(0)
    model = proto.NetParameter(name="V1Net")
    enum = V1_ENUM.values_by_name
    for name, kind, shapes in [("conv1", "CONVOLUTION", [(8, 3, 3, 3), (8,)]),
                               ("conv2", "CONVOLUTION", [(6, 4, 3, 3), (6,)]),
                               ("fc", "INNER_PRODUCT", [(4, 6), (4,)])]:
        blobs = []
        for shape in shapes:
            dims = (1,) * (4 - len(shape)) + shape
            blobs.append(proto.BlobProto(num=dims[0], channels=dims[1], height=dims[2],
                                         width=dims[3], data=rng.normal(0, 1, shape).ravel()))
        model.layers.add(name=name, type=enum[kind].number, blobs=blobs)
    path = tmp_path / "v1.caffemodel"
    path.write_bytes(model.SerializeToString())
    weights = read_caffemodel(path)
    assert not weights.layers and [layer.type for layer in weights.layer] == [
        "Convolution", "Convolution", "InnerProduct"]
    net = caffe.Net(str(prototxt), caffe.TEST, weights=str(path))
    stored = stored_layers(weights)
    for name in ("conv1", "conv2", "fc"):
        for ours, theirs in zip(layer_blobs(netdef, stored, netdef.layer(name)),
                                net.params[name], strict=True):
            np.testing.assert_array_equal(ours, theirs.data)


def one_line(error: pytest.ExceptionInfo, path) -> str:
    """The message, checked to be one line that starts with the file."""
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message[len(f"{path}: "):]


PROTOTXTS = {
    "syntax": ('layer { name: "a" type: "ReLU" \n  bottom: "x" tpo: "y" }\n',
               r'not a valid Caffe prototxt: 2:\d+ : .*"tpo"\.'),
    "no layers": ('name: "Empty"\ninput: "data"\n', "the prototxt defines no layers"),
    "mixed": ('layer { name: "a" type: "ReLU" }\nlayers { name: "b" type: RELU }\n',
              "mixes V1 'layers' and V2 'layer' definitions"),
    "empty": ("", "prototxt file is empty"),
    "binary": (b"\xff\xfe layer", "not a text prototxt file"),
    "missing": (None, "prototxt file not found"),
    "directory": ("dir", "is a directory, not a regular file"),
}


@pytest.mark.parametrize("case", PROTOTXTS)
def test_a_bad_prototxt_is_one_line_naming_the_file(tmp_path, case):
    """What is wrong with a prototxt, where Caffe would abort on a parse CHECK."""
    content, message = PROTOTXTS[case]
    path = tmp_path / "net.prototxt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    with pytest.raises(ModelError) as error:
        read_prototxt(path)
    assert re.fullmatch(message, one_line(error, path))


def test_a_prototxt_is_read_as_the_protobuf_text_it_is(tmp_path):
    """A valid file gives the NetParameter that protobuf's own parser gives."""
    path = tmp_path / "net.prototxt"
    path.write_text(V1_NET)
    assert read_prototxt(path) == text_format.Parse(V1_NET, proto.NetParameter())


def caffemodel_cases(tmp_path):
    valid = proto.NetParameter(layer=[{"name": "fc", "blobs": [proto.blob(np.ones(3))]}])
    data = valid.SerializeToString()
    (tmp_path / "trunc.caffemodel").write_bytes(data[:-5])
    (tmp_path / "empty.caffemodel").write_bytes(b"")
    (tmp_path / "nolayers.caffemodel").write_bytes(proto.NetParameter(name="x").SerializeToString())
    (tmp_path / "dir.caffemodel").mkdir()
    (tmp_path / "file").write_bytes(data)
    return {
        "trunc": r"not a Caffe caffemodel \(truncated or corrupt\?\): .+",
        "empty": "caffemodel file is empty",
        "nolayers": "not a Caffe caffemodel: it holds no layers",
        "dir": "is a directory, expected a caffemodel file",
        "missing": "caffemodel file not found",
        "file/under": "cannot read caffemodel file: Not a directory",
    }


def test_a_bad_caffemodel_is_one_line_naming_the_file(tmp_path):
    """Each way a weights file can be unusable: the OS's own reason where it has one
    (a path through a regular file: ENOTDIR, which even root gets)."""
    cases = caffemodel_cases(tmp_path)
    for name, message in cases.items():
        path = tmp_path / f"{name}.caffemodel"
        with pytest.raises(ModelError) as error:
            read_caffemodel(path)
        assert re.fullmatch(message, one_line(error, path)), name
