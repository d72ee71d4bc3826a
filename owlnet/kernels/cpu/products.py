"""Matrix products of the fully connected layers (``matmul``, ``add_matmul``)."""
from __future__ import annotations

import numpy as np

from .. import threads
from . import native, shared

# OpenBLAS copies ("packs") both operands of a product unless it is small (about a million
# multiply-adds); with a few rows on the left, packing the large right operand costs several
# times the product itself. Up to _FEW_ROWS rows times a transposed weight matrix (a fully
# connected layer's forward at a small batch) run instead as native.c's few_rows_product,
# which reads each weight row once: AlexNet fc6 at batch 2 (151 MB of weights) 2.7 ms against
# 8.4 ms for one np.matmul on 2 threads and 13.0 ms for the blocks of columns it replaces;
# at 8 rows by 4096 x 4096, 2.6 against 3.5 ms. Blocks of rows or columns are the pieces the
# worker threads share in the other cases.
_FEW_ROWS = 8
# Rows of the weight matrix in one piece of few_rows_product, and the weights from which it
# runs on the worker threads (it is bound by memory: 2 threads read 1280 x 1000 in 0.046 ms,
# one in 0.087).
_FEW_ROWS_BAND = 64
_FEW_ROWS_PARALLEL_WEIGHTS = 1 << 16

# Rows of the product that add_matmul forms at once (64 KiB-row blocks of float32 and up).
_PRODUCT_BLOCK_ELEMENTS = 1 << 18


def matmul(a, b, out):
    """``out = a @ b`` (2-d). With at most ``_FEW_ROWS`` rows in ``a``: if ``b``'s columns
    are contiguous (a transposed weight matrix) and the rows of ``a`` and ``out`` too, by
    ``native.c``'s few_rows_product; else (blocks of columns strided in memory measured 3-4x
    slower than one product), when big enough to share out, as a sum over four bands of the
    inner dimension (bands of ``b``'s rows). With more rows, when big enough, in four bands of
    ``a``'s rows (of at least ``shared.PIECE_POSITIONS``), or with fewer rows than two such
    bands, in ``shared.MIN_PIECES`` bands of ``b``'s columns (LeNet's ip1 at batch 64, 0.67
    against 0.45 ms; 128 x 4096 by 4096 x 4096, 54.5 against 29.2 ms). Otherwise one
    product."""
    rows, inner = a.shape
    parallel = a.size * b.shape[1] >= shared.PARALLEL_MULTIPLY_ADDS
    few_rows, columns_contiguous = rows <= _FEW_ROWS, b.strides[0] < b.strides[1]
    if few_rows and _native_few_rows(a, b, out):
        native.function("few_rows_product", out.dtype)(
            native.address(a), a.strides[0] // a.itemsize, native.address(b),
            b.strides[1] // b.itemsize, native.address(out), out.strides[0] // out.itemsize,
            rows, inner, b.shape[1], _FEW_ROWS_BAND,
            threads.workers() if b.size >= _FEW_ROWS_PARALLEL_WEIGHTS else 1)
        return
    if few_rows and not columns_contiguous and parallel:
        edges = [inner * k // 4 for k in range(5)]
        shared.sum_of_pieces(
            list(zip(edges, edges[1:])), True,
            lambda band, total, accumulate: shared.write_or_add(
                total, a[:, band[0]:band[1]] @ b[band[0]:band[1]], accumulate), out)
        return
    if parallel and not few_rows and rows >= 2 * shared.PIECE_POSITIONS:
        band = max(shared.PIECE_POSITIONS, -(-rows // 4))
        pieces = [(start, min(start + band, rows), 0, b.shape[1])
                  for start in range(0, rows, band)]
    elif parallel and not few_rows:
        edges = [b.shape[1] * k // shared.MIN_PIECES for k in range(shared.MIN_PIECES + 1)]
        pieces = [(0, rows, start, stop) for start, stop in zip(edges, edges[1:])]
    else:
        pieces = [(0, rows, 0, b.shape[1])]

    def piece(bounds):
        r0, r1, c0, c1 = bounds
        np.matmul(a[r0:r1], b[:, c0:c1], out=out[r0:r1, c0:c1])

    threads.run_pieces(piece, pieces, parallel)


def _native_few_rows(a, b, out) -> bool:
    """Whether few_rows_product takes ``out = a @ b``: one float type, unit steps along the
    rows of ``a``, ``out`` and ``b``'s transpose, and no empty dimension."""
    item = out.itemsize
    return (a.dtype == b.dtype == out.dtype and out.dtype in (np.float32, np.float64)
            and a.strides[1] == b.strides[0] == out.strides[1] == item and a.size > 0
            and out.size > 0 and a.strides[0] % item == 0 and b.strides[1] % item == 0
            and out.strides[0] % item == 0)


def add_matmul(out, a, b):
    """``out += a @ b`` (2-d) in bands of ``out``'s rows, each through a block-sized
    temporary of its own, instead of a temporary as large as ``out`` (fc6's weight gradient
    is 151 MB: its allocation, page faults and the extra pass over memory cost more than the
    product itself)."""
    band = max(1, _PRODUCT_BLOCK_ELEMENTS // max(1, out.shape[1]))

    def piece(start):
        part = out[start:start + band]
        part += a[start:start + band] @ b

    threads.run_pieces(piece, range(0, out.shape[0], band),
                       parallel=out.size * a.shape[1] >= shared.PARALLEL_MULTIPLY_ADDS)
