"""convert_imageset: images named in a list file -> an LMDB of Datums, as Caffe's tool.

    convert_imageset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME

LISTFILE has one ``path label`` per line; record ``i`` (0-based, after --shuffle) is stored
under the key ``'%08d_%s' % (i, path)``. Images are read as BGR (gray with --gray), resized
bilinearly when both --resize_height and --resize_width are set, and stored raw (C x H x W
bytes) or, with --encoded / --encode_type, as an image file. Images that cannot be read are
skipped, reported, and counted in the closing line.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..data.datum import (array_to_datum, encode_image, encoded_datum, image_to_chw, load_image,
                          read_image_list, resolve_list_path)
from ..data.db import COMMIT_EVERY, LMDBWriter
from ..data.prefetch import default_workers
from . import run_command
from .flags import FlagParser
from ..errors import ConfigError, DataError

PROG = "convert_imageset"


def build_parser() -> FlagParser:
    parser = FlagParser(
        prog=PROG, description="Convert a set of images to an LMDB of Caffe Datums.")
    parser.add_argument("root_folder", help="folder the list's paths are relative to")
    parser.add_argument("listfile", help="text file with one 'path label' per line")
    parser.add_argument("db_name", help="LMDB folder to create (must not exist)")
    parser.add_argument("--gray", action="store_true", help="read images as grayscale")
    parser.add_argument("--shuffle", action="store_true", help="shuffle the order of the images")
    parser.add_argument("--check_size", action="store_true",
                        help="check that all records have the same size")
    parser.add_argument("--encoded", action="store_true",
                        help="store the encoded image file in the Datum")
    parser.add_argument("--backend", default="lmdb", help="db backend (lmdb only)")
    parser.add_argument("--resize_width", type=int, default=0)
    parser.add_argument("--resize_height", type=int, default=0)
    parser.add_argument("--encode_type", default="",
                        help="image format of encoded records ('png', 'jpg', ...); implies --encoded")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of --shuffle (default 0: the same order every run, as Caffe's)")
    parser.add_argument("--threads", type=int, default=default_workers(),
                        help="decode/encode threads")
    return parser


def _extension(name: str) -> str:
    ext = os.path.splitext(name)[1].lower().lstrip(".")
    return "jpeg" if ext == "jpg" else ext


class _Converter:
    """Turns one list entry into serialized Datum bytes (called from the thread pool)."""

    def __init__(self, args):
        self.is_color = not args.gray
        self.height, self.width = args.resize_height, args.resize_width
        self.encoded = args.encoded or bool(args.encode_type)
        self.encode_type = args.encode_type.lower().lstrip(".")

    def __call__(self, entry):
        """``(datum bytes, C x H x W shape)`` or ``(None, reason)`` for an image to skip;
        ``entry`` is ``(list name, label, line number, file path)``."""
        name, label, _, path = entry
        try:
            image = load_image(path, self.is_color, self.height, self.width)
            chw = image_to_chw(image)
            if not self.encoded:
                return array_to_datum(chw, label).SerializeToString(), chw.shape
            encoding = self.encode_type or _extension(name)
            if not encoding:
                raise DataError(f"image '{path}': cannot guess the encoding from the file name; "
                                f"set --encode_type")
            resized = self.height > 0 and self.width > 0
            if not resized and _extension(name) == _extension("." + encoding):
                with open(path, "rb") as fh:
                    payload = fh.read()
            else:
                payload = encode_image(image, encoding)
            return encoded_datum(payload, label).SerializeToString(), chw.shape
        except (DataError, OSError) as exc:
            return None, str(exc)


def convert(args, out=None, err=None) -> tuple[int, int]:
    """Run the conversion; returns (records written, images skipped)."""
    out = out or sys.stdout
    err = err or sys.stderr
    if args.backend.lower() != "lmdb":
        raise ConfigError(f"backend '{args.backend}' is not supported; only lmdb is")
    if (args.resize_height > 0) != (args.resize_width > 0):
        print(f"{PROG}: warning: images are resized only when both --resize_height and "
              f"--resize_width are set", file=err)
    if args.encode_type:
        encode_image(np.zeros((1, 1, 3), np.uint8), args.encode_type)  # rejects unknown formats
    # (list name, label, line number, file path); every path stays inside the root folder
    entries = [(name, label, number, resolve_list_path(args.root_folder, name, args.listfile,
                                                       number))
               for name, label, number in read_image_list(args.listfile)]
    if args.shuffle:
        order = np.random.default_rng(args.seed).permutation(len(entries))
        entries = [entries[i] for i in order]
    print(f"A total of {len(entries)} images.", file=out)
    converter = _Converter(args)
    written = skipped = 0
    first_shape = None
    with LMDBWriter(args.db_name) as writer, \
            ThreadPoolExecutor(max_workers=max(1, args.threads)) as pool:
        for start in range(0, len(entries), COMMIT_EVERY):
            chunk = entries[start:start + COMMIT_EVERY]
            for index, entry, (payload, info) in zip(range(start, start + len(chunk)), chunk,
                                                     pool.map(converter, chunk)):
                if payload is None:
                    print(f"{PROG}: skipping {args.listfile}:{entry[2]}: {info}", file=err)
                    skipped += 1
                    continue
                if args.check_size:
                    first_shape = first_shape or info
                    if info != first_shape:
                        raise DataError(f"{args.listfile}:{entry[2]}: image '{entry[0]}' has "
                                        f"size {info}, the first image {first_shape} "
                                        f"(--check_size)")
                writer.put(f"{index:08d}_{entry[0]}".encode("utf-8"), payload)
                written += 1
                if written % COMMIT_EVERY == 0:
                    print(f"Processed {written} files.", file=out)
    print(f"Processed {written} files; skipped {skipped}.", file=out)
    return written, skipped


def main(argv=None) -> int:
    return run_command(PROG, build_parser(), convert, argv)
