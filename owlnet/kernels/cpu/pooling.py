"""Caffe's MAX and AVE pooling, with ``kernels.gpu``'s entry points, on the compiled loops of
``native.c`` (one pass over the planes, where NumPy needed one pass per kernel offset).

The entry points have kernels.gpu's signatures: x (N, C, H, W), y and argmax (N, C, OH, OW),
kernel / stride / pad pairs. Every (n, c) plane pools on its own, so the planes are cut into
bands by shape (``shared.bands``, one below 256 KB) pooled side by side on native.c's own
threads; a plane's result does not depend on its band.
"""
from __future__ import annotations

import numpy as np

from .. import threads
from . import native, shared

_POOL_BAND_BYTES = 1 << 22
# Pooling of fewer bytes than this runs as one band (native.c's threads hand off in
# microseconds, a pass over 256 KB takes about ten).
_SERIAL_BYTES = 1 << 18
# native.c's pool_bands: which pass.
_FORWARD, _MAX_BACKWARD, _AVE_BACKWARD = range(3)


def _pool(kind, inputs, outputs, kernel, stride, pad, size, pooled, is_max=False):
    """native.c's pooling pass ``kind`` over bands of planes on its threads: ``inputs`` then
    ``outputs`` are (N, C, ...) arrays (up to two each; a None output goes as a null pointer),
    the first input giving the element type; ``size`` (H, W) and ``pooled`` (OH, OW) are the
    plane sizes of the image and the pooled arrays. The forward gets two scratch planes per
    band (the rows combined along the kernel's columns, and for an argmax their columns)."""
    for a in outputs:
        if a is not None and not a.flags.c_contiguous:
            raise ValueError(f"pooling writes into C-contiguous arrays, not strides {a.strides}")
    inputs = [np.ascontiguousarray(a) for a in inputs]
    dtype = inputs[0].dtype
    planes = inputs[0].shape[0] * inputs[0].shape[1]
    plane_bytes = max(size[0] * size[1], pooled[0] * pooled[1]) * dtype.itemsize
    bands = 1 if planes * plane_bytes < _SERIAL_BYTES else len(
        shared.bands(planes, plane_bytes, _POOL_BAND_BYTES))
    values = columns = None
    if kind == _FORWARD:
        values = np.empty(bands * size[0] * pooled[1], dtype=dtype)
        if outputs[1] is not None:
            columns = np.empty(bands * size[0] * pooled[1], dtype=np.int32)
    pointers = native.addresses(*(inputs + [None] * (2 - len(inputs))),
                                *(list(outputs) + [None] * (2 - len(outputs))), values, columns)
    native.function("pool_bands", dtype)(kind, *pointers, int(is_max), planes, *size, *pooled,
                                         *kernel, *stride, *pad, bands, threads.workers())


def max_pool_forward(x, y, argmax, kernel, stride, pad):
    """Caffe's MAX pooling of ``x`` (N, C, H, W) into ``y`` (N, C, OH, OW): each window's
    largest in-image value, and in ``argmax`` (int32, y's shape) its index h*W + w in the
    plane (the first in row-major order on ties); ``argmax`` None: the maximum alone."""
    _pool(_FORWARD, [x], [y, argmax], kernel, stride, pad, x.shape[2:], y.shape[2:], True)


def max_pool_backward(dy, argmax, dx, kernel, stride, pad):
    """``dx`` (written, not added) = the sum of ``dy`` over the outputs whose maximum each
    input pixel was (``argmax`` from :func:`max_pool_forward`), added in output order."""
    _pool(_MAX_BACKWARD, [dy, argmax], [dx], kernel, stride, pad, dx.shape[2:], dy.shape[2:])


def ave_pool_forward(x, y, kernel, stride, pad):
    """Caffe's AVE pooling: the in-image sum of each window over the area of the window
    clipped to the padded image."""
    _pool(_FORWARD, [x], [y, None], kernel, stride, pad, x.shape[2:], y.shape[2:])


def ave_pool_backward(dy, dx, kernel, stride, pad):
    """``dx`` (written) = each pixel's share of the gradient of every window containing it,
    added in output order."""
    _pool(_AVE_BACKWARD, [dy], [dx], kernel, stride, pad, dx.shape[2:], dy.shape[2:])
