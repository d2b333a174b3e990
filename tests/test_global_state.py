"""Importing cam_caffe changes no process-wide state: not the umask (not even for a
moment: another thread creating a file then would get the wrong mode), not
Pillow's decompression-bomb limit. What needs them reads or sets them at run time."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from cam_caffe.image import load_image
from cam_caffe.output import write_bytes, write_image

IMPORT_EVERY_MODULE = """
import importlib, json, os, pkgutil
from PIL import Image
real_umask = os.umask
real_umask(0o027)
calls = []
os.umask = lambda mask: calls.append(mask) or real_umask(mask)
limit = Image.MAX_IMAGE_PIXELS
import cam_caffe
modules = [m.name for m in pkgutil.walk_packages(cam_caffe.__path__, "cam_caffe.")
           if m.name != "cam_caffe.__main__"]
for name in modules:
    importlib.import_module(name)
print(json.dumps({"modules": modules, "umask_calls": calls, "umask": real_umask(0o027),
                  "limit_before": limit, "limit_after": Image.MAX_IMAGE_PIXELS}))
"""


def test_importing_every_module_changes_no_global_state():
    out = subprocess.run([sys.executable, "-c", IMPORT_EVERY_MODULE], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    state = json.loads(out.stdout.splitlines()[-1])
    assert {"cam_caffe.output", "cam_caffe.image", "cam_caffe.batch"} <= set(state["modules"])
    assert state["umask_calls"] == []                   # never set, not even to read it
    assert state["umask"] == 0o027
    assert state["limit_before"] is not None                 # Pillow's default
    assert state["limit_after"] == state["limit_before"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_usual_mode_under_any_umask(tmp_path, umask):
    """0666 less the umask, as `open` gives a new file: not the temporary's 0600."""
    old = os.umask(umask)
    try:
        write_bytes(tmp_path / "a.json", b"{}")
        write_image(tmp_path / "b.png", np.zeros((4, 4, 3), np.uint8))
    finally:
        os.umask(old)
    for name in ("a.json", "b.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.png"]  # no temporary


def test_images_open_whatever_pillows_limit_was(tmp_path, monkeypatch):
    """cam-caffe's own --max-pixels is the one limit: an image over the limit a user
    (or another library) put into Pillow still loads, at any time after import."""
    image = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)   # Pillow refuses > 200 pixels
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), image)
    np.testing.assert_array_equal(load_image(tmp_path / "a.png", max_pixels=64 * 48), image)
