"""Blob and parameter shapes by Caffe's layer rules, against pycaffe's own blobs for the
same net: the CAM layers, the weight check and the memory limit all rest on them."""
import os
import signal
import subprocess
import sys

import pytest
from conftest import require_pycaffe
from nets import input_block, layer

from cam_caffe.errors import ModelError
from cam_caffe.netdef import conv_output_size, forward_bytes, load_netdef, param_shapes


def conv(name, bottom, params, kind="Convolution"):
    return layer(name, kind, bottom, name, f"convolution_param {{ {params} }}")


def pool(name, bottom, params):
    return layer(name, "Pooling", bottom, name, f"pooling_param {{ {params} }}")


NETS = {
    "convolutions": input_block(4, 13, 11)
    + conv("c1", "data", "num_output: 6 kernel_size: 3 stride: 2 pad: 1")
    + conv("c2", "data", "num_output: 6 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 "
           "pad_h: 2 pad_w: 1 group: 2")
    + conv("c3", "data", "num_output: 2 kernel_size: 3 dilation: 2 pad: 1 bias_term: false")
    + conv("c4", "data", "num_output: 4 kernel_size: 3 kernel_size: 2 stride: 1 stride: 2 "
           "pad: 0 pad: 1 dilation: 1 dilation: 3 group: 4")
    + conv("d1", "data", "num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2",
           "Deconvolution")
    + conv("d2", "data", "num_output: 3 kernel_h: 2 kernel_w: 4 stride_h: 3 stride_w: 2 "
           "dilation: 2 bias_term: false", "Deconvolution"),
    "poolings": input_block(3, 13, 10)
    + pool("p1", "data", "pool: MAX kernel_size: 3 stride: 2")
    + pool("p2", "data", "pool: AVE kernel_size: 3 stride: 2 pad: 1")
    + pool("p3", "data", "pool: MAX kernel_h: 4 kernel_w: 2 stride_h: 3 stride_w: 4 pad_h: 1 "
           "pad_w: 0")
    + pool("p4", "data", "pool: AVE kernel_size: 2 stride: 3 pad_h: 0 pad_w: 1")
    + pool("p5", "data", "pool: MAX global_pooling: true")
    + pool("p6", "data", "pool: MAX kernel_size: 4 stride: 3 pad: 2")
    # kernels past the padded input by less than a stride: one window (with ceil)
    + pool("p7", "data", "pool: AVE kernel_h: 16 kernel_w: 3 pad_h: 1 pad_w: 1 stride: 2")
    + pool("p8", "data", "pool: MAX kernel_h: 2 kernel_w: 12 stride: 3"),
    "vectors": input_block(6, 4, 3)
    + layer("ip", "InnerProduct", "data", "ip", "inner_product_param { num_output: 5 }")
    + layer("ip2", "InnerProduct", "data", "ip2",
            "inner_product_param { num_output: 7 axis: 2 transpose: true }")
    + layer("ip3", "InnerProduct", "data", "ip3",
            "inner_product_param { num_output: 2 axis: -1 bias_term: false }")
    + layer("flat", "Flatten", "data", "flat")
    + layer("flat2", "Flatten", "data", "flat2", "flatten_param { axis: 2 end_axis: -1 }")
    + layer("flat3", "Flatten", "data", "flat3", "flatten_param { axis: 0 end_axis: 1 }")
    + layer("r1", "Reshape", "data", "r1", "reshape_param { shape { dim: 0 dim: -1 dim: 2 } }")
    + layer("r2", "Reshape", "data", "r2",
            "reshape_param { shape { dim: 3 dim: 2 } axis: 1 num_axes: 1 }")
    + layer("r3", "Reshape", "data", "r3", "reshape_param { shape { dim: -1 } axis: -2 }")
    + layer("r4", "Reshape", "data", "r4",
            "reshape_param { shape { dim: 1 dim: 1 } axis: 2 num_axes: 0 }")
    + layer("r5", "Reshape", "data", "r5", "reshape_param { shape { dim: 0 dim: 0 dim: -1 } }")
    + layer("r6", "Reshape", "data", "r6",
            "reshape_param { shape { dim: 1 } axis: -1 num_axes: 0 }")     # appended at the end
    + layer("sm", "Softmax", "data", "sm"),
    "branches": input_block(8, 6, 4)
    + layer("split", "Split", "data", "s1 s2")
    + layer("sl", "Slice", "s1", "a b c", "slice_param { slice_point: 1 slice_point: 4 }")
    + layer("sl2", "Slice", "s2", "d e", "slice_param { axis: 3 }")
    + layer("sl3", "Slice", "data", "f g h", "slice_param { slice_dim: 2 }")
    + layer("cat", "Concat", "a c b", "cat")
    + layer("cat2", "Concat", "d e d", "cat2", "concat_param { axis: -1 }")
    + layer("cat3", "Concat", "f g", "cat3", "concat_param { concat_dim: 2 }")
    + layer("sum", "Eltwise", "a a", "sum")
    + layer("bn", "BatchNorm", "data", "bn")
    + layer("sc", "Scale", "bn", "sc", "scale_param { bias_term: true }")
    + layer("sc2", "Scale", "data", "sc2", "scale_param { axis: 2 num_axes: -1 }")
    + layer("bias", "Bias", "data", "bias", "bias_param { axis: 1 num_axes: 2 }")
    + layer("pr", "PReLU", "data", "pr")
    + layer("pr2", "PReLU", "data", "pr2", "prelu_param { channel_shared: true }")
    + pool("gp", "data", "pool: AVE global_pooling: true") + layer("fgp", "Flatten", "gp", "fgp")
    + layer("sc3", "Scale", "data fgp", "sc3", "scale_param { axis: 0 bias_term: true }")
    + layer("sc4", "Scale", "data fgp", "sc4", "scale_param { axis: 0 }")
    + layer("bias2", "Bias", "data fgp", "bias2", "bias_param { axis: 0 }"),
}


