"""What the CPU kernels share: how an operation is cut into pieces for the worker threads
(``..threads``), how sums over pieces stay independent of the threads, and zero padding.

Pieces are cut by shape alone (never by the number of threads), every piece writes its own
part of an output, and sums over pieces are added in a fixed order: results do not depend on
the number of threads or on which thread ran what.
"""
from __future__ import annotations

import numpy as np

from .. import threads

# Elements of one piece's column matrix (1 MB of float32, a core's share of the L2 cache
# here), and the fewest output positions (rows of the column matrix) a piece has.
PIECE_ELEMENTS = 1 << 18
PIECE_POSITIONS = 128

# An operation shared out is cut into at least this many pieces where its size allows (so
# that two or more threads have work), whatever the number of threads.
MIN_PIECES = 4

# Convolutions of fewer multiply-adds than this run as one piece, on the calling thread.
PARALLEL_MULTIPLY_ADDS = 1 << 23

# A sum over pieces is cut into at most this many runs, summed in a fixed order.
REDUCTION_RUNS = 4


def zero_padded(images, pad):
    ph, pw = pad
    if not (ph or pw):
        return images
    n, c, h, w = images.shape
    padded = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=images.dtype)
    padded[:, :, ph:ph + h, pw:pw + w] = images
    return padded


def piece_positions(total, columns_per_position):
    """Positions (rows of a column matrix, pixels) per piece: about ``PIECE_ELEMENTS`` values,
    fewer if that leaves under ``MIN_PIECES`` pieces, never under ``PIECE_POSITIONS``."""
    return max(PIECE_POSITIONS, min(PIECE_ELEMENTS // columns_per_position,
                                     -(-total // MIN_PIECES)))


# Work of fewer bytes than this runs as one piece (a thread hand-off costs more than it saves).
SPLIT_BYTES = 1 << 19


def bands(count, item_bytes, band_bytes):
    """``count`` items (planes, channels) as slices of near-equal length: ``MIN_PIECES`` (two
    per thread on two cores, so that a thread slowed by other work on its core is helped
    out), or more where a band would hold over ``band_bytes``; one below SPLIT_BYTES."""
    total = count * item_bytes
    if total < SPLIT_BYTES:
        return [slice(0, count)]
    pieces = min(count, max(MIN_PIECES, -(-total // band_bytes)))
    edges = [count * k // pieces for k in range(pieces + 1)]
    return [slice(start, stop) for start, stop in zip(edges, edges[1:])]


def write_or_add(out, term, accumulate):
    """``out[...] = term``, or ``out += term``."""
    if accumulate:
        out += term
    else:
        out[...] = term


def sum_of_pieces(pieces, parallel, add_piece, total, blas=True):
    """``total`` = the sum over pieces of ``add_piece(piece, out, accumulate)``, which writes
    its term into ``out``, or adds it when ``accumulate`` (``write_or_add``). In parallel,
    the pieces are cut into at most ``REDUCTION_RUNS`` runs, each summed in order by one
    thread into its own buffer, and the buffers are added in run order: the same result
    whatever the threads do; else they are summed in order into ``total``. ``blas``: as
    ``threads.run_pieces``."""
    if not parallel:
        threads.run_pieces(lambda item: add_piece(item[1], total, item[0] > 0),
                           list(enumerate(pieces)), parallel=False, blas=blas)
        return
    runs = np.array_split(np.arange(len(pieces)), min(len(pieces), REDUCTION_RUNS))
    partial = np.empty((len(runs),) + total.shape, dtype=total.dtype)

    def run(r):
        for k, index in enumerate(runs[r]):
            add_piece(pieces[index], partial[r], k > 0)

    threads.run_pieces(run, range(len(runs)), blas=blas)
    np.copyto(total, partial[0])
    for r in range(1, len(runs)):
        total += partial[r]
