"""Direct convolution on the compiled kernels of ``native.c``: no column matrix.

The images are copied once into a zero-padded frame split into column phases (``Frame``);
every window entry k = (c, i, j) is then an offset into it, and a run of outputs along a row
reads a contiguous run of the frame. The forward sums, for a tile of output channels and one
or two vectors of outputs along a row, the weight times the frame over every k; the
backward-filter sums, for a tile of output channels and of window entries, the output
gradient times the frame over every output. Small channel counts (the first layers, CIFAR and
MNIST nets, ResNets for CIFAR) waste most of an im2col product's time on copies; here the
only copy is the frame. On a CPU with AVX-512 the kernels use its 32 registers for bigger
tiles, with 64-byte vectors where output rows are wide enough (``vector_bytes``).

Each runs as one compiled call (the frame, then the pieces) on native.c's own worker threads.
Work is cut by shape alone into pieces (images, bands of output rows, groups); the forward
writes each output once, the backward-filter sums its pieces in runs cut by the piece count
and adds the runs in order: results do not depend on the threads.
"""
from __future__ import annotations

import functools

import numpy as np

from .. import threads
from . import native, shared

# Pieces carry at least this many multiply-adds (a hand-off and a native call cost ~0.1 ms).
_PIECE_MULTIPLY_ADDS = 1 << 21
# ... and an operation is cut into at most this many.
_MAX_PIECES = 8
# The forward and backward-filter run on native.c's own threads (whose hand-off costs
# microseconds, not the tens of a Python worker's) from this many multiply-adds.
_PARALLEL_MULTIPLY_ADDS = 1 << 22


def lanes(dtype, vector_bytes=32):
    """Values per vector."""
    return vector_bytes // np.dtype(dtype).itemsize


def vector_bytes(out_width, dtype):
    """The vector size of the kernels for output rows this wide: AVX-512's 64 bytes where
    native.c has them and a row fills more than half such a vector, else 32."""
    wide = max(native.vector_sizes())
    return wide if out_width > lanes(dtype, wide) // 2 else 32


class Frame:
    """The geometry of images of ``x_shape`` zero-padded and split into ``sw`` column phases,
    ``(N, C, sw, rows, q)`` (``shape``; the compiled call fills such an array), and the offset
    of every window entry of one group (``koff``), for kernels of ``lanes`` values a vector
    reading up to two vectors past an output."""

    def __init__(self, x_shape, w_shape, pad, stride, dilation, lanes):
        n, c = x_shape[:2]
        _, cg, kh, kw = w_shape
        (sh, sw), (dh, dw) = stride, dilation
        self.sh, self.sw, self.pad = sh, sw, tuple(pad)
        self.rows, self.q = frame_geometry(x_shape, pad, sw, 2 * lanes)
        self.shape = (n, c, sw, self.rows, self.q)
        plane = sw * self.rows * self.q
        self.group_stride = cg * plane             # elements from one group's channels to the next
        self.image_stride = c * plane
        self.koff = window_offsets(cg, kh, kw, sw, dh, dw, self.rows, self.q)
        # The compiled calls' arguments from the planes to the window entries' count.
        self.arguments = (n * c, *x_shape[2:], *self.pad, sw, self.rows, self.q,
                          native.address(self.koff), cg * kh * kw)


