"""Test helpers: build one layer from prototxt text and check its gradients in float64.

``check_gradient`` follows Caffe's GradientChecker: with fixed random top weights ``w``,
the objective is ``L = sum_i sum(w_i * top_i)``; the analytic gradient comes from
``backward`` with ``top_i.diff = w_i``, the numeric one from central differences
``(L(x + h) - L(x - h)) / 2h`` for every element of every checked bottom and parameter.
"""
from __future__ import annotations

import numpy as np
from google.protobuf import text_format

from owlnet import backend
from owlnet.blob import Blob
from owlnet.layer_types import create_layer
from owlnet.proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def layer_param(text: str):
    """A LayerParameter from prototxt text (the body of a ``layer { ... }`` block)."""
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def make_layer(text: str, bottoms, n_tops: int = 1, phase=TRAIN, dtype=np.float64, seed=1):
    """Create, set up and reshape a layer on float64 copies of ``bottoms`` (arrays).

    Returns ``(layer, bottom_blobs, top_blobs)``.
    """
    backend.set_random_seed(seed)
    with backend.dtype_scope(dtype):
        bottom = []
        for i, arr in enumerate(bottoms):
            b = Blob(np.shape(arr), name=f"bottom{i}")
            b.data[...] = arr
            bottom.append(b)
        top = [Blob((), name=f"top{i}") for i in range(n_tops)]
        layer = create_layer(layer_param(text), phase)
        layer.setup(bottom, top)
        layer.reshape(bottom, top)
    return layer, bottom, top


def forward(layer, bottom, top):
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return [t.data.copy() for t in top]


def check_gradient(layer, bottom, top, check_bottoms=None, check_params=True, step=1e-6,
                   rtol=1e-4, atol=1e-6, seed=7, reseed=None, top_ids=None):
    """Compare backward() with central differences; raise AssertionError on a mismatch.

    ``check_bottoms``: indices of bottoms to check (default all); ``reseed``: a seed set before
    every forward so random layers (Dropout) draw the same mask each time; ``top_ids``: tops
    that enter the objective (default all).
    """
    rs = np.random.default_rng(seed)
    if check_bottoms is None:
        check_bottoms = list(range(len(bottom)))
    if top_ids is None:
        top_ids = list(range(len(top)))

    def run_forward():
        if reseed is not None:
            backend.set_random_seed(reseed)
        layer.reshape(bottom, top)
        layer.forward(bottom, top)

    run_forward()
    weights = {i: rs.standard_normal(top[i].shape) for i in top_ids}

    def objective():
        run_forward()
        return sum(float(np.sum(weights[i] * top[i].data)) for i in top_ids)

    # analytic
    run_forward()
    for i, t in enumerate(top):
        t.diff[...] = weights[i] if i in top_ids else 0.0
    for p in layer.blobs:
        p.diff[...] = 0.0
    for b in bottom:
        b.diff[...] = 0.0
    propagate = [i in check_bottoms for i in range(len(bottom))]
    layer.backward(top, propagate, bottom)
    targets = [(f"bottom[{i}]", bottom[i], bottom[i].diff.copy()) for i in check_bottoms]
    if check_params:
        targets += [(f"param[{k}]", p, p.diff.copy()) for k, p in enumerate(layer.blobs)]

    for label, blob, analytic in targets:
        flat = blob.data.reshape(-1)
        numeric = np.empty(flat.size)
        for j in range(flat.size):
            keep = flat[j]
            flat[j] = keep + step
            plus = objective()
            flat[j] = keep - step
            minus = objective()
            flat[j] = keep
            numeric[j] = (plus - minus) / (2 * step)
        numeric = numeric.reshape(blob.shape)
        err = np.abs(numeric - analytic)
        bound = atol + rtol * np.maximum(np.abs(numeric), np.abs(analytic))
        if not np.all(err <= bound):
            k = int(np.argmax(err - bound))
            raise AssertionError(
                f"{layer.type} '{layer.name}' {label}: analytic {analytic.reshape(-1)[k]:.8g} vs "
                f"numeric {numeric.reshape(-1)[k]:.8g} at flat index {k} "
                f"(max abs err {err.max():.3g})")
    run_forward()


def run_both_ways(text, x, phase=TRAIN, seed=3):
    """Forward and backward of a one-bottom layer once out of place and once in place (top is
    the bottom Blob), from the same seeds and the same top gradient; returns two
    ``(y, dx, param data, param diffs)`` tuples."""
    dy = np.random.default_rng(0).standard_normal(np.shape(x))
    results = []
    for in_place in (False, True):
        backend.set_random_seed(seed)
        with backend.dtype_scope(np.float64):
            bottom = Blob(np.shape(x), name="data")
            bottom.data[...] = x
            top = bottom if in_place else Blob((), name="out")
            layer = create_layer(layer_param(text), phase)
            layer.setup([bottom], [top])
            layer.reshape([bottom], [top])
        backend.set_random_seed(seed + 1)  # random layers (Dropout) draw the same mask
        layer.forward([bottom], [top])
        y = top.data.copy()
        top.diff[...] = dy
        layer.backward([top], [True], [bottom])
        results.append((y, bottom.diff.copy(), [p.data.copy() for p in layer.blobs],
                        [p.diff.copy() for p in layer.blobs]))
    return results


def assert_same_both_ways(text, x, phase=TRAIN):
    """In-place and out-of-place runs agree on the top, the bottom diff and the parameters."""
    (y0, dx0, data0, diffs0), (y1, dx1, data1, diffs1) = run_both_ways(text, x, phase)
    for a, b in [(y0, y1), (dx0, dx1), *zip(data0, data1), *zip(diffs0, diffs1)]:
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
