"""Every code block of README.md runs, so the README stays true.

- ```python blocks run as written in a copy of the checkout (what a fresh clone
  holds); a ``print(…)  # output`` comment is the output they print ("…" stands
  for anything).
- ```sh blocks: every line runs, except the ones NOT_RUN names (with the reason):
  the quick start in a copy of the checkout, the command line and Dask examples
  with the files they name made here (the default GoogLeNet-CAM with random
  weights where the README names the official ones, which cannot be fetched
  here), and the evaluation example, whose numbers must match the README's table.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GOOGLENET, IN_CI, ROOT, shared
from nets import write_random_net
from PIL import Image
from synthetic import random_weights, save_caffemodel

from cam_caffe import models
from cam_caffe.inputs import collect, in_shard
from cam_caffe.netdef import load_netdef

README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent             # the environment's cam-caffe
NOT_RUN = {       # a line holding one of these is not run here, for the reason given
    "scripts/test.sh": "runs this test suite (CI's own command)",
    "--dask tcp://head:8786": "needs a Dask scheduler on a host named head",
    "#SBATCH": "a SLURM batch script (srun, several nodes)",
    "--method scorecam --feature-blob inception_4e/output":
        "832 GoogLeNet forwards an image: minutes on 2 cores (Score-CAM: test_methods.py)",
}


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.M | re.S)


def commands(block: str) -> list[str]:
    """The command lines of a shell block (continuation lines joined, comments dropped)."""
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


# Stands in for the CaffeNet of the Grad-CAM example (240 MB of weights): a classification
# net without a CAM head whose last spatial blob the classifier reads is pool5.
CAFFENET_LIKE = """
name: "CaffeNetLike"
input: "data"
input_shape { dim: 1 dim: 3 dim: 32 dim: 32 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv5" type: "Convolution" bottom: "pool1" top: "conv5"
        convolution_param { num_output: 16 kernel_size: 3 pad: 1 } }
layer { name: "relu5" type: "ReLU" bottom: "conv5" top: "conv5" }
layer { name: "pool5" type: "Pooling" bottom: "conv5" top: "pool5"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc8" type: "InnerProduct" bottom: "pool5" top: "fc8"
        inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }
