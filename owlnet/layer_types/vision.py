"""Spatial layers: Convolution, Deconvolution, Pooling and LRN (Caffe semantics, 2-d)."""
from __future__ import annotations

import math

from .. import backend, kernels
from ..errors import ConfigError
from ..proto import caffe_pb2
from . import stochastic_pooling, volume
from .base import Layer, register

_POOL = caffe_pb2.PoolingParameter
_LRN = caffe_pb2.LRNParameter
_CONV_ENGINE = caffe_pb2.ConvolutionParameter.Engine


class _ConvolutionBase(Layer):
    """Parameters and weights shared by Convolution and Deconvolution. Both run through the
    device's three convolution kernels (``kernels.get(xp).conv_forward``, ``conv_backward_data``,
    ``conv_backward_filter``), which choose their algorithm; Deconvolution is the transposed
    convolution, so its forward is the kernels' backward-data and its backward-data their
    forward."""

    transposed = False      # True: Deconvolution
    min_bottoms = 1
    min_tops = 1
    equal_bottom_top = True

    def layer_setup(self, bottom, top):
        p = self.param.convolution_param
        self.axis = bottom[0].canonical_axis(p.axis)
        spatial_axes = bottom[0].num_axes - self.axis - 1
        if spatial_axes != 2:
            return volume.adopt_nd(self, bottom, top)
        self.kernel = self._pair(p, "kernel_size", "kernel_h", "kernel_w", None)
        self.stride = self._pair(p, "stride", "stride_h", "stride_w", 1)
        self.pad = self._pair(p, "pad", "pad_h", "pad_w", 0)
        self.dilation = self._pair(p, "dilation", None, None, 1)
        for name, values in (("kernel size", self.kernel), ("stride", self.stride),
                             ("dilation", self.dilation)):
            if min(values) < 1:
                self.fail(f"{name} must be positive, got {values}", ConfigError)
        self.channels = bottom[0].shape[self.axis]
        self.num_output = p.num_output
        self.group = p.group
        self.engine = _CONV_ENGINE.Name(p.engine).lower()
        if self.num_output < 1:
            self.fail("num_output must be positive", ConfigError)
        if self.group < 1:
            self.fail(f"group must be positive, got {self.group}", ConfigError)
        if self.channels % self.group:
            self.fail(f"input channels {self.channels} (bottom shape {bottom[0].shape}) are not "
                      f"divisible by group {self.group}", ConfigError)
        if self.num_output % self.group:
            self.fail(f"num_output {self.num_output} is not divisible by group {self.group}",
                      ConfigError)
        self.add_param(self.weight_shape(), p.weight_filler)
        self.bias_term = p.bias_term
        if self.bias_term:
            self.add_param((self.num_output,), p.bias_filler)

    def _pair(self, p, field, h_field, w_field, default):
        """Caffe's reading of a 2-d setting: ``field_h``/``field_w``, or the repeated field
        with no value (the default), one value for both axes or one per axis."""
        values = tuple(getattr(p, field))
        if h_field and (p.HasField(h_field) or p.HasField(w_field)):
            if values:
                self.fail(f"give either {field} or {h_field}/{w_field}, not both", ConfigError)
            if field != "pad" and not (p.HasField(h_field) and p.HasField(w_field)):
                self.fail(f"{h_field} and {w_field} must be given together", ConfigError)
            return (getattr(p, h_field), getattr(p, w_field))
        if not values:
            if default is None:
                self.fail(f"{field} (or {h_field} and {w_field}) is required", ConfigError)
            return (default, default)
        if len(values) == 1:
            return values * 2
        if len(values) == 2:
            return values
        self.fail(f"{field} takes 1 or 2 values for 2 spatial axes, got {len(values)}",
                  ConfigError)

    def extent(self, axis):
        """Input span of one dilated kernel window along spatial ``axis``."""
        return self.dilation[axis] * (self.kernel[axis] - 1) + 1

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        for i, b in enumerate(bottom[1:], start=1):
            if b.shape != shape:
                self.fail(f"all bottoms must have one shape: bottom 0 '{bottom[0].name}' is "
                          f"{shape}, bottom {i} '{b.name}' is {b.shape}")
        if len(shape) != self.axis + 3 or shape[self.axis] != self.channels:
            self.fail(f"bottom '{bottom[0].name}' has shape {shape}; the weights expect "
                      f"{self.channels} channels at axis {self.axis} and 2 spatial axes after it")
        self.num = math.prod(shape[:self.axis])
        self.in_size = shape[self.axis + 1:]
        self.out_size = self.output_size(self.in_size)
        if min(self.out_size) < 1:
            self.fail(f"bottom shape {shape} gives output size {self.out_size} with kernel "
                      f"{self.kernel}, stride {self.stride}, pad {self.pad}, dilation "
                      f"{self.dilation}")
        for t in top:
            t.reshape(shape[:self.axis] + (self.num_output,) + self.out_size)

    def images(self, blob_array):
        """A blob's array as ``(num, C, H, W)`` (leading axes before ``axis`` flattened)."""
        return blob_array.reshape((self.num, -1) + blob_array.shape[self.axis + 1:])

    def convolve(self, name, *arrays, **epilogue):
        """Run kernel ``name`` ("conv_forward" | "conv_backward_data" | "conv_backward_filter")
        of the arrays' device on ``arrays`` with this layer's geometry (and conv_forward's
        ``scale``, ``shift`` and ``relu``)."""
        k = kernels.get(backend.array_module(arrays[0]))
        getattr(k, name)(*arrays, self.pad, self.stride, self.dilation, self.group, self.engine,
                         **epilogue)

    def add_bias(self, top_images):
        if self.bias_term:
            top_images += self.blobs[1].data.reshape(1, -1, 1, 1)

    def accumulate_bias(self, top_blob):
        if self.bias_term and self.param_propagate_down[1]:
            dy = self.images(top_blob.diff)
            self.blobs[1].diff += kernels.get(backend.array_module(dy)).channel_sums(
                dy.reshape(dy.shape[:2] + (-1,)))

    def forward(self, bottom, top):
        for b, t in zip(bottom, top):
            if self.transposed or not self.bias_term:
                self.add_bias(self.forward_without_bias(b, t))
            else:     # the bias added by the convolution as it writes its output
                self.forward_without_bias(b, t, shift=self.blobs[1].data)

    def forward_without_bias(self, bottom_blob, top_blob, **epilogue):
        """The convolution of one bottom written into its top, bias not added; the top's
        array as images ``(num, M, OH, OW)``. A Convolution takes conv_forward's ``scale``,
        ``shift`` and ``relu``."""
        role = "conv_backward_data" if self.transposed else "conv_forward"
        y = self.images(top_blob.data)
        self.convolve(role, self.images(bottom_blob.data), self.blobs[0].data, y, **epilogue)
        return y

    def backward(self, top, propagate_down, bottom):
        w = self.blobs[0].data
        grad = backend.array_module(w).empty_like(w) if self.param_propagate_down[0] else None
        for i, (b, t) in enumerate(zip(bottom, top)):
            self.accumulate_bias(t)
            x, dy = self.images(b.data), self.images(t.diff)
            if grad is not None:
                # The equivalent convolution of a Deconvolution reads the top.
                self.convolve("conv_backward_filter", *((dy, x) if self.transposed else (x, dy)),
                              grad)
                self.blobs[0].diff += grad
            if propagate_down[i]:
                role = "conv_forward" if self.transposed else "conv_backward_data"
                self.convolve(role, dy, w, self.images(b.diff))


