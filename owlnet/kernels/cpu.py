"""NumPy kernels: im2col / col2im for convolution.

Column layout (shared with any other device's module): ``im2col`` turns images of shape
``(N, C, H, W)`` into a matrix of shape ``(C * kh * kw, N * OH * OW)``; row ``(c, i, j)``
(row-major) holds input channel ``c`` at kernel offset ``(i, j)`` and column ``(n, oh, ow)``
(row-major) the output position, so the input pixel read is
``(oh * sh - ph + i * dh, ow * sw - pw + j * dw)``, zero outside the image. ``col2im`` is its
adjoint: it adds every column entry back onto the pixel it was read from.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided


def _zero_padded(images, pad):
    ph, pw = pad
    if not (ph or pw):
        return images
    n, c, h, w = images.shape
    padded = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=images.dtype)
    padded[:, :, ph:ph + h, pw:pw + w] = images
    return padded


def im2col(images, kernel, pad, stride, dilation, out_size):
    """``(N, C, H, W)`` images -> ``(C*kh*kw, N*OH*OW)`` patch matrix (see the module doc)."""
    n, c = images.shape[:2]
    kh, kw = kernel
    sh, sw = stride
    dh, dw = dilation
    oh, ow = out_size
    padded = _zero_padded(images, pad)
    s_n, s_c, s_h, s_w = padded.strides
    patches = as_strided(padded, shape=(c, kh, kw, n, oh, ow),
                         strides=(s_c, s_h * dh, s_w * dw, s_n, s_h * sh, s_w * sw),
                         writeable=False)
    return patches.reshape(c * kh * kw, n * oh * ow)


def col2im(cols, image_shape, kernel, pad, stride, dilation, out_size):
    """Adjoint of :func:`im2col`: sum the ``(C*kh*kw, N*OH*OW)`` matrix back onto images."""
    n, c, h, w = image_shape
    kh, kw = kernel
    ph, pw = pad
    sh, sw = stride
    dh, dw = dilation
    oh, ow = out_size
    padded = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    blocks = cols.reshape(c, kh, kw, n, oh, ow)
    for i in range(kh):
        rows = slice(i * dh, i * dh + sh * (oh - 1) + 1, sh)
        for j in range(kw):
            columns = slice(j * dw, j * dw + sw * (ow - 1) + 1, sw)
            padded[:, :, rows, columns] += blocks[:, i, j].transpose(1, 0, 2, 3)
    return padded[:, :, ph:ph + h, pw:pw + w]
