"""Caffe's MAX and AVE pooling, with ``kernels.gpu``'s entry points."""
from __future__ import annotations

import numpy as np

from .. import threads
from . import shared

# -- pooling: Caffe's MAX and AVE over bands of planes ----------------------------------------
# The entry points have kernels.gpu's signatures: x (N, C, H, W), y and argmax (N, C, OH, OW),
# kernel / stride / pad pairs; windows start at (oh*sh - ph, ow*sw - pw) and span kh x kw.
# Every (n, c) plane pools on its own, so the planes are cut into bands (two per worker
# thread, more where a band would exceed _POOL_BAND_BYTES of input) pooled side by side on
# run_pieces' threads; a plane's result does not depend on its band.
#
# A window is combined separably, first along rows (over its kw columns), then over its kh
# rows. Rows of output are short (a few to a few dozen values), and a NumPy pass over a view
# whose rows are that short is slow; so each pass runs instead over a whole band as one flat
# contiguous array, shifted against itself. The padded frame is split into sw column phases
# (padded column c goes to phase c % sw at position c // sw), each (planes, rows, Q) with Q
# = ceil(padded width / sw): kernel column j of the window whose first padded column is
# ow*sw is then phase j % sw at flat position + j // sw. Likewise the row results are split
# into sh row phases, where kernel row i is row phase i % sh at flat position + (i // sh) * Q.
# Positions past a row's last window (or a band's last row) combine values of the next row
# (or nothing): they are never read back.

_POOL_BAND_BYTES = 1 << 22


