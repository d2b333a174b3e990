"""The ONNX Runtime cache verifies what it loads, and is only an optimisation.

A cached file that another model's file replaced (other weights, another net,
an older cam-caffe without a key) is rebuilt, never trusted by its name; a cache
that cannot be found, read or written (no home, read-only, full disk) is
skipped without a word. The reference for every result is the OpenCV backend
on the same files, which never touches the cache.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import IN_CI
from nets import square_image, write_square_net

if IN_CI:
    import onnx
    import onnxruntime as ort
else:
    onnx = pytest.importorskip("onnx", reason="the 'onnx' extra is not installed")
    ort = pytest.importorskip("onnxruntime", reason="the 'onnx' extra is not installed")

from nets import CONV, nontrivial_weights
from synthetic import save_caffemodel

import cam_caffe.onnx_export as export_module
from cam_caffe import output
from cam_caffe.backends.onnxruntime import CACHE_KEY, OnnxRuntimeBackend, cache_dir
from cam_caffe.backends.opencv import OpenCVBackend
from cam_caffe.camspec import find_cam_layers
from cam_caffe.netdef import CaffeModel, load_netdef


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


class Net:
    """A prototxt with one of several weight files, its backends and a test batch."""

    def __init__(self, folder: Path, text: str, seed: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.prototxt = folder / "net.prototxt"
        self.prototxt.write_text(text)
        self.netdef = load_netdef(self.prototxt)
        self.spec = find_cam_layers(self.netdef)
        self.weights = folder / f"w{seed}.caffemodel"
        save_caffemodel(self.netdef, nontrivial_weights(self.netdef, seed), self.weights)
        shape = (2, *self.netdef.input_shape[1:])
        self.batch = np.random.default_rng(9).normal(0, 1, shape).astype(np.float32)

    def onnxruntime(self) -> OnnxRuntimeBackend:
        return OnnxRuntimeBackend(self.netdef, CaffeModel(self.weights), self.spec)

    def expected(self):
        return OpenCVBackend(self.netdef, CaffeModel(self.weights), self.spec).forward(self.batch)


def cached_key(path: Path) -> str | None:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}.get(CACHE_KEY)


def assert_matches(forward, expected) -> None:
    np.testing.assert_allclose(forward.probs, expected.probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(forward.features, expected.features, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impostor", ["other weights", "another net", "no key"])
def test_a_replaced_cache_file_is_rebuilt(tmp_path, monkeypatch, impostor):
    """Both cached files (converted and optimised) replaced by a well-formed ONNX model
    that is not this model's: the backend still computes this model's outputs (not the
    impostor's), and the cache is repaired, so the next start loads it unconverted."""
    ours = Net(tmp_path / "ours", CONV, seed=1)
    first = ours.onnxruntime()
    expected = ours.expected()
    assert_matches(first.forward(ours.batch), expected)
    assert cached_key(first.model_path) == cached_key(first.optimized_path) == first.key
    if impostor == "other weights":
        other = Net(tmp_path / "other", CONV, seed=2)
    elif impostor == "another net":
        other = Net(tmp_path / "other", CONV.replace("num_output: 6", "num_output: 10"), seed=2)
    else:
        other = None
    if other is not None:
        theirs = other.onnxruntime()
        assert theirs.key != first.key
        shutil.copyfile(theirs.model_path, first.model_path)
        shutil.copyfile(theirs.optimized_path, first.optimized_path)
    else:                    # a file made before cache keys: the right model, unmarked
        for path in (first.model_path, first.optimized_path):
            model = onnx.load(str(path))
            kept = [p for p in model.metadata_props if p.key != CACHE_KEY]
            del model.metadata_props[:]
            model.metadata_props.extend(kept)
            onnx.save(model, str(path))
    assert cached_key(first.model_path) != first.key
    if other is not None and impostor == "other weights":    # the file is plausible: same
        impostor_out = other.onnxruntime().forward(ours.batch)  # shapes, other numbers
        assert not np.allclose(impostor_out.probs, expected.probs, atol=1e-3)

    assert_matches(ours.onnxruntime().forward(ours.batch), expected)
    assert cached_key(first.model_path) == cached_key(first.optimized_path) == first.key
    monkeypatch.setattr(export_module, "convert", lambda *a, **k: pytest.fail("converted again"))
    assert_matches(ours.onnxruntime().forward(ours.batch), expected)
    assert not list(cache_dir().glob(".*.tmp"))


def test_a_foreign_converted_file_with_no_optimised_one_is_rebuilt(tmp_path):
    """Only the converted file replaced, the optimised one gone: ORT would optimise the
    impostor; its graph must not be published as ours."""
    ours = Net(tmp_path / "ours", CONV, seed=1)
    first = ours.onnxruntime()
    other = Net(tmp_path / "other", CONV, seed=2).onnxruntime()
    shutil.copyfile(other.model_path, first.model_path)
    first.optimized_path.unlink()
    assert_matches(ours.onnxruntime().forward(ours.batch), ours.expected())
    assert cached_key(first.model_path) == cached_key(first.optimized_path) == first.key


def test_cache_home(monkeypatch, tmp_path):
    """$XDG_CACHE_HOME if absolute, else $HOME/.cache, else the passwd entry's home;
    no cache at all (None) when no absolute home can be found."""
    monkeypatch.setattr(output, "_passwd_home", lambda: "/home/from-passwd")
    cases = [({"XDG_CACHE_HOME": str(tmp_path), "HOME": "/h"}, tmp_path),
             ({"XDG_CACHE_HOME": "relative", "HOME": "/h"}, Path("/h/.cache")),
             ({"XDG_CACHE_HOME": "", "HOME": "/h"}, Path("/h/.cache")),
             ({"HOME": ""}, Path("/home/from-passwd/.cache")),
             ({}, Path("/home/from-passwd/.cache")),
             ({"HOME": "relative/home"}, None)]
    for env, root in cases:
        for name in ("XDG_CACHE_HOME", "HOME"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        expected = None if root is None else root / "cam-caffe" / "onnx"
        assert cache_dir() == expected, env
    monkeypatch.setattr(output, "_passwd_home", lambda: "")    # a uid without passwd entry
    monkeypatch.delenv("HOME")
    assert cache_dir() is None


def test_without_a_cache_the_backend_converts_in_memory(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(output, "_passwd_home", lambda: "")
    net = Net(tmp_path / "n", CONV, seed=1)
    backend = net.onnxruntime()
    assert backend.model_path is None and backend.optimized_path is None
    assert_matches(backend.forward(net.batch), net.expected())


# ------------------------------------------------------ the command, odd environments
@pytest.fixture(scope="module")
def square(tmp_path_factory):
    """The square net and an image in a folder any user may read (for other uids)."""
    folder = Path(tempfile.mkdtemp(prefix="cam-caffe-cache-test-"))
    folder.chmod(0o755)
    prototxt, model, labels = write_square_net(folder)
    image = folder / "i.png"
    import cv2
    cv2.imwrite(str(image), square_image(20, 30))
    for path in folder.iterdir():
        path.chmod(0o644)
    yield folder, ["--prototxt", prototxt, "--weights", model, "--labels", labels,
                   "--mean", "0", "--scale", 1 / 255, "--backend", "onnxruntime",
                   "--workers", "0"], image
    shutil.rmtree(folder)


def run(args, env=None, preexec=None, wrapper=()):
    child = subprocess.run([*wrapper, sys.executable, "-m", "cam_caffe", *map(str, args)],
                           capture_output=True, text=True, env=env, preexec_fn=preexec,
                           timeout=300, cwd="/")
    assert "Traceback" not in child.stderr, child.stderr
    return child


def probabilities(child) -> list[float]:
    record = json.loads(child.stdout)
    return [entry["prob"] for entry in record["top_k"]]


@pytest.fixture(scope="module")
def reference(square, tmp_path_factory):
    """The square net's output with a working cache: what every odd case must print."""
    _, args, image = square
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path_factory.mktemp("reference-cache")))
    child = run([image, *args, "--jsonl", "--top-k", "2", "-q"], env=env)
    assert child.returncode == 0 and child.stderr == "", child.stderr
    return child.stdout


def test_full_cache_disk(square, reference, tmp_path):
    """Every write past 200 bytes fails (EFBIG, as ENOSPC on a full disk): the converted
    and the optimised graph cannot be cached. The run is silent and right, and leaves
    no temporary file; before, ORT's failure to write was blamed on the caffemodel."""
    _, args, image = square
    cache = tmp_path / "cache"
    env = dict(os.environ, XDG_CACHE_HOME=str(cache))

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))
    child = run([image, *args, "--jsonl", "--top-k", "2", "-q"], env=env, preexec=small_files)
    assert child.returncode == 0 and child.stderr == "", child.stderr
    assert child.stdout == reference
    leftovers = [p.name for p in cache.rglob("*") if p.is_file() and p.stat().st_size]
    assert leftovers == [], leftovers


