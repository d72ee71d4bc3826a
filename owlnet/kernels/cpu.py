"""NumPy kernels: im2col / col2im and convolution through them.

Column layout of ``im2col`` (shared with any other device's module): images of shape
``(N, C, H, W)`` become a matrix of shape ``(C * kh * kw, N * OH * OW)``; row ``(c, i, j)``
(row-major) holds input channel ``c`` at kernel offset ``(i, j)`` and column ``(n, oh, ow)``
(row-major) the output position, so the input pixel read is
``(oh * sh - ph + i * dh, ow * sw - pw + j * dw)``, zero outside the image. ``col2im`` is its
adjoint: it adds every column entry back onto the pixel it was read from.

``conv_forward``, ``conv_backward_data`` and ``conv_backward_filter`` have the signatures and
contracts of the GPU module's (arrays in, result written into the last array, True returned).
Inside, when output rows are short they order the columns ``(oh, ow, n)`` instead, batch
innermost: every copy then moves runs of ``OW * N`` contiguous values rather than ``OW``,
which is what makes im2col and col2im cheap for the small late layers of a CNN.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

# Output rows narrower than this use the batch-innermost column order (see the module doc).
_SHORT_ROW = 16


def _zero_padded(images, pad):
    ph, pw = pad
    if not (ph or pw):
        return images
    n, c, h, w = images.shape
    padded = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=images.dtype)
    padded[:, :, ph:ph + h, pw:pw + w] = images
    return padded


def _columns(images, kernel, pad, stride, dilation, out_size, batch_last):
    """The patch matrix, columns ordered ``(n, oh, ow)``, or ``(oh, ow, n)`` if batch_last."""
    n, c = images.shape[:2]
    kh, kw = kernel
    sh, sw = stride
    dh, dw = dilation
    oh, ow = out_size
    padded = _zero_padded(images, pad)
    if batch_last:
        source = np.ascontiguousarray(padded.transpose(1, 2, 3, 0))      # (C, H, W, N)
        s_c, s_h, s_w, s_n = source.strides
        shape = (c, kh, kw, oh, ow, n)
        strides = (s_c, s_h * dh, s_w * dw, s_h * sh, s_w * sw, s_n)
    else:
        source = padded
        s_n, s_c, s_h, s_w = source.strides
        shape = (c, kh, kw, n, oh, ow)
        strides = (s_c, s_h * dh, s_w * dw, s_n, s_h * sh, s_w * sw)
    patches = as_strided(source, shape=shape, strides=strides, writeable=False)
    return patches.reshape(c * kh * kw, -1)


def _kernel_windows(kernel, stride, dilation, out_size):
    """``(i, j, rows, columns)``: where kernel offset ``(i, j)`` reads in the padded image."""
    for i in range(kernel[0]):
        rows = slice(i * dilation[0], i * dilation[0] + stride[0] * (out_size[0] - 1) + 1,
                     stride[0])
        for j in range(kernel[1]):
            columns = slice(j * dilation[1], j * dilation[1] + stride[1] * (out_size[1] - 1) + 1,
                            stride[1])
            yield i, j, rows, columns


def _uncolumns(cols, image_shape, kernel, pad, stride, dilation, out_size, batch_last):
    """Adjoint of :func:`_columns`: an ``(N, C, H, W)`` view of the summed images."""
    n, c, h, w = image_shape
    kh, kw = kernel
    ph, pw = pad
    oh, ow = out_size
    windows = _kernel_windows(kernel, stride, dilation, out_size)
    if batch_last:
        padded = np.zeros((c, h + 2 * ph, w + 2 * pw, n), dtype=cols.dtype)
        blocks = cols.reshape(c, kh, kw, oh, ow, n)
        for i, j, rows, columns in windows:
            padded[:, rows, columns] += blocks[:, i, j]
        return padded[:, ph:ph + h, pw:pw + w].transpose(3, 0, 1, 2)
    padded = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    blocks = cols.reshape(c, kh, kw, n, oh, ow)
    for i, j, rows, columns in windows:
        padded[:, :, rows, columns] += blocks[:, i, j].transpose(1, 0, 2, 3)
    return padded[:, :, ph:ph + h, pw:pw + w]


def im2col(images, kernel, pad, stride, dilation, out_size):
    """``(N, C, H, W)`` images -> ``(C*kh*kw, N*OH*OW)`` patch matrix (see the module doc)."""
    return _columns(images, kernel, pad, stride, dilation, out_size, False)


def col2im(cols, image_shape, kernel, pad, stride, dilation, out_size):
    """Adjoint of :func:`im2col`: sum the ``(C*kh*kw, N*OH*OW)`` matrix back onto images."""
    return _uncolumns(cols, image_shape, kernel, pad, stride, dilation, out_size, False)


# -- convolution -------------------------------------------------------------------------------
def _positions(images, group, batch_last):
    """``(N, M, OH, OW)`` -> ``(group, M/group, positions)`` in the column order (a copy)."""
    n, m = images.shape[:2]
    order = (1, 2, 3, 0) if batch_last else (1, 0, 2, 3)
    return np.ascontiguousarray(images.transpose(order)).reshape(group, m // group, -1)


def _to_images(matrix, out, batch_last):
    """Write ``(M, positions)`` into ``out`` of shape ``(N, M, OH, OW)``."""
    n, m, oh, ow = out.shape
    if batch_last:
        out[...] = matrix.reshape(m, oh, ow, n).transpose(3, 0, 1, 2)
    else:
        out[...] = matrix.reshape(m, n, oh, ow).transpose(1, 0, 2, 3)


def _group_matmul(a, b, out):
    """``out[g] = a[g] @ b[g]`` as 2-d BLAS products (the stacked matmul skips BLAS when an
    operand is a transposed view)."""
    for g in range(a.shape[0]):
        np.matmul(a[g], b[g], out=out[g])
    return out


def _geometry(x_shape, w_shape, y_shape):
    group = x_shape[1] // w_shape[1]
    return group, tuple(w_shape[2:]), tuple(y_shape[2:]), y_shape[3] < _SHORT_ROW


def conv_forward(x, w, y, pad, stride, dilation) -> bool:
    """``y = conv(x, w)`` (no bias) written into ``y``: x ``(N, C, H, W)``, w
    ``(M, C/group, kh, kw)``, y ``(N, M, OH, OW)``."""
    group, kernel, out_size, batch_last = _geometry(x.shape, w.shape, y.shape)
    cols = _columns(x, kernel, pad, stride, dilation, out_size, batch_last)
    weights = w.reshape(group, w.shape[0] // group, -1)
    products = np.empty((group, weights.shape[1], cols.shape[1]), dtype=y.dtype)
    _group_matmul(weights, cols.reshape(group, -1, cols.shape[1]), products)
    _to_images(products.reshape(w.shape[0], -1), y, batch_last)
    return True


def conv_backward_data(dy, w, dx, pad, stride, dilation) -> bool:
    """Gradient of ``conv(x, w)`` with respect to x for output gradient ``dy``, written (not
    added) into ``dx``."""
    group, kernel, out_size, batch_last = _geometry(dx.shape, w.shape, dy.shape)
    weights = w.reshape(group, w.shape[0] // group, -1)
    dy_groups = _positions(dy, group, batch_last)
    dcols = np.empty((group, weights.shape[2], dy_groups.shape[2]), dtype=dx.dtype)
    _group_matmul(weights.transpose(0, 2, 1), dy_groups, dcols)
    dx[...] = _uncolumns(dcols.reshape(-1, dcols.shape[2]), dx.shape, kernel, pad, stride,
                         dilation, out_size, batch_last)
    return True


def conv_backward_filter(x, dy, dw, pad, stride, dilation) -> bool:
    """Gradient of ``conv(x, w)`` with respect to w for output gradient ``dy``, written (not
    added) into ``dw``."""
    group, kernel, out_size, batch_last = _geometry(x.shape, dw.shape, dy.shape)
    cols = _columns(x, kernel, pad, stride, dilation, out_size, batch_last)
    cols = cols.reshape(group, -1, cols.shape[1])
    _group_matmul(_positions(dy, group, batch_last), cols.transpose(0, 2, 1),
                  dw.reshape(group, dw.shape[0] // group, -1))
    return True
