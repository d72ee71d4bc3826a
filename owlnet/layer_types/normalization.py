"""Normalisation and per-channel affine layers: BatchNorm, Scale, Bias, MVN.

Scale and Bias combine ``bottom[0]`` with an operand (a learned blob or ``bottom[1]``) whose
shape equals ``bottom[0].shape[axis : axis + operand.ndim]``; the operand is broadcast over the
axes before and after that span, which the code views as ``(outer, dim, inner)``.
"""
from __future__ import annotations

from .. import backend, kernels
from ..errors import ConfigError
from ..proto import caffe_pb2
from .base import Layer, register


def _constant_filler(value):
    return caffe_pb2.FillerParameter(type="constant", value=value)


@register("BatchNorm")
class BatchNormLayer(Layer):
    """Per channel c (axis 1; statistics over every other axis, m values per channel):
    y = (x - mu_c) / sqrt(var_c + eps), var the biased variance.

    With batch statistics (TRAIN by default) the blobs are updated as
    s <- s * maf + 1, mean <- mean * maf + mu, variance <- variance * maf + m / (m - 1) * var.
    With global statistics (TEST by default, or use_global_stats) mu = mean / s and
    var = variance / s (both 0 when s is 0). The three blobs are never learned (lr_mult 0).
    """

    exact_bottoms = 1
    exact_tops = 1

    def layer_setup(self, bottom, top):
        if bottom[0].num_axes < 1:
            self.fail(f"needs a bottom with at least 1 axis, got shape {bottom[0].shape}")
        p = self.param.batch_norm_param
        if p.HasField("use_global_stats"):
            self.use_global_stats = bool(p.use_global_stats)
        else:
            self.use_global_stats = self.phase == caffe_pb2.TEST
        self.moving_average_fraction = float(p.moving_average_fraction)
        self.eps = float(p.eps)
        self.channels = bottom[0].shape[1] if bottom[0].num_axes > 1 else 1
        for shape in ((self.channels,), (self.channels,), (1,)):
            self.add_param(shape, _constant_filler(0.0))
        self.param_propagate_down = [False] * 3
        # As in Caffe: the statistics get lr_mult 0, and asking for more is an error.
        for i in range(3):
            if i == len(self.param.param):
                self.param.param.add().lr_mult = 0.0
            elif self.param.param[i].lr_mult != 0:
                self.fail(f"param {i} has lr_mult {self.param.param[i].lr_mult}; the batch "
                          "statistics cannot be learned (use lr_mult: 0)", ConfigError)
        self._inv_std = None
        self._normalized = None

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) > 1 and shape[1] != self.channels:
            self.fail(f"was set up for {self.channels} channels but bottom '{bottom[0].name}' "
                      f"has shape {shape}")
        top[0].reshape_like(bottom[0])

    def _by_channel(self, array):
        return array.reshape(array.shape[0], self.channels, -1)

    def forward(self, bottom, top):
        x3 = self._by_channel(bottom[0].data)
        y3 = self._by_channel(top[0].data)
        xp = backend.array_module(x3)
        if self.use_global_stats:
            mean, self._inv_std = self.global_statistics()
            xp.subtract(x3, mean[:, None], out=y3)          # two passes over the top, no copy
            y3 *= self._inv_std[:, None]
            return
        self.normalize_batch(bottom[0], top[0])

    def normalize_batch(self, bottom_blob, top_blob, scale=None, bias=None, relu=False):
        """The forward with batch statistics (the statistics blobs updated), the top then
        times ``scale`` plus ``bias`` per channel and through a ReLU where given: the Scale
        and ReLU that follow in place run in the same pass (``owlnet.fusion``)."""
        x3, y3 = self._by_channel(bottom_blob.data), self._by_channel(top_blob.data)
        xp = backend.array_module(x3)
        mean_blob, var_blob, count_blob = (b.data for b in self.blobs)
        # The normalized input is kept for backward apart from the top, which a following
        # in-place layer (Scale, ReLU) overwrites.
        kept = self._normalized_buffer(xp, y3) if self.runs_backward else None
        mean, var, self._inv_std = kernels.get(xp).batch_norm_forward(x3, y3, kept, self.eps,
                                                                      scale, bias, relu)
        m = x3.size // self.channels
        maf = self.moving_average_fraction
        count_blob *= maf
        count_blob += 1
        mean_blob *= maf
        mean_blob += mean
        var_blob *= maf
        var_blob += (m / (m - 1) if m > 1 else 1.0) * var
        self._normalized = kept

    @property
    def normalized(self):
        """The normalized input of the last forward with batch statistics that runs backward
        (by channel: (N, C, rest)), else None."""
        return self._normalized

    def global_statistics(self):
        """``(mu, 1 / sqrt(var + eps))`` per channel from the stored statistics."""
        mean_blob, var_blob, count_blob = (b.data for b in self.blobs)
        xp = backend.array_module(mean_blob)
        has_stats = count_blob != 0
        inv_count = has_stats / xp.where(has_stats, count_blob, 1)
        return mean_blob * inv_count, 1 / xp.sqrt(var_blob * inv_count + self.eps)

    def _normalized_buffer(self, xp, like):
        """The array backward reads the normalized input from, reused across iterations."""
        kept = self._normalized
        if kept is None or kept.shape != like.shape or kept.dtype != like.dtype \
                or backend.array_module(kept) is not xp:
            kept = xp.empty_like(like)
        return kept

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy3, dx3 = self._by_channel(top[0].diff), self._by_channel(bottom[0].diff)
        xp = backend.array_module(dy3)
        if self.use_global_stats:
            xp.multiply(dy3, self._inv_std[:, None], out=dx3)
            return
        self.normalized_backward(top[0], bottom[0])

    def normalized_backward(self, top_blob, bottom_blob, scale=None, relu_top=None):
        """The backward with batch statistics into the bottom's diff, of the forward of
        ``normalize_batch`` with the same ``scale`` and (its top data) ``relu_top``; returns
        the sums per channel of g * xhat and of g, g the gradient at the ReLU's input."""
        dy3, dx3 = self._by_channel(top_blob.diff), self._by_channel(bottom_blob.diff)
        return kernels.get(backend.array_module(dy3)).batch_norm_backward(
            dy3, self._normalized, self._inv_std, dx3, scale,
            None if relu_top is None else self._by_channel(relu_top))


