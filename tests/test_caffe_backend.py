"""The pycaffe backend's own logic around Caffe: the line of a dying Caffe child that says
why, which failures are the GPU's (a backend error, exit 4) rather than the net's (a model
error, exit 3), and the probe child's side. The Caffe messages are Caffe's own (a real
child's stderr, and the texts of common.cpp and CUDA_CHECK). pycaffe is required under
CI=true."""
from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import require_pycaffe
from nets import NIN_NET, TINY, write_random_net

from cam_caffe import CAMNet
from cam_caffe.backends import caffe as caffe_module
from cam_caffe.backends.caffe import (
    _is_gpu_failure,
    _probe_main,
    caffe_failure,
    first_reader,
    import_caffe,
    probe,
)
from cam_caffe.errors import BackendError, ModelError

FATAL = ("F20261129 15:44:18.251050 32734 layer_factory.hpp:81] Check failed: "
         "registry.count(type) == 1 (0 vs. 1) Unknown layer type: NoSuchLayer (known "
         "types: AbsVal, Accuracy, ArgMax)")
UNKNOWN = "Check failed: registry.count(type) == 1 (0 vs. 1) Unknown layer type: NoSuchLayer"
STACK = "*** Check failure stack trace: ***\n    @     0x7f2b0c1d2e3f  google::LogMessage::Fail()"


@pytest.fixture
def bad_net(tmp_path):
    """A net Caffe cannot build (it aborts), with good weights for its layers."""
    _prototxt, weights = write_random_net(tmp_path, TINY, "ok")
    bad = tmp_path / "bad.prototxt"
    bad.write_text(TINY + 'layer { name: "extra" type: "NoSuchLayer" bottom: "prob" '
                          'top: "extra" }\n')
    return bad, weights


def test_a_real_caffe_abort_gives_its_check_line(bad_net):
    require_pycaffe()
    bad, weights = bad_net
    child = subprocess.run([sys.executable, "-m", "cam_caffe.backends.caffe", str(bad),
                            str(weights), ""], capture_output=True, text=True,
                           env=dict(os.environ, GLOG_minloglevel="1"))
    assert child.returncode != 0 and "*** Check failure stack trace" in child.stderr
    assert caffe_failure(child.stderr) == UNKNOWN
    with pytest.raises(ModelError, match=re.escape(f"{weights}: pycaffe cannot run this net: "
                                                   f"{UNKNOWN}")):
        probe(bad, weights, None, False)


@pytest.mark.parametrize(("stderr", "reason"), [
    (f"W1129 10:00:00.000001 7 upgrade_proto.cpp:72] Note\n{FATAL}\n{STACK}\n", UNKNOWN),
    (f"F1129 10:00:00.000001 7 net.cpp:1] first\n{FATAL}\n", UNKNOWN),     # the last one
    (f"{FATAL}\ncam-caffe-probe: RuntimeError: later\n", UNKNOWN),         # glog first
    ("I1129 x\ncam-caffe-probe: RuntimeError: Could not open file a.prototxt\n  tail  \n",
     "RuntimeError: Could not open file a.prototxt"),
    ("F1129 not glog\nmiddle\n  last words  \n\n", "last words"),
    ("\n \n", "the process died without a message"),
])
def test_the_reason_is_the_line_that_says_why(stderr, reason):
    assert caffe_failure(stderr) == reason


@pytest.mark.parametrize(("reason", "gpu"), [
    ("Cannot use GPU in CPU-only Caffe: check mode.", True),
    ("Check failed: error == cudaSuccess (100 vs. 0)  no CUDA-capable device is detected", True),
    ("Check failed: error == cudaSuccess (101 vs. 0)  invalid device ordinal", True),
    ("CPU-only", True), ("CUDA", True), ("cuda", True), ("device", True), ("GPU", True),
    (UNKNOWN, False),
    ("Check failed: target_blobs[j]->shape() == source_layer.blobs(j).shape() "
     "Cannot copy param 0 weights from layer 'fc'; shape mismatch", False),
    ("RuntimeError: Could not open file a.prototxt", False),
])
def test_gpu_failures_are_told_from_the_nets(reason, gpu):
    assert _is_gpu_failure(reason) is gpu


