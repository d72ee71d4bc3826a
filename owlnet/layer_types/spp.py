"""Spatial pyramid pooling (Caffe's SPP layer), built from Pooling layers."""
from __future__ import annotations

import math

from .. import backend
from ..blob import Blob
from ..errors import ConfigError
from ..proto import caffe_pb2
from .base import Layer, create_layer, register


def level_pooling(level, height, width, method):
    """Caffe's pooling settings for pyramid level l: b = 2^l bins per side,
    kernel k = ceil(H / b), pad = (k*b - H + 1) // 2, stride k (likewise for W)."""
    bins = 2 ** level
    p = caffe_pb2.PoolingParameter(pool=method)
    for side, size in (("h", height), ("w", width)):
        kernel = math.ceil(size / bins)
        setattr(p, f"kernel_{side}", kernel)
        setattr(p, f"stride_{side}", kernel)
        setattr(p, f"pad_{side}", (kernel * bins - size + 1) // 2)
    return p


@register("SPP")
class SPPLayer(Layer):
    """For levels l = 0 .. pyramid_height-1, pool the (N, C, H, W) bottom into 2^l x 2^l bins
    (see :func:`level_pooling`; MAX, AVE or STOCHASTIC as Pooling computes them), flatten
    each to (N, C*4^l) and concatenate: top (N, C * sum_l 4^l). With pyramid_height 1 the top
    is the single level's (N, C, 1, 1), as in Caffe. Backward: the sum of the levels' pooling
    gradients."""

    exact_bottoms = 1
    exact_tops = 1

    def layer_setup(self, bottom, top):
        p = self.param.spp_param
        if p.pyramid_height < 1:
            self.fail("spp_param.pyramid_height must be set and positive", ConfigError)
        self.height = p.pyramid_height
        self.size = None

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != 4:
            self.fail(f"bottom '{bottom[0].name}' must be 4-d (N, C, H, W), got {shape}")
        if shape[2:] != self.size:
            self._build_levels(shape, bottom[0].data.dtype)
        for level_bottom, layer, level_top in self.levels:
            level_bottom.reshape(shape)
            level_bottom.share_data(bottom[0])
            layer.reshape([level_bottom], [level_top])
        if self.height == 1:
            top[0].reshape(self.levels[0][2].shape)
        else:
            total = sum(t.count_from(1) for _, _, t in self.levels)
            top[0].reshape((shape[0], total))

    def _build_levels(self, shape, dtype):
        """One Pooling layer per level, each with its own bottom (sharing the data, keeping
        its own diff) and top."""
        self.size = shape[2:]
        self.levels = []
        method = self.param.spp_param.pool
        for level in range(self.height):
            settings = level_pooling(level, *shape[2:], method)
            if method == caffe_pb2.SPPParameter.STOCHASTIC and (settings.pad_h or settings.pad_w):
                self.fail(f"STOCHASTIC pooling of level {level} ({2 ** level} bins per side) "
                          f"needs pad ({settings.pad_h}, {settings.pad_w}) on a {shape[2]} x "
                          f"{shape[3]} input, and Caffe's stochastic pooling ignores pad; use "
                          f"sides divisible by {2 ** (self.height - 1)}, or MAX or AVE",
                          ConfigError)
            lp = caffe_pb2.LayerParameter(name=f"{self.name}_pool{level}", type="Pooling")
            lp.pooling_param.CopyFrom(settings)
            level_bottom = Blob(shape, dtype, name=f"{self.name}_pool{level}_input")
            level_top = Blob((), dtype, name=f"{self.name}_pool{level}")
            layer = create_layer(lp, self.phase)
            layer.setup([level_bottom], [level_top])
            self.levels.append((level_bottom, layer, level_top))

    def forward(self, bottom, top):
        num = bottom[0].shape[0]
        out = top[0].data.reshape(num, -1)
        start = 0
        for level_bottom, layer, level_top in self.levels:
            level_bottom.share_data(bottom[0])
            layer.forward([level_bottom], [level_top])
            width = level_top.count_from(1)
            out[:, start:start + width] = level_top.data.reshape(num, width)
            start += width

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        num = bottom[0].shape[0]
        dy = top[0].diff.reshape(num, -1)
        xp = backend.array_module(dy)
        total = xp.zeros_like(bottom[0].diff)
        start = 0
        for level_bottom, layer, level_top in self.levels:
            width = level_top.count_from(1)
            level_top.diff[...] = dy[:, start:start + width].reshape(level_top.shape)
            start += width
            layer.backward([level_top], [True], [level_bottom])
            total += level_bottom.diff
        bottom[0].diff[...] = total