class _Broadcast(Layer):
    """Shared by Scale and Bias: ``bottom[0]`` combined with an operand broadcast over it."""

    min_bottoms = 1
    max_bottoms = 2
    exact_tops = 1

    def _learned_shape(self, data, axis_param, num_axes):
        """A learned operand's shape: ``data.shape[axis : axis + num_axes]`` (-1: to the end)."""
        axis = self.canonical_axis(data, axis_param)
        if num_axes < -1:
            self.fail(f"num_axes must be -1 or >= 0, got {num_axes}", ConfigError)
        if num_axes == -1:
            return data.shape[axis:]
        if axis + num_axes > data.num_axes:
            self.fail(f"axis {axis_param} with num_axes {num_axes} runs past bottom "
                      f"'{data.name}' of shape {data.shape}")
        return data.shape[axis:axis + num_axes]

    def _layout(self, data, operand, axis_param):
        """``(outer, dim, inner)`` for broadcasting ``operand`` over ``data``, checking shapes."""
        axis = 0 if operand.num_axes == 0 else self.canonical_axis(data, axis_param)
        span = data.shape[axis:axis + operand.num_axes]
        if span != operand.shape:
            self.fail(f"operand '{operand.name}' of shape {operand.shape} does not match "
                      f"bottom '{data.name}' of shape {data.shape} from axis {axis}")
        return data.count_from(0, axis), operand.count, data.count_from(axis + operand.num_axes)


