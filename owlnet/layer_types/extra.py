"""Layer types outside BVLC Caffe that published prototxts use and OpenCV's Caffe importer
accepts: ReLU6 (MobileNet ports), ShuffleChannel (ShuffleNet), Permute (SSD), Upsample
(darknet2caffe's YOLOv3 ports: nearest neighbour) and Interp (DeepLab / PSPNet: bilinear,
corners aligned). Their parameters are in proto/caffe.proto with their forks' field numbers.
"""
from __future__ import annotations

from .. import backend
from ..errors import ConfigError
from .base import Layer, register


@register("ReLU6")
class ReLU6Layer(Layer):
    """y = min(max(x, 0), 6);  dx = dy where 0 < x < 6, else 0 (read from y, so it may run
    in place)."""

    exact_bottoms = 1
    exact_tops = 1

    def reshape(self, bottom, top):
        top[0].reshape_like(bottom[0])

    def forward(self, bottom, top):
        xp = backend.array_module(bottom[0].data)
        xp.clip(bottom[0].data, 0, 6, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            y = top[0].data
            bottom[0].diff[...] = top[0].diff * ((y > 0) & (y < 6))


@register("ShuffleChannel")
class ShuffleChannelLayer(Layer):
    """With G = shuffle_channel_param.group and C = G*K channels, top channel k*G + g is
    bottom channel g*K + k (the (G, K) channel grid transposed); backward applies the inverse."""

    exact_bottoms = 1
    exact_tops = 1

    def layer_setup(self, bottom, top):
        self.group = self.param.shuffle_channel_param.group
        if self.group < 1:
            self.fail("shuffle_channel_param.group must be positive", ConfigError)
        if top[0] is bottom[0]:
            self.fail("cannot run in place", ConfigError)

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) < 2 or shape[1] % self.group:
            self.fail(f"bottom '{bottom[0].name}' of shape {shape} has channels not divisible "
                      f"by group {self.group}")
        top[0].reshape(shape)

    def _shuffle(self, source, target, groups):
        n, c = source.shape[:2]
        grid = source.reshape(n, groups, c // groups, -1)
        target.reshape(n, c // groups, groups, -1)[...] = grid.transpose(0, 2, 1, 3)

    def forward(self, bottom, top):
        self._shuffle(bottom[0].data, top[0].data, self.group)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            channels = top[0].shape[1]
            self._shuffle(top[0].diff, bottom[0].diff, channels // self.group)


@register("Permute")
class PermuteLayer(Layer):
    """top = bottom with its axes reordered: top axis i is bottom axis order[i]; axes missing
    from ``order`` follow in increasing order (SSD). Backward applies the inverse order."""

    exact_bottoms = 1
    exact_tops = 1

    def layer_setup(self, bottom, top):
        order = list(self.param.permute_param.order)
        n = bottom[0].num_axes
        if len(set(order)) != len(order) or any(a >= n for a in order):
            self.fail(f"permute_param.order {order} must list distinct axes below {n} "
                      f"(bottom shape {bottom[0].shape})", ConfigError)
        self.order = tuple(order + [a for a in range(n) if a not in order])
        self.inverse = tuple(self.order.index(a) for a in range(n))
        if top[0] is bottom[0]:
            self.fail("cannot run in place", ConfigError)

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != len(self.order):
            self.fail(f"bottom shape {shape} does not have the {len(self.order)} axes of "
                      f"order {self.order}")
        top[0].reshape(tuple(shape[a] for a in self.order))

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data.transpose(self.order)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff.transpose(self.inverse)


@register("Upsample")
class UpsampleLayer(Layer):
    """Nearest neighbour, s = upsample_param.scale: y[n, c, h, w] = x[n, c, h // s, w // s],
    top (N, C, s*H, s*W); backward dx = sum of dy over each s x s block. (SegNet's two-bottom
    Upsample, which unpools with a max-pooling mask, is a different layer and is refused.)"""

    exact_tops = 1

    def layer_setup(self, bottom, top):
        if len(bottom) != 1:
            self.fail(f"takes one bottom (nearest-neighbour upsampling, upsample_param "
                      f"{{ scale }}); {len(bottom)} bottoms is SegNet's max-unpooling "
                      "Upsample, which is not supported", ConfigError)
        self.scale = self.param.upsample_param.scale
        if self.scale < 1:
            self.fail(f"upsample_param.scale must be positive, got {self.scale}", ConfigError)

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != 4:
            self.fail(f"bottom '{bottom[0].name}' must be 4-d (N, C, H, W), got {shape}")
        s = self.scale
        top[0].reshape(shape[:2] + (shape[2] * s, shape[3] * s))

    def forward(self, bottom, top):
        n, c, h, w = bottom[0].shape
        s = self.scale
        blocks = top[0].data.reshape(n, c, h, s, w, s)
        blocks[...] = bottom[0].data[:, :, :, None, :, None]

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            n, c, h, w = bottom[0].shape
            s = self.scale
            bottom[0].diff[...] = top[0].diff.reshape(n, c, h, s, w, s).sum(axis=(3, 5))


def _align_corners_weights(xp, size_in, size_out, dtype):
    """For each output row o: the source row i0 = floor(r*o), the next row i1 (i0 + 1, or i0
    at the last row) and the weight of i1, with r = (size_in - 1)/(size_out - 1) (0 when
    size_out is 1): DeepLab's corner-aligned bilinear rule."""
    ratio = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    pos = xp.arange(size_out, dtype=dtype) * dtype.type(ratio)
    first = xp.floor(pos).astype(xp.int64)
    first = xp.minimum(first, size_in - 1)
    second = xp.where(first < size_in - 1, first + 1, first)
    return first, second, pos - first


@register("Interp")
class InterpLayer(Layer):
    """Bilinear resize with corners aligned (DeepLab): the input, cropped by -pad_beg at the
    start and -pad_end at the end (pads <= 0), of size Hi x Wi goes to Ho x Wo with output row
    o reading input row r*o, r = (Hi - 1)/(Ho - 1), interpolated between floor(r*o) and the
    next row; likewise columns. Output size: from bottom 1's (H, W) when given (PSPNet); else
    shrink_factor s alone: (Hi - 1)/s + 1; zoom_factor z alone: Hi + (Hi - 1)(z - 1);
    height and width; both factors: shrink, then zoom. Backward: the transposed weights."""

    min_bottoms = 1
    max_bottoms = 2
    exact_tops = 1

    def layer_setup(self, bottom, top):
        p = self.param.interp_param
        if p.pad_beg > 0 or p.pad_end > 0:
            self.fail(f"interp_param pad_beg {p.pad_beg} and pad_end {p.pad_end} must be <= 0 "
                      "(only cropping is supported, as DeepLab)", ConfigError)
        for field in ("zoom_factor", "shrink_factor"):
            if p.HasField(field) and getattr(p, field) < 1:
                self.fail(f"interp_param.{field} must be positive", ConfigError)
        has_size = p.HasField("height") and p.HasField("width")
        if (len(bottom) == 1 and not has_size
                and not (p.HasField("zoom_factor") or p.HasField("shrink_factor"))):
            self.fail("interp_param needs zoom_factor, shrink_factor, or height and width "
                      "(or a second bottom giving the size)", ConfigError)

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0

    def _output_size(self, bottom, size_in):
        p = self.param.interp_param
        if len(bottom) == 2:
            if bottom[1].num_axes != 4:
                self.fail(f"bottom 1 '{bottom[1].name}' must be 4-d, got {bottom[1].shape}")
            return bottom[1].shape[2:]
        zoom, shrink = p.HasField("zoom_factor"), p.HasField("shrink_factor")
        if zoom and not shrink:
            return tuple(s + (s - 1) * (p.zoom_factor - 1) for s in size_in)
        if shrink and not zoom:
            return tuple((s - 1) // p.shrink_factor + 1 for s in size_in)
        if p.HasField("height") and p.HasField("width"):
            return (p.height, p.width)
        shrunk = [(s - 1) // p.shrink_factor + 1 for s in size_in]
        return tuple(s + (s - 1) * (p.zoom_factor - 1) for s in shrunk)

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != 4:
            self.fail(f"bottom '{bottom[0].name}' must be 4-d (N, C, H, W), got {shape}")
        p = self.param.interp_param
        size_in = tuple(s + p.pad_beg + p.pad_end for s in shape[2:])
        size_out = self._output_size(bottom, size_in)
        if min(size_in) < 1 or min(size_out) < 1:
            self.fail(f"bottom shape {shape} gives input size {size_in} after pads and "
                      f"output size {size_out}; both must be positive")
        self.crop = (slice(None), slice(None)) + tuple(
            slice(-p.pad_beg, -p.pad_beg + s) for s in size_in)
        self.size_in, self.size_out = size_in, size_out
        top[0].reshape(shape[:2] + tuple(size_out))

    def _weights(self, xp, dtype):
        return [_align_corners_weights(xp, i, o, dtype)
                for i, o in zip(self.size_in, self.size_out)]

    def forward(self, bottom, top):
        x = bottom[0].data[self.crop]
        xp = backend.array_module(x)
        (r0, r1, rw), (c0, c1, cw) = self._weights(xp, x.dtype)
        rows = x[:, :, r0] * (1 - rw)[:, None] + x[:, :, r1] * rw[:, None]
        top[0].data[...] = rows[..., c0] * (1 - cw) + rows[..., c1] * cw

    def backward(self, top, propagate_down, bottom):
        if len(propagate_down) > 1 and propagate_down[1]:
            bottom[1].diff[...] = 0
        if not propagate_down[0]:
            return
        dy = top[0].diff
        xp = backend.array_module(dy)
        (r0, r1, rw), (c0, c1, cw) = self._weights(xp, dy.dtype)
        n, c = dy.shape[:2]
        rows = xp.zeros((n, c, dy.shape[2], self.size_in[1]), dtype=dy.dtype)
        xp.add.at(rows, (Ellipsis, c0), dy * (1 - cw))
        xp.add.at(rows, (Ellipsis, c1), dy * cw)
        grad = xp.zeros((n, c) + tuple(self.size_in), dtype=dy.dtype)
        xp.add.at(grad, (slice(None), slice(None), r0), rows * (1 - rw)[:, None])
        xp.add.at(grad, (slice(None), slice(None), r1), rows * rw[:, None])
        bottom[0].diff[...] = 0
        bottom[0].diff[self.crop] = grad
