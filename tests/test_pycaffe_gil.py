"""pycaffe's forward and backward passes release the GIL
(patches/pycaffe/06-release-gil-in-forward.patch): other Python threads run
while Caffe computes, and a Python layer still runs, from any thread.

Each case runs pycaffe in a child process, so that a crash fails the test
instead of killing pytest.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import require_pycaffe

CONVS = "\n".join(
    f'layer {{ name: "c{i}" type: "Convolution" bottom: "{"data" if i == 1 else f"c{i - 1}"}" '
    f'top: "c{i}" convolution_param {{ num_output: 64 kernel_size: 3 pad: 1 '
    f'weight_filler {{ type: "gaussian" std: 0.01 }} }} }}' for i in (1, 2, 3))
CONV_NET = f"""name: "convs"
input: "data"
input_shape {{ dim: 1 dim: 3 dim: 224 dim: 224 }}
{CONVS}
"""

# Times the forward pass in the main thread while another thread counts: its
# longest pause during the pass is about the whole pass when the GIL is held.
TIMING = """
import json, sys, threading, time
import numpy as np
import caffe
caffe.set_mode_cpu()
net = caffe.Net(sys.argv[1], caffe.TEST)
net.blobs["data"].data[...] = np.random.default_rng(0).random((1, 3, 224, 224))
net.forward()
ticks, running = [], True
def count():
    while running:
        ticks.append(time.perf_counter())
thread = threading.Thread(target=count)
thread.start()
time.sleep(0.05)
results = []
for _ in range(3):
    start = time.perf_counter()
    net.forward()
    end = time.perf_counter()
    inside = [start] + [t for t in ticks if start < t < end] + [end]
    results.append([end - start, max(b - a for a, b in zip(inside, inside[1:]))])
running = False
thread.join()
print(json.dumps(results))
"""

LAYER = """
import caffe

class Double(caffe.Layer):
    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = 2 * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = 2 * top[0].diff
"""

PYTHON_NET = """name: "python"
input: "data"
input_shape { dim: 2 dim: 3 dim: 4 dim: 5 }
force_backward: true
layer { name: "double" type: "Python" bottom: "data" top: "out"
        python_param { module: "double_layer" layer: "Double" } }
"""

# The Python layer's forward and backward, from the main thread and from another.
PYTHON_RUN = """
import json, sys, threading
import numpy as np
import caffe
caffe.set_mode_cpu()
net = caffe.Net(sys.argv[1], caffe.TEST)
x = np.random.default_rng(1).random((2, 3, 4, 5)).astype(np.float32)
results = []
def run():
    net.blobs["data"].data[...] = x
    out = net.forward()["out"].copy()
    net.blobs["out"].diff[...] = 1
    net.backward()
    results.append([bool(np.array_equal(out, 2 * x)),
                    bool(np.all(net.blobs["data"].diff == 2))])
run()
thread = threading.Thread(target=run)
thread.start()
thread.join()
print(json.dumps(results))
"""


def run_child(script: str, *args: str, cwd: Path) -> object:
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], cwd=cwd,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    return json.loads(child.stdout.splitlines()[-1])


def test_forward_lets_other_threads_run(tmp_path):
    require_pycaffe()
    (tmp_path / "convs.prototxt").write_text(CONV_NET)
    passes = run_child(TIMING, "convs.prototxt", cwd=tmp_path)
    for seconds, longest_pause in passes:
        assert seconds > 0.02, "the pass is too short to tell"
        assert longest_pause < seconds / 4, (
            f"another thread stood still for {longest_pause * 1000:.0f} ms of a "
            f"{seconds * 1000:.0f} ms forward pass: the GIL was held")


def test_python_layer_runs_from_any_thread(tmp_path):
    require_pycaffe()
    (tmp_path / "double_layer.py").write_text(LAYER)
    (tmp_path / "python.prototxt").write_text(PYTHON_NET)
    assert run_child(PYTHON_RUN, "python.prototxt", cwd=tmp_path) == [[True, True]] * 2
