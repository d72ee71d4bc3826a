"""Features of blobs of a solver's test net for every test image (`owlnet extract`).

    feature_extractor.py SOLVER BLOB[,BLOB...] OUT [--snapshot N | --weights W]
                         [--format npy|txt|lmdb] [--iters K] [--gpu IDX]

Runs the solver's TEST net (its first test net) over ``test_iter`` batches (or K) and writes
the named blobs (a layer name stands for its first top) for every image, in the order the
data layer serves them. OUT is a folder, created if needed, with one entry per blob (a ``/``
in a blob name becomes ``_``):

* ``npy``: ``OUT/<blob>.npy``, an N x D float32 array (D: the blob's values per image);
* ``txt``: ``OUT/<blob>.txt``, one image per line, D numbers separated by spaces;
* ``lmdb``: ``OUT/<blob>.lmdb``, Caffe's extract_features format: one Datum per image under
  the key ``%010d`` (the image index), its values in ``float_data`` with channels, height
  and width of the blob's per-image shape (Caffe's legacy axes: an N x D blob gives D x 1 x 1;
  axes past the fourth fold into width), label 0.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from .. import backend
from ..data.db import LMDBWriter
from . import run_command
from .flags import FlagParser
from ..errors import ConfigError, DataError, ShapeError
from ..proto import caffe_pb2
from ._testnet import add_test_net_arguments, find_blob, open_test_net

FORMATS = ("npy", "txt", "lmdb")


def build_parser() -> FlagParser:
    p = FlagParser(prog="feature_extractor.py", description=__doc__.splitlines()[0])
    p.add_argument("solver", help="solver prototxt (its first test net is run)")
    p.add_argument("blobs", metavar="BLOB[,BLOB...]", help="blobs (or layers) to extract")
    p.add_argument("out", metavar="OUT", help="output folder")
    add_test_net_arguments(p, "run")
    p.add_argument("--format", choices=FORMATS, default="npy")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def output_path(out: str, blob: str, fmt: str) -> str:
    """Where the features of ``blob`` go in the folder ``out``."""
    return os.path.join(out, f"{blob.replace('/', '_')}.{fmt}")


def datum_shape(per_image: tuple) -> tuple[int, int, int]:
    """channels, height, width of one image's values, as Caffe's legacy blob axes."""
    dims = list(per_image) + [1] * max(0, 3 - len(per_image))
    return dims[0], dims[1], int(np.prod(dims[2:], dtype=np.int64))


class _Writer:
    """Appends the features of one blob, batch by batch, in one of the formats.

    npy rows go into a memory-mapped ``.npy`` beside the target, sized for ``batches`` batches
    once the first one shows the shape, and renamed into place when complete: memory stays at
    one batch however many images there are.
    """

    def __init__(self, path: str, fmt: str, batches: int = 1):
        self.path, self.fmt, self.batches = path, fmt, batches
        self.count = 0
        self.handle = None
        if fmt == "txt":
            try:
                self.handle = open(path, "w", encoding="ascii")
            except OSError as exc:
                raise DataError(f"cannot write {path}: {exc.strerror or exc}") from None
        elif fmt == "lmdb":
            self.handle = LMDBWriter(path)

    def add(self, batch: np.ndarray) -> None:
        """``batch``: the blob's data of one batch, N x ..., on the host."""
        flat = batch.reshape(batch.shape[0], -1).astype(np.float32, copy=False)
        if self.fmt == "npy":
            self._add_npy(flat)
        elif self.fmt == "txt":
            np.savetxt(self.handle, flat, fmt="%.9g")
        else:
            channels, height, width = datum_shape(batch.shape[1:])
            for row in flat:
                # as Caffe's extract_features: shape and float_data only (no label)
                datum = caffe_pb2.Datum(channels=channels, height=height, width=width)
                datum.float_data.extend(row.tolist())
                self.handle.put(f"{self.count:010d}".encode("ascii"),
                                datum.SerializeToString())
                self.count += 1
            return
        self.count += len(flat)

    def _add_npy(self, flat: np.ndarray) -> None:
        if self.handle is None:
            try:
                self.handle = np.lib.format.open_memmap(
                    self.path + ".partial", mode="w+", dtype=np.float32,
                    shape=(self.batches * flat.shape[0], flat.shape[1]))
            except OSError as exc:
                raise DataError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        end = self.count + len(flat)
        if flat.shape[1] != self.handle.shape[1] or end > len(self.handle):
            raise ShapeError(f"{self.path}: a batch of {flat.shape[0]} x {flat.shape[1]} "
                             f"values does not continue the first batch's "
                             f"{len(self.handle) // self.batches} x {self.handle.shape[1]}")
        self.handle[self.count:end] = flat

    def close(self, complete: bool) -> None:
        """Finish the file; an npy file is written only when ``complete``."""
        if self.fmt != "npy":
            if self.handle is not None:
                self.handle.close()
            return
        if self.handle is None:
            return
        self.handle.flush()
        self.handle = None      # drops the map
        partial = self.path + ".partial"
        try:
            if complete:
                os.replace(partial, self.path)
            else:
                os.unlink(partial)
        except OSError as exc:
            raise DataError(f"cannot write {self.path}: {exc.strerror or exc}") from None


def extract(net, blob_names, out: str, fmt: str, iters: int, progress=None) -> int:
    """Run ``iters`` batches and write ``blob_names`` under ``out``; the number of images."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format '{fmt}' (formats: {', '.join(FORMATS)})")
    if iters <= 0:
        raise ConfigError(f"the number of batches must be positive, got {iters}")
    blobs = [find_blob(net, name) for name in blob_names]
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the output folder {out}: {exc.strerror or exc}") from None
    writers = []
    complete = False
    try:
        for blob in blobs:
            writers.append(_Writer(output_path(out, blob, fmt), fmt, iters))
        for batch in range(iters):
            net.forward(blobs=blobs)
            for blob, writer in zip(blobs, writers):
                writer.add(backend.to_host(net.blobs[blob].data))
            if progress is not None:
                progress(batch + 1, iters)
        complete = True
    finally:
        for writer in writers:
            writer.close(complete)
    return writers[0].count


class ProgressBar:
    """``[#####.....] 12/40 batches, 35.2 batches/s`` on one terminal line."""

    def __init__(self, stream):
        self.stream = stream
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        filled = int(30 * done / total)
        self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} batches, "
                          f"{rate:.1f} batches/s\033[K")
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r\033[K")
        self.stream.flush()


def run(args, out=None) -> int:
    """Extract what the parsed command line asks; the number of images."""
    out = out or sys.stdout
    names = [name for name in args.blobs.split(",") if name]
    if not names:
        raise ConfigError("name at least one blob to extract")
    net, iters = open_test_net(args)
    bar = None
    if not args.no_progress and sys.stderr.isatty():
        bar = ProgressBar(sys.stderr)
    count = extract(net, names, args.out, args.format, iters, bar)
    if bar is not None:
        bar.clear()
    blobs = [find_blob(net, name) for name in names]
    print(f"Extracted features of {count} images for blobs {', '.join(blobs)} "
          f"({args.format} in {args.out})", file=out)
    return count


def main(argv=None) -> int:
    return run_command("feature_extractor", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
