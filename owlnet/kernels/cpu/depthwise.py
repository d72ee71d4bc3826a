"""Depthwise convolution (one input channel per group): a direct sum over the kernel
offsets, no column matrix, no loop over groups."""
from __future__ import annotations

import numpy as np

from .. import threads
from . import shared

# -- depthwise: a multiply-add per kernel offset ----------------------------------------------
# Channel c of x feeds outputs c*k .. c*k + k - 1 (k = M / C). Each kernel offset is one
# multiply-add pass; what decides the speed is how long the runs of values these passes
# stream are, and how many passes (NumPy calls) there are. Two layouts, by output row length:
#
# * rows of _DEPTHWISE_SHORT_ROW outputs or more: every (n, c) plane on its own, as one flat
#   array. The zero-padded frame is split into sh x sw phases (padded pixel (r, q) goes to
#   phase (r % sh, q % sw) at (r // sh, q // sw)), each (planes, R * Q): kernel offset (i, j)
#   of output (oh, ow) is then phase ((i*dh) % sh, (j*dw) % sw) at flat position oh*Q + ow +
#   (i*dh // sh) * Q + j*dw // sw, so each pass is a shifted copy of a whole plane. Positions
#   past an output row's last output read the start of the next row: they are computed and
#   never read back, and the backward passes give them zero gradient. The planes are cut into
#   bands (of at most _DEPTHWISE_BAND_BYTES of working arrays) run side by side on
#   run_pieces' threads; few large bands, since every NumPy call costs the threads a hand-off
#   of the GIL (measured: 115 bands of 256 KB took 3x as long as 8 bands).
# * shorter rows (the small late layers): spatial axes first, a frame (H, W, N, C, k), so
#   that every pass runs over N*C*k contiguous values instead of a row of a few pixels; the
#   forward and backward-data in bands of channels on the threads.
# Every output value is computed the same way whatever the bands: the results do not depend
# on the number of threads.

_DEPTHWISE_SHORT_ROW = 32
_DEPTHWISE_BAND_BYTES = 1 << 23
_SHORT_ROW_BAND_BYTES = 1 << 20