def frame_geometry(shape, pad, column_stride, tail):
    """``(rows, q)`` of the frame of images of ``shape`` (N, C, H, W): H + 2 ph rows of q
    values, the padded row's phases and ``tail`` zero columns past the widest (a tile of
    that many values starting at the last output reads up to there)."""
    (ph, pw), w = pad, shape[3]
    return shape[2] + 2 * ph, -(-(w + 2 * pw) // column_stride) + tail


@functools.lru_cache(maxsize=256)
def window_offsets(cg, kh, kw, sw, dh, dw, rows, q):
    """Frame offset of every window entry (c, i, j) of one group, read-only int64 (the same
    for every call of a geometry: made once)."""
    k_c, k_i, k_j = np.meshgrid(np.arange(cg), np.arange(kh), np.arange(kw), indexing="ij")
    column = k_j * dw
    offsets = np.ascontiguousarray(
        (((k_c * sw + column % sw) * rows + k_i * dh) * q + column // sw).ravel(), dtype=np.int64)
    offsets.flags.writeable = False
    return offsets


def _pieces(n, group, out_rows, multiply_adds):
    """``(n0, n1, g, r0, r1)``: images n0..n1-1 of group g, output rows r0..r1-1; by shape."""
    count = int(min(_MAX_PIECES, max(1, multiply_adds // _PIECE_MULTIPLY_ADDS)))
    if count == 1:
        return [(0, n, g, 0, out_rows) for g in range(group)]
    units = n * group
    if units >= count:
        step = -(-n // max(1, count // group))
        return [(a, min(a + step, n), g, 0, out_rows) for g in range(group)
                for a in range(0, n, step)]
    bands = min(out_rows, -(-count // units))
    edges = [out_rows * b // bands for b in range(bands + 1)]
    return [(a, a + 1, g, r0, r1) for g in range(group) for a in range(n)
            for r0, r1 in zip(edges, edges[1:])]


class _ForwardPlan:
    """What a forward of one geometry needs beside its arrays, made once (``_forward_plan``):
    the frame (its shape and its part of the compiled call's arguments), the packed weights'
    shape, the call's arguments after y (``rest``), whether it runs in parallel; it keeps
    what those arguments point to (the window offsets, the pieces)."""

    def __init__(self, x_shape, w_shape, y_shape, pad, stride, dilation, group, dtype, size):
        n, m, oh, ow = y_shape
        mg, k = m // group, w_shape[1] * w_shape[2] * w_shape[3]
        multiply_adds = n * m * oh * ow * k
        self.frame = Frame(x_shape, w_shape, pad, stride, dilation, lanes(dtype, size))
        tile = native.function("conv_direct_tile", dtype, size)(ow)
        tiles = -(-mg // tile)
        self.packed_shape = (group, tiles, k, tile)
        image_out = m * oh * ow
        # Each piece as the compiled call reads it: offsets into the frame, the packed
        # weights and y, the image count, the output rows, the group's first channel.
        self.pieces = np.array(
            [(n0 * self.frame.image_stride + g * self.frame.group_stride, g * tiles * tile * k,
              n0 * image_out + g * mg * oh * ow, n1 - n0, r0, r1, g * mg)
             for n0, n1, g, r0, r1 in _pieces(n, group, oh, multiply_adds)], dtype=np.int64)
        self.rest = (image_out, self.frame.image_stride, mg, oh, ow, self.frame.sh,
                     native.address(self.pieces), len(self.pieces))
        self.parallel = multiply_adds >= _PARALLEL_MULTIPLY_ADDS


_forward_plan = functools.lru_cache(maxsize=512)(_ForwardPlan)


def forward(x, w, y, pad, stride, dilation, group, scale=None, shift=None, relu=False,
            transposed=False):
    """``y = conv(x, w)``, written; then times ``scale`` and plus ``shift`` (one value per
    output channel each) and with ``relu`` max(., 0) taken (NaN kept), as each tile is
    stored. With ``transposed`` (1x1, one group), ``w`` comes transposed, as (x's channels,
    y's channels, 1, 1): a 1x1 convolution's backward-data reads its forward's weights as
    they lie."""
    if not y.flags.c_contiguous:
        raise ValueError("conv_forward writes into a C-contiguous y")
    size = vector_bytes(y.shape[3], y.dtype)
    w_shape = (w.shape[1], w.shape[0]) + w.shape[2:] if transposed else w.shape
    plan = _forward_plan(x.shape, w_shape, y.shape, tuple(pad), tuple(stride),
                         tuple(dilation), group, y.dtype.str, size)
    x, w = np.ascontiguousarray(x), np.ascontiguousarray(w)
    scale, shift = (None if a is None else np.ascontiguousarray(a, dtype=y.dtype)
                    for a in (scale, shift))
    frame, packed = np.empty(plan.frame.shape, y.dtype), np.empty(plan.packed_shape, y.dtype)
    native.function("conv_direct_forward_framed", y.dtype, size)(
        x.ctypes.data, frame.ctypes.data, *plan.frame.arguments, w.ctypes.data,
        packed.ctypes.data, group, y.ctypes.data, *plan.rest,
        *native.addresses(scale, shift), int(relu), int(transposed),
        threads.workers() if plan.parallel else 1)


def backward_filter(x, dy, dw, pad, stride, dilation, group):
    """``dw`` = the gradient of ``conv(x, w)`` with respect to w for output gradient ``dy``,
    written."""
    n, m, oh, ow = dy.shape
    mg, k = m // group, dw[0].size
    multiply_adds = n * m * oh * ow * k
    parallel = multiply_adds >= _PARALLEL_MULTIPLY_ADDS
    size = vector_bytes(ow, dy.dtype)
    frame = Frame(x.shape, dw.shape, pad, stride, dilation, lanes(dy.dtype, size))
    grads = np.ascontiguousarray(dy)
    image_out = m * oh * ow
    pieces = np.array([(n0 * frame.image_stride, n0 * image_out, n1 - n0, r0, r1)
                       for n0, n1, _, r0, r1 in _pieces(n, 1, oh, multiply_adds)],
                      dtype=np.int64)
    # Runs of pieces, each summed in order into its own buffer, the buffers then added in
    # run order: cut by the piece count alone, so the sum does not depend on the threads.
    runs = np.linspace(0, len(pieces), min(len(pieces), shared.REDUCTION_RUNS) + 1)
    runs = np.ascontiguousarray(runs.round(), dtype=np.int32)
    partial = np.empty((len(runs) - 1,) + dw.shape, dtype=dw.dtype)
    x, framed = np.ascontiguousarray(x), np.empty(frame.shape, x.dtype)
    native.function("conv_direct_backward_filter_framed", dw.dtype, size)(
        *native.addresses(x, framed), *frame.arguments, native.address(grads), image_out,
        native.address(partial), dw.size, frame.image_stride, frame.group_stride, group, mg,
        oh, ow, frame.sh,
        native.address(pieces), native.address(runs), len(runs) - 1,
        threads.workers() if parallel else 1)
    np.copyto(dw, partial[0])
    for run in partial[1:]:
        dw += run
