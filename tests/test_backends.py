"""backends.create_backend and what every backend shares: the backend chosen by name,
the --gpu, --threads and --verbose settings reaching the one created, the CPU thread
count, the probabilities of a net with or without a final Softmax."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
from nets import TINY, write_random_net

from cam_caffe.backends import cpu_threads, create_backend, scores_to_probs, usable_cores
from cam_caffe.cam import softmax
from cam_caffe.camspec import find_target
from cam_caffe.errors import BackendError
from cam_caffe.netdef import CaffeModel, load_netdef


def ours(err: str) -> list[str]:
    """cam-caffe's lines of stderr (with --verbose ONNX Runtime adds its warnings)."""
    return [line for line in err.splitlines() if line.startswith("cam-caffe:")]


@pytest.fixture
def tiny(tmp_path):
    prototxt, weights = write_random_net(tmp_path, TINY, "tiny")
    netdef = load_netdef(prototxt)
    return netdef, CaffeModel(weights), find_target(netdef)


@pytest.mark.parametrize(("variable", "threads"), [
    (None, None), ("", None), ("3", 3), ("1", 1), ("0", None), ("-2", None), ("four", None)])
def test_cpu_threads_follow_the_argument_then_omp_num_threads_then_the_cores(
        monkeypatch, variable, threads):
    """A Dask nanny's OMP_NUM_THREADS=1 means one thread per worker; a value that is no
    positive integer is ignored (all usable cores), as OpenMP itself does."""
    if variable is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", variable)
    assert cpu_threads() == (threads or usable_cores())
    assert cpu_threads(5) == 5


def test_an_unknown_backend_is_named_with_the_choices(tiny):
    with pytest.raises(BackendError, match=r"^--backend 'tensorflow': choose one of auto, "
                                           r"opencv, caffe, onnxruntime$"):
        create_backend("tensorflow", *tiny)


def test_by_default_a_backend_is_quiet_and_forward_only(tiny, capfd):
    """create_backend's defaults: no gradients asked (OpenCV, which has none, is fine),
    nothing said (auto says which backend it chose only with verbose)."""
    assert create_backend("opencv", *tiny).name == "opencv"
    assert create_backend("auto", *tiny).name == "onnxruntime"
    assert capfd.readouterr().err == ""
    create_backend("auto", *tiny, verbose=True)
    assert ours(capfd.readouterr().err)[0].startswith("cam-caffe: backend auto: chose onnxruntime")


@pytest.mark.parametrize("name", ["opencv", "onnxruntime"])
def test_threads_and_gpu_reach_the_backend_created(tiny, name):
    """--threads sets the backend's own thread count; --gpu asks for a CUDA device,
    which the pip builds here do not have: a one-line backend error, not a CPU run."""
    create_backend(name, *tiny, threads=1)
    if name == "opencv":
        assert cv2.getNumThreads() == 1
    backend = create_backend(name, *tiny, threads=2)
    if name == "opencv":
        assert cv2.getNumThreads() == 2
    else:
        assert backend.threads == 2
        assert backend.session.get_session_options().intra_op_num_threads == 2
    with pytest.raises(BackendError, match=r"^--gpu 0: "):
        create_backend(name, *tiny, gpu=0)


def test_verbose_reaches_onnxruntime_and_opencv(tiny):
    """Their own logs: ONNX Runtime's warnings and OpenCV's log level follow --verbose."""
    for verbose, severity in ((True, 2), (False, 4)):        # warnings, or nothing
        session = create_backend("onnxruntime", *tiny, verbose=verbose).session
        assert session.get_session_options().log_severity_level == severity
    assert create_backend("opencv", *tiny, verbose=True).verbose is True
    assert create_backend("opencv", *tiny).verbose is False


def test_probabilities_are_the_softmax_unless_the_net_ends_in_one(tiny):
    _, _, spec = tiny
    scores = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 9.0]], np.float32).reshape(2, 3, 1, 1)
    probs = scores_to_probs(scores, spec)                 # TINY ends in Softmax: as is
    assert probs.shape == (2, 3) and np.array_equal(probs, scores.reshape(2, 3))
    assert not np.shares_memory(probs, scores)            # the caller's to keep
    no_softmax = dataclasses.replace(spec, softmax=False)
    np.testing.assert_allclose(scores_to_probs(scores, no_softmax),
                               softmax(scores.reshape(2, 3)), rtol=1e-6)


def test_auto_says_which_backend_it_chose_and_why(tiny, capfd):
    create_backend("auto", *tiny, verbose=True)
    assert ours(capfd.readouterr().err) == ["cam-caffe: backend auto: chose onnxruntime (the "
                                            "first of onnxruntime, opencv, caffe)"]
    create_backend("auto", *tiny, verbose=True, gradients=True)
    assert ours(capfd.readouterr().err) == [
        "cam-caffe: backend auto: chose onnxruntime (the first of onnxruntime, opencv, caffe; "
        "not installed or without gradients: opencv)"]


def test_auto_passes_threads_and_verbose_to_the_backend_it_chose(tiny):
    for threads, verbose, severity in ((1, False, 4), (2, True, 2)):
        backend = create_backend("auto", *tiny, threads=threads, verbose=verbose)
        options = backend.session.get_session_options()
        assert (options.intra_op_num_threads, options.log_severity_level) == (threads, severity)


def test_auto_on_a_gpu_tries_pycaffe_then_onnx_runtime(tiny, capfd):
    """--gpu: pycaffe's CUDA build first, then ONNX Runtime's; both CPU-only here, so
    each says why it cannot, in that order, and the error is one of theirs."""
    with pytest.raises(BackendError, match=r"--gpu 0|GPU"):
        create_backend("auto", *tiny, gpu=0, verbose=True)
    assert [line.split(" cannot run")[0] for line in ours(capfd.readouterr().err)] == [
        "cam-caffe: backend auto: caffe", "cam-caffe: backend auto: onnxruntime"]


def test_auto_with_backends_missing(tiny, monkeypatch, capfd):
    """What a pip-only install without ONNX Runtime, or with nothing, hears (which
    libraries are importable is what `installed` reports; here it is told)."""
    import cam_caffe.backends as backends
    monkeypatch.setattr(backends, "installed", lambda name: name == "opencv")
    assert create_backend("auto", *tiny, verbose=True).name == "opencv"
    assert ours(capfd.readouterr().err) == [
        "cam-caffe: backend auto: chose opencv (the first of onnxruntime, opencv, caffe; "
        "not installed: onnxruntime, caffe)"]
    with pytest.raises(BackendError, match=r"^gradient methods need ONNX Runtime or pycaffe, "
                                           r"and neither is installed: pip install "
                                           r"'cam-caffe\[onnx\]', or run "
                                           r"scripts/install_pycaffe\.sh$"):
        create_backend("auto", *tiny, gradients=True)
    monkeypatch.setattr(backends, "installed", lambda name: False)
    with pytest.raises(BackendError, match=r"^no backend installed: pip install "
                                           r"opencv-python-headless, or run "
                                           r"scripts/install_pycaffe\.sh$"):
        create_backend("auto", *tiny)
