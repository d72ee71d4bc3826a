"""Common layers: fully connected, element-wise combination, blob plumbing, softmax, arg-max.

Every layer here writes its math against ``xp = backend.array_module(...)`` so the same code
runs on NumPy and CuPy arrays.
"""
from __future__ import annotations

import itertools
import math

from .. import backend, kernels
from ..errors import ConfigError
from ..numerics import softmax
from .base import Layer, register


def _move_axis_last(array, axis):
    """``array`` with ``axis`` moved to the end (a view)."""
    return array if axis == array.ndim - 1 else array.swapaxes(axis, -1)


def _share_as(top, bottom, shape):
    """Make ``top.data`` a view of ``bottom.data`` with ``shape`` (Caffe's ShareData)."""
    top.share_data(bottom)
    top.reshape(shape)


def _legacy_axis(layer, bottom, message, legacy_field):
    """The axis of Concat/Slice: the legacy unsigned ``*_dim`` field if set, else ``axis``."""
    if message.HasField(legacy_field):
        if message.HasField("axis"):
            layer.fail(f"set either axis or {legacy_field}, not both", ConfigError)
        axis = getattr(message, legacy_field)
        if axis >= bottom.num_axes:
            layer.fail(f"{legacy_field} {axis} out of range for bottom of shape {bottom.shape}")
        return axis
    return layer.canonical_axis(bottom, message.axis)


@register("InnerProduct")
class InnerProductLayer(Layer):
    """Fully connected: with X the bottom as an (M, K) matrix (K = count from ``axis``),
    ``top = X W^T + b`` for W of shape (N, K), or ``X W + b`` for W of shape (K, N) when
    ``transpose``; the top keeps the bottom's axes before ``axis`` and adds one axis N."""

    exact_bottoms = 1
    exact_tops = 1

    def layer_setup(self, bottom, top):
        p = self.param.inner_product_param
        if not p.HasField("num_output") or p.num_output == 0:
            self.fail("inner_product_param.num_output must be set and positive", ConfigError)
        self.num_output = p.num_output
        self.bias_term = p.bias_term
        self.transpose = p.transpose
        self.axis = self.canonical_axis(bottom[0], p.axis)
        self.k = bottom[0].count_from(self.axis)
        shape = (self.k, self.num_output) if self.transpose else (self.num_output, self.k)
        self.add_param(shape, p.weight_filler)
        if self.bias_term:
            self.add_param((self.num_output,), p.bias_filler)

    def reshape(self, bottom, top):
        axis = self.canonical_axis(bottom[0], self.param.inner_product_param.axis)
        k = bottom[0].count_from(axis)
        if k != self.k:
            self.fail(f"bottom shape {bottom[0].shape} gives {k} inputs from axis {axis}, "
                      f"but the weights take {self.k}")
        self.axis = axis
        self.m = bottom[0].count_from(0, axis)
        top[0].reshape(bottom[0].shape[:axis] + (self.num_output,))

    def forward(self, bottom, top):
        xp = backend.array_module(bottom[0].data)
        x = bottom[0].data.reshape(self.m, self.k)
        w = self.blobs[0].data
        y = top[0].data.reshape(self.m, self.num_output)
        kernels.get(xp).matmul(x, w if self.transpose else w.T, y)
        if self.bias_term:
            y += self.blobs[1].data

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff.reshape(self.m, self.num_output)
        x = bottom[0].data.reshape(self.m, self.k)
        w = self.blobs[0]
        if self.param_propagate_down[0]:
            k = kernels.get(backend.array_module(dy))
            if self.transpose:
                k.add_matmul(w.diff, x.T, dy)
            else:
                k.add_matmul(w.diff, dy.T, x)
        if self.bias_term and self.param_propagate_down[1]:
            self.blobs[1].diff += dy.sum(axis=0)
        if propagate_down[0]:
            dx = bottom[0].diff.reshape(self.m, self.k)
            kernels.get(backend.array_module(dy)).matmul(
                dy, w.data.T if self.transpose else w.data, dx)