@pytest.mark.parametrize("name", NETS)
def test_shapes_are_pycaffes(tmp_path, name):
    """Every blob's shape and every layer's learnable blob shapes, as pycaffe makes them
    (at batch 1): rounding, padding, dilation, group, axes, legacy fields."""
    caffe = require_pycaffe()
    path = tmp_path / f"{name}.prototxt"
    path.write_text(NETS[name])
    netdef = load_netdef(path)
    net = caffe.Net(str(path), caffe.TEST)
    assert netdef.shapes == {b: tuple(net.blobs[b].data.shape) for b in netdef.shapes}
    # Python ints (a float dim could not go into a prototxt's int64 field)
    assert all(type(d) is int for shape in netdef.shapes.values() for d in shape)
    for lay in netdef.net.layer[1:]:
        ours = param_shapes(netdef, lay)
        if ours is None:                   # a type without parameters
            assert lay.name not in net.params, lay.name
        else:
            caffes = net.params.get(lay.name, [])
            assert ours == [tuple(p.data.shape) for p in caffes], lay.name
            assert all(type(d) is int for shape in ours for d in shape)


# How kernel, stride and pad may be given: pycaffe dies on each of these (below).
FIELD_RULES = [
    (conv("c", "data", "num_output: 3 kernel_size: 3 kernel_size: 3 kernel_size: 3"),
     "kernel_size has 3 values for 2 spatial axes"),
    (conv("c", "data", "num_output: 3 kernel_size: 1 pad: 0 pad: 0 pad: 0"),
     "pad has 3 values for 2 spatial axes"),
    (conv("c", "data", "num_output: 3 kernel_size: 1 dilation: 1 dilation: 1 dilation: 1"),
     "dilation has 3 values for 2 spatial axes"),
    (conv("c", "data", "num_output: 3 kernel_size: 1 kernel_h: 1 kernel_w: 1"),
     "kernel_size and kernel_h/kernel_w are both given"),
    (conv("c", "data", "num_output: 3 kernel_size: 1 stride: 1 stride_w: 2"),
     "stride and stride_h/stride_w are both given"),
    (conv("c", "data", "num_output: 3 kernel_size: 1 stride: 0"),
     "stride 0x0: it must be positive"),
    (conv("c", "data", "num_output: 3 kernel_size: 1 stride_h: 0 stride_w: 1"),
     "stride 0x1: it must be positive"),
    (conv("c", "data", "num_output: 3 kernel_size: 1 stride_h: 1 stride_w: 0"),
     "stride 1x0: it must be positive"),
    (pool("p", "data", "pool: MAX kernel_size: 2 pad_h: 1"), "pad_h and pad_w must be given together"),
    (pool("p", "data", "pool: MAX kernel_size: 2 stride_w: 1"),
     "stride_h and stride_w must be given together"),
    (pool("p", "data", "pool: MAX kernel_h: 2"), "kernel_h and kernel_w must be given together"),
    (pool("p", "data", "pool: MAX kernel_size: 2 kernel_h: 2 kernel_w: 2"),
     "kernel_size and kernel_h/kernel_w are both given"),
    (pool("p", "data", "pool: MAX pad: 1 pad_h: 1 pad_w: 1 kernel_size: 2"),
     "pad and pad_h/pad_w are both given"),
    (pool("p", "data", "pool: MAX"), "kernel size not set"),
    (pool("p", "data", "pool: MAX kernel_size: 0"), "kernel size not set"),
    (pool("p", "data", "pool: MAX kernel_h: 2 kernel_w: 0"), "kernel size not set"),
    (pool("p", "data", "pool: MAX kernel_h: 0 kernel_w: 2"), "kernel size not set"),
    (pool("p", "data", "pool: MAX kernel_size: 2 stride_h: 0 stride_w: 1"),
     "stride 0x1: it must be positive"),
    (pool("p", "data", "pool: MAX kernel_h: 2 kernel_w: 3 pad_h: 2 pad_w: 0"),
     "pad 2x0 must be smaller than the kernel 2x3"),
    (pool("p", "data", "pool: MAX kernel_size: 2 stride: 0"), "stride 0x0: it must be positive"),
    (pool("p", "data", "pool: MAX kernel_size: 2 stride_h: 1 stride_w: 0"),
     "stride 1x0: it must be positive"),
    (pool("p", "data", "pool: MAX kernel_size: 2 pad: 2"),
     "pad 2x2 must be smaller than the kernel 2x2"),
    (pool("p", "data", "pool: MAX kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 2"),
     "pad 1x2 must be smaller than the kernel 3x2"),
    (pool("p", "data", "pool: AVE global_pooling: true kernel_size: 2"),
     "a global pooling takes no kernel size"),
    (pool("p", "data", "pool: AVE global_pooling: true kernel_h: 2 kernel_w: 2"),
     "a global pooling takes no kernel size"),
    (pool("p", "data", "pool: AVE global_pooling: true pad: 1"),
     "a global pooling takes only pad 0 and stride 1"),
    (pool("p", "data", "pool: AVE global_pooling: true stride_h: 1 stride_w: 2"),
     "a global pooling takes only pad 0 and stride 1"),
]


