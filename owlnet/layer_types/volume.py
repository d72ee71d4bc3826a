"""N-d (e.g. 3-d volume) Convolution and Pooling, and the window helpers they share with
stochastic pooling.

vision.py's Convolution and Pooling handle 2 spatial axes; when a bottom has another number
they call :func:`adopt_nd`, which turns the layer into the N-d class here (same type string,
same LayerParameter), as Caffe's ConvolutionLayer switches to its N-d im2col.
"""
from __future__ import annotations

import itertools
import math

from .. import backend
from ..errors import ConfigError
from ..proto import caffe_pb2
from .base import Layer

_POOL = caffe_pb2.PoolingParameter


def window_offsets(kernel):
    """Every kernel offset (one index per spatial axis), in row-major order."""
    return list(itertools.product(*[range(k) for k in kernel]))


def _strided(frame, offset, stride, dilation, out_size):
    """View of ``frame`` (N, C, *spatial) at ``offset`` * dilation for every output position."""
    index = tuple(slice(o * d, o * d + s * (n - 1) + 1, s)
                  for o, d, s, n in zip(offset, dilation, stride, out_size))
    return frame[(Ellipsis,) + index]


def padded_frame(xp, x, pad, frame_size, fill):
    """``x`` (N, C, *spatial) placed at ``pad`` inside a ``frame_size`` array of ``fill``."""
    frame = xp.full(x.shape[:2] + tuple(frame_size), fill, dtype=x.dtype)
    frame[(Ellipsis,) + interior(x.shape[2:], pad)] = x
    return frame


def interior(size, pad):
    return tuple(slice(p, p + s) for p, s in zip(pad, size))


def window_frame_size(size, kernel, stride, pad, out_size, dilation=None):
    """Frame that holds the leading pad, the input and every window."""
    dilation = dilation or (1,) * len(kernel)
    return tuple(max(p + s, (o - 1) * st + d * (k - 1) + 1)
                 for s, k, st, p, o, d in zip(size, kernel, stride, pad, out_size, dilation))


def window_stack(xp, x, kernel, stride, pad, out_size, fill):
    """(N, C, *out, K) values of every window (K = prod(kernel), row-major offsets) of
    ``x`` padded by ``pad`` with ``fill``, and the (*out, K) mask of positions inside ``x``."""
    size = x.shape[2:]
    frame_size = window_frame_size(size, kernel, stride, pad, out_size)
    frame = padded_frame(xp, x, pad, frame_size, fill)
    inside = xp.zeros(frame_size, dtype=bool)
    inside[interior(size, pad)] = True
    offsets = window_offsets(kernel)
    values = xp.stack([_strided(frame, o, stride, (1,) * len(kernel), out_size)
                       for o in offsets], axis=-1)
    mask = xp.stack([_strided(inside, o, stride, (1,) * len(kernel), out_size)
                     for o in offsets], axis=-1)
    return values, mask


def scatter_windows(xp, grads, size, kernel, stride, pad, out_size, dilation=None):
    """Adjoint of :func:`window_stack` (and of convolution's columns, with ``dilation``): add
    the (N, C, *out, K) ``grads`` back onto the input positions; returns (N, C, *size)."""
    dilation = dilation or (1,) * len(kernel)
    frame_size = window_frame_size(size, kernel, stride, pad, out_size, dilation)
    frame = xp.zeros(grads.shape[:2] + frame_size, dtype=grads.dtype)
    for k, offset in enumerate(window_offsets(kernel)):
        _strided(frame, offset, stride, dilation, out_size)[...] += grads[..., k]
    return frame[(Ellipsis,) + interior(size, pad)]


def adopt_nd(layer, bottom, top):
    """Make ``layer`` (a Convolution or Pooling whose bottom does not have 2 spatial axes)
    the N-d layer of its type, and set it up."""
    classes = {"Convolution": NdConvolutionLayer, "Pooling": NdPoolingLayer}
    if layer.type not in classes:
        layer.fail(f"supports 2 spatial axes only; bottom shape {bottom[0].shape} has another "
                   "number (N-d is supported for Convolution and Pooling)", ConfigError)
    layer.__class__ = classes[layer.type]
    layer.check_counts(bottom, top)
    layer.layer_setup(bottom, top)


def _per_axis(layer, values, name, axes, default):
    """A repeated convolution setting: none (the default), one for all axes, or one per axis."""
    values = tuple(values)
    if not values:
        if default is None:
            layer.fail(f"{name} is required", ConfigError)
        return (default,) * axes
    if len(values) == 1:
        return values * axes
    if len(values) != axes:
        layer.fail(f"{name} takes 1 or {axes} values for {axes} spatial axes, got {len(values)}",
                   ConfigError)
    return values