_PROD, _SUM, _MAX = 0, 1, 2


@register("Eltwise")
class EltwiseLayer(Layer):
    """Element-wise over equal-shaped bottoms: SUM ``sum_i c_i x_i`` (c_i = coeff, default 1),
    PROD ``prod_i x_i``, MAX ``max_i x_i`` (coeff accepted and ignored, as Caffe); MAX routes
    the gradient to the winning bottom (ties: bottom 1 beats bottom 0, later bottoms win only
    when strictly greater)."""

    min_bottoms = 2
    exact_tops = 1

    def layer_setup(self, bottom, top):
        p = self.param.eltwise_param
        self.operation = p.operation
        self.stable_prod_grad = p.stable_prod_grad
        if p.coeff and self.operation == _PROD:  # MAX accepts and ignores them, as Caffe
            self.fail("coeff is not allowed with operation PROD", ConfigError)
        if p.coeff and len(p.coeff) != len(bottom):
            self.fail(f"has {len(p.coeff)} coeff values for {len(bottom)} bottoms "
                      "(give one per bottom)", ConfigError)
        self.coeffs = list(p.coeff) or [1.0] * len(bottom)

    def reshape(self, bottom, top):
        for b in bottom[1:]:
            if b.shape != bottom[0].shape:
                self.fail(f"bottom '{b.name}' has shape {b.shape}, but bottom "
                          f"'{bottom[0].name}' has shape {bottom[0].shape}; all must be equal")
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        xp = backend.array_module(bottom[0].data)
        if self.operation == _SUM:
            terms = [b.data if c == 1.0 else c * b.data for c, b in zip(self.coeffs, bottom)]
            out = top[0].data
            if not any(xp.may_share_memory(out, term) for term in terms[2:]):
                # Added into the top in turn, left to right (no temporary as large as it);
                # the first sum reads both terms element by element, so either may be the top.
                xp.add(terms[0], terms[1], out=out)
                for term in terms[2:]:
                    xp.add(out, term, out=out)
                return
            out = terms[0]
            for term in terms[1:]:
                out = out + term
        elif self.operation == _PROD:
            out = bottom[0].data * bottom[1].data
            for b in bottom[2:]:
                out = out * b.data
        else:
            first, second = bottom[0].data, bottom[1].data
            first_wins = first > second
            self.winner = (~first_wins).astype(xp.int32)
            out = xp.where(first_wins, first, second)
            for i, b in enumerate(bottom[2:], start=2):
                better = b.data > out
                self.winner = xp.where(better, xp.int32(i), self.winner)
                out = xp.where(better, b.data, out)
        top[0].data[...] = out

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff
        for i, b in enumerate(bottom):
            if not propagate_down[i]:
                continue
            if self.operation == _SUM:
                b.diff[...] = dy if self.coeffs[i] == 1.0 else self.coeffs[i] * dy
            elif self.operation == _PROD:
                if self.stable_prod_grad:
                    others = None
                    for j, other in enumerate(bottom):
                        if j != i:
                            others = other.data if others is None else others * other.data
                    b.diff[...] = others * dy
                else:
                    b.diff[...] = top[0].data / b.data * dy
            else:
                b.diff[...] = dy * (self.winner == i)


