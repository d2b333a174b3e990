"""Fuzz tests (hypothesis, a bounded number of cases): image bytes and prototxt text
either load or raise the tool's own one-line errors — never anything else."""
import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nets import TINY, V1_NET, VGG_LIKE
from PIL import Image

from cam_caffe.camspec import find_cam_layers
from cam_caffe.errors import ImageError, ModelError
from cam_caffe.image import load_image

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def encoded(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


SEEDS = [encoded("PNG"), encoded("JPEG"), encoded("BMP"), encoded("GIF")]


@st.composite
def mutated(draw, seeds):
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:pos + draw(st.integers(1, 64))]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@FUZZ
@given(data=st.one_of(mutated(SEEDS), st.binary(max_size=256)))
def test_image_bytes(tmp_path, data):
    path = tmp_path / "fuzz.img"
    path.write_bytes(data)
    try:
        image = load_image(path, max_pixels=4_000_000)
    except ImageError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)  # noqa: PT017 (either outcome)
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


@FUZZ
@given(text=mutated([t.encode() for t in (TINY, V1_NET, VGG_LIKE)]))
def test_prototxt_text(tmp_path, text):
    from cam_caffe.netdef import load_netdef
    path = tmp_path / "fuzz.prototxt"
    path.write_bytes(text)
    try:
        netdef = load_netdef(path)
        find_cam_layers(netdef)
    except ModelError as e:
        assert str(e).startswith(f"{path}") and "\n" not in str(e).strip()  # noqa: PT017