@register("Scale")
class ScaleLayer(_Broadcast):
    """y = x * s (+ b with bias_term), s a learned blob (filler default 1) or bottom[1], b a
    learned blob (bias_filler default 0), both of shape x.shape[axis : axis + num_axes] and
    broadcast over the other axes.  dx = dy * s;  ds = sum of dy * x;  db = sum of dy."""

    def layer_setup(self, bottom, top):
        p = self.param.scale_param
        if len(bottom) == 1:
            shape = self._learned_shape(bottom[0], p.axis, p.num_axes)
            self.add_param(shape, p.filler if p.HasField("filler") else _constant_filler(1.0))
        else:
            shape = bottom[1].shape
        self.bias_index = None
        if p.bias_term:
            self.bias_index = len(self.blobs)
            self.add_param(shape, p.bias_filler if p.HasField("bias_filler")
                           else _constant_filler(0.0))
        self._saved_input = None       # what backward reads as the input, when kept
        self._input_copy = None        # the copy this layer's in-place forward keeps

    def _scale(self, bottom):
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom, top):
        self.layout = self._layout(bottom[0], self._scale(bottom), self.param.scale_param.axis)
        top[0].reshape_like(bottom[0])

    def forward(self, bottom, top):
        outer, dim, inner = self.layout
        x = bottom[0].data
        xp = backend.array_module(x)
        learns_scale = len(bottom) > 1 or self.param_propagate_down[0]
        # In place, the scale's gradient needs the input, which the top overwrites: kept.
        keep = top[0] is bottom[0] and learns_scale and self.runs_backward
        kept = self._input_copy if keep else None
        if keep and (kept is None or kept.shape != x.shape or kept.dtype != x.dtype
                     or backend.array_module(kept) is not xp):
            kept = self._input_copy = xp.empty_like(x)
        self._saved_input = kept
        bias = None if self.bias_index is None else self.blobs[self.bias_index].data.reshape(dim)
        kernels.get(xp).scale_forward(
            x.reshape(outer, dim, inner), self._scale(bottom).data.reshape(dim), bias,
            top[0].data.reshape(outer, dim, inner),
            None if kept is None else kept.reshape(outer, dim, inner))

    def backward(self, top, propagate_down, bottom):
        outer, dim, inner = self.layout
        dy3 = top[0].diff.reshape(outer, dim, inner)
        scale = self._scale(bottom)
        two_bottoms = len(bottom) > 1
        learns_bias = self.bias_index is not None and self.param_propagate_down[self.bias_index]
        learns_scale = propagate_down[1] if two_bottoms else self.param_propagate_down[0]
        if not (learns_bias or learns_scale or propagate_down[0]):
            return
        x = bottom[0].data if self._saved_input is None else self._saved_input
        # One pass per channel: the parameter sums of each run before dx overwrites it (in
        # place, bottom[0].diff is top[0].diff).
        scale_sums, bias_sums = kernels.get(backend.array_module(dy3)).scale_backward(
            dy3, x.reshape(outer, dim, inner) if learns_scale else None, scale.data.reshape(dim),
            bottom[0].diff.reshape(outer, dim, inner) if propagate_down[0] else None)
        if two_bottoms and learns_scale:
            scale.diff[...] = scale_sums.reshape(scale.shape)
        self.add_parameter_gradients(None if two_bottoms else scale_sums, bias_sums)

    def borrow_input(self, array):
        """Have backward read its input from ``array`` (values equal to this in-place layer's
        input at the last forward, owned by the BatchNorm before it: ``owlnet.fusion``)."""
        self._saved_input = array

    def add_parameter_gradients(self, scale_sums, bias_sums):
        """Add the per-channel sums of dy * x (``scale_sums``, for a learned scale: one
        bottom) and of dy to the diffs of the learned blobs (each unless None)."""
        if scale_sums is not None and self.param_propagate_down[0]:
            self.blobs[0].diff[...] += scale_sums.reshape(self.blobs[0].shape)
        if bias_sums is not None and self.bias_index is not None \
                and self.param_propagate_down[self.bias_index]:
            bias = self.blobs[self.bias_index]
            bias.diff[...] += bias_sums.reshape(bias.shape)


