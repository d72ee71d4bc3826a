"""Reduction, repetition, indexing and lookup layers: Reduction, Tile, Parameter, BatchReindex,
Filter, Embed (BVLC Caffe semantics).

Layers whose bottoms carry indices (BatchReindex's permutation, Filter's selector, Embed's
words) pass no gradient to those bottoms, as in Caffe: asking for one is a ConfigError.
"""
from __future__ import annotations

from .. import backend
from ..errors import ConfigError, DataError
from ..proto import caffe_pb2
from .base import Layer, register

_REDUCE = caffe_pb2.ReductionParameter


def _as_indices(layer, blob, limit, what):
    """The values of ``blob`` as int64 indices, each an integer in [0, limit); a DataError
    naming the layer and blob otherwise."""
    xp = backend.array_module(blob.data)
    values = blob.data
    index = values.astype(xp.int64)
    bad = (index != values) | (index < 0) | (index >= limit)
    if bool(bad.any()):
        first = backend.to_host(values[bad].reshape(-1)[:1])[0]
        raise DataError(f"layer '{layer.name}' ({layer.type}): bottom '{blob.name}' holds "
                        f"{what} {first!r}, which is not an integer in [0, {limit})")
    return index


def _refuse_index_gradient(layer, propagate_down, index_bottoms):
    for i in index_bottoms:
        if i < len(propagate_down) and propagate_down[i]:
            layer.fail(f"cannot back-propagate to bottom {i}, which holds indices", ConfigError)


@register("Reduction")
class ReductionLayer(Layer):
    """Reduces every axis from ``axis`` on: with x_i the values of one leading index,
    SUM ``y = c sum_i x_i``, ASUM ``c sum_i |x_i|``, SUMSQ ``c sum_i x_i^2``, MEAN
    ``c/D sum_i x_i`` (D values, c = coeff). The top has the bottom's axes before ``axis``
    (a scalar for axis 0). Backward: dx_i = c dy times 1, sign(x_i), 2 x_i, 1/D."""

    exact_bottoms = 1
    exact_tops = 1

    def layer_setup(self, bottom, top):
        p = self.param.reduction_param
        self.operation = p.operation
        self.coeff = float(p.coeff)

    def reshape(self, bottom, top):
        self.axis = self.canonical_axis(bottom[0], self.param.reduction_param.axis)
        self.outer = bottom[0].count_from(0, self.axis)
        self.inner = bottom[0].count_from(self.axis)
        top[0].reshape(bottom[0].shape[:self.axis])

    def forward(self, bottom, top):
        xp = backend.array_module(bottom[0].data)
        x = bottom[0].data.reshape(self.outer, self.inner)
        if self.operation == _REDUCE.ASUM:
            x = xp.abs(x)
        elif self.operation == _REDUCE.SUMSQ:
            x = x * x
        total = x.sum(axis=1)
        scale = self.coeff / self.inner if self.operation == _REDUCE.MEAN else self.coeff
        top[0].data[...] = (total * scale).reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = backend.array_module(bottom[0].data)
        dy = top[0].diff.reshape(self.outer, 1) * self.coeff
        x = bottom[0].data.reshape(self.outer, self.inner)
        dx = bottom[0].diff.reshape(self.outer, self.inner)
        if self.operation == _REDUCE.SUM:
            dx[...] = dy
        elif self.operation == _REDUCE.MEAN:
            dx[...] = dy / self.inner
        elif self.operation == _REDUCE.ASUM:
            dx[...] = xp.sign(x) * dy
        else:
            dx[...] = 2 * x * dy


@register("Tile")
class TileLayer(Layer):
    """Repeats the bottom's block from ``axis`` on ``tiles`` times along ``axis``:
    top[a, t, b] = x[a, b] with a the leading index, t < tiles, b the index within the block;
    backward dx[a, b] = sum_t dy[a, t, b]."""

    exact_bottoms = 1
    exact_tops = 1

    def layer_setup(self, bottom, top):
        p = self.param.tile_param
        if not p.HasField("tiles") or p.tiles < 1:
            self.fail("tile_param.tiles must be set and positive", ConfigError)
        self.tiles = p.tiles

    def reshape(self, bottom, top):
        axis = self.canonical_axis(bottom[0], self.param.tile_param.axis)
        self.outer = bottom[0].count_from(0, axis)
        self.inner = bottom[0].count_from(axis)
        shape = list(bottom[0].shape)
        shape[axis] *= self.tiles
        top[0].reshape(tuple(shape))

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.outer, 1, self.inner)
        top[0].data.reshape(self.outer, self.tiles, self.inner)[...] = x

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            dy = top[0].diff.reshape(self.outer, self.tiles, self.inner)
            bottom[0].diff.reshape(self.outer, self.inner)[...] = dy.sum(axis=1)


