"""Winograd convolution F(4x4, 3x3) and F(2x2, 5x5) on the compiled kernels of ``native.c``,
for float32 3x3 and 5x5 convolutions with stride 1: the forward, the backward-data (the
forward of the output gradient with the kernel flipped, which native.c reads flipped where it
lies) and the backward-filter.

Each m x m block of an output plane (m = 4 for 3x3 kernels, 2 for 5x5) is formed from the
6x6 block of input around it with 36 products per input channel and output channel instead
of the direct kernel's 144 (3x3) or 100 (5x5): the input blocks and the weights are
transformed (``B^T d B``, ``G g G^T``), multiplied elementwise and summed over the input
channels (36 matrix products), and each block transformed back (``A^T m A``). The
backward-filter is the adjoint: ``G^T [sum over blocks of (A dY A^T) * (B^T d B)] G``.
native.c's section on it gives the matrices and layouts. Results differ from the direct sums
by rounding only, but more of it (the transforms' constants run from 1/24 to 16): measured
against float64, up to ~7e-6 of the outputs' largest magnitude for the forward and 2e-5
(3x3) to 5e-5 (5x5) of the gradient's for the backward-filter (a sum over every block), where
the direct kernel's are ~1e-7 to 1e-6 (bench/RESULTS.md, round 9). float64, the dtype of the
gradient checks, keeps the direct kernel.

The transformed weights (36 values for every 9 or 25 weights, channels padded to whole
vectors) are kept
for the next call: native.c compares the weights with the copy kept beside them and
transforms them again only if they changed (a training step's update, a user's edit).
Entries are found by the weights' address and shape, and the oldest are dropped beyond
``_KEPT_BYTES``. The frames (images copied channels last) and the blocks' transforms live in
scratch that each thread keeps (native.c), up to ``_SCRATCH_BYTES`` for a convolution.
"""
from __future__ import annotations

import collections
import functools
import threading

import numpy as np

from .. import threads
from . import native

# A piece's blocks: at least this many (where there are), their transformed input (36 x
# blocks x cp floats) at most about this many bytes beyond that.
_MIN_BLOCKS = 32
_CHUNK_BYTES = 1 << 20
# Multiply-adds (of the direct sum) from which a convolution runs on native.c's threads.
_PARALLEL_MULTIPLY_ADDS = 1 << 21
# Transformed weights kept, bytes (copies included).
_KEPT_BYTES = 1 << 27
# The fewest input and output channels for which it is used (``suits``).
MIN_CHANNELS = 8
# The output block's edge for each kernel size served.
_EDGES = {3: 4, 5: 2}
# With AVX-512, 32-byte vectors where padding the channels to 64-byte ones would make this
# many times the products (LeNet's 20 to 50 channels: 1.52x; there forward / backward-filter
# 0.87 / 1.14 ms against 1.14 / 1.27; with no padding either way they are 3-35% slower).
_NARROW_PADDING = 1.4
# The backward-filter sums over the blocks in passes of about this many bytes of transforms.
_PASS_BYTES = 1 << 23
# A convolution is served where its scratch (frames, a pass's transforms) stays within this.
_SCRATCH_BYTES = 1 << 28


def suits(x_shape, w_shape, pad, stride, dilation, group, dtype) -> bool:
    """Whether this convolution is one Winograd's F(4x4, 3x3) or F(2x2, 5x5) serves here:
    float32, 3x3 or 5x5, stride and dilation 1, one group, at least ``MIN_CHANNELS`` in and
    out, its frame within ``_SCRATCH_BYTES``."""
    kernel = w_shape[2]
    if not (np.dtype(dtype) == np.float32 and group == 1 and kernel in _EDGES
            and w_shape[3] == kernel and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
            and min(w_shape[0], w_shape[1]) >= MIN_CHANNELS and min(pad) >= 0):
        return False
    n, c, h, w = x_shape
    edge = _EDGES[kernel]
    rows, columns = (_blocks(size + 2 * p - kernel + 1, edge) for size, p in zip((h, w), pad))
    cp = _padded_count(c, _lanes(c, w_shape[0]))
    return 4 * n * (edge * rows + 6 - edge) * (edge * columns + 6 - edge) * cp \
        <= _SCRATCH_BYTES


