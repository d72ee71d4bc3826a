"""Caffe's MAX and AVE pooling, with ``kernels.gpu``'s entry points, on the compiled loops of
``native.c`` (one pass over the planes, where NumPy needed one pass per kernel offset).

The entry points have kernels.gpu's signatures: x (N, C, H, W), y and argmax (N, C, OH, OW),
kernel / stride / pad pairs. Every (n, c) plane pools on its own, so the planes are cut into
bands (``shared.bands``) pooled side by side on ``run_pieces``' threads; a plane's result
does not depend on its band.
"""
from __future__ import annotations

import numpy as np

from .. import threads
from . import native, shared

_POOL_BAND_BYTES = 1 << 22


def _pool(name, inputs, outputs, kernel, stride, pad, size, pooled, options=()):
    """Run native ``name`` over bands of planes: ``inputs`` then ``outputs`` are (N, C, ...)
    arrays (a None output goes as a null pointer), the first input giving the element type;
    ``size`` (H, W) and ``pooled`` (OH, OW) are the plane sizes of the image and the pooled
    arrays. The forward gets two scratch planes per band (the rows combined along the kernel's
    columns, and for an argmax their columns) and the ``options`` (MAX or not)."""
    for a in outputs:
        if a is not None and not a.flags.c_contiguous:
            raise ValueError(f"pooling writes into C-contiguous arrays, not strides {a.strides}")
    arrays = [np.ascontiguousarray(a) for a in inputs] + list(outputs)
    planes = inputs[0].shape[0] * inputs[0].shape[1]
    compiled = native.function(name, inputs[0].dtype)
    geometry = (*size, *pooled, *kernel, *stride, *pad)

    def band(part):
        pointers = [None if a is None else native.address(a, part.start * (a.size // planes))
                    for a in arrays]
        if name == "pool_forward":
            values = np.empty(size[0] * pooled[1], dtype=inputs[0].dtype)
            columns = np.empty(size[0] * pooled[1], dtype=np.int32) if pointers[2] else None
            pointers += [native.address(values),
                         None if columns is None else native.address(columns)]
        compiled(*pointers, *options, part.stop - part.start, *geometry)

    plane_bytes = max(size[0] * size[1], pooled[0] * pooled[1]) * inputs[0].itemsize
    threads.run_pieces(band, shared.bands(planes, plane_bytes, _POOL_BAND_BYTES), blas=False)


def max_pool_forward(x, y, argmax, kernel, stride, pad):
    """Caffe's MAX pooling of ``x`` (N, C, H, W) into ``y`` (N, C, OH, OW): each window's
    largest in-image value, and in ``argmax`` (int32, y's shape) its index h*W + w in the
    plane (the first in row-major order on ties); ``argmax`` None: the maximum alone."""
    _pool("pool_forward", [x], [y, argmax], kernel, stride, pad, x.shape[2:], y.shape[2:], (1,))


def max_pool_backward(dy, argmax, dx, kernel, stride, pad):
    """``dx`` (written, not added) = the sum of ``dy`` over the outputs whose maximum each
    input pixel was (``argmax`` from :func:`max_pool_forward`), added in output order."""
    _pool("max_pool_backward", [dy, argmax], [dx], kernel, stride, pad, dx.shape[2:],
          dy.shape[2:])


def ave_pool_forward(x, y, kernel, stride, pad):
    """Caffe's AVE pooling: the in-image sum of each window over the area of the window
    clipped to the padded image."""
    _pool("pool_forward", [x], [y, None], kernel, stride, pad, x.shape[2:], y.shape[2:], (0,))


def ave_pool_backward(dy, dx, kernel, stride, pad):
    """``dx`` (written) = each pixel's share of the gradient of every window containing it,
    added in output order."""
    _pool("ave_pool_backward", [dy], [dx], kernel, stride, pad, dx.shape[2:], dy.shape[2:])