class _Pooling:
    """One pooling geometry and its separable passes on bands of ``(planes, H, W)`` arrays."""

    def __init__(self, x_shape, y_shape, kernel, stride, pad, itemsize):
        self.size, self.pooled = tuple(x_shape[2:]), tuple(y_shape[2:])
        self.kernel, self.stride, self.pad = tuple(kernel), tuple(stride), tuple(pad)
        # Rows/columns covering the image after the leading pad and every window.
        self.padded_size = tuple(max(p + s, (o - 1) * st + k) for p, s, o, st, k in zip(
            self.pad, self.size, self.pooled, self.stride, self.kernel))
        self.phase_width = -(-self.padded_size[1] // self.stride[1])
        self.phase_rows = -(-self.padded_size[0] // self.stride[0])
        self.is_global = self.pooled == (1, 1) and self.kernel == self.size and not any(pad)
        planes = x_shape[0] * x_shape[1]
        self.bands = shared.bands(planes, self.size[0] * self.size[1] * itemsize, _POOL_BAND_BYTES)

    def _column_placement(self):
        """``(phase, first position, first image column, columns)`` of every phase holding
        image columns."""
        pw, sw, w = self.pad[1], self.stride[1], self.size[1]
        for p in range(sw):
            first = -(-(pw - p) // sw)          # first position at padded column >= pw
            column = p + first * sw - pw
            if column < w:
                yield p, first, column, len(range(column, w, sw))

    def column_phases(self, images, fill):
        """The band's frame padded with ``fill``, split by column phase: ``(sw, planes,
        padded rows, Q)``."""
        if self.stride[1] == 1 and self.padded_size == self.size:
            return images[None]
        phases = np.full((self.stride[1], len(images), self.padded_size[0], self.phase_width),
                         fill, dtype=images.dtype)
        ph, h = self.pad[0], self.size[0]
        for p, first, column, count in self._column_placement():
            phases[p, :, ph:ph + h, first:first + count] = images[..., column::self.stride[1]]
        return phases

    def uncolumn_phases(self, phases, images):
        """Adjoint of :func:`column_phases`: the image part of the phases into ``images``."""
        ph, h = self.pad[0], self.size[0]
        for p, first, column, count in self._column_placement():
            images[..., column::self.stride[1]] = phases[p, :, ph:ph + h, first:first + count]

    def row_phases(self, rows, fill):
        """``(planes, padded rows, Q)`` split by row phase: ``(sh, planes, R, Q)``."""
        sh = self.stride[0]
        if sh == 1:
            return rows[None]
        phases = np.full((sh,) + rows.shape[:1] + (self.phase_rows,) + rows.shape[2:], fill,
                         dtype=rows.dtype)
        for q in range(sh):
            part = rows[:, q::sh]
            phases[q, :, :part.shape[1]] = part
        return phases

    def unrow_phases(self, phases):
        """Adjoint of :func:`row_phases`: ``(planes, padded rows, Q)``."""
        sh = self.stride[0]
        if sh == 1:
            return phases[0]
        rows = np.empty(phases.shape[1:2] + (self.padded_size[0],) + phases.shape[3:],
                        dtype=phases.dtype)
        for q in range(sh):
            count = len(range(q, self.padded_size[0], sh))
            rows[:, q::sh] = phases[q, :, :count]
        return rows

    def shifts(self, axis):
        """``(phase, flat shift)`` of every kernel offset along ``axis`` (0 rows, 1 columns)."""
        step, unit = self.stride[axis], (self.phase_width if axis == 0 else 1)
        return [(k % step, k // step * unit) for k in range(self.kernel[axis])]

    def _output(self, combined):
        """The outputs among the positions of a flat vertical result."""
        shape = (-1, self.phase_rows, self.phase_width)
        return combined.reshape(shape)[:, :self.pooled[0], :self.pooled[1]]

    def separable(self, phases, combine, fill):
        """``combine`` (``maximum`` or ``add``) of each window's values, as a view of the band's
        outputs: over a window's kw columns, then its kh rows, each kernel offset in order."""
        flat = phases.reshape(len(phases), -1)
        rows = flat[0].copy()
        for phase, shift in self.shifts(1)[1:]:
            combine(rows[:rows.size - shift], flat[phase, shift:], out=rows[:rows.size - shift])
        flat = self.row_phases(rows.reshape(phases.shape[1:]), fill).reshape(self.stride[0], -1)
        combined = flat[0].copy()
        for phase, shift in self.shifts(0)[1:]:
            end = combined.size - shift
            combine(combined[:end], flat[phase, shift:], out=combined[:end])
        return self._output(combined)

    def max_offsets(self, phases):
        """The maximum of every window and where its first occurrence (row-major) lies
        relative to the window's first pixel, ``i * W + j`` for kernel offset (i, j), as views
        of the band's outputs. Offsets grow along each pass, so "take the later offset where
        strictly larger" is a maximum: arithmetic instead of masked copies, which are slow on
        the CPU."""
        width = self.size[1]
        flat = phases.reshape(len(phases), -1)
        column_type = np.uint8 if self.kernel[1] <= 256 else np.int32
        rows, column = flat[0].copy(), np.zeros(flat.shape[1], dtype=column_type)
        larger, code = np.empty(rows.size, dtype=bool), np.empty(rows.size, dtype=column_type)
        for j, (phase, shift) in enumerate(self.shifts(1)[1:], 1):
            end = rows.size - shift
            np.greater(flat[phase, shift:], rows[:end], out=larger[:end])
            np.maximum(column[:end], np.multiply(larger[:end], column_type(j), out=code[:end]),
                       out=column[:end])
            np.maximum(rows[:end], flat[phase, shift:], out=rows[:end])
        flat = self.row_phases(rows.reshape(phases.shape[1:]), -np.inf)
        flat = flat.reshape(self.stride[0], -1)
        columns = self.row_phases(column.reshape(phases.shape[1:]), 0)
        columns = columns.reshape(self.stride[0], -1)
        best, offset = flat[0].copy(), columns[0].astype(np.int32)
        larger, code = larger[:best.size], np.empty(best.size, dtype=np.int32)
        for i, (phase, shift) in enumerate(self.shifts(0)[1:], 1):
            end = best.size - shift
            np.greater(flat[phase, shift:], best[:end], out=larger[:end])
            np.add(columns[phase, shift:], np.int32(i * width), out=code[:end])
            np.maximum(offset[:end], np.multiply(larger[:end], code[:end], out=code[:end]),
                       out=offset[:end])
            np.maximum(best[:end], flat[phase, shift:], out=best[:end])
        return self._output(best), self._output(offset)

    def window_area(self, dtype):
        """AVE divisor per output: the window clipped to the padded image (Caffe)."""
        sides = []
        for a in range(2):
            start = np.arange(self.pooled[a]) * self.stride[a] - self.pad[a]
            end = np.minimum(start + self.kernel[a], self.size[a] + self.pad[a])
            sides.append((end - start).astype(dtype))
        return sides[0][:, None] * sides[1][None, :]

    def window_bases(self):
        """Plane index h*W + w of every window's first (unclipped) pixel, ``(OH, OW)`` int32."""
        rows, columns = [np.arange(self.pooled[a]) * self.stride[a] - self.pad[a]
                         for a in range(2)]
        return (rows[:, None] * self.size[1] + columns[None, :]).astype(np.int32)


def max_pool_forward(x, y, argmax, kernel, stride, pad):
    """Caffe's MAX pooling of ``x`` (N, C, H, W) into ``y`` (N, C, OH, OW): each window's
    largest in-image value, and in ``argmax`` (int32, y's shape) its index h*W + w in the
    plane (the first in row-major order on ties); ``argmax`` None: the maximum alone."""
    pooling = _Pooling(x.shape, y.shape, kernel, stride, pad, x.itemsize)
    images, pooled = shared.planes(x), shared.planes(y, writable=True)
    indices = None if argmax is None else shared.planes(argmax, writable=True)
    bases = pooling.window_bases()

    def band(planes):
        if pooling.is_global:
            flat = images[planes].reshape(planes.stop - planes.start, -1)
            np.max(flat, axis=1, out=pooled[planes, 0, 0])
            if indices is not None:
                indices[planes, 0, 0] = np.argmax(flat, axis=1)
            return
        phases = pooling.column_phases(images[planes], -np.inf)
        if indices is None:
            pooled[planes] = pooling.separable(phases, np.maximum, -np.inf)
            return
        pooled[planes], offsets = pooling.max_offsets(phases)
        np.add(offsets, bases, out=indices[planes])

    threads.run_pieces(band, pooling.bands)


def max_pool_backward(dy, argmax, dx, kernel, stride, pad):
    """``dx`` (written, not added) = the sum of ``dy`` over the outputs whose maximum each
    input pixel was (``argmax`` from :func:`max_pool_forward`); sums of several outputs are
    formed in float64."""
    pooling = _Pooling(dx.shape, dy.shape, kernel, stride, pad, dx.itemsize)
    grads, indices = shared.planes(dy), shared.planes(argmax)
    images = shared.planes(dx, writable=True)
    plane_size = pooling.size[0] * pooling.size[1]

    def band(planes):
        count = planes.stop - planes.start
        flat = indices[planes] + (np.arange(count) * plane_size)[:, None, None]
        sums = np.bincount(flat.ravel(), weights=grads[planes].ravel(),
                           minlength=count * plane_size)
        images[planes] = sums.reshape(images[planes].shape)

    threads.run_pieces(band, pooling.bands)


def ave_pool_forward(x, y, kernel, stride, pad):
    """Caffe's AVE pooling: the in-image sum of each window over the area of the window
    clipped to the padded image."""
    pooling = _Pooling(x.shape, y.shape, kernel, stride, pad, x.itemsize)
    images, pooled = shared.planes(x), shared.planes(y, writable=True)
    area = pooling.window_area(y.dtype)

    def band(planes):
        if pooling.is_global:
            flat = images[planes].reshape(planes.stop - planes.start, -1)
            np.divide(flat.sum(axis=1), area[0, 0], out=pooled[planes, 0, 0])
            return
        sums = pooling.separable(pooling.column_phases(images[planes], 0), np.add, 0)
        np.divide(sums, area, out=pooled[planes])

    threads.run_pieces(band, pooling.bands)


def ave_pool_backward(dy, dx, kernel, stride, pad):
    """``dx`` (written) = each pixel's share of the gradient of every window containing it:
    the adjoint of the forward's passes, run backwards."""
    pooling = _Pooling(dx.shape, dy.shape, kernel, stride, pad, dx.itemsize)
    grads, images = shared.planes(dy), shared.planes(dx, writable=True)
    area = pooling.window_area(dy.dtype)
    (sh, sw), (rows, width) = pooling.stride, (pooling.phase_rows, pooling.phase_width)

    def band(planes):
        count = planes.stop - planes.start
        share = np.zeros((count, rows, width), dtype=dx.dtype)
        np.divide(grads[planes], area, out=share[:, :pooling.pooled[0], :pooling.pooled[1]])
        share = share.ravel()
        row_grads = np.zeros((sh, share.size), dtype=dx.dtype)
        for phase, shift in pooling.shifts(0):
            row_grads[phase, shift:] += share[:share.size - shift]
        row_grads = pooling.unrow_phases(row_grads.reshape((sh, count, -1, width))).ravel()
        column_grads = np.zeros((sw, row_grads.size), dtype=dx.dtype)
        for phase, shift in pooling.shifts(1):
            column_grads[phase, shift:] += row_grads[:row_grads.size - shift]
        pooling.uncolumn_phases(column_grads.reshape((sw, count, -1, width)), images[planes])

    threads.run_pieces(band, pooling.bands)