@register("Bias")
class BiasLayer(_Broadcast):
    """y = x + b, b a learned blob (filler default 0) of shape x.shape[axis : axis + num_axes]
    or bottom[1], broadcast over the other axes.  dx = dy;  db = sum of dy."""

    def layer_setup(self, bottom, top):
        p = self.param.bias_param
        if len(bottom) == 1:
            self.add_param(self._learned_shape(bottom[0], p.axis, p.num_axes), p.filler)

    def _bias(self, bottom):
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom, top):
        self.layout = self._layout(bottom[0], self._bias(bottom), self.param.bias_param.axis)
        top[0].reshape_like(bottom[0])

    def forward(self, bottom, top):
        outer, dim, inner = self.layout
        x = bottom[0].data
        backend.array_module(x).add(x.reshape(outer, dim, inner),
                                    self._bias(bottom).data.reshape(1, dim, 1),
                                    out=top[0].data.reshape(outer, dim, inner))

    def backward(self, top, propagate_down, bottom):
        outer, dim, inner = self.layout
        dy3 = top[0].diff.reshape(outer, dim, inner)
        bias = self._bias(bottom)
        two_bottoms = len(bottom) > 1
        if (propagate_down[1] if two_bottoms else self.param_propagate_down[0]):
            grad = kernels.get(backend.array_module(dy3)).channel_sums(dy3).reshape(bias.shape)
            if two_bottoms:
                bias.diff[...] = grad
            else:
                bias.diff[...] += grad
        if propagate_down[0] and top[0] is not bottom[0]:
            bottom[0].diff[...] = top[0].diff


@register("MVN")
class MVNLayer(Layer):
    """Per group (each (n, c) over the remaining axes, or each n over all of them with
    across_channels): y = (x - mean) / (std + eps), std = sqrt of the biased variance;
    without normalize_variance y = x - mean. Backward as Caffe:
    dx = (dy - mean(dy) - y * mean(dy * y)) / (std + eps) (exact for eps -> 0), or
    dx = dy - mean(dy) without normalize_variance."""

    exact_bottoms = 1
    exact_tops = 1

    def layer_setup(self, bottom, top):
        p = self.param.mvn_param
        self.normalize_variance = bool(p.normalize_variance)
        self.across_channels = bool(p.across_channels)
        self.eps = float(p.eps)
        self._inv_denominator = None

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if not shape:
            self.fail("needs a bottom with at least 1 axis, got a scalar")
        per_group = self.across_channels or len(shape) == 1
        self.groups = shape[0] if per_group else shape[0] * shape[1]
        top[0].reshape_like(bottom[0])

    def forward(self, bottom, top):
        x2 = bottom[0].data.reshape(self.groups, -1)
        xp = backend.array_module(x2)
        centered = x2 - x2.mean(axis=1, keepdims=True)
        y2 = top[0].data.reshape(x2.shape)
        if not self.normalize_variance:
            y2[...] = centered
            return
        std = xp.sqrt((centered * centered).mean(axis=1, keepdims=True))
        self._inv_denominator = 1 / (std + self.eps)
        xp.multiply(centered, self._inv_denominator, out=y2)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy2 = top[0].diff.reshape(self.groups, -1)
        dx2 = dy2 - dy2.mean(axis=1, keepdims=True)
        if self.normalize_variance:
            y2 = top[0].data.reshape(dy2.shape)
            dx2 = (dx2 - y2 * (dy2 * y2).mean(axis=1, keepdims=True)) * self._inv_denominator
        bottom[0].diff.reshape(dy2.shape)[...] = dx2