def test_the_probe_child_runs_a_good_net_and_reports_what_pycaffe_raises(tmp_path, capsys):
    """Its side, in this process (only for what does not abort): a good net loads and
    runs; a file pycaffe cannot open is its exception's one line and exit status 1."""
    require_pycaffe()
    prototxt, weights = write_random_net(tmp_path, TINY, "ok")
    assert _probe_main(str(prototxt), str(weights), "") is None
    missing = tmp_path / "missing.caffemodel"
    with pytest.raises(SystemExit) as exit_:
        _probe_main(str(prototxt), str(missing), "")
    assert exit_.value.code == 1
    assert capsys.readouterr().err == (f"cam-caffe-probe: RuntimeError: Could not open "
                                       f"file {missing}\n")


def test_backward_ends_at_the_first_layer_reading_the_blobs_final_value(tmp_path):
    """Not at the in-place ReLU on it; at Caffe's own Split where two layers read it."""
    caffe = require_pycaffe()
    two_readers = TINY.replace(
        'layer { name: "prob"',
        'layer { name: "side" type: "Pooling" bottom: "conv" top: "side" '
        'pooling_param { pool: MAX global_pooling: true } }\nlayer { name: "prob"')
    nets = {}
    for name, text in (("tiny", TINY), ("two", two_readers)):
        prototxt, weights = write_random_net(tmp_path, text, name)
        nets[name] = caffe.Net(str(prototxt), caffe.TEST, weights=str(weights))
    assert first_reader(nets["tiny"], "conv") == "gap"
    split = first_reader(nets["two"], "conv")
    assert nets["two"].layer_dict[split].type == "Split"
    with pytest.raises(ModelError, match=r"^no layer reads blob 'prob'$"):
        first_reader(nets["tiny"], "prob")


class DeviceLog:
    """pycaffe with its device calls written down instead of made: this CPU-only build
    aborts on set_device (the GPU path runs on a CUDA build, docs/GPU.md)."""

    def __init__(self, caffe) -> None:
        self.caffe, self.calls = caffe, []

    def __getattr__(self, name: str):
        return getattr(self.caffe, name)

    def set_mode_cpu(self) -> None:
        self.calls.append("cpu")
        self.caffe.set_mode_cpu()

    def set_mode_gpu(self) -> None:
        self.calls.append("gpu")

    def set_device(self, device: int) -> None:
        self.calls.append(device)


def test_the_gpu_number_reaches_caffes_device_in_the_probe_child_and_the_backend(
        tmp_path, monkeypatch):
    log = DeviceLog(require_pycaffe())
    monkeypatch.setattr(caffe_module, "import_caffe", lambda verbose=False: log)
    prototxt, weights = write_random_net(tmp_path, TINY, "ok")
    _probe_main(str(prototxt), str(weights), "3")
    _probe_main(str(prototxt), str(weights), "")
    assert log.calls == ["gpu", 3, "cpu"]
    probed = []
    monkeypatch.setattr(caffe_module, "probe", lambda *args: probed.append(args))
    log.calls.clear()
    CAMNet(prototxt, weights, backend="caffe", gpu=2)
    CAMNet(prototxt, weights, backend="caffe", verbose=True)
    assert [args[2:] for args in probed] == [(2, False), (None, True)]   # (gpu, verbose)
    assert log.calls == ["gpu", 2, "cpu"]


def test_a_missing_pycaffe_says_how_to_get_one(monkeypatch):
    monkeypatch.setitem(sys.modules, "caffe", None)          # `import caffe` fails
    with pytest.raises(BackendError) as error:
        import_caffe()
    assert re.fullmatch(r"pycaffe is not installed \(.*caffe.*\); run "
                        r"scripts/install_pycaffe\.sh or use --backend opencv", str(error.value))


def test_caffes_own_log_is_silenced_unless_verbose(monkeypatch):
    require_pycaffe()
    monkeypatch.delenv("GLOG_minloglevel", raising=False)
    import_caffe(verbose=True)
    assert "GLOG_minloglevel" not in os.environ
    import_caffe()
    assert os.environ.get("GLOG_minloglevel") == "2"  # noqa: SIM112 (glog spells it so)
    monkeypatch.setenv("GLOG_minloglevel", "0")              # the user's own setting stays
    import_caffe()
    assert os.environ.get("GLOG_minloglevel") == "0"  # noqa: SIM112


