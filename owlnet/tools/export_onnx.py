"""Export a deploy net and its trained weights to ONNX (`owlnet export-onnx`).

    owlnet export-onnx DEPLOY.prototxt WEIGHTS.caffemodel OUT.onnx [--opset N]
        [--batch dynamic|N] [--output BLOB]...

The net is built in the TEST phase with the weights loaded and written by
owlnet.export_onnx: one ONNX operator graph computing the net's forward in float32, its
inputs the net's Input blobs (first axis "N" with ``--batch dynamic``, the default), its
outputs the net's outputs (or the ``--output`` blobs). A layer that ONNX cannot express is
refused with one line naming it and its file:line.
"""
from __future__ import annotations

import argparse
import sys

from ..net import TEST, Net
from ..onnx_export import DEFAULT_OPSET, MIN_OPSET, export_onnx
from . import run_command


def batch_size(text: str):
    if text == "dynamic":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'dynamic' or a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="owlnet export-onnx", description=__doc__.splitlines()[0])
    p.add_argument("deploy", help="deploy prototxt (Input layers feed the net)")
    p.add_argument("weights", help="trained .caffemodel")
    p.add_argument("output_file", metavar="OUT.onnx", help="ONNX model to write")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, metavar="N",
                   help=f"ONNX opset version ({MIN_OPSET} or later, default {DEFAULT_OPSET})")
    p.add_argument("--batch", type=batch_size, default="dynamic", metavar="dynamic|N",
                   help="first axis of the inputs: symbolic (default) or a fixed size")
    p.add_argument("--output", action="append", metavar="BLOB",
                   help="blob to make a graph output (repeatable; default the net's outputs)")
    return p


def run(args, out=None):
    out = out or sys.stdout
    net = Net(args.deploy, args.weights, TEST)
    model = export_onnx(net, args.output_file, opset=args.opset, batch=args.batch,
                        outputs=args.output)
    graph = model.graph
    print(f"Wrote {args.output_file}: opset {args.opset}, {len(graph.node)} nodes, inputs "
          f"{', '.join(v.name for v in graph.input)}, outputs "
          f"{', '.join(v.name for v in graph.output)}", file=out)
    return model


def main(argv=None) -> int:
    return run_command("owlnet export-onnx", build_parser(), run, argv)
