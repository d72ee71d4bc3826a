"""NumPy kernels: convolution, each shape served by its own algorithm.

Convolution entry points (the same signatures and contracts as ``kernels.gpu``'s):
``conv_forward(x, w, y, ...)`` writes ``y = conv(x, w)`` (no bias), ``conv_backward_data(dy, w,
dx, ...)`` writes ``dx``, ``conv_backward_filter(x, dy, dw, ...)`` writes ``dw``, with x
``(N, C, H, W)``, w ``(M, C/group, kh, kw)``, y ``(N, M, OH, OW)``; each overwrites its
output and always succeeds. ``engine`` (the prototxt's engine name) does not change anything
on the CPU. The algorithm follows from the shapes:

* depthwise (one input channel per group): a direct sum over the kh*kw kernel offsets, each
  one vectorised multiply-add over the whole batch; no column matrix, no loop over groups;
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

# Depthwise output rows narrower than this use the spatial-first frame (see below).
_DEPTHWISE_SHORT_ROW = 32

# Elements of one piece's column matrix (1 MB of float32, a core's share of the L2 cache
# here), and the fewest output positions (rows of the column matrix) a piece has.
_PIECE_ELEMENTS = 1 << 18
_PIECE_POSITIONS = 128

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
    """``out = a @ b`` (2-d): with at most ``_FEW_ROWS`` rows in ``a``, in blocks of ``b``'s
    columns under ``_UNPACKED_MULTIPLY_ADDS``; otherwise, when big enough to share out, in four
    bands of ``a``'s rows (of at least ``_PIECE_POSITIONS`` rows)."""
    rows, inner = a.shape
    if rows <= _FEW_ROWS:
        width = max(1, _UNPACKED_MULTIPLY_ADDS // max(1, rows * inner))
        pieces = [(0, rows, start, min(start + width, b.shape[1]))
                  for start in range(0, b.shape[1], width)]
    elif rows * inner * b.shape[1] >= _PARALLEL_MULTIPLY_ADDS:
        band = max(_PIECE_POSITIONS, -(-rows // 4))
        pieces = [(start, min(start + band, rows), 0, b.shape[1])
                  for start in range(0, rows, band)]
    else:
        pieces = [(0, rows, 0, b.shape[1])]

    def piece(bounds):
        r0, r1, c0, c1 = bounds
        np.matmul(a[r0:r1], b[:, c0:c1], out=out[r0:r1, c0:c1])

    threads.run_pieces(piece, pieces, parallel=a.size * b.shape[1] >= _PARALLEL_MULTIPLY_ADDS)


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

def _pointwise_pieces(n, c, m, pixels):
    """``(pieces, parallel)``: ``(image, start, stop)`` pieces of about ``_PIECE_ELEMENTS``
    input values each (at least ``_PIECE_POSITIONS`` pixels) to run on the worker threads,
    or whole images in turn when the convolution is small."""
    if n * c * m * pixels < _PARALLEL_MULTIPLY_ADDS:
        return [(i, 0, pixels) for i in range(n)], False
    band = max(_PIECE_POSITIONS, _PIECE_ELEMENTS // c)
    return [(i, s, min(s + band, pixels)) for i in range(n) for s in range(0, pixels, band)], True


def _pointwise_product(a, b, out, piece):
    """``out[i][:, s:e] = a @ b[i][:, s:e]`` for piece ``(i, s, e)``."""
    i, start, stop = piece
    if stop - start == out.shape[2]:
        np.matmul(a, b[i], out=out[i])
    else:
        out[i][:, start:stop] = a @ b[i][:, start:stop]


def _images_as_matrices(images):
    return images.reshape(images.shape[0], images.shape[1], -1)


def _pointwise_forward(x, w, y, pad, stride, dilation, group):
    weights, x3, y3 = w.reshape(w.shape[0], -1), _images_as_matrices(x), _images_as_matrices(y)
    threads.run_pieces(lambda piece: _pointwise_product(weights, x3, y3, piece),
         *_pointwise_pieces(*x3.shape[:2], y3.shape[1], x3.shape[2]))


def _pointwise_backward_data(dy, w, dx, pad, stride, dilation, group):
    weights_t = w.reshape(w.shape[0], -1).T
    dy3, dx3 = _images_as_matrices(dy), _images_as_matrices(dx)
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
                   dw.reshape(dw.shape[0], -1))


# -- depthwise: a multiply-add per kernel offset -----------------------------------------
# Channel c of x feeds outputs c*k .. c*k + k - 1 (k = M / C), so the kernels give that
# multiplier an axis of its own. Arrays are laid out as a "frame": (N, C, k, H, W), or, when
# output rows are short or the stride is not 1, spatial axes first, (H, W, N, C, k), so that
# every multiply-add runs over N*C*k contiguous values instead of a row of a few pixels.

def _depthwise_layout(y_shape, stride):
    """True: spatial axes first (see above); measured faster also for every strided layer."""
    return y_shape[3] < _DEPTHWISE_SHORT_ROW or tuple(stride) != (1, 1)


def _frame(images, pad, spatial_first, fill=True):
    """``(N, C, H, W)`` images zero-padded as a frame with a multiplier axis of 1; a view where
    nothing is to be copied. ``fill=False`` leaves the interior unwritten (zeros)."""
    n, c, h, w = images.shape
    ph, pw = pad
    if not spatial_first:
        if not fill:
            return np.zeros((n, c, 1, h + 2 * ph, w + 2 * pw), dtype=images.dtype)
        return _zero_padded(images, pad)[:, :, None]
    frame = np.zeros((h + 2 * ph, w + 2 * pw, n, c, 1), dtype=images.dtype)
    if fill:
        frame[ph:ph + h, pw:pw + w, :, :, 0] = images.transpose(2, 3, 0, 1)
    return frame


def _frame_images(frame, spatial_first):
    """Inverse of :func:`_frame` without the pad: an ``(N, C*k, H, W)``-ordered view."""
    if spatial_first:
        frame = frame.transpose(2, 3, 4, 0, 1)
    n, c, k = frame.shape[:3]
    return frame.reshape(n, c * k, *frame.shape[3:])


def _frame_view(images, k, spatial_first):
    """``(N, C*k, H, W)`` images as an ``(N, C, k, H, W)`` view, or a spatial-first copy."""
    n, m = images.shape[:2]
    framed = images.reshape(n, m // k, k, *images.shape[2:])
    return np.ascontiguousarray(framed.transpose(3, 4, 0, 1, 2)) if spatial_first else framed


def _window(rows, columns, spatial_first):
    return (rows, columns) if spatial_first else (Ellipsis, rows, columns)


def _tap(taps, i, j, spatial_first):
    """Weights of kernel offset (i, j), ``(C, k)``, shaped to broadcast over a frame."""
    return taps[:, :, i, j] if spatial_first else taps[:, :, i, j, None, None]


def _depthwise_forward(x, w, y, pad, stride, dilation, group):
    n, c = x.shape[:2]
    first = _depthwise_layout(y.shape, stride)
    taps = w.reshape(c, -1, *w.shape[2:])
    k = taps.shape[1]
    padded = _frame(x, pad, first)
    if first:
        out = np.empty(y.shape[2:] + (n, c, k), dtype=y.dtype)
    else:
        out = y.reshape(n, c, k, *y.shape[2:])
    term = np.empty_like(out)
    for i, j, rows, columns in _kernel_windows(w.shape[2:], stride, dilation, y.shape[2:]):
        window = padded[_window(rows, columns, first)]
        if i == 0 and j == 0:
            np.multiply(window, _tap(taps, i, j, first), out=out)
        else:
            out += np.multiply(window, _tap(taps, i, j, first), out=term)
    if first:
        y[...] = _frame_images(out, first)


def _depthwise_backward_data(dy, w, dx, pad, stride, dilation, group):
    c, h, wd = dx.shape[1:]
    ph, pw = pad
    first = _depthwise_layout(dy.shape, stride)
    taps = w.reshape(c, -1, *w.shape[2:])
    k = taps.shape[1]
    grads = _frame_view(dy, k, first)
    padded = _frame(dx, pad, first, fill=False)
    k_axis = -1 if first else 2
    term = np.empty_like(grads)
    for i, j, rows, columns in _kernel_windows(w.shape[2:], stride, dilation, dy.shape[2:]):
        np.multiply(grads, _tap(taps, i, j, first), out=term)
        padded[_window(rows, columns, first)] += term.sum(axis=k_axis, keepdims=True) \
            if k > 1 else term
    inner = padded[ph:ph + h, pw:pw + wd] if first else padded[..., ph:ph + h, pw:pw + wd]
    dx[...] = _frame_images(inner, first)


def _depthwise_backward_filter(x, dy, dw, pad, stride, dilation, group):
    c = x.shape[1]
    first = _depthwise_layout(dy.shape, stride)
    taps = dw.reshape(c, -1, *dw.shape[2:])
    grads = _frame_view(dy, taps.shape[1], first)
    padded = _frame(x, pad, first)
    spec = "hwnck,hwncl->ck" if first else "nckhw,nclhw->ck"
    for i, j, rows, columns in _kernel_windows(dw.shape[2:], stride, dilation, dy.shape[2:]):
        taps[:, :, i, j] = np.einsum(spec, grads, padded[_window(rows, columns, first)])


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
# thread even for M of 16-64). Smaller ones are one product, which OpenBLAS parallelises.

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
        positions = max(_PIECE_POSITIONS, _PIECE_ELEMENTS // columns_per_position)
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
        """``(M, C/g, kh, kw)`` as ``(g, K/g, M/g)`` in channels-last window order, else as
        ``(g, M/g, K/g)``."""
        per_group = w.reshape(self.group, self.mg, -1)
        if not self.positions_first:
            return per_group
        kh, kw = w.shape[2:]
        cl = w.reshape(self.group, self.mg, self.cg, kh, kw).transpose(0, 3, 4, 2, 1)
        return np.ascontiguousarray(cl).reshape(self.group, -1, self.mg)

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
        target = y.reshape(y.shape[0], g, mg, *self.out_size)[n0:n1, :, :, r0:r1]
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

    def piece(bounds):
        products = [columns.matrix(bounds, g) @ weights[g] if columns.positions_first
                    else weights[g] @ columns.matrix(bounds, g) for g in range(group)]
        columns.write(np.stack(products) if group > 1 else products[0], y, bounds)

    threads.run_pieces(piece, columns.pieces, columns.parallel)


def _im2col_backward_filter(x, dy, dw, pad, stride, dilation, group):
    columns = _Columns(x, dw.shape, pad, stride, dilation, group, dy.shape[2:])
    rows = columns.output_rows(dy)

    def add_piece(bounds, out, accumulate):
        for g in range(group):
            cols, grads = columns.matrix(bounds, g), columns.piece_rows(rows, bounds, g)
            product = cols.T @ grads if columns.positions_first else grads @ cols.T
            if accumulate:
                out[g] += product
            else:
                out[g] = product

    m, cg, kh, kw = dw.shape
    total = np.empty((group,) + ((kh * kw * cg, m // group) if columns.positions_first
                                 else (m // group, cg * kh * kw)), dtype=dw.dtype)
    _sum_of_pieces(columns.pieces, columns.parallel, add_piece, total)
    if columns.positions_first:
        total = total.reshape(group, kh, kw, cg, m // group).transpose(0, 4, 3, 1, 2)
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
