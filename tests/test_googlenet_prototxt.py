"""The generated GoogLeNet-CAM deploy prototxt matches the upstream CAM one.

``prototxt/deploy_googlenetCAM.prototxt`` is produced by
``scripts/make_googlenet_cam_prototxt.py``. These tests check that it is
up to date with the script, and that it is layer-for-layer equal to the
official ``deploy_googlenetCAM.prototxt`` (in ``../shared/fixtures``) once the
allowed differences are removed from both: ``param`` blocks, weight/bias
fillers, ``force_backward`` and the input declaration (batch 10 via
``input_dim`` upstream, batch 1 via ``input_shape`` here).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import GOOGLENET, ROOT, shared
from google.protobuf import text_format
from google.protobuf.message import Message

GENERATED = GOOGLENET             # what scripts/make_googlenet_cam_prototxt.py writes
SCRIPT = ROOT / "scripts" / "make_googlenet_cam_prototxt.py"

FILLER_FIELDS = ("weight_filler", "bias_filler")


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_googlenet_cam_prototxt", SCRIPT)
    assert spec is not None and spec.loader is not None, f"cannot load {SCRIPT}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # also makes cam_caffe importable if it was not
    return module


gen = _load_script()
proto = gen.proto


def _parse(path: Path) -> Message:
    net = proto.NetParameter()
    text_format.Parse(path.read_text(encoding="utf-8"), net)
    return net


@pytest.fixture(scope="module")
def official() -> Message:
    return _parse(shared("googlenet_cam", "deploy_googlenetCAM.prototxt"))


@pytest.fixture(scope="module")
def generated() -> Message:
    assert GENERATED.is_file(), f"{GENERATED} is missing: run {SCRIPT.relative_to(ROOT)}"
    return _parse(GENERATED)


def input_dims(net: Message) -> list[list[int]]:
    """Dims of each net input, whether given as ``input_shape`` or legacy ``input_dim``."""
    if net.input_shape:
        return [list(shape.dim) for shape in net.input_shape]
    dims = list(net.input_dim)
    return [dims[i:i + 4] for i in range(0, len(dims), 4)]


def strip_allowed(net: Message) -> Message:
    """A copy of ``net`` without the differences a deploy file may have."""
    out = proto.NetParameter()
    out.CopyFrom(net)
    out.ClearField("force_backward")
    out.ClearField("input_dim")
    out.ClearField("input_shape")
    for layer in out.layer:
        layer.ClearField("param")
        for field, value in layer.ListFields():
            if isinstance(value, Message):  # a singular sub-message such as convolution_param
                for name in FILLER_FIELDS:
                    if name in field.message_type.fields_by_name:
                        value.ClearField(name)
    return out


def _show(layer: Message) -> str:
    return text_format.MessageToString(layer).rstrip()


def first_layer_difference(expected: Message, actual: Message) -> str | None:
    """Describe the first layer where the two nets differ, or return None."""
    for i, (want, got) in enumerate(zip(expected.layer, actual.layer, strict=True)):
        if want != got:
            return (f"layer #{i} differs: upstream {want.name!r} vs generated {got.name!r}\n"
                    f"--- upstream\n{_show(want)}\n--- generated\n{_show(got)}")
    n_want, n_got = len(expected.layer), len(actual.layer)
    if n_want != n_got:
        i = min(n_want, n_got)
        extra = expected.layer[i] if n_want > n_got else actual.layer[i]
        side = "missing from generated" if n_want > n_got else "extra in generated"
        return (f"layer count differs: upstream {n_want} vs generated {n_got}; "
                f"first {side}: layer #{i} {extra.name!r}")
    return None


def test_layers_match_upstream(official: Message, generated: Message) -> None:
    diff = first_layer_difference(strip_allowed(official), strip_allowed(generated))
    assert diff is None, diff


def test_net_fields_match_upstream(official: Message, generated: Message) -> None:
    want, got = strip_allowed(official), strip_allowed(generated)
    want.ClearField("layer")
    got.ClearField("layer")
    assert want == got, f"net-level fields differ:\n--- upstream\n{want}--- generated\n{got}"


def test_input_is_batch_one_of_upstream_shape(official: Message, generated: Message) -> None:
    want, got = input_dims(official), input_dims(generated)
    assert len(want) == len(got) == 1, (want, got)
    assert got[0][1:] == want[0][1:], f"input C,H,W differ: upstream {want[0]} vs generated {got[0]}"
    assert got[0][0] == 1, f"deploy batch size should be 1, got {got[0]}"
    assert list(generated.input_shape[0].dim) == [1, 3, 224, 224]
    assert not generated.input_dim, "use input_shape, not the legacy input_dim"


def test_generated_has_no_training_fields(generated: Message) -> None:
    assert not generated.HasField("force_backward")
    for layer in generated.layer:
        assert not layer.param, f"{layer.name}: param {{ lr_mult ... }} is training-only"
        for field, value in layer.ListFields():
            if isinstance(value, Message):  # a singular sub-message such as convolution_param
                for name in FILLER_FIELDS:
                    assert not (name in field.message_type.fields_by_name and value.HasField(name)), \
                        f"{layer.name}: {field.name}.{name} is training-only"


def test_comparison_detects_a_changed_pad(generated: Message) -> None:
    """Guard against a vacuous comparison: one wrong pad must be reported by layer name."""
    broken = proto.NetParameter()
    broken.CopyFrom(generated)
    layer = next(layer for layer in broken.layer if layer.name == "inception_4c/5x5")
    layer.convolution_param.pad[0] += 1
    diff = first_layer_difference(strip_allowed(generated), strip_allowed(broken))
    assert diff is not None and "'inception_4c/5x5'" in diff


def test_committed_file_is_up_to_date(tmp_path: Path) -> None:
    out = gen.write_prototxt(tmp_path / "deploy_googlenetCAM.prototxt")
    assert out.read_text(encoding="utf-8") == GENERATED.read_text(encoding="utf-8"), (
        f"{GENERATED.relative_to(ROOT)} is stale: rerun {SCRIPT.relative_to(ROOT)}")


def test_script_cli_writes_output(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "net.prototxt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, str(SCRIPT), "-o", str(out)], check=True,
                   cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.read_text(encoding="utf-8") == GENERATED.read_text(encoding="utf-8")