@register("Concat")
class ConcatLayer(Layer):
    """Joins the bottoms along ``axis`` (legacy ``concat_dim``); every other dimension must
    match. Backward hands each bottom its slice of the top diff."""

    min_bottoms = 1
    exact_tops = 1

    def layer_setup(self, bottom, top):
        self.axis = _legacy_axis(self, bottom[0], self.param.concat_param, "concat_dim")

    def reshape(self, bottom, top):
        first = bottom[0].shape
        size = 0
        for b in bottom:
            if (len(b.shape) != len(first)
                    or b.shape[:self.axis] + b.shape[self.axis + 1:]
                    != first[:self.axis] + first[self.axis + 1:]):
                self.fail(f"bottom '{b.name}' of shape {b.shape} does not match bottom "
                          f"'{bottom[0].name}' of shape {first} outside concat axis {self.axis}")
            size += b.shape[self.axis]
        self.bounds = [0, *itertools.accumulate(b.shape[self.axis] for b in bottom)]
        top[0].reshape(first[:self.axis] + (size,) + first[self.axis + 1:])

    def forward(self, bottom, top):
        xp = backend.array_module(bottom[0].data)
        if len(bottom) == 1:
            top[0].data[...] = bottom[0].data
            return
        xp.concatenate([b.data for b in bottom], axis=self.axis, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        lead = (slice(None),) * self.axis
        for i, b in enumerate(bottom):
            if propagate_down[i]:
                b.diff[...] = top[0].diff[lead + (slice(self.bounds[i], self.bounds[i + 1]),)]


@register("Slice")
class SliceLayer(Layer):
    """Cuts the bottom along ``axis`` (legacy ``slice_dim``) at ``slice_point``s, or into
    equal parts when none are given. Backward joins the top diffs."""

    exact_bottoms = 1
    min_tops = 1

    def layer_setup(self, bottom, top):
        self.axis = _legacy_axis(self, bottom[0], self.param.slice_param, "slice_dim")
        self.points = list(self.param.slice_param.slice_point)

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        dim = shape[self.axis]
        if self.points:
            if len(self.points) != len(top) - 1:
                self.fail(f"has {len(self.points)} slice_point values for {len(top)} tops "
                          "(give one fewer than the tops)", ConfigError)
            bounds = [0] + self.points + [dim]
            if any(a >= b for a, b in zip(bounds, bounds[1:])):
                self.fail(f"slice_point {self.points} must increase strictly inside (0, {dim}) "
                          f"for bottom shape {shape} along axis {self.axis}")
        else:
            if dim % len(top):
                self.fail(f"{len(top)} tops do not evenly divide dimension {dim} of bottom "
                          f"shape {shape} along axis {self.axis}")
            step = dim // len(top)
            bounds = list(range(0, dim + 1, step))
        self.bounds = bounds
        for i, t in enumerate(top):
            t.reshape(shape[:self.axis] + (bounds[i + 1] - bounds[i],) + shape[self.axis + 1:])

    def forward(self, bottom, top):
        lead = (slice(None),) * self.axis
        for i, t in enumerate(top):
            t.data[...] = bottom[0].data[lead + (slice(self.bounds[i], self.bounds[i + 1]),)]

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = backend.array_module(bottom[0].diff)
        if len(top) == 1:
            bottom[0].diff[...] = top[0].diff
            return
        xp.concatenate([t.diff for t in top], axis=self.axis, out=bottom[0].diff)


@register("Split")
class SplitLayer(Layer):
    """Hands one bottom to several tops (tops share the bottom's data); backward sums the
    top diffs into the bottom diff."""

    exact_bottoms = 1
    min_tops = 1

    def layer_setup(self, bottom, top):
        if any(t is bottom[0] for t in top):
            self.fail("cannot run in place", ConfigError)

    def reshape(self, bottom, top):
        for t in top:
            t.reshape(bottom[0].shape)

    def forward(self, bottom, top):
        for t in top:
            t.share_data(bottom[0])

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        out = bottom[0].diff
        if len(top) == 1:
            out[...] = top[0].diff
            return
        # Added into the bottom's diff in turn, left to right: one pass, no temporary.
        xp = backend.array_module(out)
        xp.add(top[0].diff, top[1].diff, out=out)
        for t in top[2:]:
            xp.add(out, t.diff, out=out)


class _ViewLayer(Layer):
    """Base of Flatten and Reshape: the top is a view of the bottom with another shape."""

    exact_bottoms = 1
    exact_tops = 1

    def layer_setup(self, bottom, top):
        if top[0] is bottom[0]:
            self.fail("cannot run in place", ConfigError)

    def forward(self, bottom, top):
        _share_as(top[0], bottom[0], top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff.reshape(bottom[0].shape)


@register("Flatten")
class FlattenLayer(_ViewLayer):
    """Merges axes ``axis`` .. ``end_axis`` (inclusive) into one of their product size."""

    def reshape(self, bottom, top):
        p = self.param.flatten_param
        shape = bottom[0].shape
        start = self.canonical_axis(bottom[0], p.axis)
        end = self.canonical_axis(bottom[0], p.end_axis)
        if end < start:
            self.fail(f"end_axis {p.end_axis} comes before axis {p.axis} for bottom shape {shape}",
                      ConfigError)
        top[0].reshape(shape[:start] + (bottom[0].count_from(start, end + 1),) + shape[end + 1:])


@register("Reshape")
class ReshapeLayer(_ViewLayer):
    """Replaces bottom axes [axis, axis + num_axes) by ``shape``: a 0 copies the bottom's
    dimension at that position, one -1 is inferred so the counts agree."""

    def layer_setup(self, bottom, top):
        super().layer_setup(bottom, top)
        dims = list(self.param.reshape_param.shape.dim)
        if dims.count(-1) > 1:
            self.fail(f"shape {dims} has more than one -1", ConfigError)
        if any(d < -1 for d in dims):
            self.fail(f"shape {dims} has a dimension below -1", ConfigError)
        self.dims = dims

    def reshape(self, bottom, top):
        p = self.param.reshape_param
        shape = bottom[0].shape
        n = len(shape)
        start = p.axis if p.axis >= 0 else n + p.axis + 1
        if not 0 <= start <= n:
            self.fail(f"reshape_param.axis {p.axis} out of range for bottom shape {shape}",
                      ConfigError)
        end = n if p.num_axes == -1 else start + p.num_axes
        if p.num_axes < -1 or end > n:
            self.fail(f"reshape_param.num_axes {p.num_axes} from axis {start} does not fit "
                      f"bottom shape {shape}", ConfigError)
        middle = []
        for i, d in enumerate(self.dims):
            if d == 0:
                if start + i >= n:
                    self.fail(f"shape {self.dims}: dimension {i} copies axis {start + i}, "
                              f"which bottom shape {shape} lacks")
                d = shape[start + i]
            middle.append(d)
        new_shape = list(shape[:start]) + middle + list(shape[end:])
        count = bottom[0].count
        if -1 in middle:
            known = math.prod(d for d in new_shape if d != -1)
            if known == 0 or count % known:
                self.fail(f"cannot infer the -1 in shape {self.dims} for bottom shape {shape} "
                          f"({count} elements)")
            new_shape[new_shape.index(-1)] = count // known
        new_shape = tuple(new_shape)
        if math.prod(new_shape) != count:
            self.fail(f"shape {self.dims} gives top shape {new_shape} with "
                      f"{math.prod(new_shape)} elements, but bottom shape {shape} has {count}")
        top[0].reshape(new_shape)


@register("Crop")
class CropLayer(Layer):
    """Crops bottom 0 to the shape of bottom 1 on the axes from ``axis`` on, starting at
    ``offset`` (one value for all those axes, one per axis, or 0 when none)."""

    exact_bottoms = 2
    exact_tops = 1

    def reshape(self, bottom, top):
        p = self.param.crop_param
        big, ref = bottom[0].shape, bottom[1].shape
        if len(big) != len(ref):
            self.fail(f"bottom shapes {big} and {ref} have different numbers of axes")
        start = self.canonical_axis(bottom[0], p.axis)
        n_cropped = len(big) - start
        offsets = list(p.offset)
        if len(offsets) not in (0, 1, n_cropped):
            self.fail(f"has {len(offsets)} offsets for {n_cropped} cropped axes "
                      "(give 0, 1 or one per axis)", ConfigError)
        if len(offsets) <= 1:
            offsets = (offsets or [0]) * n_cropped
        index = [slice(None)] * start
        for i, off in enumerate(offsets):
            axis = start + i
            if off + ref[axis] > big[axis]:
                self.fail(f"offset {off} plus size {ref[axis]} exceeds dimension {big[axis]} on "
                          f"axis {axis} (bottom shapes {big} and {ref})")
            index.append(slice(off, off + ref[axis]))
        self.window = tuple(index)
        top[0].reshape(big[:start] + ref[start:])

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data[self.window]

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = 0
            bottom[0].diff[self.window] = top[0].diff
        if propagate_down[1]:
            bottom[1].diff[...] = 0


@register("Silence")
class SilenceLayer(Layer):
    """Consumes its bottoms and outputs nothing; backward writes zero diffs."""

    min_bottoms = 1
    exact_tops = 0

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        for b, down in zip(bottom, propagate_down):
            if down:
                b.diff[...] = 0


@register("ArgMax")
class ArgMaxLayer(Layer):
    """Indices (and with ``out_max_val`` the values) of the ``top_k`` largest entries per item
    over all axes after the first, or along ``axis`` when set; equal values put the larger
    index first. Without ``axis`` the top is (N, 1 or 2, top_k, 1...); with ``axis`` it is the
    bottom shape with ``top_k`` on that axis, holding values when ``out_max_val``."""

    exact_bottoms = 1
    exact_tops = 1

    def layer_setup(self, bottom, top):
        p = self.param.argmax_param
        self.top_k = p.top_k
        self.out_max_val = p.out_max_val
        self.axis = self.canonical_axis(bottom[0], p.axis) if p.HasField("axis") else None
        if self.top_k < 1:
            self.fail("top_k must be at least 1", ConfigError)

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        dim = shape[self.axis] if self.axis is not None else bottom[0].count_from(1)
        if self.top_k > dim:
            self.fail(f"top_k {self.top_k} exceeds the {dim} values per item of bottom shape "
                      f"{shape}", ConfigError)
        if self.axis is not None:
            out = list(shape)
            out[self.axis] = self.top_k
        else:
            out = [1] * max(len(shape), 3)
            out[0] = shape[0]
            out[1] = 2 if self.out_max_val else 1
            out[2] = self.top_k
        top[0].reshape(tuple(out))

    def allow_force_backward(self, bottom_index):
        return False

    def forward(self, bottom, top):
        xp = backend.array_module(bottom[0].data)
        data = bottom[0].data
        if self.axis is None:
            values = data.reshape(data.shape[0], -1)
        else:
            values = _move_axis_last(data, self.axis)
        dim = values.shape[-1]
        reversed_values = values[..., ::-1]
        if self.top_k == 1:
            position = xp.argmax(reversed_values, axis=-1)[..., None]
        else:
            position = xp.argsort(-reversed_values, axis=-1, kind="stable")[..., :self.top_k]
        index = dim - 1 - position
        best = xp.take_along_axis(values, index, axis=-1)
        if self.axis is not None:
            result = best if self.out_max_val else index
            top[0].data[...] = _move_axis_last(result, self.axis)
        else:
            out = top[0].data.reshape(data.shape[0], -1, self.top_k)
            out[:, 0, :] = index
            if self.out_max_val:
                out[:, 1, :] = best

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            self.fail("has no backward", ConfigError)


@register("Softmax")
class SoftmaxLayer(Layer):
    """``top = exp(x - max) / sum(exp(x - max))`` along ``axis`` (default 1);
    backward ``dx = (dy - sum(dy * y)) * y`` along the same axis."""

    exact_bottoms = 1
    exact_tops = 1

    def reshape(self, bottom, top):
        self.axis = self.canonical_axis(bottom[0], self.param.softmax_param.axis)
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = softmax(bottom[0].data, self.axis)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            y, dy = top[0].data, top[0].diff
            bottom[0].diff[...] = (dy - (dy * y).sum(axis=self.axis, keepdims=True)) * y
