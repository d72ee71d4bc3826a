"""Convolution: ``conv_forward``, ``conv_backward_data``, ``conv_backward_filter``, each shape
served by its own algorithm.

The entry points have ``kernels.gpu``'s signatures and contracts: ``conv_forward(x, w, y,
...)`` writes ``y = conv(x, w)`` (no bias), ``conv_backward_data(dy, w, dx, ...)`` writes
``dx``, ``conv_backward_filter(x, dy, dw, ...)`` writes ``dw``, with x ``(N, C, H, W)``, w
``(M, C/group, kh, kw)``, y ``(N, M, OH, OW)``; each overwrites its output and always
succeeds. ``engine`` (the prototxt's engine name) does not change anything on the CPU. The
algorithm follows from the shapes:

* float32 3x3 or 5x5 with stride 1 and one group, at least ``winograd.MIN_CHANNELS`` channels
  in and out: ``winograd`` (F(4x4, 3x3), F(2x2, 5x5)), for the forward, the backward-data (the
  forward of dy with the kernel flipped) and the backward-filter (where its scratch is within
  bounds); measured 0.3-0.8x the direct kernel's time for the 3x3 forward, 0.3-0.4x for the
  backward-filter but with 16 channels in and out (ResNet's first stage: even), 0.4-0.6x for
  the 5x5s of cifar10_quick (bench/RESULTS.md, round 9);
* depthwise (one input channel per group): ``depthwise``;
* pointwise (1x1, stride 1, no pad, one group): matrix products on the NCHW layout, with no
  column matrix, big ones in bands of pixels; but on a CPU with AVX-512, for rows of more
  than 8 outputs, the forward is ``direct`` (its epilogue applied as it stores, no pass
  after: the 1x1s of MobileNet v1 and v2, GoogLeNet and SqueezeNet from 13x13 up measured
  0.54-0.98x the products' time; at 7x7, 1.2-1.5x) and the backward-data the direct forward of dy with the weights
  read transposed (SqueezeNet's conv10 at batch 4, 2.7 against 3.4 ms);
* few inputs per window (C/group * kh * kw <= ``_DIRECT_WINDOW``: first layers, CIFAR and
  MNIST nets): ``direct``, compiled loops with no column matrix, whose copies would cost
  more than these products (measured 1.1-1.9x faster forward and backward-filter up to 144
  inputs per window; slower from 288 on where output rows leave lanes of the tiles idle and
  BLAS's products win); also up to ``_DIRECT_WINDOW_ONE_THREAD`` inputs per
  window for a convolution too small to share out among the threads (the small-batch ResNets
  of inference: there im2col's copies and calls cost more than its product saves), and up to
  ``_DIRECT_WINDOW_WHOLE_TILES`` where output rows are whole tiles (a multiple of 16 values:
  no lane wasted), and for the forward alone up to ``_DIRECT_WINDOW_FORWARD`` (it runs on
  native.c's own threads), at any window on a CPU with AVX-512 (there the backward-filter
  too up to ``_DIRECT_WINDOW_SHORT_ROWS_AVX512`` for rows of at most 8 outputs); its
  backward-data as im2col's below;
* anything else: im2col and a matrix product per group, piece by piece (a few images, or a
  band of output rows), each piece's column matrix made just before its product so that it
  is still in cache. Its backward-data with stride 1, one group and no more output than input
  channels is the forward convolution of the output gradient with the flipped,
  channel-swapped kernel (itself direct or im2col by its own shape); otherwise col2im.

Convolutions big enough to repay the hand-off run their pieces on the worker threads, smaller
ones in turn, always with the BLAS held to one thread (``..threads``, ``shared``).
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .. import threads
from . import direct, native, shared, winograd
from .depthwise import depthwise_backward_data, depthwise_backward_filter, depthwise_forward
from .normalization import scale_forward

# -- convolution: the choice ---------------------------------------------------------------
_DIRECT_WINDOW = 160
# Measured on ResNet-56 at batch 2 (convolutions of 4.7 M multiply-adds, K = 144-576): the
# forward 15.3 ms with im2col from K = 288 on, 14.1 ms with direct to 288, 13.8 ms to 576.
_DIRECT_WINDOW_ONE_THREAD = 576
# Output rows of whole tiles (2 vectors of float32), forward / backward-filter ms, im2col
# against direct: (32,32,16,16) to 32 channels 5x5 (K = 800) 3.39-4.28 / 6.16-6.73 against
# 3.24-3.76 / 4.34-5.37; (4,32,224,224) to 64 3x3 66.38 / 105.02 against 44.32 / 49.66;
# (8,64,32,32) to 64 3x3 6.39 / 8.00 against 4.44 / 5.89; (4,64,112,112) to 128 3x3 even.
_DIRECT_WINDOW_WHOLE_TILES = 800
_TILE_WIDTH = 16
# The forward alone, since it runs on native.c's own threads: SqueezeNet deploy b2 18.80 /
# 19.02 ms (best / median of 5) with im2col from K = 288 on, 18.07 / 18.22 ms with direct to
# 576; its training step slower with the backward direct to 576 too (95.63 against 100.20
# ms), so the backward keeps the rules above.
_DIRECT_WINDOW_FORWARD = 576
# With native.c's AVX-512 builds (tiles of 8-16 channels) the forward measured faster direct
# at every window, best of 20 forwards with K up to 576 / any: GoogLeNet b2 61.71 / 53.46 ms,
# AlexNet b2 33.96 / 31.19, cifar10_full b2 0.97 / 0.81; training steps even.
_DIRECT_WINDOW_FORWARD_AVX512 = 1 << 30
# ... and the backward-filter up to this window where output rows are at most 8 wide (its
# 32-byte AVX-512 build), ms against im2col: (32,32,8,8) to 64 5x5 2.28 / 1.57, (32,64,8,8)
# to 64 3x3 1.29 / 1.15, LeNet's conv2 1.70 / 1.49; wider rows or windows mostly slower
# (AlexNet's conv3 10.76 / 24.04, (4,64,13,13) to 256 3x3 1.44 / 3.84).
_DIRECT_WINDOW_SHORT_ROWS_AVX512 = 800
_SHORT_ROWS_AVX512 = 8


def _algorithm(x_shape, w_shape, y_shape, pad, stride, group, forward=False):
    """"depthwise", "pointwise", "direct" or "im2col" for this convolution (module doc);
    ``forward``: for the forward pass."""
    if w_shape[1] == 1 and group == x_shape[1] and group > 1:
        return "depthwise"
    avx512 = 64 in native.vector_sizes()
    short_rows = avx512 and y_shape[3] <= _SHORT_ROWS_AVX512
    if group == 1 and w_shape[2:] == (1, 1) and tuple(stride) == (1, 1) and not any(pad):
        return "direct" if forward and avx512 and not short_rows else "pointwise"
    window = w_shape[1] * w_shape[2] * w_shape[3]
    one_thread = y_shape[0] * y_shape[1] * y_shape[2] * y_shape[3] * window \
        < shared.PARALLEL_MULTIPLY_ADDS
    whole_tiles = y_shape[3] % _TILE_WIDTH == 0
    forward_window = _DIRECT_WINDOW_FORWARD_AVX512 if avx512 else _DIRECT_WINDOW_FORWARD
    if window <= max(_DIRECT_WINDOW, _DIRECT_WINDOW_ONE_THREAD if one_thread else 0,
                     _DIRECT_WINDOW_WHOLE_TILES if whole_tiles else 0,
                     forward_window if forward else 0,
                     _DIRECT_WINDOW_SHORT_ROWS_AVX512 if short_rows else 0):
        return "direct"
    return "im2col"


def conv_forward(x, w, y, pad, stride, dilation, group, engine="default", scale=None,
                 shift=None, relu=False):
    """``y = conv(x, w)`` (no bias) written into ``y``: x ``(N, C, H, W)``, w
    ``(M, C/group, kh, kw)``, y ``(N, M, OH, OW)``; then times ``scale`` and plus ``shift``
    (M values each, or None) per channel and with ``relu`` max(., 0) taken (NaN kept): by the
    Winograd and direct kernels as they store their outputs, else as one pass after."""
    planned = winograd.plan(x.shape, w.shape, y.shape, pad, stride, dilation, group, y.dtype)
    if planned is not None:
        winograd.forward(planned, x, w, y, scale, shift, relu)
        return
    algorithm = _algorithm(x.shape, w.shape, y.shape, pad, stride, group, forward=True)
    if algorithm in ("direct", "depthwise"):
        run = direct.forward if algorithm == "direct" else depthwise_forward
        run(x, w, y, pad, stride, dilation, group, scale, shift, relu)
        return
    _FORWARD[algorithm](x, w, y, pad, stride, dilation, group)
    if scale is not None or shift is not None or relu:
        y3 = _images_as_matrices(y, output=True)
        scale_forward(y3, scale, shift, y3, None, relu)


def conv_backward_data(dy, w, dx, pad, stride, dilation, group, engine="default"):
    """Gradient of ``conv(x, w)`` with respect to x for output gradient ``dy``, written (not
    added) into ``dx``."""
    run = _BACKWARD_DATA[_algorithm(dx.shape, w.shape, dy.shape, pad, stride, group)]
    run(dy, w, dx, pad, stride, dilation, group)


def conv_backward_filter(x, dy, dw, pad, stride, dilation, group, engine="default"):
    """Gradient of ``conv(x, w)`` with respect to w for output gradient ``dy``, written (not
    added) into ``dw``."""
    planned = winograd.gradient_plan(x.shape, dw.shape, dy.shape, pad, stride, dilation, group,
                                     dw.dtype)
    if planned is not None:
        winograd.backward_filter(planned, x, dy, dw)
        return
    run = _BACKWARD_FILTER[_algorithm(x.shape, dw.shape, dy.shape, pad, stride, group)]
    run(x, dy, dw, pad, stride, dilation, group)


# -- pointwise: matrix products on the NCHW layout ---------------------------------------
# 2-d products per image (NumPy's stacked matmul does not always reach BLAS: measured 8x
# slower for a 1024x1024 weight on 7x7 images); a big convolution runs as pieces (bands of
# pixels of one image) on the worker threads.

def _pointwise_pieces(n, c, m, pixels):
    """``(pieces, parallel)``: ``(image, start, stop)`` pieces of about ``shared.PIECE_ELEMENTS``
    input values each (at least ``shared.PIECE_POSITIONS`` pixels) to run on the worker threads,
    or whole images in turn when the convolution is small."""
    if n * c * m * pixels < shared.PARALLEL_MULTIPLY_ADDS:
        return [(i, 0, pixels) for i in range(n)], False
    band = shared.piece_positions(n * pixels, c)
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
    if 64 in native.vector_sizes() and dx.shape[3] > _SHORT_ROWS_AVX512:
        # The forward of dy with the transposed weights, through the direct kernel (module
        # doc).
        direct.forward(dy, w, dx, pad, stride, dilation, group, transposed=True)
        return
    weights_t = w.reshape(w.shape[0], -1).T
    dy3, dx3 = _images_as_matrices(dy), _images_as_matrices(dx, output=True)
    threads.run_pieces(lambda piece: _pointwise_product(weights_t, dy3, dx3, piece),
                       *_pointwise_pieces(*dx3.shape[:2], dy3.shape[1], dx3.shape[2]))


def _pointwise_backward_filter(x, dy, dw, pad, stride, dilation, group):
    x3, dy3 = _images_as_matrices(x), _images_as_matrices(dy)

    def add_piece(piece, out, accumulate):
        i, start, stop = piece
        shared.write_or_add(out, dy3[i][:, start:stop] @ x3[i][:, start:stop].T, accumulate)

    shared.sum_of_pieces(*_pointwise_pieces(*x3.shape[:2], dy3.shape[1], x3.shape[2]),
                         add_piece, dw.reshape((dw.shape[0], -1), copy=False))


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
        self.parallel = parallel = multiply_adds >= shared.PARALLEL_MULTIPLY_ADDS
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
        if parallel and len(self.pieces) == 1 and self.mg >= 2 * shared.MIN_PIECES:
            edges = [self.mg * k // shared.MIN_PIECES for k in range(shared.MIN_PIECES + 1)]
            self.channel_bands = [(g, slice(a, b)) for g in range(group)
                                  for a, b in zip(edges, edges[1:])]

    def _view(self, images, pad, kernel, stride, dilation):
        n, c, h, w = images.shape
        ph, pw = pad
        oh, ow = self.out_size
        (sh, sw), (dh, dw) = stride, dilation
        if self.layout == "channel-major":
            frame = np.ascontiguousarray(shared.zero_padded(images, pad))           # (N, C, H, W)
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
        In pieces, each column matrix holds about ``shared.PIECE_ELEMENTS`` values and at least
        ``shared.PIECE_POSITIONS`` positions (a product must be long enough to repay packing the
        weights); batch-last pieces are bands of rows of the whole batch."""
        n, (oh, ow) = self.n, self.out_size
        if not parallel:
            return [(0, n, 0, oh)]
        positions = shared.piece_positions(n * oh * ow, columns_per_position)
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

    def products(self, piece, dtype):
        """An empty array for a piece's products, as :func:`write` takes them."""
        n0, n1, r0, r1 = piece
        positions = (n1 - n0) * (r1 - r0) * self.out_size[1]
        shape = (positions, self.mg) if self.positions_first else (self.mg, positions)
        return np.empty((self.group,) + shape, dtype=dtype)

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


