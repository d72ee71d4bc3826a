"""`owlnet SUBCOMMAND ...`: one entry point for the tools (each also has a script in tools/).

Caffe's ``caffe`` commands are here under their names (train, test, time, device_query) and
take Caffe's flags beside owl.net's (see each tool's --help).
"""
from __future__ import annotations

import sys

from .tools import (classify, convert, device, export_onnx, extract, mean, plot, test, time,
                    train)

#: subcommand -> (its main(argv), one-line description)
COMMANDS = {
    "train": (train.main, "train a solver (tools/net_trainer.py; also `caffe train` flags)"),
    "convert": (convert.main, "convert an image list to a Datum LMDB (tools/convert_imageset.py)"),
    "mean": (mean.main, "compute the mean image of an LMDB (tools/compute_image_mean.py)"),
    "test": (test.main, "score a solver's test net (tools/net_tester.py) or, with --model, "
                        "a net as `caffe test`"),
    "extract": (extract.main, "extract blobs' features (tools/feature_extractor.py)"),
    "classify": (classify.main, "top-k labels of images with a deploy net and weights"),
    "time": (time.main, "per-layer forward/backward timing, like `caffe time`"),
    "device_query": (device.query_main, "GPU diagnostic information, like `caffe device_query`"),
    "plot": (plot.plot_main, "plot loss, learning rate and test accuracy from a training log"),
    "parse-log": (plot.parse_main, "write a training log's numbers as CSV, like Caffe's parse_log"),
    "export-onnx": (export_onnx.main, "write a deploy net and its weights as an ONNX model"),
}


def usage() -> str:
    lines = ["usage: owlnet SUBCOMMAND [ARGS...]", "", "subcommands:"]
    lines += [f"  {name:<13} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"owlnet: unknown subcommand '{name}'\n{usage()}", file=sys.stderr)
        return 2
    return COMMANDS[name][0](rest)


if __name__ == "__main__":
    sys.exit(main())
