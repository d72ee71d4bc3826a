"""compute_image_mean: the per-pixel mean of an LMDB of Datums, as Caffe's tool.

    compute_image_mean [--backend lmdb] DB [MEAN.binaryproto] [--npy MEAN.npy]

mean[c, h, w] = (1/n) * sum over records of x[c, h, w], accumulated in float64 (encoded records
are decoded with their own channels). The mean is written as a 1 x C x H x W BlobProto; the
per-channel means (the mean over h, w of mean[c]) are printed as Caffe prints them.
"""
from __future__ import annotations

import io
import itertools
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..data.datum import datum_to_array, describe_key, parse_datum
from ..data.db import LMDBReader
from ..data.prefetch import default_workers
from . import run_command
from .flags import FlagParser
from ..errors import ConfigError, DataError
from ..fileio import atomic_write, write_mean_binaryproto

PROG = "compute_image_mean"
_CHUNK = 64   # records summed by one task of the pool


def build_parser() -> FlagParser:
    parser = FlagParser(
        prog=PROG, description="Compute the per-pixel mean of an LMDB of Caffe Datums.")
    parser.add_argument("db", help="LMDB folder of Datums")
    parser.add_argument("output", nargs="?", help="mean file to write (binaryproto)")
    parser.add_argument("--backend", default="lmdb", help="db backend (lmdb only)")
    parser.add_argument("--npy", help="also write the C x H x W mean as a .npy file")
    parser.add_argument("--threads", type=int, default=default_workers(),
                        help="decode threads")
    return parser


def _size_error(key, shape, first_key, first_shape) -> DataError:
    return DataError(f"record '{describe_key(key)}' has shape {shape}, record "
                     f"'{describe_key(first_key)}' {first_shape}; all records need one size")


def _sum_chunk(records):
    """(sum in float64, count, shape, key of the first record) of a list of (key, value)."""
    total = None
    shape = first_key = None
    for key, value in records:
        example = datum_to_array(parse_datum(value, key), key)
        if total is None:
            total, shape, first_key = example.astype(np.float64), example.shape, key
        elif example.shape != shape:
            raise _size_error(key, example.shape, first_key, shape)
        else:
            total += example
    return total, len(records), shape, first_key


def compute_mean(path, threads: int = 1) -> np.ndarray:
    """The C x H x W float64 mean of every record of the LMDB at ``path``."""
    total = None
    count = 0
    shape = first_key = None
    with LMDBReader(path) as reader, ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        records = iter(reader)
        while True:
            chunks = [list(itertools.islice(records, _CHUNK)) for _ in range(2 * max(1, threads))]
            chunks = [chunk for chunk in chunks if chunk]
            if not chunks:
                break
            for part, n, part_shape, key in pool.map(_sum_chunk, chunks):
                if total is None:
                    total, shape, first_key = part, part_shape, key
                elif part_shape != shape:
                    raise _size_error(key, part_shape, first_key, shape)
                else:
                    total += part
                count += n
    return total / count


def run(args, out=None) -> np.ndarray:
    """Compute, write and summarise the mean as the parsed command line asks."""
    out = out or sys.stdout
    if args.backend.lower() != "lmdb":
        raise ConfigError(f"backend '{args.backend}' is not supported; only lmdb is")
    mean = compute_mean(args.db, args.threads)
    if args.output:
        print(f"Write to {args.output}", file=out)
        write_mean_binaryproto(args.output, mean)
    if args.npy:
        buffer = io.BytesIO()
        np.save(buffer, mean.astype(np.float32), allow_pickle=False)
        atomic_write(args.npy, buffer.getvalue())
    print(f"Number of channels: {mean.shape[0]}", file=out)
    for channel, value in enumerate(mean.reshape(mean.shape[0], -1).mean(axis=1)):
        print(f"mean_value channel [{channel}]: {value}", file=out)
    return mean


def main(argv=None) -> int:
    return run_command(PROG, build_parser(), run, argv)