def test_the_probe_child_reports_a_gpu_it_cannot_use(tmp_path):
    """This pycaffe is CPU-only: asked for device 0, its child aborts, and that is the
    backend's failure (exit 6), not the net's; a net whose error only mentions CUDA is
    still the net's."""
    require_pycaffe()
    prototxt, weights = write_random_net(tmp_path, TINY, "ok")
    with pytest.raises(BackendError, match=r": pycaffe cannot run this net: Cannot use GPU in "
                                           r"CPU-only Caffe"):
        probe(prototxt, weights, 0, verbose=False)
    probe(prototxt, weights, None, verbose=False)             # the same net on the CPU: fine
    bad = tmp_path / "cuda.prototxt"
    bad.write_text(TINY + 'layer { name: "x" type: "CUDAOnlyLayer" bottom: "prob" top: "x" }\n')
    with pytest.raises(ModelError, match="Unknown layer type: CUDAOnlyLayer"):
        probe(bad, weights, None, verbose=False)


def test_the_probe_child_sees_the_environment_and_is_quiet_unless_verbose(
        tmp_path, monkeypatch, capsys):
    """Its environment is this process's (PYTHONPATH, CUDA_VISIBLE_DEVICES, a source
    build's library path), with Caffe's whole log when verbose, echoed here."""
    require_pycaffe()
    prototxt, weights = write_random_net(tmp_path, TINY, "ok")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\nprint('child sees', os.environ.get('CAM_CAFFE_TEST_MARK'), "
        "file=sys.stderr)\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("CAM_CAFFE_TEST_MARK", "the parent's variable")
    monkeypatch.setenv("GLOG_minloglevel", "2")              # as import_caffe leaves it
    probe(prototxt, weights, None, verbose=False)
    assert capsys.readouterr().err == ""
    probe(prototxt, weights, None, verbose=True)
    err = capsys.readouterr().err
    assert "child sees the parent's variable\n" in err
    # (Caffe's INFO lines go to its log file: a warning of its prototxt upgrade shows)
    assert re.search(r"^W\d{4,8} .*upgrade_proto\.cpp:\d+\] Note that future Caffe releases",
                     err, re.M)


def test_a_probe_past_its_time_limit_is_a_backend_error(tmp_path, monkeypatch):
    require_pycaffe()
    prototxt, weights = write_random_net(tmp_path, TINY, "ok")
    monkeypatch.setattr(caffe_module, "PROBE_TIMEOUT_S", 0.001)
    with pytest.raises(BackendError, match=r"^.*ok\.caffemodel: pycaffe did not load the net "
                                           r"in 0\.001 s$"):
        probe(prototxt, weights, None, verbose=False)


def test_threads_set_openblas_which_runs_caffes_gemms(tmp_path):
    require_pycaffe()
    openblas = ctypes.CDLL("libopenblas.so.0", mode=os.RTLD_NOLOAD)
    prototxt, weights = write_random_net(tmp_path, TINY, "ok")
    for threads in (1, 2, 1):
        CAMNet(prototxt, weights, backend="caffe", threads=threads)
        assert openblas.openblas_get_num_threads() == threads


def test_gradients_of_logits_that_are_a_pooled_blob(tmp_path):
    """A NIN-style net: its logits are the N×C×1×1 global average of the features, so
    d logit_c / d F = 1/(H·W) on channel c and 0 elsewhere."""
    require_pycaffe()
    prototxt, weights = write_random_net(tmp_path, NIN_NET, "nin", seed=1)
    net = CAMNet(prototxt, weights, backend="caffe", method="gradcam")
    backend = net.backend
    batch = np.random.default_rng(0).random((2, 3, 16, 16), np.float32)
    backend.forward(batch)
    classes = np.array([[4, 0], [1, 3]])
    grads = backend.gradients(classes)
    assert grads.dtype == np.float32 and grads.shape == (2, 2, 5, 7, 7)
    expected = np.zeros(grads.shape, np.float32)
    for n in range(2):
        for m in range(2):
            expected[n, m, classes[n, m]] = 1 / 49
    np.testing.assert_allclose(grads, expected, rtol=1e-6, atol=0)