@pytest.mark.parametrize(("body", "message"), [
    (conv("c", "data", "num_output: 4"), "kernel size not set"),
    (conv("c", "data", "num_output: 4 kernel_size: 1 group: 3"),
     "4 input channels or 4 outputs not divisible by group 3"),
    (conv("c", "data", "num_output: 3 kernel_size: 1 group: 2"),
     "4 input channels or 3 outputs not divisible by group 2"),
    (conv("c", "data", "num_output: 3 kernel_h: 0 kernel_w: 3"), "kernel size not set"),
    (conv("c", "data", "num_output: 3 kernel_h: 3 kernel_w: 0"), "kernel size not set"),
    (conv("c", "data", "num_output: 3 kernel_h: 1 kernel_w: 6"),
     "input 6x5 is too small for this kernel"),
    (conv("c", "data", "num_output: 3 kernel_h: 7 kernel_w: 1"),
     "input 6x5 is too small for this kernel"),
    (conv("c", "data", "num_output: 3 kernel_h: 1 kernel_w: 3 dilation: 3"),
     "input 6x5 is too small for this kernel"),
    (conv("c", "data", "num_output: 3 kernel_size: 1 pad: 3", "Deconvolution"),
     "input 6x5 is too small for this kernel"),
    (pool("p", "data", "pool: MAX kernel_h: 7 kernel_w: 1"),
     r"pooling kernel 7x1 is larger than its input 6x5"),
    (pool("p", "data", "pool: MAX kernel_h: 1 kernel_w: 6"),
     r"pooling kernel 1x6 is larger than its input 6x5"),
    (pool("p", "data", "pool: MAX kernel_h: 9 kernel_w: 1 pad_h: 1 pad_w: 0"),
     r"pooling kernel 9x1 is larger than its input 6x5"),
    (pool("p", "data", "pool: MAX kernel_h: 10 kernel_w: 1 pad_h: 1 pad_w: 0 stride: 2"),
     r"pooling kernel 10x1 is larger than its input 6x5"),
    (pool("p", "data", "pool: MAX kernel_h: 1 kernel_w: 6 stride: 2 ceil_mode: false"),
     r"pooling kernel 1x6 is larger than its input 6x5"),
    (pool("a", "data", "pool: MAX kernel_size: 2") + layer("c", "Concat", "data a", "c"),
     r"cannot concatenate shapes \[1, 4, 6, 5\] and \[1, 4, 5, 4\]"),
    (layer("f", "Flatten", "data", "f") + layer("c", "Concat", "data f", "c"),
     r"cannot concatenate shapes \[1, 4, 6, 5\] and \[1, 120\]"),
    (pool("a", "data", "pool: MAX kernel_size: 2") + layer("e", "Eltwise", "data a", "e"),
     r"inputs of different shapes \[1, 4, 6, 5\] and \[1, 4, 5, 4\]"),
    (layer("e", "Eltwise", "data", "e"), "1 input; Eltwise takes at least 2"),
    (layer("r", "ReLU", "nothing", "r"), "reads blob 'nothing', which no earlier "
     "layer produces"),
    (layer("r", "Reshape", "data", "r", "reshape_param { shape { dim: -1 } axis: 5 }"),
     "reshape axis 5 is out of range for 4 axes"),
    (layer("r", "Reshape", "data", "r", "reshape_param { shape { dim: -1 } axis: -6 }"),
     "reshape axis -6 is out of range for 4 axes"),
    *FIELD_RULES,
])
def test_shapes_caffe_refuses_are_one_line_errors(tmp_path, body, message):
    """Where Caffe's Reshape would abort on a CHECK: a one-line error naming the file
    and the layer (the pad makes a kernel of input + 2 fit, one more does not)."""
    path = tmp_path / "net.prototxt"
    path.write_text(input_block(4, 6, 5) + body)
    with pytest.raises(ModelError,
                       match=fr"^{path}: layer '[a-z]' (\([A-Za-z]+\): )?{message}$"):
        load_netdef(path)


