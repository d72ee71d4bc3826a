"""Per-channel passes on the compiled loops of ``native.c``: BatchNorm with batch statistics
(alone, or with the Scale and ReLU that follow it in a training net, ``owlnet.fusion``),
Scale's forward and backward, the per-channel sums of Bias gradients, ReLU's gradient, LRN
across channels.
``kernels.gpu`` has the same entry points.

Arrays are viewed as ``(outer, C, inner)`` (channel c the middle index). Channels are cut into
bands by shape (``_run_bands``) run on native.c's own threads (their hand-off costs
microseconds, so passes from 256 KB up are shared: a BatchNorm of (4, 512, 14, 14) forward
0.104 -> 0.062 ms, backward 0.131 -> 0.078 against one Python-threaded band), each band's
values read once per pass while still in cache; sums add blocks of vectors into float64
lanes in a fixed order, so results do not depend on the threads.
"""
from __future__ import annotations

import numpy as np

from .. import threads
from . import native, shared

_BAND_BYTES = 1 << 21
# These passes run at memory speed on native.c's own threads, whose hand-off costs a few
# microseconds (a pass over 256 KB about ten): smaller passes are one band.
_SERIAL_BYTES = 1 << 18
# native.c's channel_bands: which pass.
_BATCH_NORM_FORWARD, _BATCH_NORM_BACKWARD, _CHANNEL_PASS, _SCALE_FORWARD, _RELU_BACKWARD = range(5)


def _run_bands(kind, dtype, pointers, shape, relu=False, eps=0.0):
    """native.c's pass ``kind`` over arrays of ``shape`` (outer, C, inner) with ``pointers``
    (None for a null one), in bands of channels (of values for ReLU's gradient) cut by shape:
    one below _SERIAL_BYTES, else ``shared.MIN_PIECES`` or more where a band would hold
    over _BAND_BYTES."""
    outer, channels, inner = shape
    size = outer * channels * inner * np.dtype(dtype).itemsize
    units = -(-outer * channels * inner // 64) if kind == _RELU_BACKWARD else channels
    bands = 1 if size < _SERIAL_BYTES else min(units, max(shared.MIN_PIECES,
                                                          -(-size // _BAND_BYTES)))
    native.function("channel_bands", dtype)(
        kind, *pointers, *[None] * (8 - len(pointers)), outer, channels, inner, int(relu),
        eps, bands, threads.workers())


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
    stats = np.empty((3, x3.shape[1]), dtype=x3.dtype)
    operands = [None if a is None else np.ascontiguousarray(a, dtype=x3.dtype)
                for a in (scale, bias)]
    outputs = [_contiguous_output(y3)] + ([] if kept is None else [_contiguous_output(kept)])
    _run_bands(_BATCH_NORM_FORWARD, x3.dtype,
               native.addresses(x3, outputs[0], kept, *stats, *operands), x3.shape, relu, eps)
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
    sum_g, sum_gx = np.empty((2, dy3.shape[1]), dtype=dy3.dtype)
    _contiguous_output(dx3)
    _run_bands(_BATCH_NORM_BACKWARD, dy3.dtype, native.addresses(
        dy3, normalized3, inv_std, dx3, scale, relu_top, sum_g, sum_gx), dy3.shape)
    return sum_gx, sum_g


def _channel_pass(dy3, x3, scale, dx3, sum_dy, sum_dyx):
    """native.c's channel_pass over bands of channels (None arrays go as null pointers)."""
    _run_bands(_CHANNEL_PASS, dy3.dtype,
               native.addresses(dy3, x3, scale, dx3, sum_dy, sum_dyx), dy3.shape)


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
    scale, bias = [None if a is None else np.ascontiguousarray(a, dtype=x3.dtype)
                   for a in (scale, bias)]
    for output in (y3, kept):
        if output is not None:
            _contiguous_output(output)
    _run_bands(_SCALE_FORWARD, x3.dtype, native.addresses(x3, scale, bias, y3, kept),
               x3.shape, relu)


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
    _contiguous_output(dx)
    _run_bands(_RELU_BACKWARD, dy.dtype, native.addresses(dy, x, dx), (1, 1, dy.size))


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
