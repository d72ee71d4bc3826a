#!/usr/bin/env python3
"""Regenerate owlnet/proto/caffe_pb2.py from proto/caffe.proto.

    python scripts/gen_proto.py          # rewrite the committed module
    python scripts/gen_proto.py --check  # exit 1 if the committed module is stale

Uses the protoc bundled with grpcio-tools (``grpc_tools.protoc``), so no system
protoc is needed. The generated module records the protoc/gencode version; the
protobuf runtime must be at least that version.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
PROTO_FILE = PROTO_DIR / "caffe.proto"
OUTPUT = ROOT / "owlnet" / "proto" / "caffe_pb2.py"


def generate(out_dir: Path) -> Path:
    """Run protoc on caffe.proto into out_dir and return the generated file."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - environment problem
        raise SystemExit(f"gen_proto: grpcio-tools is required ({exc})")
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_DIR}",
        f"--python_out={out_dir}",
        str(PROTO_FILE),
    ]
    status = protoc.main(args)
    if status != 0:
        raise SystemExit(f"gen_proto: protoc failed with status {status}")
    generated = out_dir / "caffe_pb2.py"
    if not generated.is_file():
        raise SystemExit(f"gen_proto: protoc produced no {generated.name}")
    return generated


def check() -> int:
    """Return 0 if OUTPUT matches a fresh generation, else print why and return 1."""
    with tempfile.TemporaryDirectory(prefix="owlnet-proto-") as tmp:
        fresh = generate(Path(tmp)).read_bytes()
    rel = OUTPUT.relative_to(ROOT)
    if not OUTPUT.is_file():
        print(f"gen_proto: {rel} is missing; run `python scripts/gen_proto.py`",
              file=sys.stderr)
        return 1
    if OUTPUT.read_bytes() != fresh:
        print(f"gen_proto: {rel} is stale relative to "
              f"{PROTO_FILE.relative_to(ROOT)}; run `python scripts/gen_proto.py`",
              file=sys.stderr)
        return 1
    print(f"gen_proto: {rel} is up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="verify the committed module instead of rewriting it")
    opts = parser.parse_args(argv)
    if opts.check:
        return check()
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="owlnet-proto-") as tmp:
        shutil.copyfile(generate(Path(tmp)), OUTPUT)
    print(f"gen_proto: wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
