"""`owlnet SUBCOMMAND ...`: one entry point for the tools (each also has a script in tools/)."""
from __future__ import annotations

import importlib
import sys

#: subcommand -> (module under owlnet.tools, one-line description)
COMMANDS = {
    "train": ("train", "train a solver (tools/net_trainer.py)"),
    "convert": ("convert", "convert an image list to a Datum LMDB (tools/convert_imageset.py)"),
    "mean": ("mean", "compute the mean image of an LMDB (tools/compute_image_mean.py)"),
    "test": ("test", "score a trained net, single or 10-view (tools/net_tester.py)"),
    "extract": ("extract", "extract blobs' features (tools/feature_extractor.py)"),
    "classify": ("classify", "top-k labels of images with a deploy net and weights"),
    "time": ("time", "per-layer forward/backward timing, like `caffe time`"),
    "plot": ("plot", "plot loss, learning rate and test accuracy from a training log"),
    "parse-log": ("plot", "write a training log's numbers as CSV, like Caffe's parse_log"),
    "export-onnx": ("export_onnx", "write a deploy net and its weights as an ONNX model"),
}


def usage() -> str:
    lines = ["usage: owlnet SUBCOMMAND [ARGS...]", "", "subcommands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
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
    module = importlib.import_module(f"owlnet.tools.{COMMANDS[name][0]}")
    if name == "parse-log":
        return module.parse_main(rest)
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