@register("Parameter")
class ParameterLayer(Layer):
    """No bottoms; its top is its one learned blob of ``parameter_param.shape`` (zeros until
    weights are loaded, as in Caffe). Backward adds the top diff to the blob's diff."""

    exact_bottoms = 0
    exact_tops = 1

    def layer_setup(self, bottom, top):
        p = self.param.parameter_param
        shape = tuple(p.shape.dim)
        if any(d < 0 for d in shape):
            self.fail(f"parameter_param.shape {shape} has a negative dimension", ConfigError)
        self.add_param(shape, caffe_pb2.FillerParameter(type="constant", value=0.0))

    def reshape(self, bottom, top):
        top[0].reshape(self.blobs[0].shape)

    def forward(self, bottom, top):
        top[0].share_data(self.blobs[0])

    def backward(self, top, propagate_down, bottom):
        if self.param_propagate_down[0]:
            self.blobs[0].diff += top[0].diff


@register("BatchReindex")
class BatchReindexLayer(Layer):
    """top[i] = x[p[i]] along the first axis, p = bottom 1 (integers in [0, N));
    backward dx[j] = sum over i with p[i] = j of dy[i]."""

    exact_bottoms = 2
    exact_tops = 1

    def reshape(self, bottom, top):
        if bottom[1].num_axes != 1:
            self.fail(f"bottom 1 '{bottom[1].name}' (the permutation) must be 1-d, got shape "
                      f"{bottom[1].shape}")
        top[0].reshape(bottom[1].shape[:1] + bottom[0].shape[1:])

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0

    def forward(self, bottom, top):
        self.index = _as_indices(self, bottom[1], bottom[0].shape[0], "index")
        top[0].data[...] = bottom[0].data[self.index]

    def backward(self, top, propagate_down, bottom):
        _refuse_index_gradient(self, propagate_down, [1])
        if propagate_down[0]:
            xp = backend.array_module(top[0].diff)
            bottom[0].diff[...] = 0
            xp.add.at(bottom[0].diff, self.index, top[0].diff)


@register("Filter")
class FilterLayer(Layer):
    """The last bottom selects items: each top k holds the items n of bottom k (along the
    first axis, in order) whose selector value is nonzero. Backward scatters dy back to the
    selected items and writes 0 to the others. The selection is made in reshape, from the
    selector's data at that time (as Caffe)."""

    min_bottoms = 2
    min_tops = 1

    def layer_setup(self, bottom, top):
        self.selector_index = len(bottom) - 1
        if len(top) != len(bottom) - 1:
            self.fail(f"needs one top per data bottom: {len(bottom) - 1} data bottoms, "
                      f"{len(top)} tops", ConfigError)

    def reshape(self, bottom, top):
        selector = bottom[-1]
        num = selector.shape[0] if selector.num_axes else 0
        if selector.count != num:
            self.fail(f"selector '{selector.name}' must hold one value per item, got shape "
                      f"{selector.shape}")
        for b in bottom[:-1]:
            if not b.num_axes or b.shape[0] != num:
                self.fail(f"bottom '{b.name}' of shape {b.shape} must have {num} items (the "
                          f"selector '{selector.name}' has shape {selector.shape})")
        xp = backend.array_module(selector.data)
        self.selected = xp.nonzero(selector.data.reshape(-1))[0]
        for b, t in zip(bottom[:-1], top):
            t.reshape((int(self.selected.shape[0]),) + b.shape[1:])

    def allow_force_backward(self, bottom_index):
        return bottom_index != self.selector_index

    def forward(self, bottom, top):
        for b, t in zip(bottom[:-1], top):
            t.data[...] = b.data[self.selected]

    def backward(self, top, propagate_down, bottom):
        _refuse_index_gradient(self, propagate_down, [self.selector_index])
        for i, t in enumerate(top):
            if propagate_down[i]:
                bottom[i].diff[...] = 0
                bottom[i].diff[self.selected] = t.diff


@register("Embed")
class EmbedLayer(Layer):
    """Lookup table: for every index k of the bottom (an integer in [0, input_dim)),
    ``top[..., :] = W[k, :] + b`` with W of shape (input_dim, num_output) and b (num_output);
    top shape = bottom shape + (num_output,). Backward: dW[k] += dy for every occurrence of k,
    db += sum dy; no gradient to the indices."""

    exact_bottoms = 1
    exact_tops = 1

    def layer_setup(self, bottom, top):
        p = self.param.embed_param
        if p.num_output < 1 or p.input_dim < 1:
            self.fail("embed_param.num_output and input_dim must be set and positive",
                      ConfigError)
        self.num_output, self.input_dim = p.num_output, p.input_dim
        self.bias_term = p.bias_term
        self.add_param((self.input_dim, self.num_output), p.weight_filler)
        if self.bias_term:
            self.add_param((self.num_output,), p.bias_filler)

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape + (self.num_output,))

    def allow_force_backward(self, bottom_index):
        return False

    def forward(self, bottom, top):
        self.index = _as_indices(self, bottom[0], self.input_dim, "index")
        out = self.blobs[0].data[self.index]
        if self.bias_term:
            out = out + self.blobs[1].data
        top[0].data[...] = out

    def backward(self, top, propagate_down, bottom):
        _refuse_index_gradient(self, propagate_down, [0])
        dy = top[0].diff.reshape(-1, self.num_output)
        if self.param_propagate_down[0]:
            xp = backend.array_module(dy)
            xp.add.at(self.blobs[0].diff, self.index.reshape(-1), dy)
        if self.bias_term and self.param_propagate_down[1]:
            self.blobs[1].diff += dy.sum(axis=0)