def _im2col_forward(x, w, y, pad, stride, dilation, group):
    columns = _Columns(x, w.shape, pad, stride, dilation, group, y.shape[2:])
    weights = columns.weights(w)

    def multiply(g, matrix, products, channels=slice(None)):
        """Group ``g``'s products for output channels ``channels`` into ``products[g]``."""
        if columns.positions_first:
            np.matmul(matrix, weights[g][channels].T, out=products[g][:, channels])
        else:
            np.matmul(weights[g][channels], matrix, out=products[g][channels])

    if columns.channel_bands:
        whole = columns.pieces[0]
        matrices = [columns.matrix(whole, g) for g in range(group)]
        products = columns.products(whole, y.dtype)
        threads.run_pieces(lambda part: multiply(part[0], matrices[part[0]], products, part[1]),
                           columns.channel_bands)
        columns.write(products, y, whole)
        return

    def piece(bounds):
        products = columns.products(bounds, y.dtype)
        for g in range(group):
            multiply(g, columns.matrix(bounds, g), products)
        columns.write(products, y, bounds)

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
                shared.write_or_add(out[g], product(columns.matrix(bounds, g),
                                                    columns.piece_rows(rows, bounds, g)),
                                    accumulate)

        shared.sum_of_pieces(columns.pieces, columns.parallel, add_piece, total)
    if first:
        dw[...] = total.reshape(group, m // group, kh, kw, cg).transpose(0, 1, 4, 2, 3) \
            .reshape(dw.shape)
    else:
        dw[...] = total.reshape(dw.shape)


# With AVX-512's direct forward, the flipped backward-data also where M > C, for outputs the
# size of the input and rows at most this wide or a flipped window of at most this many
# inputs. Measured against col2im, ms: (32,32,8,8) to 64 5x5 1.68 / 1.20, (32,64,8,8) to
# 128 3x3 2.31 / 1.85, SqueezeNet's (4,16,55,55) to 64 3x3 1.84 / 1.51, (4,32,27,27) to 128
# 3x3 1.52 / 1.48; slower for (4,96,27,27) to 256 5x5, 19.49 / 21.34, and for LeNet's conv2
# (no pad: dy padded by 4), 2.01 / 5.22.
_FLIPPED_ROWS = 16
_FLIPPED_WINDOW = 576


def _flipped_or_col2im_backward_data(dy, w, dx, pad, stride, dilation, group):
    flipped_pad = tuple(d * (k - 1) - p for d, k, p in zip(dilation, w.shape[2:], pad))
    planned = winograd.plan(dy.shape, w.shape, dx.shape, flipped_pad, stride, dilation, group,
                            dx.dtype, flipped=True)
    if planned is not None:
        # The flipped forward below, by Winograd, which reads w flipped where it lies.
        winograd.forward(planned, dy, w, dx)
        return
    flipped_cheaper = w.shape[0] <= w.shape[1] or (
        flipped_pad == tuple(pad) and 64 in native.vector_sizes()
        and (dy.shape[3] <= _FLIPPED_ROWS or w[:, 0].size <= _FLIPPED_WINDOW))
    if group == 1 and tuple(stride) == (1, 1) and min(flipped_pad) >= 0 and flipped_cheaper:
        # With stride 1, dx is the convolution of dy (padded by d*(k-1) - p) with the kernel
        # flipped in space and with input and output channels swapped: a forward convolution
        # of dy replaces col2im, whose scattered adds cost more whenever M <= C (measured
        # 1.2-1.8x faster with NumPy's col2im; slower when M > C, where the column matrix of
        # dy is the larger, but for small "same" convolutions with the AVX-512 forward).
        flipped = np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
        conv_forward(dy, flipped, dx, flipped_pad, stride, dilation, 1)
        return
    n, m, oh, ow = dy.shape
    parallel = n * m * oh * ow * w[0].size >= shared.PARALLEL_MULTIPLY_ADDS and n > 1
    # Whole images per piece (the windows of neighbouring rows overlap), about
    # shared.PIECE_ELEMENTS column values each.
    step = max(1, shared.PIECE_ELEMENTS // (oh * ow * w[0].size)) if parallel else n
    images = [(a, min(a + step, n)) for a in range(0, n, step)]
    threads.run_pieces(lambda part: _col2im_backward_data(
        dy[part[0]:part[1]], w, dx[part[0]:part[1]], pad, stride, dilation, group), images,
        parallel)


# Backward-data by col2im: the column gradients (rows (c, i, j), columns (n, oh, ow)) as one
# product per group, added back into the images by native.c's col2im in one pass.
def _col2im_backward_data(dy, w, dx, pad, stride, dilation, group):
    n, c, h, wd = dx.shape
    m, cg, kh, kw = w.shape
    oh, ow = dy.shape[2:]
    dy_groups = np.ascontiguousarray(dy.transpose(1, 0, 2, 3)).reshape(group, m // group, -1)
    weights = w.reshape(group, m // group, -1)
    dcols = np.empty((group, weights.shape[2], dy_groups.shape[2]), dtype=dx.dtype)
    for g in range(group):
        np.matmul(weights[g].T, dy_groups[g], out=dcols[g])
    if not dx.flags.c_contiguous:
        raise ValueError("conv_backward_data writes into a C-contiguous dx")
    native.function("col2im", dx.dtype)(
        native.address(dcols), native.address(dx), n, c, 0, c, h, wd, kh, kw, oh, ow, *stride,
        *pad, *dilation)


# Each algorithm's three kernels, all with the entry points' arguments (less ``engine``).
_FORWARD = {"depthwise": depthwise_forward, "pointwise": _pointwise_forward,
            "direct": direct.forward, "im2col": _im2col_forward}
_BACKWARD_DATA = {"depthwise": depthwise_backward_data, "pointwise": _pointwise_backward_data,
                  "direct": _flipped_or_col2im_backward_data,
                  "im2col": _flipped_or_col2im_backward_data}
_BACKWARD_FILTER = {"depthwise": depthwise_backward_filter,
                    "pointwise": _pointwise_backward_filter, "direct": direct.backward_filter,
                    "im2col": _im2col_backward_filter}