"""


def not_run(line: str, block: str = "") -> bool:
    return any(words in line or words in block for words in NOT_RUN)


def block_with(words: str) -> str:
    found = [b for b in blocks("sh") if words in b]
    assert len(found) == 1, f"one ```sh block with {words!r} expected"
    return found[0]


QUICK_START = block_with("scripts/setup.sh")
EXAMPLES = block_with("cam-caffe img1.jpg")
DASK = block_with("--dask tcp://head:8786")
SLURM = block_with("#SBATCH")
EVALUATE = block_with("cam-caffe evaluate")


def run(command: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    child = subprocess.run(["sh", "-c", command], cwd=cwd, capture_output=True, text=True,
                           env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
                                **(env or {})}, timeout=300)
    assert "Traceback" not in child.stderr, child.stderr
    return child


def test_every_shell_block_is_run_here():
    """A new ```sh block needs a test here (or a reason in NOT_RUN)."""
    assert sorted(blocks("sh")) == sorted([QUICK_START, EXAMPLES, DASK, SLURM, EVALUATE])
    assert all(any(words in block for block in blocks("sh")) for words in NOT_RUN)
    assert all(not_run(line, SLURM) for line in commands(SLURM))


def tracked_files() -> list[str]:
    """The checkout's files a clone of it would hold (untracked ones not ignored too)."""
    try:
        listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                                  "--exclude-standard"], cwd=ROOT, capture_output=True,
                                 check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        if IN_CI:
            pytest.fail("CI runs in a git checkout")
        pytest.skip("not a git checkout")
    return [name for name in listing.decode().split("\0") if name]


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A copy of the checkout's files, with a .venv/bin/cam-caffe that runs the copy's
    code in this test's environment (what scripts/setup.sh made)."""
    clone = tmp_path_factory.mktemp("clone")
    for name in tracked_files():
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    wrapper = clone / ".venv" / "bin" / "cam-caffe"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{clone}" exec "{sys.executable}" '
                       f'-m cam_caffe "$@"\n')
    wrapper.chmod(0o755)
    return clone


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs_as_written(index, clone, tmp_path):
    code = blocks("python")[index]
    child = subprocess.run([sys.executable, "-c", code], cwd=clone, capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": str(clone),
                                           "XDG_CACHE_HOME": str(tmp_path)}, timeout=300)
    assert child.returncode == 0, child.stderr
    expected = re.findall(r"^\s*print\(.*\)\s+# (.*)$", code, re.M)
    printed = child.stdout.splitlines()
    assert len(printed) == len(expected)
    for line, claim in zip(printed, expected, strict=True):
        pattern = ".*".join(re.escape(part) for part in claim.split("…"))
        assert re.fullmatch(pattern, line), f"printed {line!r}, the README says {claim!r}"


def test_quick_start_in_a_fresh_copy(clone, tmp_path):
    """The first quick-start line in a copy of the checkout: scripts/setup.sh is what
    made this test's environment."""
    lines = commands(QUICK_START)
    assert lines[0].startswith("scripts/setup.sh && .venv/bin/cam-caffe ")
    assert all(not_run(line) for line in lines[1:])
    child = run(lines[0].removeprefix("scripts/setup.sh && "), clone,
                {"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert child.returncode == 0, child.stderr
    demo_images = sorted((clone / "images").glob("*.png"))
    assert len(demo_images) == 6
    for image in demo_images:
        for kind in ("cam", "montage"):
            assert (clone / "out" / f"{image.stem}.{kind}.png").is_file()
        assert str(Path("images") / image.name) in child.stdout
    assert "6 images: 6 done, 0 failed, 0 skipped" in child.stderr


@pytest.fixture(scope="module")
def example_folder(tmp_path_factory):
    """The files the examples name, and GoogLeNet-CAM (random weights) as if downloaded."""
    folder = tmp_path_factory.mktemp("examples")
    cache = folder / "cache"
    env = {"XDG_CACHE_HOME": str(cache), "MPLBACKEND": "agg"}
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    try:
        missing = models.missing_files("googlenet-cam")
    finally:
        os.environ.pop("XDG_CACHE_HOME") if old is None else os.environ.update(
            XDG_CACHE_HOME=old)
    prototxt = GOOGLENET
    for path in missing:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".caffemodel":
            netdef = load_netdef(prototxt)
            save_caffemodel(netdef, random_weights(netdef), path)
        else:
            shutil.copy(shared("imagenet", "synset_words.txt"), path)
    fixtures = shared("googlenet_cam", "img1.jpg").parent
    shutil.copy(fixtures / "img1.jpg", folder / "img1.jpg")
    shutil.copy(shared("imagenet", "synset_words.txt"), folder / "synset_words.txt")
    for sub in ("photos", "data/a"):
        (folder / sub).mkdir(parents=True)
        for name in ("img2.jpg", "test.jpg"):
            shutil.copy(fixtures / name, folder / sub / name)
    (folder / "all_images.txt").write_text(
        "".join(f"photos/{name}\n" for name in ("img2.jpg", "test.jpg")) + "img1.jpg\n")
    Image.open(fixtures / "img2.jpg").resize((32, 32)).save(folder / "x.png")
    shutil.copy(fixtures / "test.jpg", folder / "cat.jpg")
    _, weights = write_random_net(folder, CAFFENET_LIKE, "caffenet_deploy")
    weights.rename(folder / "caffenet.caffemodel")
    resnet = shared("cifar10_resnet20", "test_ResNet_20.prototxt").parent
    (folder / "test_ResNet_20.prototxt").symlink_to(resnet / "test_ResNet_20.prototxt")
    (folder / "resnet20.caffemodel").symlink_to(
        resnet / "cifar10_ResNet_20_iter_53500.caffemodel")
    (folder / ".venv").mkdir()
    (folder / ".venv" / "bin").symlink_to(BIN)      # for examples that name .venv/bin/…
    # the shard of the job-array example that holds images, so that it has work to do
    os.chdir(folder)
    try:
        items = collect(["@all_images.txt"])
    finally:
        os.chdir(ROOT)
    env["SLURM_ARRAY_TASK_ID"] = str(next(i for i in range(8)
                                          if any(in_shard(item, (i, 8)) for item in items)))
    return folder, env


def test_command_line_and_dask_examples_run(example_folder):
    folder, env = example_folder
    for command in commands(EXAMPLES) + commands(DASK):
        if not_run(command):
            continue
        child = run(command, folder, env)
        if "--show" in command:           # no display here: refused up front, in one line
            assert child.returncode == 2 and child.stderr == (
                "cam-caffe: error: --show needs a display (no interactive matplotlib "
                "backend); use -o\n"), child.stderr
            continue
        assert child.returncode == 0, f"{command}\n{child.stderr}"
        if "caffenet" in command:         # "at pool5 by default", as -v says
            assert "method gradcam at blob 'pool5'" in child.stderr, child.stderr
    for name in ("img1_cam.png", "mug.png", "img1_tencrop.png", "cams/img2.cam.png",
                 "cams/test.json", "cams/test.cam.npy"):
        assert (folder / name).is_file(), name
    predictions = (folder / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 2 and all('"top_k"' in line for line in predictions)


def test_evaluate_example_gives_the_tables_numbers(tmp_path):
    lines = commands(EVALUATE)
    assert len(lines) == 2 and all("/tmp/heldout" in line for line in lines)
    output = ""
    for line in lines:
        child = run(line.replace("/tmp/heldout", str(tmp_path / "heldout")), ROOT)
        assert child.returncode == 0, child.stderr
        output += child.stdout
    row = re.search(r"^\| demo model, 500 held-out .*\| ([\d.]+)% \| ([\d.]+)% \|$", README,
                    re.M)
    measured = re.search(r"^classification\s+([\d.]+)%.*\n^localization\s+([\d.]+)%", output,
                         re.M)
    assert row and measured, output
    assert [float(v) for v in row.groups()] == [float(v) for v in measured.groups()]


def test_memory_per_image_is_what_image_cost_reserves():
    """The README's bytes per pixel of an image's memory budget, and its worked example,
    are image_cost's (test_batch_run checks each term of it)."""
    from cam_caffe.batch import Options, image_cost
    line = next(line for line in README.splitlines() if line.startswith("| decoding memory"))
    assert "about 21 bytes a pixel (+7 a further map, +4 with `npy`, +7 with `--boxes dt`" \
        in line
    example = re.search(r"(\d+)x(\d+) pixels would need about (\d+) MiB", line)
    assert example is not None
    width, height, mib = map(int, example.groups())
    assert round(image_cost(width, height, Options()) / 2 ** 20) == mib
    assert image_cost(1, 1, Options()) == 21
