"""Cheap checks of the GPU tooling that run without a GPU (and fast, for CI).

- scripts/install_pycaffe.sh documents --cuda;
- patches/pycaffe-cuda/*.patch apply cleanly, after the CPU patches, to the
  brocolli-caffe sdist in the pycaffe cache (install_pycaffe.sh downloads it);
- scripts/gpu_check.py runs on the CPU pycaffe (--cpu-only), and its GPU-vs-CPU
  comparison and report work (a fake "GPU" that is the CPU, on a tiny net).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import IN_CI, ROOT, USER_CACHE, require_pycaffe
from nets import SQUARE_PROTOTXT

SCRIPTS = ROOT / "scripts"
CPU_PATCHES = sorted((ROOT / "patches" / "pycaffe").glob("*.patch"))
CUDA_PATCHES = sorted((ROOT / "patches" / "pycaffe-cuda").glob("*.patch"))
SDIST = "brocolli-caffe-9.0.2"


def test_install_pycaffe_help_mentions_cuda():
    out = subprocess.run(["bash", str(SCRIPTS / "install_pycaffe.sh"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for option in ("--cuda", "--cuda-arch", "--no-cudnn", "--wheel-only"):
        assert option in out.stdout


def test_install_pycaffe_rejects_bad_cuda_arch_before_building(tmp_path):
    """A bad --cuda-arch fails fast with a message (no download, no build)."""
    if not (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc").exists():
        pytest.skip("no CUDA toolkit (nvcc) on this machine")
    py = Path(sys.executable)
    out = subprocess.run(["bash", str(SCRIPTS / "install_pycaffe.sh"), "--python", str(py),
                          "--cuda-arch", "52", "--wheel-only"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "sm_52 is not supported" in out.stderr


def test_gpu_bundle_script_parses_and_documents_itself():
    script = SCRIPTS / "make_gpu_bundle.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "run.sh" in out.stdout and "--wheel" in out.stdout


def test_cuda_patches_have_a_header_saying_why():
    assert len(CUDA_PATCHES) >= 6
    for patch in CUDA_PATCHES:
        header = patch.read_text().split("\n--- a/", 1)[0].strip()
        assert len(header) > 80, f"{patch.name}: no header comment"
        assert "cam-caffe" in header


def _sdist() -> Path:
    tarball = USER_CACHE / "cam-caffe" / "pycaffe" / "src" / f"{SDIST}.tar.gz"
    if not tarball.is_file():
        if IN_CI:
            pytest.fail(f"{tarball} missing: scripts/install_pycaffe.sh should have fetched it")
        pytest.skip(f"{tarball} absent (run scripts/install_pycaffe.sh once)")
    return tarball


def _touched_files(patches: list[Path]) -> set[str]:
    """The sdist's files that the patches change (not those they create)."""
    files = set()
    for patch in patches:
        text = patch.read_text()
        created = re.findall(r"^--- /dev/null\n\+\+\+ b/(\S+)", text, re.M)
        files.update(set(re.findall(r"^\+\+\+ b/(\S+)", text, re.M)) - set(created))
    return files