def test_full_tmpfs_cache(square, reference, tmp_path):
    """The same on a real full file system (a 16 KiB tmpfs), where the machine allows it."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"],
                                                       capture_output=True).returncode:
        pytest.skip("no private mount namespaces here; test_full_cache_disk covers it")
    _, args, image = square
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    command = " ".join(map(str, [sys.executable, "-m", "cam_caffe", image, *args, "--jsonl",
                                 "--top-k", "2", "-q"]))
    script = (f"mount -t tmpfs -o size=16k tmpfs {mount} && head -c 12k /dev/zero > "
              f"{mount}/filler && XDG_CACHE_HOME={mount} {command}; echo rc=$?; "
              f"find {mount} -name '*.tmp'")
    child = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True)
    assert child.stderr == "" and child.stdout.startswith(reference), child.stdout + child.stderr
    assert child.stdout[len(reference):].strip() == "rc=0"


def no_dac_override():
    if os.geteuid() != 0:
        return ()
    return ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--")


def test_read_only_cache_and_home_are_silent(square, reference, tmp_path):
    """A read-only home and cache (a container's read-only root, say): no ONNX Runtime
    telemetry warning, no error, the same result; a read-only cache filled earlier is
    still used."""
    _, args, image = square
    home = tmp_path / "home"
    (home / ".cache").mkdir(parents=True)
    env = dict(os.environ, HOME=str(home))
    env.pop("XDG_CACHE_HOME")
    env.pop("ORT_DISABLE_TELEMETRY", None)
    for kind in ("empty", "filled"):
        if kind == "filled":
            assert run([image, *args, "-q"], env=env).returncode == 0
            assert list((home / ".cache" / "cam-caffe" / "onnx").glob("*.onnx"))
        for folder in [home, *home.rglob("*")]:
            if folder.is_dir():
                folder.chmod(0o555)
        child = run([image, *args, "--jsonl", "--top-k", "2", "-q"], env=env,
                    wrapper=no_dac_override())
        assert child.returncode == 0 and child.stderr == "", (kind, child.stderr)
        assert child.stdout == reference
        for folder in [home, *home.rglob("*")]:
            if folder.is_dir():
                folder.chmod(0o755)


def as_user_without_passwd_entry():
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        if IN_CI:
            pytest.fail("CI runs as root with setpriv to test a uid without a passwd entry")
        pytest.skip("needs root and setpriv to become a uid without a passwd entry")
    import pwd
    uid = 54321
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            break
        uid += 1
    # It may read (not write) what root can: the checkout may sit in a private folder
    # (mktemp -d is 0700), and the uid still has to import cam-caffe from it.
    return ("setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--")


@pytest.mark.parametrize("home", [None, ""])
def test_user_without_home(square, reference, home):
    """A uid with no passwd entry, HOME unset or empty, no XDG_CACHE_HOME (common in
    containers): the run works without a cache, silently, and writes nothing under /."""
    _, args, image = square
    env = {k: v for k, v in os.environ.items()
           if k not in ("HOME", "XDG_CACHE_HOME", "ORT_DISABLE_TELEMETRY")}
    if home is not None:
        env["HOME"] = home
    before = os.path.exists("/.cache")
    child = run([image, *args, "--jsonl", "--top-k", "2", "-q"], env=env,
                wrapper=as_user_without_passwd_entry())
    assert child.returncode == 0 and child.stderr == "", child.stderr
    assert child.stdout == reference
    assert os.path.exists("/.cache") == before
    child = run(["models", "path", "googlenet-cam"], env=env,
                wrapper=as_user_without_passwd_entry())
    assert child.returncode == 3 and "set XDG_CACHE_HOME" in child.stderr
    assert len(child.stderr.splitlines()) == 1


@pytest.mark.parametrize("case", ["full disk", "no passwd entry"])
def test_worker_processes_in_odd_environments(square, reference, case):
    """The same runs with one worker process give the same output: the pool is an
    optimisation too (its shared memory on a full disk, or a uid without passwd entry,
    gave exit 70 until the run fell back to threads when workers cannot start)."""
    _, args, image = square
    args = [*args[:-2], "--workers", "1", "--jsonl", "--top-k", "2", "-q"]
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "XDG_CACHE_HOME")}
    if case == "full disk":
        child = run([image, *args], env=dict(os.environ), preexec=lambda: resource.setrlimit(
            resource.RLIMIT_FSIZE, (200, 200)))
    else:
        child = run([image, *args], env=env, wrapper=as_user_without_passwd_entry())
    assert child.returncode == 0 and child.stdout == reference, child.stderr