@register("Convolution")
class ConvolutionLayer(_ConvolutionBase):
    """y[n, m, oh, ow] = b[m] + sum_{c in group(m), i, j} W[m, c, i, j] *
    x[n, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw] (zero outside the image);
    OH = (H + 2ph - (dh*(kh-1) + 1)) // sh + 1, likewise OW. W: (M, C/group, kh, kw).
    """

    def weight_shape(self):
        return (self.num_output, self.channels // self.group) + self.kernel

    def output_size(self, in_size):
        return tuple((in_size[a] + 2 * self.pad[a] - self.extent(a)) // self.stride[a] + 1
                     for a in range(2))


@register("Deconvolution")
class DeconvolutionLayer(_ConvolutionBase):
    """The transpose of Convolution: every input pixel x[n, c, h, w] adds
    W[c, m, i, j] * x to y[n, m, h*sh - ph + i*dh, w*sw - pw + j*dw] (m in c's group), plus b[m];
    OH = sh*(H - 1) + dh*(kh - 1) + 1 - 2ph, likewise OW. W: (C, M/group, kh, kw) as in Caffe.
    """

    transposed = True

    def weight_shape(self):
        return (self.channels, self.num_output // self.group) + self.kernel

    def output_size(self, in_size):
        return tuple(self.stride[a] * (in_size[a] - 1) + self.extent(a) - 2 * self.pad[a]
                     for a in range(2))


def _pooled_size(size, kernel, pad, stride, ceil_mode, padded):
    """Caffe's pooled length: ceil (or floor) of (size + 2p - k) / s, plus 1, minus 1 when
    the layer is ``padded`` (on either axis) and the last window starts at or beyond size + p."""
    span = size + 2 * pad - kernel
    pooled = (-(-span // stride) if ceil_mode else span // stride) + 1
    if padded and (pooled - 1) * stride >= size + pad:
        pooled -= 1
    return pooled


@register("Pooling")
class PoolingLayer(Layer):
    """Windows start at (ph*sh - pad_h, pw*sw - pad_w) and span kh x kw; pooled size is
    ceil((H + 2p - k) / s) + 1 (floor with round_mode FLOOR), minus 1 if pad_h or pad_w > 0
    and the last window would start at or beyond H + p (each axis checked, as Caffe).
    MAX: max over in-image pixels (first in row-major order on ties); optional top 1 = its
    index h*W + w. AVE: sum of in-image pixels / ((min(hs + kh, H + p) - hs) *
    (min(ws + kw, W + p) - ws)), hs/ws the unclipped window start. STOCHASTIC: see
    stochastic_pooling; other than 2 spatial axes: volume.NdPoolingLayer.
    """

    exact_bottoms = 1
    min_tops = 1
    max_tops = 2

    def layer_setup(self, bottom, top):
        if bottom[0].num_axes != 4:
            return volume.adopt_nd(self, bottom, top)
        p = self.param.pooling_param
        self.method = p.pool
        if len(top) == 2 and self.method != _POOL.MAX:
            self.fail("only MAX pooling has a second (argmax mask) top", ConfigError)
        self.global_pooling = p.global_pooling
        has_kernel = p.HasField("kernel_size") or p.HasField("kernel_h") or p.HasField("kernel_w")
        if self.global_pooling:
            if has_kernel:
                self.fail("global_pooling takes its kernel from the bottom; do not set "
                          "kernel_size/kernel_h/kernel_w", ConfigError)
        elif p.HasField("kernel_size"):
            if p.HasField("kernel_h") or p.HasField("kernel_w"):
                self.fail("give either kernel_size or kernel_h/kernel_w, not both", ConfigError)
            self.kernel = (p.kernel_size, p.kernel_size)
        elif p.HasField("kernel_h") and p.HasField("kernel_w"):
            self.kernel = (p.kernel_h, p.kernel_w)
        else:
            self.fail("kernel_size (or kernel_h and kernel_w) is required", ConfigError)
        self.pad = self._pair(p, "pad")
        self.stride = self._pair(p, "stride")
        if min(self.stride) < 1:
            self.fail(f"stride must be positive, got {self.stride}", ConfigError)
        if self.global_pooling:
            if self.pad != (0, 0) or self.stride != (1, 1):
                self.fail("global_pooling needs pad 0 and stride 1", ConfigError)
        else:
            if min(self.kernel) < 1:
                self.fail(f"kernel size must be positive, got {self.kernel}", ConfigError)
            if self.pad[0] >= self.kernel[0] or self.pad[1] >= self.kernel[1]:
                self.fail(f"pad {self.pad} must be smaller than kernel {self.kernel}",
                          ConfigError)
        self.ceil_mode = p.round_mode == _POOL.CEIL
        if self.method == _POOL.STOCHASTIC:
            stochastic_pooling.check(self)

    def _pair(self, p, field):
        """``field`` for both axes, or ``field_h`` and ``field_w`` given together (Caffe)."""
        h_field, w_field = f"{field}_h", f"{field}_w"
        if not (p.HasField(h_field) or p.HasField(w_field)):
            return (getattr(p, field),) * 2
        if p.HasField(field) or not (p.HasField(h_field) and p.HasField(w_field)):
            self.fail(f"give {field}, or {h_field} and {w_field} together", ConfigError)
        return (getattr(p, h_field), getattr(p, w_field))

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != 4:
            self.fail(f"bottom '{bottom[0].name}' must be 4-d (N, C, H, W), got shape {shape}")
        if self.global_pooling:
            self.kernel = shape[2:]
        self.pooled = tuple(_pooled_size(shape[2 + a], self.kernel[a], self.pad[a],
                                         self.stride[a], self.ceil_mode, any(self.pad))
                            for a in range(2))
        if min(self.pooled) < 1:
            self.fail(f"bottom shape {shape} gives pooled size {self.pooled} with kernel "
                      f"{self.kernel}, stride {self.stride}, pad {self.pad}")
        for t in top:
            t.reshape(shape[:2] + self.pooled)

    # -- forward / backward ------------------------------------------------------------------
    # Each device's kernels (kernels.cpu / kernels.gpu) pool in one call per direction; the
    # MAX argmax is the plane index h * W + w of each window's maximum, Caffe's mask top.
    def forward(self, bottom, top):
        if self.method == _POOL.STOCHASTIC:
            return stochastic_pooling.forward(self, bottom, top)
        x = bottom[0].data
        xp = backend.array_module(x)
        k = kernels.get(xp)
        geometry = (self.kernel, self.stride, self.pad)
        if self.method == _POOL.AVE:
            k.ave_pool_forward(x, top[0].data, *geometry)
            return
        if xp.__name__ == "numpy" and not (self.runs_backward or len(top) == 2):
            k.max_pool_forward(x, top[0].data, None, *geometry)    # nothing reads the argmax
            return
        if getattr(self, "argmax", None) is None or self.argmax.shape != top[0].shape \
                or self.argmax.dtype != xp.int32:
            self.argmax = xp.empty(top[0].shape, dtype=xp.int32)
        k.max_pool_forward(x, top[0].data, self.argmax, *geometry)
        if len(top) == 2:
            top[1].data[...] = self.argmax

    def backward(self, top, propagate_down, bottom):
        if self.method == _POOL.STOCHASTIC:
            return stochastic_pooling.backward(self, top, propagate_down, bottom)
        if not propagate_down[0]:
            return
        dy, dx = top[0].diff, bottom[0].diff
        k = kernels.get(backend.array_module(dy))
        geometry = (self.kernel, self.stride, self.pad)
        if self.method == _POOL.AVE:
            k.ave_pool_backward(dy, dx, *geometry)
        else:
            k.max_pool_backward(dy, self.argmax, dx, *geometry)


def _window_sum(xp, a, axis, half):
    """Sum of ``a`` over the window [i - half, i + half] along ``axis``, zero outside."""
    total = a.copy()
    before = [slice(None)] * a.ndim
    after = [slice(None)] * a.ndim
    for shift in range(1, min(half, a.shape[axis] - 1) + 1):
        before[axis], after[axis] = slice(None, -shift), slice(shift, None)
        total[tuple(after)] += a[tuple(before)]
        total[tuple(before)] += a[tuple(after)]
    return total


@register("LRN")
class LRNLayer(Layer):
    """y = x * s^-beta with n = local_size (odd) and zero padding outside the blob:
    ACROSS_CHANNELS: s = k + alpha/n * sum of x^2 over channels c-(n-1)/2 .. c+(n-1)/2;
    WITHIN_CHANNEL (Caffe builds it from AVE pooling with pad (n-1)/2, so the divisor is
    always n^2 and k is unused): s = 1 + alpha/n^2 * sum of x^2 over the n x n window
    centred at (h, w). Backward: dx = dy*s^-beta - 2*alpha*beta/|win| * x * winsum(dy*y/s).
    """

    exact_bottoms = 1
    exact_tops = 1

    def layer_setup(self, bottom, top):
        p = self.param.lrn_param
        self.size = p.local_size
        if self.size % 2 == 0:
            self.fail(f"local_size must be odd, got {self.size}", ConfigError)
        self.beta = p.beta
        if p.norm_region == _LRN.ACROSS_CHANNELS:
            self.axes = (1,)
            self.shift = p.k
            self.coeff = p.alpha / self.size
        else:
            self.axes = (2, 3)
            self.shift = 1.0
            self.coeff = p.alpha / self.size ** 2

    def reshape(self, bottom, top):
        if bottom[0].num_axes != 4:
            self.fail(f"bottom '{bottom[0].name}' must be 4-d (N, C, H, W), "
                      f"got shape {bottom[0].shape}")
        top[0].reshape(bottom[0].shape)

    def _neighbourhood_sum(self, xp, a):
        for axis in self.axes:
            a = _window_sum(xp, a, axis, self.size // 2)
        return a

    def forward(self, bottom, top):
        x = bottom[0].data
        xp = backend.array_module(x)
        if self.axes == (1,):
            kept = self.runs_backward
            if kept and (getattr(self, "scale", None) is None or self.scale.shape != x.shape
                         or self.scale.dtype != x.dtype
                         or backend.array_module(self.scale) is not xp):
                self.scale, self.scale_power = xp.empty_like(x), xp.empty_like(x)
            kernels.get(xp).lrn_across_channels_forward(
                x, top[0].data, self.scale if kept else None, self.scale_power if kept else None,
                self.size, self.coeff, self.shift, self.beta)
            return
        scale = self._neighbourhood_sum(xp, x * x)
        scale *= self.coeff
        scale += self.shift
        self.scale = scale
        self.scale_power = scale ** -self.beta
        xp.multiply(x, self.scale_power, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x, dy = bottom[0].data, top[0].diff
        xp = backend.array_module(x)
        if self.axes == (1,):
            kernels.get(xp).lrn_across_channels_backward(
                x, dy, bottom[0].diff, self.scale, self.scale_power, self.size, self.coeff,
                self.beta)
            return
        ratio = dy * x
        ratio *= self.scale_power
        ratio /= self.scale
        correction = self._neighbourhood_sum(xp, ratio)
        correction *= x
        correction *= -2 * self.coeff * self.beta
        xp.multiply(dy, self.scale_power, out=bottom[0].diff)
        bottom[0].diff += correction