def test_cuda_patches_apply_cleanly_to_fresh_source(tmp_path):
    tarball = _sdist()
    if shutil.which("patch") is None:
        pytest.skip("`patch` is not installed")
    wanted = {f"{SDIST}/{f}" for f in _touched_files(CPU_PATCHES + CUDA_PATCHES)}
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.name in wanted]
        assert {m.name for m in members} == wanted, "files missing from the sdist"
        # extraction filters exist from Python 3.11.4 (Debian 12 ships 3.11.2)
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp_path, members=members, **safe)
    src = tmp_path / SDIST

    def patch(p: Path, *extra: str) -> str:
        out = subprocess.run(["patch", "-p1", "-N", "--batch", *extra, "-d", str(src),
                              "-i", str(p)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"{p.name}:\n{out.stdout}{out.stderr}"
        return out.stdout

    for p in CPU_PATCHES:
        patch(p)
    for p in CUDA_PATCHES:      # each one checked on the tree the previous ones made
        dry = patch(p, "--dry-run")
        assert "fuzz" not in dry and "FAILED" not in dry, f"{p.name}:\n{dry}"
        patch(p)
    # the result is what install_pycaffe.sh --cuda builds
    assert "include(cmake/Cuda.cmake)" in (src / "cmake" / "Dependencies.cmake").read_text()
    assert "caffe_cuda_compile(cuda_objs" in (src / "python" / "CMakeLists.txt").read_text()
    assert "-std=c++17" in (src / "CMakeLists.txt").read_text()
    assert "CPU_FALLBACK_GPU(UpsampleLayer)" in (
        src / "src" / "caffe" / "layers" / "upsample_layer.cpp").read_text()
    conv = (src / "src" / "caffe" / "layers" / "cudnn_conv_layer.cpp").read_text()
    assert "cudnnFindConvolutionForwardAlgorithm" in conv   # the cuDNN 9 port (07)
    assert "cudnnGetConvolutionBackwardDataAlgorithm_v7" in conv


def test_gpu_check_cpu_only_prints_a_table():
    require_pycaffe()
    out = subprocess.run([sys.executable, str(SCRIPTS / "gpu_check.py"), "--cpu-only",
                          "--batches", "1", "--min-time", "0", "--min-repeats", "1"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "CPU only" in out.stdout
    assert "| device | batch | ms/batch | ms/image | images/s |" in out.stdout
    assert re.search(r"^\| CPU \| 1 \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", out.stdout, re.M), out.stdout


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPTS / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_compare_path_with_a_fake_gpu(tmp_path, monkeypatch, capsys):
    """The GPU-vs-CPU branch, with the CPU standing in for the GPU: errors are 0, PASS."""
    caffe = require_pycaffe()
    import cam_caffe.backends.caffe as backend

    real = backend.CaffeBackend

    class CpuAsGpu(real):
        def __init__(self, netdef, weights, spec, gpu=None, verbose=False):
            super().__init__(netdef, weights, spec, gpu=None, verbose=verbose)

    monkeypatch.setattr(backend, "CaffeBackend", CpuAsGpu)
    monkeypatch.setattr(backend, "set_device", lambda c, gpu: caffe.set_mode_cpu())
    gpu_check = _load_gpu_check()
    monkeypatch.setattr(gpu_check, "gpu_name", lambda gpu: "Fake GPU (sm_90)")
    real_fork_check = gpu_check.fork_layers_check
    monkeypatch.setattr(gpu_check, "fork_layers_check",
                        lambda gpu, verbose: real_fork_check(None, verbose))
    prototxt = tmp_path / "square.prototxt"
    prototxt.write_text(SQUARE_PROTOTXT)
    result = tmp_path / "result.json"
    rc = gpu_check.main(["--prototxt", str(prototxt), "--batches", "1,3", "--compare-batch", "4",
                         "--min-time", "0", "--min-repeats", "1", "--json", str(result)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "GPU 0: Fake GPU (sm_90)" in out
    assert "| result | PASS | |" in out
    assert "| same top-1 class | 4/4 | |" in out
    assert "Fork layers (MaxUnPool, ReLU6, HardSwish, HardSigmoid, Upsample, PixelShuffle)" in out
    data = json.loads(result.read_text())
    assert data["pass"] is True
    assert data["compare"]["prob_rel"] == 0.0 and data["compare"]["cam_rel"] == 0.0
    assert [(t["device"], t["batch"]) for t in data["timings"]] == [
        ("GPU 0", 1), ("GPU 0", 3), ("CPU", 1), ("CPU", 3)]


def test_gpu_check_fork_layer_child_reports_caffe_failures():
    """GPU mode in a CPU-only pycaffe aborts the child; the check returns Caffe's reason."""
    require_pycaffe()
    gpu_check = _load_gpu_check()
    assert "error" not in gpu_check.fork_layers_check(None, False)
    result = gpu_check.fork_layers_check(0, False)
    # install_pycaffe.sh names a CUDA build's wheel version "+brocolli….cuda13…"
    cuda_build = ".cuda" in importlib.metadata.version("pycaffe")
    if cuda_build and Path("/dev/nvidiactl").exists():
        assert "max_abs" in result, result       # a CUDA pycaffe on a machine with a GPU
    else:
        assert set(result) == {"error"}, result
        assert "GPU" in result["error"] or "CUDA" in result["error"], result


def test_gpu_check_rejects_bad_batches():
    gpu_check = _load_gpu_check()
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--batches", "0"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--batches", "x"])
    assert gpu_check.parse_args(["--batches", "1,8"]).batch_sizes == [1, 8]
