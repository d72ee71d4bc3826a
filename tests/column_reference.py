"""The column layout every device's im2col uses, written plainly as the tests' reference.

Images ``(N, C, H, W)`` become a matrix ``(C * kh * kw, N * OH * OW)``: row ``(c, i, j)``
(row-major) holds input channel ``c`` at kernel offset ``(i, j)``, column ``(n, oh, ow)`` the
output position; the pixel read is ``(oh * sh - ph + i * dh, ow * sw - pw + j * dw)``, zero
outside the image. ``col2im`` is the adjoint: every entry is added back onto its pixel.
"""
import numpy as np


def _read_pixels(kernel, stride, dilation, out_size):
    """Row and column, in the zero-padded image, read for (i, j, oh, ow): index arrays that
    broadcast to ``(kh, kw, OH, OW)``."""
    i, j, oh, ow = np.ix_(*(np.arange(size) for size in (*kernel, *out_size)))
    return oh * stride[0] + i * dilation[0], ow * stride[1] + j * dilation[1]


def _padded(shape, pad, dtype):
    n, c, h, w = shape
    return np.zeros((n, c, h + 2 * pad[0], w + 2 * pad[1]), dtype=dtype)


def im2col(images, kernel, pad, stride, dilation, out_size):
    n, c, h, w = images.shape
    padded = _padded(images.shape, pad, images.dtype)
    padded[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + w] = images
    rows, columns = _read_pixels(kernel, stride, dilation, out_size)
    patches = padded[:, :, rows, columns]                       # (N, C, kh, kw, OH, OW)
    return patches.transpose(1, 2, 3, 0, 4, 5).reshape(c * kernel[0] * kernel[1], -1)


def col2im(cols, image_shape, kernel, pad, stride, dilation, out_size):
    n, c, h, w = image_shape
    padded = _padded(image_shape, pad, cols.dtype)
    rows, columns = _read_pixels(kernel, stride, dilation, out_size)
    values = cols.reshape((c, *kernel, n, *out_size)).transpose(3, 0, 1, 2, 4, 5)
    np.add.at(padded, (slice(None), slice(None), rows, columns), values)
    return padded[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + w]
