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

    def convolve(self, name, *arrays):
        """Run kernel ``name`` ("conv_forward" | "conv_backward_data" | "conv_backward_filter")
        of the arrays' device on ``arrays`` with this layer's geometry."""
        k = kernels.get(backend.array_module(arrays[0]))
        getattr(k, name)(*arrays, self.pad, self.stride, self.dilation, self.group, self.engine)

    def add_bias(self, top_images):
        if self.bias_term:
            top_images += self.blobs[1].data.reshape(1, -1, 1, 1)

    def accumulate_bias(self, top_blob):
        if self.bias_term and self.param_propagate_down[1]:
            self.blobs[1].diff += self.images(top_blob.diff).sum(axis=(0, 2, 3))

    def forward(self, bottom, top):
        for b, t in zip(bottom, top):
            self.add_bias(self.forward_without_bias(b, t))

    def forward_without_bias(self, bottom_blob, top_blob, weights=None):
        """The convolution of one bottom written into its top, bias not added, with the
        layer's weights or ``weights`` of their shape; the top's array as images
        ``(num, M, OH, OW)``."""
        role = "conv_backward_data" if self.transposed else "conv_forward"
        y = self.images(top_blob.data)
        self.convolve(role, self.images(bottom_blob.data),
                      self.blobs[0].data if weights is None else weights, y)
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

    # -- window plumbing -------------------------------------------------------------------
    # The padded frame is split by column phase: padded column c goes to phase c % sw at
    # position c // sw, each phase contiguous. Kernel offset (i, j) of every window is then a
    # slice of phase j % sw whose rows are contiguous runs (a strided read of every sw-th
    # value is several times slower), at the price of one copy of the frame.
    def _padded_shape(self, shape):
        """Rows/columns covering the image after the leading pad and every window."""
        return shape[:2] + tuple(
            max(self.pad[a] + shape[2 + a], (self.pooled[a] - 1) * self.stride[a] + self.kernel[a])
            for a in range(2))

    def _phases(self, xp, frame):
        """``frame`` split by column phase (see above); ``[frame]`` when the stride is 1."""
        sw = self.stride[1]
        return [frame] if sw == 1 else [xp.ascontiguousarray(frame[..., p::sw])
                                        for p in range(sw)]

    def _phase_shapes(self, shape):
        padded = self._padded_shape(shape)
        sw = self.stride[1]
        return [padded[:3] + (len(range(p, padded[3], sw)),) for p in range(sw)]

    def _window(self, phases, offset):
        """Kernel offset ``offset`` (row-major in the kernel) of every window, a view of its
        phase."""
        i, j = divmod(offset, self.kernel[1])
        (sh, sw), (oh, ow) = self.stride, self.pooled
        return phases[j % sw][..., i:i + sh * (oh - 1) + 1:sh, j // sw:j // sw + ow]

    def _separable(self, xp, phases, combine, out):
        """``combine`` (``maximum`` or ``add``) of each window's values into ``out``, first
        over the kw offsets along every needed padded row, then over the kh rows: kh + kw - 2
        passes instead of kh * kw - 1 (exact for the maximum; the sum is reordered)."""
        (sh, sw), (oh, ow) = self.stride, self.pooled
        kh, kw = self.kernel
        needed = slice(0, sh * (oh - 1) + kh)
        rows = phases[0][..., needed, :ow].copy()
        for j in range(1, kw):
            combine(rows, phases[j % sw][..., needed, j // sw:j // sw + ow], out=rows)
        out[...] = rows[..., 0:sh * (oh - 1) + 1:sh, :]
        for i in range(1, kh):
            combine(out, rows[..., i:i + sh * (oh - 1) + 1:sh, :], out=out)

    def _unphase(self, phases, image):
        """Write the interior of the frame whose phases are ``phases`` into ``image``."""
        (ph, pw), sw = self.pad, self.stride[1]
        h, w = image.shape[2:]
        for p, phase in enumerate(phases):
            first = -(-(pw - p) // sw)          # first position at padded column >= pw
            column = p + first * sw - pw
            if column < w:
                count = len(range(column, w, sw))
                image[..., column::sw] = phase[..., ph:ph + h, first:first + count]

    def _windows_tile(self, shape):
        """The windows cover the image exactly once: stride = kernel, no pad, sizes divisible."""
        return (self.stride == tuple(self.kernel) and self.pad == (0, 0)
                and shape[2] % self.kernel[0] == 0 and shape[3] % self.kernel[1] == 0)

    def _padded(self, xp, x, fill):
        shape = self._padded_shape(x.shape)
        if shape == x.shape:
            return x
        frame = xp.full(shape, fill, dtype=x.dtype)
        frame[..., self.pad[0]:self.pad[0] + x.shape[2], self.pad[1]:self.pad[1] + x.shape[3]] = x
        return frame

    def _window_area(self, xp, shape, dtype):
        """AVE divisor per output: the window clipped to the padded image (Caffe)."""
        sides = []
        for a in range(2):
            start = xp.arange(self.pooled[a]) * self.stride[a] - self.pad[a]
            end = xp.minimum(start + self.kernel[a], shape[2 + a] + self.pad[a])
            sides.append((end - start).astype(dtype))
        return sides[0][:, None] * sides[1][None, :]

    # -- forward / backward ------------------------------------------------------------------
    def forward(self, bottom, top):
        if self.method == _POOL.STOCHASTIC:
            return stochastic_pooling.forward(self, bottom, top)
        x = bottom[0].data
        xp = backend.array_module(x)
        out = top[0].data
        if xp.__name__ != "numpy":
            return self._device_forward(xp, x, top)
        offsets = range(1, self.kernel[0] * self.kernel[1])
        if self.method == _POOL.AVE:
            self._separable(xp, self._phases(xp, self._padded(xp, x, 0)), xp.add, out)
            out /= self._window_area(xp, x.shape, x.dtype)
            return
        phases = self._phases(xp, self._padded(xp, x, -xp.inf))
        if not (self.runs_backward or len(top) == 2):
            # Nothing reads the argmax: the maximum alone.
            self._separable(xp, phases, xp.maximum, out)
            return
        out[...] = self._window(phases, 0)
        self.argmax = xp.zeros(out.shape, dtype=xp.uint8 if len(offsets) < 256 else xp.int32)
        larger = xp.empty(out.shape, dtype=bool)
        code = xp.empty_like(self.argmax)
        for offset in offsets:
            window = self._window(phases, offset)
            # Offsets grow, so "take the later offset where strictly larger" is a maximum;
            # arithmetic instead of masked copies, which are slow on the CPU.
            xp.greater(window, out, out=larger)
            xp.maximum(self.argmax, xp.multiply(larger, code.dtype.type(offset), out=code),
                       out=self.argmax)
            xp.maximum(out, window, out=out)
        if len(top) == 2:
            kw = self.kernel[1]
            rows = (xp.arange(self.pooled[0]) * self.stride[0] - self.pad[0])[:, None]
            cols = (xp.arange(self.pooled[1]) * self.stride[1] - self.pad[1])[None, :]
            top[1].data[...] = (rows + self.argmax // kw) * x.shape[3] + cols + self.argmax % kw

    def backward(self, top, propagate_down, bottom):
        if self.method == _POOL.STOCHASTIC:
            return stochastic_pooling.backward(self, top, propagate_down, bottom)
        if not propagate_down[0]:
            return
        dy = top[0].diff
        xp = backend.array_module(dy)
        if xp.__name__ != "numpy":
            return self._device_backward(xp, dy, bottom[0].diff)
        shape = bottom[0].shape
        kh, kw = self.kernel
        if self.method == _POOL.MAX and self._windows_tile(shape):
            # Every pixel lies in exactly one window: write each offset's share directly.
            dx = bottom[0].diff.reshape(shape[:2] + (self.pooled[0], kh, self.pooled[1], kw))
            for offset in range(kh * kw):
                i, j = divmod(offset, kw)
                xp.multiply(dy, self.argmax == offset, out=dx[:, :, :, i, :, j])
            return
        grads = [xp.zeros(phase_shape, dtype=dy.dtype) for phase_shape in self._phase_shapes(shape)]
        if self.method == _POOL.AVE:
            share = dy / self._window_area(xp, shape, dy.dtype)
            for offset in range(kh * kw):
                self._window(grads, offset)[...] += share
        else:
            hit = xp.empty(dy.shape, dtype=bool)
            share = xp.empty_like(dy)
            for offset in range(kh * kw):
                xp.equal(self.argmax, offset, out=hit)
                self._window(grads, offset)[...] += xp.multiply(dy, hit, out=share)
        self._unphase(grads, bottom[0].diff)

    # The GPU runs one fused kernel per direction (kernels.gpu, checked against the NumPy
    # path above); its MAX argmax is the plane index h * W + w, Caffe's mask top.
    def _device_forward(self, xp, x, top):
        k = kernels.get(xp)
        geometry = (self.kernel, self.stride, self.pad)
        if self.method == _POOL.AVE:
            k.ave_pool_forward(x, top[0].data, *geometry)
            return
        if getattr(self, "argmax", None) is None or self.argmax.shape != top[0].shape \
                or self.argmax.dtype != xp.int32:
            self.argmax = xp.empty(top[0].shape, dtype=xp.int32)
        k.max_pool_forward(x, top[0].data, self.argmax, *geometry)
        if len(top) == 2:
            top[1].data[...] = self.argmax

    def _device_backward(self, xp, dy, dx):
        k = kernels.get(xp)
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
        ratio = dy * x
        ratio *= self.scale_power
        ratio /= self.scale
        correction = self._neighbourhood_sum(xp, ratio)
        correction *= x
        correction *= -2 * self.coeff * self.beta
        xp.multiply(dy, self.scale_power, out=bottom[0].diff)
        bottom[0].diff += correction
