"""The column layout every device's im2col uses, written plainly as the tests' reference.

Images ``(N, C, H, W)`` become a matrix ``(C * kh * kw, N * OH * OW)``: row ``(c, i, j)``
(row-major) holds input channel ``c`` at kernel offset ``(i, j)``, column ``(n, oh, ow)`` the
output position; the pixel read is ``(oh * sh - ph + i * dh, ow * sw - pw + j * dw)``, zero
outside the image. ``col2im`` is the adjoint: every entry is added back onto its pixel.
"""
import numpy as np


def _offsets(kernel, stride, dilation, out_size):
    for i in range(kernel[0]):
        rows = slice(i * dilation[0], i * dilation[0] + stride[0] * (out_size[0] - 1) + 1,
                     stride[0])
        for j in range(kernel[1]):
            columns = slice(j * dilation[1], j * dilation[1] + stride[1] * (out_size[1] - 1) + 1,
                            stride[1])
            yield i, j, rows, columns


def im2col(images, kernel, pad, stride, dilation, out_size):
    n, c, h, w = images.shape
    (ph, pw), (kh, kw) = pad, kernel
    padded = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=images.dtype)
    padded[:, :, ph:ph + h, pw:pw + w] = images
    cols = np.empty((c, kh, kw, n) + tuple(out_size), dtype=images.dtype)
    for i, j, rows, columns in _offsets(kernel, stride, dilation, out_size):
        cols[:, i, j] = padded[:, :, rows, columns].transpose(1, 0, 2, 3)
    return cols.reshape(c * kh * kw, -1)


def col2im(cols, image_shape, kernel, pad, stride, dilation, out_size):
    n, c, h, w = image_shape
    (ph, pw), (kh, kw) = pad, kernel
    padded = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    blocks = cols.reshape((c, kh, kw, n) + tuple(out_size))
    for i, j, rows, columns in _offsets(kernel, stride, dilation, out_size):
        padded[:, :, rows, columns] += blocks[:, i, j].transpose(1, 0, 2, 3)
    return padded[:, :, ph:ph + h, pw:pw + w]