@pytest.mark.parametrize(("body", "message"), [
    *FIELD_RULES,
    (pool("p", "data", "pool: MAX kernel_h: 3 kernel_w: 2 pad_h: 2 pad_w: 0 stride_h: 1 "
          "stride_w: 2"), None),
    (conv("c", "data", "num_output: 3 kernel_size: 1 pad: 1 pad: 0 stride_h: 2"), None),
])
def test_pycaffe_dies_on_what_the_field_rules_refuse(tmp_path, body, message):
    """pycaffe, loading the net in a child process, dies (a CHECK's abort, or a division
    by zero for a pooling stride of 0) on each refused net, and loads the valid ones."""
    require_pycaffe()
    path = tmp_path / "net.prototxt"
    path.write_text(input_block(4, 6, 5) + body)
    child = subprocess.run([sys.executable, "-c", "import sys, caffe; "
                            "caffe.Net(sys.argv[1], caffe.TEST)", str(path)],
                           capture_output=True, text=True, env={**os.environ,
                                                                "GLOG_minloglevel": "2"})
    if message is None:
        assert child.returncode == 0, child.stderr
        load_netdef(path)
    else:
        assert child.returncode in (-signal.SIGABRT, -signal.SIGFPE), child.stderr


def test_a_padded_kernel_as_large_as_the_padded_input_fits(tmp_path):
    """The largest window Caffe accepts at stride 1: kernel = input + 2·pad (one output)."""
    path = tmp_path / "net.prototxt"
    path.write_text(input_block(4, 6, 5) + pool("p", "data", "pool: MAX kernel_h: 8 kernel_w: 5 "
                                                "pad_h: 1 pad_w: 0"))
    assert load_netdef(path).shapes["p"] == (1, 4, 1, 1)


def test_unknown_layers_give_unknown_shapes_downstream(tmp_path):
    """A layer type cam-caffe has no rule for: its tops and everything after them are
    unknown (None), never a guess; and its parameters too."""
    path = tmp_path / "net.prototxt"
    path.write_text(input_block(4, 6, 5) + layer("m", "ArgMax", "data", "m1 m2")
                    + layer("r", "ReLU", "m1", "r") + layer("e", "Eltwise", "data r", "e")
                    + layer("ip", "InnerProduct", "r", "ip", "inner_product_param { num_output: 2 }"))
    netdef = load_netdef(path)
    assert [netdef.shapes[b] for b in ("m1", "m2", "r", "e", "ip")] == [None] * 5
    assert netdef.shapes["data"] == (1, 4, 6, 5)
    assert param_shapes(netdef, netdef.layer("ip")) is None
    assert param_shapes(netdef, netdef.layer("m")) is None


def test_tops_beyond_a_rule_are_unknown(tmp_path):
    """A convolution over two bottoms (Caffe allows pairs): its rule gives the first
    top; the second is unknown rather than an error or a guess."""
    path = tmp_path / "net.prototxt"
    path.write_text(input_block(4, 6, 5) + layer("s", "Split", "data", "d2")
                    + conv("c", "data d2", "num_output: 2 kernel_size: 1").replace(
                        'top: "c"', 'top: "c" top: "c2"'))
    netdef = load_netdef(path)
    assert (netdef.shapes["c"], netdef.shapes["c2"]) == ((1, 2, 6, 5), None)


def test_the_defaults_of_the_exported_size_functions(tmp_path):
    """``conv_output_size`` without dilation is an undilated convolution, and
    ``forward_bytes`` without a batch is one image (both are public): blobs 2·3·3 and
    1·3·3, weights 2 and a bias, 4 bytes each."""
    assert conv_output_size(7, 3, 0, 1) == 5 == conv_output_size(7, 3, 0, 1, 1)
    path = tmp_path / "net.prototxt"
    path.write_text(input_block(2, 3, 3) + conv("c", "data", "num_output: 1 kernel_size: 1"))
    netdef = load_netdef(path)
    assert forward_bytes(netdef) == forward_bytes(netdef, 1) == 4 * (18 + 9 + 2 + 1)