def _blocks(size, edge):
    """Blocks of ``edge`` outputs along an output side of ``size``."""
    return -(-size // edge)


def _lanes(c, k):
    """float32 values a vector for a convolution of c input and k output channels: those of
    the widest build native.c has on this CPU, unless padding c and k to them costs over
    ``_NARROW_PADDING`` times the products of padding to the narrower build's."""
    sizes = native.vector_sizes()
    wide, narrow = max(sizes) // 4, min(sizes) // 4
    padding = (_padded_count(c, wide) * _padded_count(k, wide)
               / (_padded_count(c, narrow) * _padded_count(k, narrow)))
    return narrow if padding > _NARROW_PADDING else wide


def _padded_count(channels, lanes):
    """A channel count padded to whole vectors."""
    return -(-channels // lanes) * lanes


def plan(x_shape, w_shape, y_shape, pad, stride, dilation, group, dtype, flipped=False):
    """The plan of a forward (with ``flipped``: of the backward-data's flipped forward, w_shape
    then being the convolution's own) that ``suits``, made once per geometry, CPU and thread
    count; None for one it does not serve."""
    return _planned(tuple(x_shape), tuple(w_shape), tuple(y_shape), tuple(pad), tuple(stride),
                    tuple(dilation), group, dtype, flipped, tuple(native.vector_sizes()),
                    threads.workers())


def gradient_plan(x_shape, w_shape, y_shape, pad, stride, dilation, group, dtype):
    """The plan of a backward-filter: one whose forward ``suits`` and whose scratch stays
    within ``_SCRATCH_BYTES``; else None."""
    planned = plan(x_shape, w_shape, y_shape, pad, stride, dilation, group, dtype)
    return planned if planned is not None and planned.gradient_fits else None


@functools.lru_cache(maxsize=1024)
def _planned(x_shape, w_shape, y_shape, pad, stride, dilation, group, dtype, flipped, sizes,
             workers):
    if flipped:
        w_shape = (w_shape[1], w_shape[0]) + w_shape[2:]
    if not suits(x_shape, w_shape, pad, stride, dilation, group, dtype):
        return None
    return _Plan(x_shape, w_shape, y_shape, pad, flipped, workers)


class _Plan:
    """What a call for one geometry needs beside its arrays, made once: the vector width
    (``lanes``) and padded channel counts (``cp``, ``kp``); for the forward the cut into
    pieces (``chunk`` blocks, ``band`` output channels) and its compiled call's arguments
    (``before``: between the weights' flag and scale); for the backward-filter whether its
    scratch fits (``gradient_fits``), its compiled call and that call's arguments after the
    arrays (``gradient``, ``gradient_arguments``: the passes among them)."""

    def __init__(self, x_shape, w_shape, y_shape, pad, flipped, workers):
        n, c, _, _ = x_shape
        k, _, kernel, _ = w_shape
        oh, ow = y_shape[2:]
        self.lanes = lanes = _lanes(c, k)
        self.flipped = flipped
        self.cp, self.kp = cp, kp = _padded_count(c, lanes), _padded_count(k, lanes)
        edge = _EDGES[kernel]
        blocks = n * _blocks(oh, edge) * _blocks(ow, edge)
        parallel = n * k * oh * ow * c * kernel ** 2 >= _PARALLEL_MULTIPLY_ADDS
        self.workers = workers if parallel else 1
        self.chunk, self.band = _cut(blocks, cp, kp, lanes, self.workers)
        self.forward = native.function("winograd_forward", np.float32, 4 * lanes)
        self.before = (int(flipped), kernel, *x_shape, *pad, cp, kp, k, oh, ow, self.chunk,
                       self.band)
        self.gradient_fits = _gradient_scratch_bytes(x_shape, y_shape, edge, cp, kp) \
            <= _SCRATCH_BYTES
        self.gradient = native.function("winograd_backward_filter", np.float32, 4 * lanes)
        step = min(blocks, _gradient_pass(cp, kp))
        self.gradient_arguments = (kernel, *x_shape, *pad, cp, kp, k, oh, ow, step,
                                   -(-step // (2 * self.workers)), self.workers)


def _cut(blocks, cp, kp, lanes, workers):
    """``(chunk, band)``: the cut of the blocks and output channels into pieces, at least
    ``workers`` of them where the shape allows, each a chunk of at least ``_MIN_BLOCKS``
    blocks (where there are) whose scratch stays within ``_CHUNK_BYTES``, the one that reads
    the least: every chunk reads all the transformed weights (36 cp kp values), every band
    transforms the input again (36 cp values a block)."""
    vectors = kp // lanes
    options = []
    for bands in range(1, vectors + 1):
        band = -(-vectors // bands) * lanes
        bands = -(-kp // band)
        most = max(_MIN_BLOCKS, _CHUNK_BYTES // (36 * 4 * (cp + band)))
        chunks = max(-(-blocks // most), -(-workers // bands))
        chunk = max(-(-blocks // chunks), min(blocks, _MIN_BLOCKS))
        chunks = -(-blocks // chunk)
        reads = chunks * cp * kp + bands * blocks * cp
        options.append((chunks * bands < workers, reads, chunks * bands, chunk, band))
    return min(options)[3:]


def _gradient_pass(cp, kp):
    """Blocks a pass of the backward-filter."""
    return max(1, _PASS_BYTES // (36 * 4 * (cp + kp)))


def _gradient_scratch_bytes(x_shape, y_shape, edge, cp, kp):
    """The backward-filter's scratch: the frame and the gradient's, a pass's transforms and
    the summed products (native.c's winograd_backward_filter)."""
    n = x_shape[0]
    th, tw = _blocks(y_shape[2], edge), _blocks(y_shape[3], edge)
    blocks = min(n * th * tw, _gradient_pass(cp, kp))
    return 4 * (n * (edge * th + 6 - edge) * (edge * tw + 6 - edge) * cp
                + n * edge * edge * th * tw * kp + 36 * blocks * (cp + kp) + 36 * kp * cp)


_kept = collections.OrderedDict()   # (address, shape, lanes, flipped) -> (copy, u, addresses)
_kept_bytes = [0]
_kept_lock = threading.Lock()


def _kept_transform(w, planned):
    """``(copy address, u address, fresh)``: the arrays kept for weights ``w`` at this address
    (as ``planned`` reads them, flipped or not), a copy of them and their transform ``u``
    (36, kp / lanes, cp, lanes), new (``fresh``: to be filled) if there were none. Two threads
    with the same weights may share them: both then write the same values."""
    key = (native.address(w), w.shape, planned.lanes, planned.flipped)
    with _kept_lock:
        entry = _kept.get(key)
        if entry is not None:
            _kept.move_to_end(key)
            return (*entry[2], False)
        copy = np.empty_like(w)
        u = _aligned_empty((36, planned.kp // planned.lanes, planned.cp, planned.lanes))
        entry = _kept[key] = (copy, u, native.addresses(copy, u))
        _kept_bytes[0] += copy.nbytes + u.nbytes
        while _kept_bytes[0] > _KEPT_BYTES and len(_kept) > 1:
            copy, u, _ = _kept.pop(next(iter(_kept)))
            _kept_bytes[0] -= copy.nbytes + u.nbytes
    return (*entry[2], True)


def _aligned_empty(shape):
    """An empty float32 array of ``shape`` starting on a 64-byte boundary (a cache line: no
    vector of native.c's splits across two)."""
    count = int(np.prod(shape))
    memory = np.empty(count + 16, np.float32)
    first = (-memory.ctypes.data % 64) // 4
    return memory[first:first + count].reshape(shape)


def forward(planned, x, w, y, scale=None, shift=None, relu=False):
    """``y = conv(x, w)`` for a convolution ``planned`` (``plan``), written; then times
    ``scale`` and plus ``shift`` (per output channel, or None) and with ``relu`` max(., 0)
    taken (NaN kept), as the direct kernel applies them. For a flipped plan, w (C, M, r, r)
    is a convolution's kernel whose backward-data this is: the kernel used is w flipped in
    space with input and output channels swapped (no copy made; its transform is kept like
    any other)."""
    if not y.flags.c_contiguous:
        raise ValueError("conv_forward writes into a C-contiguous y")
    x, w = np.ascontiguousarray(x), np.ascontiguousarray(w)
    if scale is not None:
        scale = np.ascontiguousarray(scale, dtype=np.float32)
    if shift is not None:
        shift = np.ascontiguousarray(shift, dtype=np.float32)
    copy, u, fresh = _kept_transform(w, planned)
    failed = planned.forward(
        native.address(x), native.address(w), copy, u, native.address(y), int(fresh),
        *planned.before, None if scale is None else native.address(scale),
        None if shift is None else native.address(shift), int(relu), planned.workers)
    if failed:
        raise MemoryError("owlnet's Winograd convolution could not allocate its scratch")


def backward_filter(planned, x, dy, dw):
    """``dw`` = the gradient of ``conv(x, w)`` with respect to w for output gradient ``dy``,
    written, for a convolution with a ``gradient_plan``: G^T [sum over blocks of (A dY A^T) *
    (B^T d B)] G, the adjoint of the forward's transforms, the sums in passes over the blocks
    cut by shape alone (the same bits on any number of threads)."""
    if not dw.flags.c_contiguous:
        raise ValueError("conv_backward_filter writes into a C-contiguous dw")
    x, dy = np.ascontiguousarray(x), np.ascontiguousarray(dy)
    failed = planned.gradient(*native.addresses(x, dy, dw), *planned.gradient_arguments)
    if failed:
        raise MemoryError("owlnet's Winograd convolution could not allocate its scratch")