class NdConvolutionLayer(Layer):
    """Convolution over k spatial axes (Caffe's N-d im2col path): y[n, m, o] = b[m] +
    sum over c in group(m) and kernel offsets j of W[m, c, j] x[n, c, o*s - p + j*d] (zero
    outside), O_a = (S_a + 2p_a - (d_a(k_a - 1) + 1)) // s_a + 1 per axis. W: (M, C/group,
    *kernel). kernel_size/pad/stride/dilation take one value or one per axis."""

    min_bottoms = 1
    min_tops = 1
    equal_bottom_top = True

    def layer_setup(self, bottom, top):
        p = self.param.convolution_param
        self.axis = self.canonical_axis(bottom[0], p.axis)
        axes = bottom[0].num_axes - self.axis - 1
        if axes < 1:
            self.fail(f"bottom shape {bottom[0].shape} has no spatial axis after channel axis "
                      f"{self.axis}", ConfigError)
        if any(p.HasField(f) for f in ("kernel_h", "kernel_w", "stride_h", "stride_w",
                                       "pad_h", "pad_w")):
            self.fail(f"kernel_h/w, stride_h/w and pad_h/w are for 2 spatial axes; this bottom "
                      f"{bottom[0].shape} has {axes}", ConfigError)
        self.kernel = _per_axis(self, p.kernel_size, "kernel_size", axes, None)
        self.stride = _per_axis(self, p.stride, "stride", axes, 1)
        self.pad = _per_axis(self, p.pad, "pad", axes, 0)
        self.dilation = _per_axis(self, p.dilation, "dilation", axes, 1)
        if min(self.kernel + self.stride + self.dilation) < 1:
            self.fail("kernel_size, stride and dilation must be positive", ConfigError)
        self.channels = bottom[0].shape[self.axis]
        self.num_output, self.group = p.num_output, p.group
        if self.num_output < 1 or self.group < 1 or self.channels % self.group \
                or self.num_output % self.group:
            self.fail(f"num_output {self.num_output} and channels {self.channels} must be "
                      f"positive multiples of group {self.group}", ConfigError)
        self.add_param((self.num_output, self.channels // self.group) + self.kernel,
                       p.weight_filler)
        self.bias_term = p.bias_term
        if self.bias_term:
            self.add_param((self.num_output,), p.bias_filler)

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        for b in bottom[1:]:
            if b.shape != shape:
                self.fail(f"all bottoms must have one shape: '{bottom[0].name}' is {shape}, "
                          f"'{b.name}' is {b.shape}")
        if len(shape) != self.axis + 1 + len(self.kernel) or shape[self.axis] != self.channels:
            self.fail(f"bottom shape {shape} does not match {self.channels} channels at axis "
                      f"{self.axis} and {len(self.kernel)} spatial axes")
        self.num = math.prod(shape[:self.axis])
        self.in_size = shape[self.axis + 1:]
        self.out_size = tuple(
            (s + 2 * p - (d * (k - 1) + 1)) // st + 1
            for s, k, st, p, d in zip(self.in_size, self.kernel, self.stride, self.pad,
                                      self.dilation))
        if min(self.out_size) < 1:
            self.fail(f"bottom shape {shape} gives output size {self.out_size}")
        for t in top:
            t.reshape(shape[:self.axis] + (self.num_output,) + self.out_size)

    def _columns(self, xp, x):
        """(n, group, C/group * K, prod(out)) columns of images x (n, C, *in)."""
        frame_size = window_frame_size(self.in_size, self.kernel, self.stride, self.pad,
                                       self.out_size, self.dilation)
        frame = padded_frame(xp, x, self.pad, frame_size, 0)
        cols = xp.stack([_strided(frame, o, self.stride, self.dilation, self.out_size)
                         for o in window_offsets(self.kernel)], axis=2)
        return cols.reshape(x.shape[0], self.group, -1, math.prod(self.out_size))

    def _weights(self):
        return self.blobs[0].data.reshape(self.group, self.num_output // self.group, -1)

    def _images(self, array):
        return array.reshape((self.num, -1) + array.shape[self.axis + 1:])

    def forward(self, bottom, top):
        xp = backend.array_module(bottom[0].data)
        for b, t in zip(bottom, top):
            cols = self._columns(xp, self._images(b.data))
            y = xp.einsum("gmk,ngkp->ngmp", self._weights(), cols)
            y = y.reshape((self.num, self.num_output) + self.out_size)
            if self.bias_term:
                y = y + self.blobs[1].data.reshape((1, -1) + (1,) * len(self.kernel))
            self._images(t.data)[...] = y

    def backward(self, top, propagate_down, bottom):
        xp = backend.array_module(top[0].diff)
        spatial = tuple(range(2, 2 + len(self.kernel)))
        for i, (b, t) in enumerate(zip(bottom, top)):
            dy = self._images(t.diff)
            if self.bias_term and self.param_propagate_down[1]:
                self.blobs[1].diff += dy.sum(axis=(0,) + spatial)
            dy = dy.reshape(self.num, self.group, self.num_output // self.group, -1)
            if self.param_propagate_down[0]:
                cols = self._columns(xp, self._images(b.data))
                grad = xp.einsum("ngmp,ngkp->gmk", dy, cols)
                self.blobs[0].diff += grad.reshape(self.blobs[0].shape)
            if propagate_down[i]:
                dcols = xp.einsum("gmk,ngmp->ngkp", self._weights(), dy)
                dcols = dcols.reshape((self.num, self.channels, -1) + self.out_size)
                self._images(b.diff)[...] = scatter_windows(
                    xp, xp.moveaxis(dcols, 2, -1), self.in_size, self.kernel, self.stride,
                    self.pad, self.out_size, self.dilation)


def pooled_size(size, kernel, pad, stride, ceil_mode):
    """Caffe's pooled length per axis: ceil (or floor) of (S + 2p - k) / s, plus 1, minus 1
    where any pad is set and the last window would start at or beyond S + p."""
    out = []
    for s, k, p, st in zip(size, kernel, pad, stride):
        span = s + 2 * p - k
        n = (-(-span // st) if ceil_mode else span // st) + 1
        if any(pad) and (n - 1) * st >= s + p:
            n -= 1
        out.append(n)
    return tuple(out)


class NdPoolingLayer(Layer):
    """Pooling over the k spatial axes of an (N, C, *spatial) bottom, with Caffe's 2-d rules
    on every axis: kernel_size / pad / stride (one value for all axes, or global_pooling),
    pooled size by :func:`pooled_size`; MAX over in-image positions (first in row-major order
    on ties), AVE dividing by the window clipped to the padded volume. No argmax top."""

    exact_bottoms = 1
    exact_tops = 1

    def layer_setup(self, bottom, top):
        p = self.param.pooling_param
        axes = bottom[0].num_axes - 2
        if axes < 1:
            self.fail(f"bottom shape {bottom[0].shape} has no spatial axis", ConfigError)
        if any(p.HasField(f) for f in ("kernel_h", "kernel_w", "stride_h", "stride_w",
                                       "pad_h", "pad_w")):
            self.fail(f"kernel_h/w, stride_h/w and pad_h/w are for 2 spatial axes; bottom "
                      f"{bottom[0].shape} has {axes}", ConfigError)
        if p.pool not in (_POOL.MAX, _POOL.AVE):
            self.fail(f"only MAX and AVE pooling support {axes} spatial axes", ConfigError)
        if not p.global_pooling and not p.HasField("kernel_size"):
            self.fail("kernel_size is required", ConfigError)
        self.method = p.pool
        self.axes = axes
        self.kernel = (p.kernel_size,) * axes
        self.stride, self.pad = (p.stride,) * axes, (p.pad,) * axes
        if p.global_pooling and (p.HasField("kernel_size") or p.pad or p.stride != 1):
            self.fail("global_pooling takes its kernel from the bottom, with pad 0 and stride 1",
                      ConfigError)
        if min(self.stride) < 1 or (not p.global_pooling and p.pad >= p.kernel_size):
            self.fail(f"needs stride >= 1 and pad < kernel (kernel {p.kernel_size}, pad {p.pad}, "
                      f"stride {p.stride})", ConfigError)
        self.ceil_mode = p.round_mode == _POOL.CEIL

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != 2 + self.axes:
            self.fail(f"bottom shape {shape} must keep {self.axes} spatial axes")
        if self.param.pooling_param.global_pooling:
            self.kernel = shape[2:]
        self.pooled = pooled_size(shape[2:], self.kernel, self.pad, self.stride, self.ceil_mode)
        if min(self.pooled) < 1:
            self.fail(f"bottom shape {shape} gives pooled size {self.pooled}")
        top[0].reshape(shape[:2] + self.pooled)

    def _divisor(self, xp, shape, dtype):
        """AVE: product over axes of min(start + k, S + p) - start, start = o*s - p."""
        total = xp.ones(self.pooled, dtype=dtype)
        for a in range(self.axes):
            start = xp.arange(self.pooled[a]) * self.stride[a] - self.pad[a]
            side = xp.minimum(start + self.kernel[a], shape[2 + a] + self.pad[a]) - start
            total = total * side.astype(dtype).reshape((-1,) + (1,) * (self.axes - 1 - a))
        return total

    def forward(self, bottom, top):
        x = bottom[0].data
        xp = backend.array_module(x)
        fill = 0 if self.method == _POOL.AVE else -xp.inf
        values, _ = window_stack(xp, x, self.kernel, self.stride, self.pad, self.pooled, fill)
        if self.method == _POOL.AVE:
            top[0].data[...] = values.sum(axis=-1) / self._divisor(xp, x.shape, x.dtype)
        else:
            self.argmax = values.argmax(axis=-1)
            top[0].data[...] = xp.take_along_axis(values, self.argmax[..., None], -1)[..., 0]

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].diff
        xp = backend.array_module(dy)
        k = math.prod(self.kernel)
        if self.method == _POOL.AVE:
            share = dy / self._divisor(xp, bottom[0].shape, dy.dtype)
            grads = xp.broadcast_to(share[..., None], dy.shape + (k,))
        else:
            grads = dy[..., None] * (xp.arange(k) == self.argmax[..., None])
        bottom[0].diff[...] = scatter_windows(xp, grads, bottom[0].shape[2:], self.kernel,
                                              self.stride, self.pad, self.pooled)
