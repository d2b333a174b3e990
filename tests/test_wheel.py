"""The wheel works anywhere: built from the checkout, installed into a fresh venv, run
from an unrelated folder with the demo model and, after a download, the default model.

The wheel is built by pip from a copy of the checkout (no build isolation, no index:
no network) and installed with ``--no-deps`` into an empty venv. Its dependencies
(NumPy, OpenCV, ONNX Runtime, …) come from the project's venv through a ``.pth`` line
written after the install; the editable install of the checkout that venv holds stays
off (its finder is started by a ``.pth`` file of that venv, and Python runs ``.pth``
files only in its own site folders). So cam_caffe, its prototxts and the demo model
can only come from the wheel — the test checks that too.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import GOOGLENET, ROOT
from synthetic import random_weights, save_caffemodel

from cam_caffe import CAMNet, models
from cam_caffe.netdef import load_netdef

NOT_COPIED = (".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", "out")


class Installed:
    """A venv holding only the built wheel (its dependencies borrowed), and a clean folder
    and cache to run it in."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.venv = base / "venv"
        self.work = base / "work"                   # the current folder of every run
        self.cache = base / "cache"                 # XDG_CACHE_HOME
        self.site = Path(self.python("-c", "import sysconfig; "
                                     "print(sysconfig.get_paths()['purelib'])").stdout.strip())

    def run(self, program: str, *args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTHON", "CAM_CAFFE_", "VIRTUAL_ENV"))}
        env["XDG_CACHE_HOME"] = str(self.cache)
        return subprocess.run([str(self.venv / "bin" / program), *args], cwd=self.work,
                              env=env, capture_output=True, text=True, timeout=300)

    def python(self, *args: str) -> subprocess.CompletedProcess:
        return self.run("python", *args)

    def cam_caffe(self, *args: str) -> subprocess.CompletedProcess:
        return self.run("cam-caffe", *args)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    base = tmp_path_factory.mktemp("wheel")
    src, dist = base / "src", base / "dist"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_COPIED))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(dist), str(src)], capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("cam_caffe-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(base / "venv")],
                   check=True, timeout=120)
    (base / "work").mkdir()
    env = Installed(base)
    install = subprocess.run([*pip, "--python", str(env.venv / "bin" / "python"), "install",
                              "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    # The dependencies: the project's venv, after the install (pip must not see its cam-caffe).
    (env.site / "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env


def test_the_wheel_is_what_runs(installed):
    where = installed.python("-c", "import cam_caffe, cam_caffe.models as m; "
                                   "print(cam_caffe.__file__); print(m.data_root())")
    assert where.returncode == 0, where.stderr
    module, data = where.stdout.splitlines()
    assert Path(module) == installed.site / "cam_caffe" / "__init__.py"
    assert Path(data) == installed.site / "cam_caffe" / "data"
    # Every file the checkout ships for the demo model and the prototxts is in the wheel.
    for folder in ["models/demo", "prototxt"]:
        shipped = sorted(p.name for p in (ROOT / folder).iterdir())
        assert sorted(p.name for p in (Path(data) / folder).iterdir()) == shipped
        for name in shipped:
            assert (Path(data) / folder / name).read_bytes() == (ROOT / folder / name).read_bytes()


def test_demo_model_from_another_folder(installed):
    images = sorted((ROOT / "images").glob("demo_*.png"))
    for image in images:
        shutil.copy(image, installed.work / image.name)
    out = installed.cam_caffe("--model", "demo", ".", "--output-dir", "out",
                              "--save", "overlay,json", "--boxes", "paper")
    assert out.returncode == 0, out.stderr
    demo = installed.site / "cam_caffe" / "data" / "models" / "demo"
    for image in images:
        record = json.loads((installed.work / "out" / f"{image.stem}.json").read_text())
        assert record["model"] == {"prototxt": str(demo / "deploy.prototxt"),
                                   "weights": str(demo / "demo.caffemodel")}
        assert record["top_k"][0]["label"] == image.stem.split("_")[1]   # demo_<shape>_<n>
        overlay = cv2.imread(str(installed.work / "out" / f"{image.stem}.cam.png"))
        assert overlay.shape == cv2.imread(str(image)).shape


def test_report_page_comes_from_the_wheel(installed):
    images = installed.work / "report-images"
    images.mkdir()
    shutil.copy(ROOT / "images" / "demo_star_4.png", images)
    out = installed.cam_caffe("--model", "demo", str(images), "--output-dir", "report", "--report")
    assert out.returncode == 0, out.stderr
    assets = ROOT / "cam_caffe" / "report_assets"
    page = installed.work / "report"
    assert (page / "index.html").read_bytes() == (assets / "index.html").read_bytes()
    for name in ("app.js", "style.css"):
        assert (page / "_report" / name).read_bytes() == (assets / name).read_bytes()


@pytest.fixture
def server(tmp_path):
    """A local HTTP server over tmp_path/served: (its URL, the folder)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", folder
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def test_default_model_after_a_download(installed, server):
    url, served = server
    entry = models.get(models.DEFAULT_MODEL)
    folder = installed.cache / "cam-caffe" / "models" / entry.name
    image = installed.work / "img.png"
    rng = np.random.default_rng(3)
    cv2.imwrite(str(image), rng.integers(0, 256, (180, 240, 3), dtype=np.uint8))

    before = installed.cam_caffe(str(image))
    assert before.returncode == 3
    assert before.stderr == (
        f"cam-caffe: error: model 'googlenet-cam' is not downloaded (missing "
        f"{entry.labels.filename}, {entry.weights.filename} in {folder}); run: cam-caffe "
        "models download googlenet-cam, or pass --model demo, or --prototxt and --weights\n")

    # The official weights' file name, GoogLeNet-CAM with random weights; 1000 labels.
    prototxt = GOOGLENET
    netdef = load_netdef(prototxt)
    save_caffemodel(netdef, random_weights(netdef, seed=5), served / entry.weights.filename)
    (served / entry.labels.filename).write_text("".join(f"class {i}\n" for i in range(1000)))
    download = installed.cam_caffe("models", "download", "googlenet-cam", "--base-url", url)
    assert download.returncode == 0, download.stderr
    assert download.stdout.splitlines()[0] == \
        "googlenet-cam: structure checked (no published checksum for its labels, weights)"
    assert (folder / entry.weights.filename).read_bytes() == \
        (served / entry.weights.filename).read_bytes()

    run = installed.cam_caffe(str(image), "--top-k", "5", "--jsonl")
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert record["model"] == {
        "prototxt": str(installed.site / "cam_caffe" / "data" / "prototxt" / prototxt.name),
        "weights": str(folder / entry.weights.filename)}
    # The same net, run here from the checkout with OpenCV: the same five classes.
    reference = CAMNet(prototxt, served / entry.weights.filename, backend="opencv",
                       mean=entry.mean_arg, input_size=entry.input_size)
    expected = reference.predict([reference.load(image)], top_k=5)[0].top(5)
    assert [(c["class"], c["label"]) for c in record["top_k"]] == \
        [(class_id, f"class {class_id}") for class_id, _, _ in expected]
    np.testing.assert_allclose([c["prob"] for c in record["top_k"]],
                               [prob for _, _, prob in expected], rtol=1e-3, atol=1e-6)
