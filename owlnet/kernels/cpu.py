"""NumPy kernels: convolution (each shape served by its own algorithm), fully connected
products and pooling, with ``kernels.gpu``'s entry points.

Convolution entry points (the same signatures and contracts as ``kernels.gpu``'s):
``conv_forward(x, w, y, ...)`` writes ``y = conv(x, w)`` (no bias), ``conv_backward_data(dy, w,
dx, ...)`` writes ``dx``, ``conv_backward_filter(x, dy, dw, ...)`` writes ``dw``, with x
``(N, C, H, W)``, w ``(M, C/group, kh, kw)``, y ``(N, M, OH, OW)``; each overwrites its
output and always succeeds. ``engine`` (the prototxt's engine name) does not change anything
on the CPU. The algorithm follows from the shapes:

* depthwise (one input channel per group): a direct sum over the kh*kw kernel offsets, each
  one vectorised multiply-add over bands of planes; no column matrix, no loop over groups;
* pointwise (1x1, stride 1, no pad, one group): one matrix product per image on the NCHW
  layout, with no column matrix;
* anything else: im2col on a channels-last copy of the images and a matrix product per group,
  piece by piece (a few images, or a band of output rows), each piece's column matrix made
  just before its product so that it is still in cache. Its backward-data with stride 1, one
  group and no more output than input channels is the forward convolution of the output
  gradient with the flipped, channel-swapped kernel (no col2im).

Convolutions big enough to repay the hand-off run their pieces on the worker threads of
``threads``, smaller ones in turn, always with the BLAS held to one thread; how an operation
is cut follows from its shapes alone, every piece writes its own part of the output, and sums
over pieces (the filter gradient) are added in a fixed order, so results do not depend on the
number of threads or on which thread ran what.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import threads

# Elements of one piece's column matrix (1 MB of float32, a core's share of the L2 cache
# here), and the fewest output positions (rows of the column matrix) a piece has.
_PIECE_ELEMENTS = 1 << 18
_PIECE_POSITIONS = 128

# An operation shared out is cut into at least this many pieces where its size allows (so
# that two or more threads have work), whatever the number of threads.
_MIN_PIECES = 4

# Convolutions of fewer multiply-adds than this run as one piece, on the calling thread.
_PARALLEL_MULTIPLY_ADDS = 1 << 23

# A sum over pieces is cut into at most this many runs, summed in a fixed order.
_REDUCTION_RUNS = 4


def _zero_padded(images, pad):
    ph, pw = pad
    if not (ph or pw):
        return images
    n, c, h, w = images.shape
    padded = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=images.dtype)
    padded[:, :, ph:ph + h, pw:pw + w] = images
    return padded


def _kernel_windows(kernel, stride, dilation, out_size):
    """``(i, j, rows, columns)``: where kernel offset ``(i, j)`` reads in the padded image."""
    for i in range(kernel[0]):
        rows = slice(i * dilation[0], i * dilation[0] + stride[0] * (out_size[0] - 1) + 1,
                     stride[0])
        for j in range(kernel[1]):
            columns = slice(j * dilation[1], j * dilation[1] + stride[1] * (out_size[1] - 1) + 1,
                            stride[1])
            yield i, j, rows, columns


# -- convolution: the choice ---------------------------------------------------------------
def _algorithm(x_shape, w_shape, pad, stride, group):
    """"depthwise", "pointwise" or "im2col" for this convolution (see the module doc)."""
    if w_shape[1] == 1 and group == x_shape[1] and group > 1:
        return "depthwise"
    if group == 1 and w_shape[2:] == (1, 1) and tuple(stride) == (1, 1) and not any(pad):
        return "pointwise"
    return "im2col"


def conv_forward(x, w, y, pad, stride, dilation, group, engine="default"):
    """``y = conv(x, w)`` (no bias) written into ``y``: x ``(N, C, H, W)``, w
    ``(M, C/group, kh, kw)``, y ``(N, M, OH, OW)``."""
    run = _FORWARD[_algorithm(x.shape, w.shape, pad, stride, group)]
    run(x, w, y, pad, stride, dilation, group)


def conv_backward_data(dy, w, dx, pad, stride, dilation, group, engine="default"):
    """Gradient of ``conv(x, w)`` with respect to x for output gradient ``dy``, written (not
    added) into ``dx``."""
    run = _BACKWARD_DATA[_algorithm(dx.shape, w.shape, pad, stride, group)]
    run(dy, w, dx, pad, stride, dilation, group)


def conv_backward_filter(x, dy, dw, pad, stride, dilation, group, engine="default"):
    """Gradient of ``conv(x, w)`` with respect to w for output gradient ``dy``, written (not
    added) into ``dw``."""
    run = _BACKWARD_FILTER[_algorithm(x.shape, dw.shape, pad, stride, group)]
    run(x, dy, dw, pad, stride, dilation, group)


# -- matrix products (fully connected layers) -----------------------------------------------
# OpenBLAS copies ("packs") both operands of a product unless it is small (about a million
# multiply-adds); with a few rows on the left, packing the large right operand costs several
# times the product itself (AlexNet fc6 at batch 2: 31 ms single-threaded, 7 ms in blocks of
# columns; measured a gain up to 8 rows, a loss from 16). Blocks of columns or rows are also
# the pieces the worker threads share.
_UNPACKED_MULTIPLY_ADDS = 1 << 19
_FEW_ROWS = 8

# Rows of the product that add_matmul forms at once (64 KiB-row blocks of float32 and up).
_PRODUCT_BLOCK_ELEMENTS = 1 << 18


def matmul(a, b, out):
    """``out = a @ b`` (2-d). With at most ``_FEW_ROWS`` rows in ``a``: if ``b``'s columns
    are contiguous (a transposed weight matrix), in blocks of them under
    ``_UNPACKED_MULTIPLY_ADDS``; else (blocks of columns strided in memory measured 3-4x slower
    than one product), when big enough to share out, as a sum over four bands of the inner
    dimension (bands of ``b``'s rows). With more rows, when big enough, in four bands of
    ``a``'s rows (of at least ``_PIECE_POSITIONS``)."""
    rows, inner = a.shape
    parallel = a.size * b.shape[1] >= _PARALLEL_MULTIPLY_ADDS
    if rows <= _FEW_ROWS and b.strides[0] >= b.strides[1] and parallel:
        edges = [inner * k // 4 for k in range(5)]

        def add_band(band, total, accumulate):
            product = a[:, band[0]:band[1]] @ b[band[0]:band[1]]
            if accumulate:
                total += product
            else:
                total[...] = product

        _sum_of_pieces(list(zip(edges, edges[1:])), True, add_band, out)
        return
    if rows <= _FEW_ROWS:
        width = max(1, _UNPACKED_MULTIPLY_ADDS // max(1, rows * inner))
        pieces = [(0, rows, start, min(start + width, b.shape[1]))
                  for start in range(0, b.shape[1], width)]
    elif parallel:
        band = max(_PIECE_POSITIONS, -(-rows // 4))
        pieces = [(start, min(start + band, rows), 0, b.shape[1])
                  for start in range(0, rows, band)]
    else:
        pieces = [(0, rows, 0, b.shape[1])]

    def piece(bounds):
        r0, r1, c0, c1 = bounds
        np.matmul(a[r0:r1], b[:, c0:c1], out=out[r0:r1, c0:c1])

    threads.run_pieces(piece, pieces, parallel)


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
                       parallel=out.size * a.shape[1] >= _PARALLEL_MULTIPLY_ADDS)


# -- pointwise: matrix products on the NCHW layout ---------------------------------------
# 2-d products per image (NumPy's stacked matmul does not always reach BLAS: measured 8x
# slower for a 1024x1024 weight on 7x7 images); a big convolution runs as pieces (bands of
# pixels of one image) on the worker threads.

def _piece_positions(total, columns_per_position):
    """Positions (rows of a column matrix, pixels) per piece: about ``_PIECE_ELEMENTS`` values,
    fewer if that leaves under ``_MIN_PIECES`` pieces, never under ``_PIECE_POSITIONS``."""
    return max(_PIECE_POSITIONS, min(_PIECE_ELEMENTS // columns_per_position,
                                     -(-total // _MIN_PIECES)))


def _pointwise_pieces(n, c, m, pixels):
    """``(pieces, parallel)``: ``(image, start, stop)`` pieces of about ``_PIECE_ELEMENTS``
    input values each (at least ``_PIECE_POSITIONS`` pixels) to run on the worker threads,
    or whole images in turn when the convolution is small."""
    if n * c * m * pixels < _PARALLEL_MULTIPLY_ADDS:
        return [(i, 0, pixels) for i in range(n)], False
    band = _piece_positions(n * pixels, c)
    return [(i, s, min(s + band, pixels)) for i in range(n) for s in range(0, pixels, band)], True


def _pointwise_product(a, b, out, piece):
    """``out[i][:, s:e] = a @ b[i][:, s:e]`` for piece ``(i, s, e)``."""
    i, start, stop = piece
    if stop - start == out.shape[2]:
        np.matmul(a, b[i], out=out[i])
    else:
        out[i][:, start:stop] = a @ b[i][:, start:stop]


def _images_as_matrices(images, output=False):
    """``(N, C, H, W)`` as ``(N, C, H*W)``; an output always as a view (never a copy)."""
    return images.reshape(images.shape[:2] + (-1,), copy=False if output else None)


def _pointwise_forward(x, w, y, pad, stride, dilation, group):
    weights, x3 = w.reshape(w.shape[0], -1), _images_as_matrices(x)
    y3 = _images_as_matrices(y, output=True)
    threads.run_pieces(lambda piece: _pointwise_product(weights, x3, y3, piece),
                       *_pointwise_pieces(*x3.shape[:2], y3.shape[1], x3.shape[2]))


def _pointwise_backward_data(dy, w, dx, pad, stride, dilation, group):
    weights_t = w.reshape(w.shape[0], -1).T
    dy3, dx3 = _images_as_matrices(dy), _images_as_matrices(dx, output=True)
    threads.run_pieces(lambda piece: _pointwise_product(weights_t, dy3, dx3, piece),
                       *_pointwise_pieces(*dx3.shape[:2], dy3.shape[1], dx3.shape[2]))


def _pointwise_backward_filter(x, dy, dw, pad, stride, dilation, group):
    x3, dy3 = _images_as_matrices(x), _images_as_matrices(dy)

    def add_piece(piece, out, accumulate):
        i, start, stop = piece
        product = dy3[i][:, start:stop] @ x3[i][:, start:stop].T
        if accumulate:
            out += product
        else:
            out[...] = product

    _sum_of_pieces(*_pointwise_pieces(*x3.shape[:2], dy3.shape[1], x3.shape[2]), add_piece,
                   dw.reshape((dw.shape[0], -1), copy=False))


# -- depthwise: a multiply-add per kernel offset ----------------------------------------------
# Channel c of x feeds outputs c*k .. c*k + k - 1 (k = M / C). Each kernel offset is one
# multiply-add pass; what decides the speed is how long the runs of values these passes
# stream are, and how many passes (NumPy calls) there are. Two layouts, by output row length:
#
# * rows of _DEPTHWISE_SHORT_ROW outputs or more: every (n, c) plane on its own, as one flat
#   array. The zero-padded frame is split into sh x sw phases (padded pixel (r, q) goes to
#   phase (r % sh, q % sw) at (r // sh, q // sw)), each (planes, R * Q): kernel offset (i, j)
#   of output (oh, ow) is then phase ((i*dh) % sh, (j*dw) % sw) at flat position oh*Q + ow +
#   (i*dh // sh) * Q + j*dw // sw, so each pass is a shifted copy of a whole plane. Positions
#   past an output row's last output read the start of the next row: they are computed and
#   never read back, and the backward passes give them zero gradient. The planes are cut into
#   bands (of at most _DEPTHWISE_BAND_BYTES of working arrays) run side by side on
#   run_pieces' threads; few large bands, since every NumPy call costs the threads a hand-off
#   of the GIL (measured: 115 bands of 256 KB took 3x as long as 8 bands).
# * shorter rows (the small late layers): spatial axes first, a frame (H, W, N, C, k), so
#   that every pass runs over N*C*k contiguous values instead of a row of a few pixels; the
#   forward and backward-data in bands of channels on the threads.
# Every output value is computed the same way whatever the bands: the results do not depend
# on the number of threads.

_DEPTHWISE_SHORT_ROW = 32
_DEPTHWISE_BAND_BYTES = 1 << 23
_SHORT_ROW_BAND_BYTES = 1 << 20

# Work of fewer bytes than this runs as one piece (a thread hand-off costs more than it saves).
_SPLIT_BYTES = 1 << 19


def _bands(count, item_bytes, band_bytes):
    """``count`` items (planes, channels) as slices of near-equal length: two per worker
    thread (so that a thread slowed by other work on its core is helped out), or more where a
    band would hold over ``band_bytes``; one below _SPLIT_BYTES."""
    total = count * item_bytes
    if total < _SPLIT_BYTES:
        return [slice(0, count)]
    pieces = min(count, max(2 * threads.workers(), -(-total // band_bytes)))
    edges = [count * k // pieces for k in range(pieces + 1)]
    return [slice(start, stop) for start, stop in zip(edges, edges[1:])]


def _planes(array, writable=False):
    """``(N, C, H, W)`` as ``(N*C, H, W)``; a view (never a copy) of an output."""
    return array.reshape((-1,) + array.shape[2:], copy=False if writable else None)


class _Depthwise:
    """One depthwise geometry for the planar kernels: bands of planes, phases, offsets."""

    def __init__(self, x_shape, w_shape, y_shape, pad, stride, dilation, itemsize):
        n, c, h, w = x_shape
        (ph, pw), (sh, sw), (dh, dw) = pad, stride, dilation
        self.channels, self.multiplier = c, w_shape[0] // c
        self.size, self.out_size, self.pad, self.stride = (h, w), tuple(y_shape[2:]), pad, stride
        self.phase_size = (-(-(h + 2 * ph) // sh), -(-(w + 2 * pw) // sw))
        width = self.phase_size[1]
        self.offsets = [((i * dh % sh) * sw + j * dw % sw, i * dh // sh * width + j * dw // sw)
                        for i in range(w_shape[2]) for j in range(w_shape[3])]
        planes = n * c
        plane_bytes = self.phase_size[0] * width * sh * sw * itemsize * (1 + 2 * self.multiplier)
        self.bands = _bands(planes, plane_bytes, _DEPTHWISE_BAND_BYTES)

    def _placement(self):
        """``(phase, image rows, image columns, phase rows, phase columns)`` for each phase
        holding image pixels."""
        (h, w), (ph, pw), (sh, sw) = self.size, self.pad, self.stride
        for a in range(sh):
            for b in range(sw):
                row, column = (a - ph) % sh, (b - pw) % sw      # first image pixel in the phase
                if row < h and column < w:
                    rows, columns = len(range(row, h, sh)), len(range(column, w, sw))
                    first_row, first_column = (ph + row) // sh, (pw + column) // sw
                    yield (a * sw + b, slice(row, None, sh), slice(column, None, sw),
                           slice(first_row, first_row + rows),
                           slice(first_column, first_column + columns))

    def phases(self, images):
        """``(planes, H, W)`` images as the phases of their zero-padded frame:
        ``(sh * sw, planes, R * Q)``."""
        phases = np.zeros((self.stride[0] * self.stride[1], len(images)) + self.phase_size,
                          dtype=images.dtype)
        for phase, rows, columns, phase_rows, phase_columns in self._placement():
            phases[phase, :, phase_rows, phase_columns] = images[:, rows, columns]
        return phases.reshape(phases.shape[:2] + (-1,))

    def unphase(self, phases, images):
        """Adjoint of :meth:`phases` (each pixel lies in one phase): write ``images``."""
        phases = phases.reshape(phases.shape[:2] + self.phase_size)
        for phase, rows, columns, phase_rows, phase_columns in self._placement():
            images[:, rows, columns] = phases[phase, :, phase_rows, phase_columns]

    def weights(self, w, planes):
        """The kernel of every plane in the band: ``(planes, k, kh * kw)``."""
        taps = w.reshape(self.channels, self.multiplier, -1)
        return taps[np.arange(planes.start, planes.stop) % self.channels]

    def outputs(self, array):
        """``(N, C*k, OH, OW)`` as ``(N*C, k, OH, OW)``, a view."""
        return array.reshape((-1, self.multiplier) + self.out_size, copy=False)

    def spread(self, grads):
        """``(planes, k, OH, OW)`` output gradients as flat ``(planes, k, R * Q)`` rows, zero
        past each output row."""
        spread = np.zeros(grads.shape[:2] + self.phase_size, dtype=grads.dtype)
        spread[..., :self.out_size[0], :self.out_size[1]] = grads
        return spread.reshape(grads.shape[:2] + (-1,))


def _planar_forward(x, w, y, pad, stride, dilation):
    geometry = _Depthwise(x.shape, w.shape, y.shape, pad, stride, dilation, x.itemsize)
    images, outputs = _planes(x), geometry.outputs(y)
    oh, ow = geometry.out_size

    def band(planes):
        phases, weights = geometry.phases(images[planes]), geometry.weights(w, planes)
        out = np.empty(weights.shape[:2] + phases.shape[2:], dtype=y.dtype)
        term = np.empty_like(out)
        for tap, (phase, shift) in enumerate(geometry.offsets):
            end = out.shape[2] - shift
            product = np.multiply(phases[phase, :, None, shift:], weights[:, :, tap, None],
                                  out=term[..., :end] if tap else out)
            if tap:
                np.add(out[..., :end], product, out=out[..., :end])
        outputs[planes] = out.reshape(out.shape[:2] + geometry.phase_size)[..., :oh, :ow]

    threads.run_pieces(band, geometry.bands)


def _planar_backward_data(dy, w, dx, pad, stride, dilation):
    geometry = _Depthwise(dx.shape, w.shape, dy.shape, pad, stride, dilation, dx.itemsize)
    grads, images = geometry.outputs(dy), _planes(dx, writable=True)

    def band(planes):
        spread, weights = geometry.spread(grads[planes]), geometry.weights(w, planes)
        phases = np.zeros((geometry.stride[0] * geometry.stride[1],) + spread.shape[::2],
                          dtype=dx.dtype)
        term = np.empty_like(spread)
        for tap, (phase, shift) in enumerate(geometry.offsets):
            end = spread.shape[2] - shift
            np.multiply(spread[..., :end], weights[:, :, tap, None], out=term[..., :end])
            phases[phase, :, shift:] += term[:, 0, :end] if geometry.multiplier == 1 \
                else term[..., :end].sum(axis=1)
        geometry.unphase(phases, images[planes])

    threads.run_pieces(band, geometry.bands)


def _planar_backward_filter(x, dy, dw, pad, stride, dilation):
    """The sum over the batch of per-image sums, in image order (the same with any threads)."""
    geometry = _Depthwise(x.shape, dw.shape, dy.shape, pad, stride, dilation, x.itemsize)
    images, grads = _planes(x), geometry.outputs(dy)
    per_plane = np.empty((len(images), geometry.multiplier, len(geometry.offsets)),
                         dtype=dw.dtype)

    def band(planes):
        phases, spread = geometry.phases(images[planes]), geometry.spread(grads[planes])
        for tap, (phase, shift) in enumerate(geometry.offsets):
            end = spread.shape[2] - shift
            per_plane[planes, :, tap] = np.einsum("pl,pkl->pk", phases[phase, :, shift:],
                                                  spread[..., :end])

    threads.run_pieces(band, geometry.bands)
    dw[...] = per_plane.reshape(x.shape[0], -1).sum(axis=0).reshape(dw.shape)


def _spatial_frame(images, pad, fill=True):
    """``(N, C, H, W)`` images zero-padded as a ``(H, W, N, C, 1)`` frame; ``fill=False``
    leaves the interior unwritten (zeros)."""
    n, c, h, w = images.shape
    ph, pw = pad
    frame = np.zeros((h + 2 * ph, w + 2 * pw, n, c, 1), dtype=images.dtype)
    if fill:
        frame[ph:ph + h, pw:pw + w, :, :, 0] = images.transpose(2, 3, 0, 1)
    return frame


def _spatial_images(frame):
    """Inverse of :func:`_spatial_frame` without the pad: an ``(N, C*k, H, W)``-ordered view."""
    h, w, n, c, k = frame.shape
    return frame.transpose(2, 3, 4, 0, 1).reshape(n, c * k, h, w)


def _spatial_view(images, k):
    """``(N, C*k, H, W)`` images as an ``(H, W, N, C, k)`` copy."""
    n, m = images.shape[:2]
    framed = images.reshape(n, m // k, k, *images.shape[2:])
    return np.ascontiguousarray(framed.transpose(3, 4, 0, 1, 2))


def _channel_bands(x_shape, y_shape, k, itemsize):
    """Bands of input channels for the spatial-first kernels, each computed on its own."""
    n, c, h, w = x_shape
    per_channel = n * itemsize * (h * w + 2 * k * y_shape[2] * y_shape[3])
    return _bands(c, per_channel, _SHORT_ROW_BAND_BYTES)


def _spatial_forward(x, w, y, pad, stride, dilation):
    taps = w.reshape(x.shape[1], -1, *w.shape[2:])
    k = taps.shape[1]

    def band(channels):
        padded = _spatial_frame(x[:, channels], pad)
        out = np.empty(y.shape[2:] + padded.shape[2:4] + (k,), dtype=y.dtype)
        term = np.empty_like(out)
        for i, j, rows, columns in _kernel_windows(w.shape[2:], stride, dilation, y.shape[2:]):
            tap = taps[channels, :, i, j]
            if i == 0 and j == 0:
                np.multiply(padded[rows, columns], tap, out=out)
            else:
                out += np.multiply(padded[rows, columns], tap, out=term)
        y[:, channels.start * k:channels.stop * k] = _spatial_images(out)

    threads.run_pieces(band, _channel_bands(x.shape, y.shape, k, x.itemsize))


def _spatial_backward_data(dy, w, dx, pad, stride, dilation):
    h, wd = dx.shape[2:]
    ph, pw = pad
    taps = w.reshape(dx.shape[1], -1, *w.shape[2:])
    k = taps.shape[1]

    def band(channels):
        grads = _spatial_view(dy[:, channels.start * k:channels.stop * k], k)
        padded = _spatial_frame(dx[:, channels], pad, fill=False)
        term = np.empty_like(grads)
        for i, j, rows, columns in _kernel_windows(w.shape[2:], stride, dilation,
                                                   dy.shape[2:]):
            np.multiply(grads, taps[channels, :, i, j], out=term)
            padded[rows, columns] += term.sum(axis=-1, keepdims=True) if k > 1 else term
        dx[:, channels] = _spatial_images(padded[ph:ph + h, pw:pw + wd])

    threads.run_pieces(band, _channel_bands(dx.shape, dy.shape, k, dx.itemsize))


def _spatial_backward_filter(x, dy, dw, pad, stride, dilation):
    """One einsum per kernel offset over the whole batch (bands measured no faster)."""
    taps = dw.reshape(x.shape[1], -1, *dw.shape[2:])
    grads = _spatial_view(dy, taps.shape[1])
    padded = _spatial_frame(x, pad)
    for i, j, rows, columns in _kernel_windows(dw.shape[2:], stride, dilation, dy.shape[2:]):
        taps[:, :, i, j] = np.einsum("hwnck,hwncl->ck", grads, padded[rows, columns])


def _depthwise_forward(x, w, y, pad, stride, dilation, group):
    short = y.shape[3] < _DEPTHWISE_SHORT_ROW
    (_spatial_forward if short else _planar_forward)(x, w, y, pad, stride, dilation)


def _depthwise_backward_data(dy, w, dx, pad, stride, dilation, group):
    short = dy.shape[3] < _DEPTHWISE_SHORT_ROW
    (_spatial_backward_data if short else _planar_backward_data)(dy, w, dx, pad, stride,
                                                                 dilation)


def _depthwise_backward_filter(x, dy, dw, pad, stride, dilation, group):
    short = dy.shape[3] < _DEPTHWISE_SHORT_ROW
    (_spatial_backward_filter if short else _planar_backward_filter)(x, dy, dw, pad, stride,
                                                                     dilation)


# -- im2col + GEMM ---------------------------------------------------------------------------
# The column matrix holds every output position's window, read from a zero-padded copy of
# the images in one of three layouts (``_Columns``):
# * "channels-last": images copied to (N, H, W, C); a (positions x K) matrix, windows in
#   (i, j, c) order (copied in runs of kw*C values), product (positions x K) @ (K x M/g);
# * "channel-major": NCHW images; a (K x positions) matrix, rows (c, i, j), positions
#   (n, oh, ow) (runs of OW values), product (M/g x K) @ (K x positions);
# * "batch-last": images copied to (C, H, W, N); as channel-major with positions ordered
#   (oh, ow, n) (runs of OW*N values), for output rows shorter than ``_SHORT_ROW``.
# A convolution big enough to repay the thread hand-off is cut into pieces (a few images, or a
# band of output rows), each piece's column matrix made just before its product so that it
# is still in cache, the pieces run on the worker threads; it then uses channels-last where
# C >= kw (the product's long side is then the positions, which OpenBLAS serves well on one
# thread even for M of 16-64). Smaller ones are one product on the calling thread.

# Output rows narrower than this use the batch-last layout when the batch is one piece.
_SHORT_ROW = 16


class _Columns:
    """The windows of ``images`` for a convolution of this geometry, in the layout chosen
    for it, and the pieces it runs in."""

    def __init__(self, images, w_shape, pad, stride, dilation, group, out_size):
        n, c, h, wd = images.shape
        m, cg, kh, kw = w_shape
        self.n, self.group, self.cg, self.mg = n, group, cg, m // group
        self.out_size = tuple(out_size)
        multiply_adds = n * m * out_size[0] * out_size[1] * cg * kh * kw
        self.parallel = parallel = multiply_adds >= _PARALLEL_MULTIPLY_ADDS
        if parallel and c >= kw:
            self.layout = "channels-last"
        elif out_size[1] < _SHORT_ROW:
            self.layout = "batch-last"
        else:
            self.layout = "channel-major"
        self.windows = self._view(images, pad, (kh, kw), stride, dilation)
        self.pieces = self._cut(cg * kh * kw, parallel)
        # Too few positions for pieces (the small late layers): one column matrix, shared
        # out by bands of output channels instead.
        self.channel_bands = None
        if parallel and len(self.pieces) == 1 and self.mg >= 2 * _MIN_PIECES:
            edges = [self.mg * k // _MIN_PIECES for k in range(_MIN_PIECES + 1)]
            self.channel_bands = [(g, slice(a, b)) for g in range(group)
                                  for a, b in zip(edges, edges[1:])]

    def _view(self, images, pad, kernel, stride, dilation):
        n, c, h, w = images.shape
        ph, pw = pad
        oh, ow = self.out_size
        (sh, sw), (dh, dw) = stride, dilation
        if self.layout == "channel-major":
            frame = np.ascontiguousarray(_zero_padded(images, pad))           # (N, C, H, W)
            s_n, s_c, s_h, s_w = frame.strides
            return as_strided(frame, shape=(c,) + kernel + (n, oh, ow), writeable=False,
                              strides=(s_c, s_h * dh, s_w * dw, s_n, s_h * sh, s_w * sw))
        if self.layout == "channels-last":
            frame = np.zeros((n, h + 2 * ph, w + 2 * pw, c), dtype=images.dtype)
            frame[:, ph:ph + h, pw:pw + w] = images.transpose(0, 2, 3, 1)
            s_n, s_h, s_w, s_c = frame.strides
            return as_strided(frame, shape=(n, oh, ow) + kernel + (c,), writeable=False,
                              strides=(s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c))
        frame = np.zeros((c, h + 2 * ph, w + 2 * pw, n), dtype=images.dtype)   # batch-last
        frame[:, ph:ph + h, pw:pw + w] = images.transpose(1, 2, 3, 0)
        s_c, s_h, s_w, s_n = frame.strides
        return as_strided(frame, shape=(c,) + kernel + (oh, ow, n), writeable=False,
                          strides=(s_c, s_h * dh, s_w * dw, s_h * sh, s_w * sw, s_n))

    def _cut(self, columns_per_position, parallel):
        """``(n0, n1, r0, r1)``: images n0..n1-1, output rows r0..r1-1, covering the output.
        In pieces, each column matrix holds about ``_PIECE_ELEMENTS`` values and at least
        ``_PIECE_POSITIONS`` positions (a product must be long enough to repay packing the
        weights); batch-last pieces are bands of rows of the whole batch."""
        n, (oh, ow) = self.n, self.out_size
        if not parallel:
            return [(0, n, 0, oh)]
        positions = _piece_positions(n * oh * ow, columns_per_position)
        if self.layout == "batch-last":
            rows = -(-positions // (ow * n))
            return [(0, n, r, min(r + rows, oh)) for r in range(0, oh, rows)]
        if oh * ow <= positions:
            step = positions // (oh * ow)
            return [(a, min(a + step, n), 0, oh) for a in range(0, n, step)]
        rows = -(-positions // ow)
        return [(a, a + 1, r, min(r + rows, oh)) for a in range(n) for r in range(0, oh, rows)]

    @property
    def positions_first(self):
        """Whether column matrices are (positions x K) (else (K x positions))."""
        return self.layout == "channels-last"

    def matrix(self, piece, g):
        """Group ``g``'s column matrix of a piece."""
        n0, n1, r0, r1 = piece
        part = slice(g * self.cg, (g + 1) * self.cg)
        if self.layout == "channels-last":
            block = self.windows[n0:n1, r0:r1, :, :, :, part]
            return block.reshape(-1, block.shape[3] * block.shape[4] * block.shape[5])
        if self.layout == "channel-major":
            block = self.windows[part, :, :, n0:n1, r0:r1]
        else:
            block = self.windows[part, :, :, r0:r1]
        return block.reshape(block.shape[0] * block.shape[1] * block.shape[2], -1)

    def weights(self, w):
        """``(M, C/g, kh, kw)`` as ``(g, M/g, K/g)``, each row in the windows' order (for
        channels-last a copy with the channels moved last; measured half the time of moving
        the output channels last as well, the products then read it transposed)."""
        per_group = w.reshape(self.group, self.mg, self.cg, *w.shape[2:])
        if self.positions_first:
            per_group = np.ascontiguousarray(per_group.transpose(0, 1, 3, 4, 2))
        return per_group.reshape(self.group, self.mg, -1)

    def output_rows(self, images):
        """An ``(N, M, OH, OW)`` array (dy) copied to the order of positions: ``(N, OH, OW,
        M)`` if channels-last, else ``(M, N, OH, OW)`` or (batch-last) ``(M, OH, OW, N)``."""
        if self.layout == "channels-last":
            return np.ascontiguousarray(images.transpose(0, 2, 3, 1))      # (N, OH, OW, M)
        order = (1, 0, 2, 3) if self.layout == "channel-major" else (1, 2, 3, 0)
        return np.ascontiguousarray(images.transpose(order))              # (M, ...)

    def piece_rows(self, rows, piece, g):
        """Group ``g``'s part of ``output_rows`` for a piece: (positions x M/g) if
        channels-last, else (M/g x positions)."""
        n0, n1, r0, r1 = piece
        part = slice(g * self.mg, (g + 1) * self.mg)
        if self.layout == "channels-last":
            return rows[n0:n1, r0:r1, :, part].reshape(-1, self.mg)
        if self.layout == "channel-major":
            return rows[part, n0:n1, r0:r1].reshape(self.mg, -1)
        return rows[part, r0:r1].reshape(self.mg, -1)

    def write(self, products, y, piece):
        """Put a piece's products (``(g, positions, M/g)`` or ``(g, M/g, positions)``)
        into ``y`` ``(N, M, OH, OW)``."""
        n0, n1, r0, r1 = piece
        g, mg, ow = self.group, self.mg, self.out_size[1]
        target = y.reshape((y.shape[0], g, mg) + self.out_size, copy=False)[n0:n1, :, :, r0:r1]
        if self.layout == "channels-last":
            target[...] = products.reshape(g, n1 - n0, r1 - r0, ow, mg).transpose(1, 0, 4, 2, 3)
        elif self.layout == "channel-major":
            target[...] = products.reshape(g, mg, n1 - n0, r1 - r0, ow).transpose(2, 0, 1, 3, 4)
        else:
            target[...] = products.reshape(g, mg, r1 - r0, ow, n1 - n0).transpose(4, 0, 1, 2, 3)


def _sum_of_pieces(pieces, parallel, add_piece, total):
    """``total`` = the sum over pieces of ``add_piece(piece, out, accumulate)`` (which writes
    its term into ``out``, or adds it when ``accumulate``). In parallel, the pieces are cut
    into at most ``_REDUCTION_RUNS`` runs, each summed in order by one thread into its own
    buffer, and the buffers are added in run order: the same result whatever the threads
    do; else they are summed in order into ``total``."""
    if not parallel:
        threads.run_pieces(lambda item: add_piece(item[1], total, item[0] > 0),
                           list(enumerate(pieces)), parallel=False)
        return
    runs = np.array_split(np.arange(len(pieces)), min(len(pieces), _REDUCTION_RUNS))
    partial = np.empty((len(runs),) + total.shape, dtype=total.dtype)

    def run(r):
        for k, index in enumerate(runs[r]):
            add_piece(pieces[index], partial[r], k > 0)

    threads.run_pieces(run, range(len(runs)))
    np.copyto(total, partial[0])
    for r in range(1, len(runs)):
        total += partial[r]


def _im2col_forward(x, w, y, pad, stride, dilation, group):
    columns = _Columns(x, w.shape, pad, stride, dilation, group, y.shape[2:])
    weights = columns.weights(w)
    first = columns.positions_first

    if columns.channel_bands:
        whole = columns.pieces[0]
        matrices = [columns.matrix(whole, g) for g in range(group)]
        positions = matrices[0].shape[0 if first else 1]
        products = np.empty((group,) + ((positions, columns.mg) if first
                                        else (columns.mg, positions)), dtype=y.dtype)

        def band(part):
            g, channels = part
            if first:
                np.matmul(matrices[g], weights[g][channels].T, out=products[g][:, channels])
            else:
                np.matmul(weights[g][channels], matrices[g], out=products[g][channels])

        threads.run_pieces(band, columns.channel_bands)
        columns.write(products, y, whole)
        return

    def piece(bounds):
        products = [columns.matrix(bounds, g) @ weights[g].T if first
                    else weights[g] @ columns.matrix(bounds, g) for g in range(group)]
        columns.write(np.stack(products), y, bounds)

    threads.run_pieces(piece, columns.pieces, columns.parallel)


def _im2col_backward_filter(x, dy, dw, pad, stride, dilation, group):
    """The gradient as ``(g, M/g, K/g)`` rows in the windows' order, then put into dw's."""
    columns = _Columns(x, dw.shape, pad, stride, dilation, group, dy.shape[2:])
    rows = columns.output_rows(dy)
    first = columns.positions_first
    m, cg, kh, kw = dw.shape
    total = np.empty((group, m // group, cg * kh * kw), dtype=dw.dtype)

    def product(cols, grads):
        return grads.T @ cols if first else grads @ cols.T

    if columns.channel_bands:
        whole = columns.pieces[0]
        matrices = [columns.matrix(whole, g) for g in range(group)]

        def band(part):
            g, channels = part
            grads = columns.piece_rows(rows, whole, g)
            total[g][channels] = product(matrices[g],
                                         grads[:, channels] if first else grads[channels])

        threads.run_pieces(band, columns.channel_bands)
    else:
        def add_piece(bounds, out, accumulate):
            for g in range(group):
                term = product(columns.matrix(bounds, g), columns.piece_rows(rows, bounds, g))
                if accumulate:
                    out[g] += term
                else:
                    out[g] = term

        _sum_of_pieces(columns.pieces, columns.parallel, add_piece, total)
    if first:
        dw[...] = total.reshape(group, m // group, kh, kw, cg).transpose(0, 1, 4, 2, 3) \
            .reshape(dw.shape)
    else:
        dw[...] = total.reshape(dw.shape)


def _im2col_backward_data(dy, w, dx, pad, stride, dilation, group):
    flipped_pad = tuple(d * (k - 1) - p for d, k, p in zip(dilation, w.shape[2:], pad))
    if (group == 1 and tuple(stride) == (1, 1) and min(flipped_pad) >= 0
            and w.shape[0] <= w.shape[1]):
        # With stride 1, dx is the convolution of dy (padded by d*(k-1) - p) with the kernel
        # flipped in space and with input and output channels swapped: an im2col of dy and a
        # product replace col2im, whose scattered adds cost more whenever M <= C (measured
        # 1.2-1.8x faster; slower when M > C, where the column matrix of dy is the larger).
        flipped = np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
        _im2col_forward(dy, flipped, dx, flipped_pad, stride, dilation, 1)
        return
    n, m, oh, ow = dy.shape
    parallel = n * m * oh * ow * w[0].size >= _PARALLEL_MULTIPLY_ADDS and n > 1
    # Whole images per piece (the windows of neighbouring rows overlap), about
    # _PIECE_ELEMENTS column values each.
    step = max(1, _PIECE_ELEMENTS // (oh * ow * w[0].size)) if parallel else n
    images = [(a, min(a + step, n)) for a in range(0, n, step)]
    threads.run_pieces(lambda part: _col2im_backward_data(
        dy[part[0]:part[1]], w, dx[part[0]:part[1]], pad, stride, dilation, group), images,
        parallel)


# Backward-data by col2im on columns in the channel-major or (short rows) batch-last layout.
def _col2im_backward_data(dy, w, dx, pad, stride, dilation, group):
    n, c, h, wd = dx.shape
    m, cg, kh, kw = w.shape
    ph, pw = pad
    oh, ow = dy.shape[2:]
    batch_last = ow < _SHORT_ROW
    order = (1, 2, 3, 0) if batch_last else (1, 0, 2, 3)
    dy_groups = np.ascontiguousarray(dy.transpose(order)).reshape(group, m // group, -1)
    weights = w.reshape(group, m // group, -1)
    dcols = np.empty((group, weights.shape[2], dy_groups.shape[2]), dtype=dx.dtype)
    for g in range(group):
        np.matmul(weights[g].T, dy_groups[g], out=dcols[g])
    windows = _kernel_windows((kh, kw), stride, dilation, (oh, ow))
    if batch_last:
        padded = np.zeros((c, h + 2 * ph, wd + 2 * pw, n), dtype=dx.dtype)
        blocks = dcols.reshape(c, kh, kw, oh, ow, n)
        for i, j, rows, columns in windows:
            padded[:, rows, columns] += blocks[:, i, j]
        dx[...] = padded[:, ph:ph + h, pw:pw + wd].transpose(3, 0, 1, 2)
        return
    padded = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), dtype=dx.dtype)
    blocks = dcols.reshape(c, kh, kw, n, oh, ow)
    for i, j, rows, columns in windows:
        padded[:, :, rows, columns] += blocks[:, i, j].transpose(1, 0, 2, 3)
    dx[...] = padded[:, :, ph:ph + h, pw:pw + wd]


# Each algorithm's three kernels, all with the entry points' arguments (less ``engine``).
_FORWARD = {"depthwise": _depthwise_forward, "pointwise": _pointwise_forward,
            "im2col": _im2col_forward}
_BACKWARD_DATA = {"depthwise": _depthwise_backward_data, "pointwise": _pointwise_backward_data,
                  "im2col": _im2col_backward_data}
_BACKWARD_FILTER = {"depthwise": _depthwise_backward_filter,
                    "pointwise": _pointwise_backward_filter, "im2col": _im2col_backward_filter}


# -- pooling: Caffe's MAX and AVE over bands of planes ----------------------------------------
# The entry points have kernels.gpu's signatures: x (N, C, H, W), y and argmax (N, C, OH, OW),
# kernel / stride / pad pairs; windows start at (oh*sh - ph, ow*sw - pw) and span kh x kw.
# Every (n, c) plane pools on its own, so the planes are cut into bands (two per worker
# thread, more where a band would exceed _POOL_BAND_BYTES of input) pooled side by side on
# run_pieces' threads; a plane's result does not depend on its band.
#
# A window is combined separably, first along rows (over its kw columns), then over its kh
# rows. Rows of output are short (a few to a few dozen values), and a NumPy pass over a view
# whose rows are that short is slow; so each pass runs instead over a whole band as one flat
# contiguous array, shifted against itself. The padded frame is split into sw column phases
# (padded column c goes to phase c % sw at position c // sw), each (planes, rows, Q) with Q
# = ceil(padded width / sw): kernel column j of the window whose first padded column is
# ow*sw is then phase j % sw at flat position + j // sw. Likewise the row results are split
# into sh row phases, where kernel row i is row phase i % sh at flat position + (i // sh) * Q.
# Positions past a row's last window (or a band's last row) combine values of the next row
# (or nothing): they are never read back.

_POOL_BAND_BYTES = 1 << 22


class _Pooling:
    """One pooling geometry and its separable passes on bands of ``(planes, H, W)`` arrays."""

    def __init__(self, x_shape, y_shape, kernel, stride, pad, itemsize):
        self.size, self.pooled = tuple(x_shape[2:]), tuple(y_shape[2:])
        self.kernel, self.stride, self.pad = tuple(kernel), tuple(stride), tuple(pad)
        # Rows/columns covering the image after the leading pad and every window.
        self.padded_size = tuple(max(p + s, (o - 1) * st + k) for p, s, o, st, k in zip(
            self.pad, self.size, self.pooled, self.stride, self.kernel))
        self.phase_width = -(-self.padded_size[1] // self.stride[1])
        self.phase_rows = -(-self.padded_size[0] // self.stride[0])
        self.is_global = self.pooled == (1, 1) and self.kernel == self.size and not any(pad)
        planes = x_shape[0] * x_shape[1]
        self.bands = _bands(planes, self.size[0] * self.size[1] * itemsize, _POOL_BAND_BYTES)

    def _column_placement(self):
        """``(phase, first position, first image column, columns)`` of every phase holding
        image columns."""
        pw, sw, w = self.pad[1], self.stride[1], self.size[1]
        for p in range(sw):
            first = -(-(pw - p) // sw)          # first position at padded column >= pw
            column = p + first * sw - pw
            if column < w:
                yield p, first, column, len(range(column, w, sw))

    def column_phases(self, images, fill):
        """The band's frame padded with ``fill``, split by column phase: ``(sw, planes,
        padded rows, Q)``."""
        if self.stride[1] == 1 and self.padded_size == self.size:
            return images[None]
        phases = np.full((self.stride[1], len(images), self.padded_size[0], self.phase_width),
                         fill, dtype=images.dtype)
        ph, h = self.pad[0], self.size[0]
        for p, first, column, count in self._column_placement():
            phases[p, :, ph:ph + h, first:first + count] = images[..., column::self.stride[1]]
        return phases

    def uncolumn_phases(self, phases, images):
        """Adjoint of :func:`column_phases`: the image part of the phases into ``images``."""
        ph, h = self.pad[0], self.size[0]
        for p, first, column, count in self._column_placement():
            images[..., column::self.stride[1]] = phases[p, :, ph:ph + h, first:first + count]

    def row_phases(self, rows, fill):
        """``(planes, padded rows, Q)`` split by row phase: ``(sh, planes, R, Q)``."""
        sh = self.stride[0]
        if sh == 1:
            return rows[None]
        phases = np.full((sh,) + rows.shape[:1] + (self.phase_rows,) + rows.shape[2:], fill,
                         dtype=rows.dtype)
        for q in range(sh):
            part = rows[:, q::sh]
            phases[q, :, :part.shape[1]] = part
        return phases

    def unrow_phases(self, phases):
        """Adjoint of :func:`row_phases`: ``(planes, padded rows, Q)``."""
        sh = self.stride[0]
        if sh == 1:
            return phases[0]
        rows = np.empty(phases.shape[1:2] + (self.padded_size[0],) + phases.shape[3:],
                        dtype=phases.dtype)
        for q in range(sh):
            count = len(range(q, self.padded_size[0], sh))
            rows[:, q::sh] = phases[q, :, :count]
        return rows

    def shifts(self, axis):
        """``(phase, flat shift)`` of every kernel offset along ``axis`` (0 rows, 1 columns)."""
        step, unit = self.stride[axis], (self.phase_width if axis == 0 else 1)
        return [(k % step, k // step * unit) for k in range(self.kernel[axis])]

    def _output(self, combined):
        """The outputs among the positions of a flat vertical result."""
        shape = (-1, self.phase_rows, self.phase_width)
        return combined.reshape(shape)[:, :self.pooled[0], :self.pooled[1]]

    def separable(self, phases, combine, fill):
        """``combine`` (``maximum`` or ``add``) of each window's values, as a view of the band's
        outputs: over a window's kw columns, then its kh rows, each kernel offset in order."""
        flat = phases.reshape(len(phases), -1)
        rows = flat[0].copy()
        for phase, shift in self.shifts(1)[1:]:
            combine(rows[:rows.size - shift], flat[phase, shift:], out=rows[:rows.size - shift])
        flat = self.row_phases(rows.reshape(phases.shape[1:]), fill).reshape(self.stride[0], -1)
        combined = flat[0].copy()
        for phase, shift in self.shifts(0)[1:]:
            end = combined.size - shift
            combine(combined[:end], flat[phase, shift:], out=combined[:end])
        return self._output(combined)

    def max_offsets(self, phases):
        """The maximum of every window and where its first occurrence (row-major) lies
        relative to the window's first pixel, ``i * W + j`` for kernel offset (i, j), as views
        of the band's outputs. Offsets grow along each pass, so "take the later offset where
        strictly larger" is a maximum: arithmetic instead of masked copies, which are slow on
        the CPU."""
        width = self.size[1]
        flat = phases.reshape(len(phases), -1)
        column_type = np.uint8 if self.kernel[1] <= 256 else np.int32
        rows, column = flat[0].copy(), np.zeros(flat.shape[1], dtype=column_type)
        larger, code = np.empty(rows.size, dtype=bool), np.empty(rows.size, dtype=column_type)
        for j, (phase, shift) in enumerate(self.shifts(1)[1:], 1):
            end = rows.size - shift
            np.greater(flat[phase, shift:], rows[:end], out=larger[:end])
            np.maximum(column[:end], np.multiply(larger[:end], column_type(j), out=code[:end]),
                       out=column[:end])
            np.maximum(rows[:end], flat[phase, shift:], out=rows[:end])
        flat = self.row_phases(rows.reshape(phases.shape[1:]), -np.inf)
        flat = flat.reshape(self.stride[0], -1)
        columns = self.row_phases(column.reshape(phases.shape[1:]), 0)
        columns = columns.reshape(self.stride[0], -1)
        best, offset = flat[0].copy(), columns[0].astype(np.int32)
        larger, code = larger[:best.size], np.empty(best.size, dtype=np.int32)
        for i, (phase, shift) in enumerate(self.shifts(0)[1:], 1):
            end = best.size - shift
            np.greater(flat[phase, shift:], best[:end], out=larger[:end])
            np.add(columns[phase, shift:], np.int32(i * width), out=code[:end])
            np.maximum(offset[:end], np.multiply(larger[:end], code[:end], out=code[:end]),
                       out=offset[:end])
            np.maximum(best[:end], flat[phase, shift:], out=best[:end])
        return self._output(best), self._output(offset)

    def window_area(self, dtype):
        """AVE divisor per output: the window clipped to the padded image (Caffe)."""
        sides = []
        for a in range(2):
            start = np.arange(self.pooled[a]) * self.stride[a] - self.pad[a]
            end = np.minimum(start + self.kernel[a], self.size[a] + self.pad[a])
            sides.append((end - start).astype(dtype))
        return sides[0][:, None] * sides[1][None, :]

    def window_bases(self):
        """Plane index h*W + w of every window's first (unclipped) pixel, ``(OH, OW)`` int32."""
        rows, columns = [np.arange(self.pooled[a]) * self.stride[a] - self.pad[a]
                         for a in range(2)]
        return (rows[:, None] * self.size[1] + columns[None, :]).astype(np.int32)


def max_pool_forward(x, y, argmax, kernel, stride, pad):
    """Caffe's MAX pooling of ``x`` (N, C, H, W) into ``y`` (N, C, OH, OW): each window's
    largest in-image value, and in ``argmax`` (int32, y's shape) its index h*W + w in the
    plane (the first in row-major order on ties); ``argmax`` None: the maximum alone."""
    pooling = _Pooling(x.shape, y.shape, kernel, stride, pad, x.itemsize)
    images, pooled = _planes(x), _planes(y, writable=True)
    indices = None if argmax is None else _planes(argmax, writable=True)
    bases = pooling.window_bases()

    def band(planes):
        if pooling.is_global:
            flat = images[planes].reshape(planes.stop - planes.start, -1)
            np.max(flat, axis=1, out=pooled[planes, 0, 0])
            if indices is not None:
                indices[planes, 0, 0] = np.argmax(flat, axis=1)
            return
        phases = pooling.column_phases(images[planes], -np.inf)
        if indices is None:
            pooled[planes] = pooling.separable(phases, np.maximum, -np.inf)
            return
        pooled[planes], offsets = pooling.max_offsets(phases)
        np.add(offsets, bases, out=indices[planes])

    threads.run_pieces(band, pooling.bands)


def max_pool_backward(dy, argmax, dx, kernel, stride, pad):
    """``dx`` (written, not added) = the sum of ``dy`` over the outputs whose maximum each
    input pixel was (``argmax`` from :func:`max_pool_forward`); sums of several outputs are
    formed in float64."""
    pooling = _Pooling(dx.shape, dy.shape, kernel, stride, pad, dx.itemsize)
    grads, indices, images = _planes(dy), _planes(argmax), _planes(dx, writable=True)
    plane_size = pooling.size[0] * pooling.size[1]

    def band(planes):
        count = planes.stop - planes.start
        flat = indices[planes] + (np.arange(count) * plane_size)[:, None, None]
        sums = np.bincount(flat.ravel(), weights=grads[planes].ravel(),
                           minlength=count * plane_size)
        images[planes] = sums.reshape(images[planes].shape)

    threads.run_pieces(band, pooling.bands)


def ave_pool_forward(x, y, kernel, stride, pad):
    """Caffe's AVE pooling: the in-image sum of each window over the area of the window
    clipped to the padded image."""
    pooling = _Pooling(x.shape, y.shape, kernel, stride, pad, x.itemsize)
    images, pooled = _planes(x), _planes(y, writable=True)
    area = pooling.window_area(y.dtype)

    def band(planes):
        if pooling.is_global:
            flat = images[planes].reshape(planes.stop - planes.start, -1)
            np.divide(flat.sum(axis=1), area[0, 0], out=pooled[planes, 0, 0])
            return
        sums = pooling.separable(pooling.column_phases(images[planes], 0), np.add, 0)
        np.divide(sums, area, out=pooled[planes])

    threads.run_pieces(band, pooling.bands)


def ave_pool_backward(dy, dx, kernel, stride, pad):
    """``dx`` (written) = each pixel's share of the gradient of every window containing it:
    the adjoint of the forward's passes, run backwards."""
    pooling = _Pooling(dx.shape, dy.shape, kernel, stride, pad, dx.itemsize)
    grads, images = _planes(dy), _planes(dx, writable=True)
    area = pooling.window_area(dy.dtype)
    (sh, sw), (rows, width) = pooling.stride, (pooling.phase_rows, pooling.phase_width)

    def band(planes):
        count = planes.stop - planes.start
        share = np.zeros((count, rows, width), dtype=dx.dtype)
        np.divide(grads[planes], area, out=share[:, :pooling.pooled[0], :pooling.pooled[1]])
        share = share.ravel()
        row_grads = np.zeros((sh, share.size), dtype=dx.dtype)
        for phase, shift in pooling.shifts(0):
            row_grads[phase, shift:] += share[:share.size - shift]
        row_grads = pooling.unrow_phases(row_grads.reshape((sh, count, -1, width))).ravel()
        column_grads = np.zeros((sw, row_grads.size), dtype=dx.dtype)
        for phase, shift in pooling.shifts(1):
            column_grads[phase, shift:] += row_grads[:row_grads.size - shift]
        pooling.uncolumn_phases(column_grads.reshape((sw, count, -1, width)), images[planes])

    threads.run_pieces(band, pooling.bands)
