"""Per-channel passes on the compiled loops of ``native.c``: BatchNorm with batch statistics
(alone, or with the Scale and ReLU that follow it in a training net, ``owlnet.fusion``),
Scale's forward and backward, the per-channel sums of Bias gradients, ReLU's gradient, LRN
across channels.
``kernels.gpu`` has the same entry points.

Arrays are viewed as ``(outer, C, inner)`` (channel c the middle index). Channels are cut into
bands by shape (``shared.bands``) run on the worker threads, each band's values read once per
pass while still in cache; sums add blocks of vectors into float64 lanes in a fixed order, so
results do not depend on the threads.
"""
from __future__ import annotations

import numpy as np

from .. import threads
from . import native, shared

_BAND_BYTES = 1 << 21
# These passes run at memory speed (a 2 MB sum in 0.04 ms on one thread, against ~0.09 ms for
# a hand-off to the worker threads): arrays smaller than this are one band.
_PARALLEL_BYTES = 1 << 23


def _bands(count, item_bytes):
    if count * item_bytes < _PARALLEL_BYTES:
        return [slice(0, count)]
    return shared.bands(count, item_bytes, _BAND_BYTES)


def _channel_bands(array3):
    outer, channels, inner = array3.shape
    return _bands(channels, outer * inner * array3.itemsize)


def _contiguous_output(array):
    if not array.flags.c_contiguous:
        raise ValueError("the per-channel kernels write into C-contiguous arrays")
    return array


def batch_norm_forward(x3, y3, kept, eps, scale=None, bias=None, relu=False):
    """Batch statistics per channel c of ``x3`` (outer, C, inner), m = outer * inner values:
    mean = sum x / m, var = sum (x - mean)^2 / m, inv_std = 1 / sqrt(var + eps);
    xhat = (x - mean) * inv_std, copied into ``kept`` unless None, and ``y3`` = xhat, or
    xhat * scale[c] + bias[c] (each when given), then max(., 0) with ``relu``: a BatchNorm,
    or a BatchNorm with the Scale and ReLU after it in one pass (``y3`` may be ``x3``).
    Returns ``(mean, var, inv_std)``, each (C,) of x's type."""
    x3 = np.ascontiguousarray(x3)
    outer, channels, inner = x3.shape
    stats = np.empty((3, channels), dtype=x3.dtype)
    operands = [None if a is None else np.ascontiguousarray(a, dtype=x3.dtype)
                for a in (scale, bias)]
    compiled = native.function("batch_norm_forward", x3.dtype)
    outputs = [_contiguous_output(y3)] + ([] if kept is None else [_contiguous_output(kept)])
    pointers = native.addresses(x3, outputs[0], kept, *stats, *operands)

    def band(part):
        compiled(*pointers, outer, channels, inner, part.start, part.stop, int(relu), eps)

    threads.run_pieces(band, _channel_bands(x3), blas=False)
    return stats[0], stats[1], stats[2]


def batch_norm_backward(dy3, normalized3, inv_std, dx3, scale=None, relu_top=None):
    """The gradient of ``batch_norm_forward``: g = dy, or dy * (top > 0) for ``relu_top`` (the
    forward's output, its ReLU applied); ``dx3`` = (g - mean(g) - xhat * mean(g * xhat)) *
    inv_std * scale[c] (scale 1 unless given), xhat ``normalized3`` (``dx3`` may be ``dy3``).
    Returns ``(sum of g * xhat, sum of g)`` per channel: Scale's parameter gradients."""
    dy3, normalized3 = np.ascontiguousarray(dy3), np.ascontiguousarray(normalized3)
    inv_std = np.ascontiguousarray(inv_std, dtype=dy3.dtype)
    scale = None if scale is None else np.ascontiguousarray(scale, dtype=dy3.dtype)
    relu_top = None if relu_top is None else np.ascontiguousarray(relu_top, dtype=dy3.dtype)
    outer, channels, inner = dy3.shape
    sum_g, sum_gx = np.empty((2, channels), dtype=dy3.dtype)
    compiled = native.function("batch_norm_backward", dy3.dtype)
    _contiguous_output(dx3)
    pointers = native.addresses(dy3, normalized3, inv_std, dx3, scale, relu_top, sum_g, sum_gx)

    def band(part):
        compiled(*pointers, outer, channels, inner, part.start, part.stop)

    threads.run_pieces(band, _channel_bands(dy3), blas=False)
    return sum_gx, sum_g


def _channel_pass(dy3, x3, scale, dx3, sum_dy, sum_dyx):
    """native.c's channel_pass over bands of channels (None arrays go as null pointers)."""
    outer, channels, inner = dy3.shape
    compiled = native.function("channel_pass", dy3.dtype)
    pointers = native.addresses(dy3, x3, scale, dx3, sum_dy, sum_dyx)

    def band(part):
        compiled(*pointers, outer, channels, inner, part.start, part.stop)

    threads.run_pieces(band, _channel_bands(dy3), blas=False)


