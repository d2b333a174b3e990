"""``cam-caffe export``: write a Caffe CAM net as an ONNX model.

    cam-caffe export --prototxt deploy.prototxt --weights net.caffemodel -o net.onnx
    cam-caffe export --model demo -o demo.onnx

The ONNX model takes a (N, C, H, W) float batch, preprocessed as for Caffe,
and outputs the score blob (probabilities, or raw scores for a net without
Softmax) and the CAM feature blob, named like the Caffe blobs. Its metadata
(``cam_caffe.*`` keys) names them and the FC layer whose weights make the CAM.

With ``--gradient`` (any classification net), the outputs are the logits
(the final Softmax's input), the score blob and the target blob
(``--feature-blob``, by default as for ``--method gradcam``), and the model
also takes a seed S shaped like the logits (input ``<logits>:seed``) and
outputs ∂(Σ S · logits)/∂target (``<target>:grad``): with a one-hot seed,
the gradient Grad-CAM weights.
"""
from __future__ import annotations

from pathlib import Path

from ..camspec import find_cam_layers, find_target
from ..errors import EXIT_OK, ModelError
from ..netdef import check_weights, load_netdef, read_caffemodel
from ..onnx_export import OPSET, convert, gradient_names
from ..output import write_bytes
from .options import ArgumentParser, add_model_options, model_files

PROTOBUF_LIMIT = 2 ** 31 - 1     # one ONNX file holds at most 2 GiB


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="cam-caffe export",
                       description="Convert a Caffe CAM net (prototxt + caffemodel) to ONNX.")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT",
                   help="the .onnx file to write")
    p.add_argument("--gradient", action="store_true",
                   help="also output the logits and, for a seed input, the gradient of the "
                        "seeded logits at the feature blob (Grad-CAM; any classification net)")
    add_model_options(p, running=False)
    return p


def main(argv: list[str]) -> int:
    """``cam-caffe export … -o OUT``: the exit code."""
    args = build_parser().parse_args(argv)
    prototxt, weights_path, _, entry = model_files(args)
    input_size = args.input_size or (entry.input_size if entry else None)
    netdef = load_netdef(prototxt, input_size=input_size)
    weights = read_caffemodel(weights_path)
    check_weights(netdef, weights, weights_path)
    if args.gradient:
        spec = find_target(netdef, args.feature_blob, args.fc_layer)
        outputs = [spec.logit_blob, spec.score_blob, spec.feature_blob]
        model = convert(netdef, weights, spec, outputs, gradient=spec.feature_blob)
    else:
        spec = find_cam_layers(netdef, args.feature_blob, args.fc_layer)
        model = convert(netdef, weights, spec)
    size = model.ByteSize()
    if size > PROTOBUF_LIMIT:
        raise ModelError(f"{weights_path}: the ONNX model would be {size / 2**30:.1f} GiB; "
                         "one ONNX file holds at most 2 GiB")
    write_bytes(args.output, model.SerializeToString())
    _, c, h, w = netdef.input_shape
    k, (fh, fw) = spec.channels, spec.feature_size
    scores = "probabilities" if spec.softmax else "scores, no softmax"
    print(f"{args.output}: opset {OPSET}, {len(model.graph.node)} nodes, {size / 2**20:.1f} MiB; "
          f"input '{netdef.input_name}' Nx{c}x{h}x{w} → '{spec.score_blob}' "
          f"Nx{spec.num_classes} ({scores}), '{spec.feature_blob}' Nx{k}x{fh}x{fw}"
          + (" + seed '{}' → gradient '{}'".format(*gradient_names(spec.logit_blob,
                                                                  spec.feature_blob))
             if args.gradient else ""))
    return EXIT_OK
