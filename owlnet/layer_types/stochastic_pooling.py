"""Pooling with ``pool: STOCHASTIC`` (Zeiler & Fergus; Caffe's GPU kernels), called from
vision.py's PoolingLayer.

Windows start at (ph * sh, pw * sw), span kh x kw clipped to the image (Caffe's stochastic
kernels ignore pad, so a pad is refused), in the pooled size Pooling computes. With S the sum
of a window's values (meant to be non-negative, e.g. after a ReLU):

* TRAIN: draw u ~ U[0, 1) per output; the output is the first value (row-major) at which the
  running sum reaches u * S (the last one if none does), so value v is picked with probability
  v / S; backward routes dy to that position.
* TEST: y = sum(v^2) / (S + FLT_MIN), the activation-weighted average; its gradient is
  dy * (2 v (S + FLT_MIN) - sum(v^2)) / (S + FLT_MIN)^2 for each value v in the window.
"""
from __future__ import annotations

from .. import backend
from ..errors import ConfigError
from ..proto import caffe_pb2
from .volume import scatter_windows, window_stack

_FLT_MIN = 1.1754943508222875e-38


def check(layer):
    """Refuse what Caffe's stochastic kernels do not implement."""
    if any(layer.pad):
        layer.fail(f"STOCHASTIC pooling ignores pad in Caffe; remove pad {layer.pad}",
                   ConfigError)


def _windows(layer, x):
    xp = backend.array_module(x)
    return xp, *window_stack(xp, x, tuple(layer.kernel), layer.stride, (0, 0), layer.pooled, 0)


def forward(layer, bottom, top):
    xp, values, inside = _windows(layer, bottom[0].data)
    values = values * inside
    total = values.sum(axis=-1)
    if layer.phase != caffe_pb2.TRAIN:
        top[0].data[...] = (values * values).sum(axis=-1) / (total + _FLT_MIN)
        return
    draw = xp.asarray(backend.rng().random(total.shape)).astype(values.dtype)
    reached = (xp.cumsum(values, axis=-1) >= (draw * total)[..., None]) & inside
    last_inside = inside.shape[-1] - 1 - xp.argmax(inside[..., ::-1], axis=-1)
    layer.stochastic_choice = xp.where(reached.any(axis=-1), xp.argmax(reached, axis=-1),
                                       last_inside)
    top[0].data[...] = xp.take_along_axis(values, layer.stochastic_choice[..., None], -1)[..., 0]


def backward(layer, top, propagate_down, bottom):
    if not propagate_down[0]:
        return
    dy = top[0].diff
    xp, values, inside = _windows(layer, bottom[0].data)
    if layer.phase == caffe_pb2.TRAIN:
        grads = dy[..., None] * (xp.arange(values.shape[-1]) == layer.stochastic_choice[..., None])
    else:
        values = values * inside
        total = values.sum(axis=-1, keepdims=True) + _FLT_MIN
        squares = (values * values).sum(axis=-1, keepdims=True)
        grads = dy[..., None] * (2 * values * total - squares) / (total * total) * inside
    bottom[0].diff[...] = scatter_windows(xp, grads, bottom[0].shape[2:], tuple(layer.kernel),
                                          layer.stride, (0, 0), layer.pooled)