def channel_sums(a3, b3=None):
    """The sum over outer and inner of ``a3`` (times ``b3`` when given) per channel: (C,)."""
    a3 = np.ascontiguousarray(a3)
    b3 = None if b3 is None else np.ascontiguousarray(b3, dtype=a3.dtype)
    sums = np.empty(a3.shape[1], dtype=a3.dtype)
    _channel_pass(a3, b3, None, None, sums if b3 is None else None, None if b3 is None else sums)
    return sums


def scale_forward(x3, scale, bias, y3, kept, relu=False):
    """Scale's forward per channel c of ``x3`` (outer, C, inner): ``y3`` = x * scale[c] +
    bias[c] (each unless None), then max(., 0) with ``relu``, after copying x into ``kept``
    unless None (``y3`` may be ``x3``)."""
    x3 = np.ascontiguousarray(x3)
    outer, channels, inner = x3.shape
    scale, bias = [None if a is None else np.ascontiguousarray(a, dtype=x3.dtype)
                   for a in (scale, bias)]
    for output in (y3, kept):
        if output is not None:
            _contiguous_output(output)
    compiled = native.function("scale_forward", x3.dtype)
    pointers = native.addresses(x3, scale, bias, y3, kept)

    def band(part):
        compiled(*pointers, outer, channels, inner, part.start, part.stop, int(relu))

    threads.run_pieces(band, _channel_bands(x3), blas=False)


def scale_backward(dy3, x3, scale, dx3):
    """Scale's backward per channel c: ``(sum of dy * x, sum of dy)`` (the first None when
    ``x3`` is None), and ``dx3`` = dy * scale[c] unless ``dx3`` is None (it may be ``dy3``)."""
    dy3 = np.ascontiguousarray(dy3)
    x3 = None if x3 is None else np.ascontiguousarray(x3, dtype=dy3.dtype)
    scale = np.ascontiguousarray(scale, dtype=dy3.dtype)
    if dx3 is not None:
        _contiguous_output(dx3)
    sum_dy = np.empty(dy3.shape[1], dtype=dy3.dtype)
    sum_dyx = None if x3 is None else np.empty(dy3.shape[1], dtype=dy3.dtype)
    _channel_pass(dy3, x3, scale, dx3, sum_dy, sum_dyx)
    return sum_dyx, sum_dy


def relu_backward(dy, x, dx):
    """ReLU's gradient (no negative slope): ``dx`` = dy * (x > 0) (``dx`` may be ``dy``)."""
    dy, x = np.ascontiguousarray(dy), np.ascontiguousarray(x)
    compiled = native.function("relu_backward", dy.dtype)
    _contiguous_output(dx)
    size = dy.size
    pieces = _bands(size, dy.itemsize)

    def band(part):
        compiled(native.address(dy, part.start), native.address(x, part.start),
                 native.address(dx, part.start), part.stop - part.start)

    threads.run_pieces(band, pieces, blas=False)


def lrn_across_channels_forward(x, y, scale, power, size, coeff, shift, beta):
    """LRN across channels of ``x`` (N, C, H, W): s = shift + coeff * (sum of x^2 over the
    ``size`` channels centred on each, inside the blob), ``y`` = x * s^-beta; ``scale`` and
    ``power`` (both None, or arrays like x) get s and s^-beta. Pieces: images."""
    x = np.ascontiguousarray(x)
    n, c = x.shape[:2]
    positions = x[0, 0].size
    for output in (y, scale, power):
        if output is not None:
            _contiguous_output(output)
    compiled = native.function("lrn_forward", x.dtype)
    image = c * positions

    def piece(part):
        compiled(*[None if a is None else native.address(a, part.start * image)
                   for a in (x, y, scale, power)],
                 part.stop - part.start, c, positions, size, coeff, shift, beta)

    pieces = [slice(i, i + 1) for i in range(n)] if x.nbytes >= shared.SPLIT_BYTES \
        else [slice(0, n)]
    threads.run_pieces(piece, pieces, len(pieces) > 1, blas=False)


def lrn_across_channels_backward(x, dy, dx, scale, power, size, coeff, beta):
    """The gradient of LRN across channels, written into ``dx``: dy * s^-beta - 2 coeff beta
    * x * (sum over the ``size`` channels centred on each, inside the blob, of dy * x *
    s^-beta / s), with ``scale`` and ``power`` the forward's s and s^-beta. Pieces: images."""
    x, dy, scale, power = (np.ascontiguousarray(a, dtype=x.dtype) for a in (x, dy, scale, power))
    _contiguous_output(dx)
    n, c = x.shape[:2]
    positions = x[0, 0].size
    compiled = native.function("lrn_backward", x.dtype)
    image = c * positions

    def piece(part):
        ratio = np.empty(c * 256, dtype=x.dtype)
        compiled(*[native.address(a, part.start * image) for a in (x, dy, scale, power, dx)],
                 native.address(ratio), part.stop - part.start, c, positions, size,
                 -2 * coeff * beta)

    pieces = [slice(i, i + 1) for i in range(n)] if x.nbytes >= shared.SPLIT_BYTES \
        else [slice(0, n)]
    threads.run_pieces(piece, pieces, len(pieces) > 1, blas=False)