class _Depthwise:
    """One depthwise geometry for the planar kernels: bands of planes, phases, offsets."""

    def __init__(self, x_shape, w_shape, y_shape, pad, stride, dilation, itemsize):
        n, c, h, w = x_shape
        (ph, pw), (sh, sw), (dh, dw) = pad, stride, dilation
        self.channels, self.multiplier = c, w_shape[0] // c
        self.size, self.out_size, self.pad, self.stride = (h, w), tuple(y_shape[2:]), pad, stride
        self.phase_size = (-(-(h + 2 * ph) // sh), -(-(w + 2 * pw) // sw))
        width = self.phase_size[1]
        self.offsets = [((i * dh % sh) * sw + j * dw % sw, i * dh // sh * width + j * dw // sw)
                        for i in range(w_shape[2]) for j in range(w_shape[3])]
        planes = n * c
        plane_bytes = self.phase_size[0] * width * sh * sw * itemsize * (1 + 2 * self.multiplier)
        self.bands = shared.bands(planes, plane_bytes, _DEPTHWISE_BAND_BYTES)

    def _placement(self):
        """``(phase, image rows, image columns, phase rows, phase columns)`` for each phase
        holding image pixels."""
        (h, w), (ph, pw), (sh, sw) = self.size, self.pad, self.stride
        for a in range(sh):
            for b in range(sw):
                row, column = (a - ph) % sh, (b - pw) % sw      # first image pixel in the phase
                if row < h and column < w:
                    rows, columns = len(range(row, h, sh)), len(range(column, w, sw))
                    first_row, first_column = (ph + row) // sh, (pw + column) // sw
                    yield (a * sw + b, slice(row, None, sh), slice(column, None, sw),
                           slice(first_row, first_row + rows),
                           slice(first_column, first_column + columns))

    def phases(self, images):
        """``(planes, H, W)`` images as the phases of their zero-padded frame:
        ``(sh * sw, planes, R * Q)``."""
        phases = np.zeros((self.stride[0] * self.stride[1], len(images)) + self.phase_size,
                          dtype=images.dtype)
        for phase, rows, columns, phase_rows, phase_columns in self._placement():
            phases[phase, :, phase_rows, phase_columns] = images[:, rows, columns]
        return phases.reshape(phases.shape[:2] + (-1,))

    def unphase(self, phases, images):
        """Adjoint of :meth:`phases` (each pixel lies in one phase): write ``images``."""
        phases = phases.reshape(phases.shape[:2] + self.phase_size)
        for phase, rows, columns, phase_rows, phase_columns in self._placement():
            images[:, rows, columns] = phases[phase, :, phase_rows, phase_columns]

    def weights(self, w, planes):
        """The kernel of every plane in the band: ``(planes, k, kh * kw)``."""
        taps = w.reshape(self.channels, self.multiplier, -1)
        return taps[np.arange(planes.start, planes.stop) % self.channels]

    def outputs(self, array):
        """``(N, C*k, OH, OW)`` as ``(N*C, k, OH, OW)``, a view."""
        return array.reshape((-1, self.multiplier) + self.out_size, copy=False)

    def spread(self, grads):
        """``(planes, k, OH, OW)`` output gradients as flat ``(planes, k, R * Q)`` rows, zero
        past each output row."""
        spread = np.zeros(grads.shape[:2] + self.phase_size, dtype=grads.dtype)
        spread[..., :self.out_size[0], :self.out_size[1]] = grads
        return spread.reshape(grads.shape[:2] + (-1,))


def _planar_forward(x, w, y, pad, stride, dilation):
    geometry = _Depthwise(x.shape, w.shape, y.shape, pad, stride, dilation, x.itemsize)
    images, outputs = shared.planes(x), geometry.outputs(y)
    oh, ow = geometry.out_size

    def band(planes):
        phases, weights = geometry.phases(images[planes]), geometry.weights(w, planes)
        out = np.empty(weights.shape[:2] + phases.shape[2:], dtype=y.dtype)
        term = np.empty_like(out)
        for tap, (phase, shift) in enumerate(geometry.offsets):
            end = out.shape[2] - shift
            product = np.multiply(phases[phase, :, None, shift:], weights[:, :, tap, None],
                                  out=term[..., :end] if tap else out)
            if tap:
                np.add(out[..., :end], product, out=out[..., :end])
        outputs[planes] = out.reshape(out.shape[:2] + geometry.phase_size)[..., :oh, :ow]

    threads.run_pieces(band, geometry.bands)


def _planar_backward_data(dy, w, dx, pad, stride, dilation):
    geometry = _Depthwise(dx.shape, w.shape, dy.shape, pad, stride, dilation, dx.itemsize)
    grads, images = geometry.outputs(dy), shared.planes(dx, writable=True)

    def band(planes):
        spread, weights = geometry.spread(grads[planes]), geometry.weights(w, planes)
        phases = np.zeros((geometry.stride[0] * geometry.stride[1],) + spread.shape[::2],
                          dtype=dx.dtype)
        term = np.empty_like(spread)
        for tap, (phase, shift) in enumerate(geometry.offsets):
            end = spread.shape[2] - shift
            np.multiply(spread[..., :end], weights[:, :, tap, None], out=term[..., :end])
            phases[phase, :, shift:] += term[:, 0, :end] if geometry.multiplier == 1 \
                else term[..., :end].sum(axis=1)
        geometry.unphase(phases, images[planes])

    threads.run_pieces(band, geometry.bands)


def _planar_backward_filter(x, dy, dw, pad, stride, dilation):
    """The sum over the batch of per-image sums, in image order (the same with any threads)."""
    geometry = _Depthwise(x.shape, dw.shape, dy.shape, pad, stride, dilation, x.itemsize)
    images, grads = shared.planes(x), geometry.outputs(dy)
    per_plane = np.empty((len(images), geometry.multiplier, len(geometry.offsets)),
                         dtype=dw.dtype)

    def band(planes):
        phases, spread = geometry.phases(images[planes]), geometry.spread(grads[planes])
        for tap, (phase, shift) in enumerate(geometry.offsets):
            end = spread.shape[2] - shift
            per_plane[planes, :, tap] = np.einsum("pl,pkl->pk", phases[phase, :, shift:],
                                                  spread[..., :end])

    threads.run_pieces(band, geometry.bands)
    dw[...] = per_plane.reshape(x.shape[0], -1).sum(axis=0).reshape(dw.shape)


def _spatial_frame(images, pad, fill=True):
    """``(N, C, H, W)`` images zero-padded as a ``(H, W, N, C, 1)`` frame; ``fill=False``
    leaves the interior unwritten (zeros)."""
    n, c, h, w = images.shape
    ph, pw = pad
    frame = np.zeros((h + 2 * ph, w + 2 * pw, n, c, 1), dtype=images.dtype)
    if fill:
        frame[ph:ph + h, pw:pw + w, :, :, 0] = images.transpose(2, 3, 0, 1)
    return frame


def _spatial_images(frame):
    """Inverse of :func:`_spatial_frame` without the pad: an ``(N, C*k, H, W)``-ordered view."""
    h, w, n, c, k = frame.shape
    return frame.transpose(2, 3, 4, 0, 1).reshape(n, c * k, h, w)


def _spatial_view(images, k):
    """``(N, C*k, H, W)`` images as an ``(H, W, N, C, k)`` copy."""
    n, m = images.shape[:2]
    framed = images.reshape(n, m // k, k, *images.shape[2:])
    return np.ascontiguousarray(framed.transpose(3, 4, 0, 1, 2))


def _channel_bands(x_shape, y_shape, k, itemsize):
    """Bands of input channels for the spatial-first kernels, each computed on its own."""
    n, c, h, w = x_shape
    per_channel = n * itemsize * (h * w + 2 * k * y_shape[2] * y_shape[3])
    return shared.bands(c, per_channel, _SHORT_ROW_BAND_BYTES)


def _spatial_forward(x, w, y, pad, stride, dilation):
    taps = w.reshape(x.shape[1], -1, *w.shape[2:])
    k = taps.shape[1]

    def band(channels):
        padded = _spatial_frame(x[:, channels], pad)
        out = np.empty(y.shape[2:] + padded.shape[2:4] + (k,), dtype=y.dtype)
        term = np.empty_like(out)
        offsets = shared.kernel_windows(w.shape[2:], stride, dilation, y.shape[2:])
        for i, j, rows, columns in offsets:
            tap = taps[channels, :, i, j]
            if i == 0 and j == 0:
                np.multiply(padded[rows, columns], tap, out=out)
            else:
                out += np.multiply(padded[rows, columns], tap, out=term)
        y[:, channels.start * k:channels.stop * k] = _spatial_images(out)

    threads.run_pieces(band, _channel_bands(x.shape, y.shape, k, x.itemsize))


def _spatial_backward_data(dy, w, dx, pad, stride, dilation):
    h, wd = dx.shape[2:]
    ph, pw = pad
    taps = w.reshape(dx.shape[1], -1, *w.shape[2:])
    k = taps.shape[1]

    def band(channels):
        grads = _spatial_view(dy[:, channels.start * k:channels.stop * k], k)
        padded = _spatial_frame(dx[:, channels], pad, fill=False)
        term = np.empty_like(grads)
        for i, j, rows, columns in shared.kernel_windows(w.shape[2:], stride, dilation,
                                                   dy.shape[2:]):
            np.multiply(grads, taps[channels, :, i, j], out=term)
            padded[rows, columns] += term.sum(axis=-1, keepdims=True) if k > 1 else term
        dx[:, channels] = _spatial_images(padded[ph:ph + h, pw:pw + wd])

    threads.run_pieces(band, _channel_bands(dx.shape, dy.shape, k, dx.itemsize))


def _spatial_backward_filter(x, dy, dw, pad, stride, dilation):
    """One einsum per kernel offset over the whole batch (bands measured no faster)."""
    taps = dw.reshape(x.shape[1], -1, *dw.shape[2:])
    grads = _spatial_view(dy, taps.shape[1])
    padded = _spatial_frame(x, pad)
    for i, j, rows, columns in shared.kernel_windows(dw.shape[2:], stride, dilation, dy.shape[2:]):
        taps[:, :, i, j] = np.einsum("hwnck,hwncl->ck", grads, padded[rows, columns])


def depthwise_forward(x, w, y, pad, stride, dilation, group):
    short = y.shape[3] < _DEPTHWISE_SHORT_ROW
    (_spatial_forward if short else _planar_forward)(x, w, y, pad, stride, dilation)


def depthwise_backward_data(dy, w, dx, pad, stride, dilation, group):
    short = dy.shape[3] < _DEPTHWISE_SHORT_ROW
    (_spatial_backward_data if short else _planar_backward_data)(dy, w, dx, pad, stride,
                                                                 dilation)


def depthwise_backward_filter(x, dy, dw, pad, stride, dilation, group):
    short = dy.shape[3] < _DEPTHWISE_SHORT_ROW
    (_spatial_backward_filter if short else _planar_backward_filter)(x, dy, dw, pad, stride,
                                                                     dilation)
