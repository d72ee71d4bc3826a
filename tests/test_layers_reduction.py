"""Reduction, Tile, Parameter, BatchReindex, Filter, Embed: forward against independent float64
loops, backward by central differences."""
import itertools

import numpy as np
import pytest

import owlnet.layer_types  # noqa: F401  (registers the layer types)
from gradcheck import check_gradient, forward, make_layer
from owlnet.errors import ConfigError, DataError

rs = np.random.default_rng(5)


def randn(*shape):
    return rs.standard_normal(shape)


# -- Reduction --------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_reduction(op, axis):
    x = randn(2, 3, 4)
    text = (f'name: "r" type: "Reduction" '
            f'reduction_param {{ operation: {op} axis: {axis} coeff: -1.5 }}')
    layer, bottom, top = make_layer(text, [x])
    y = forward(layer, bottom, top)[0]
    ax = axis % 3
    assert y.shape == x.shape[:ax]
    expect = np.zeros(x.shape[:ax])
    for lead in itertools.product(*[range(d) for d in x.shape[:ax]]):
        values = [float(v) for v in x[lead].ravel()]
        fn = {"SUM": lambda v: v, "ASUM": abs, "SUMSQ": lambda v: v * v, "MEAN": lambda v: v}[op]
        total = sum(fn(v) for v in values)
        if op == "MEAN":
            total /= len(values)
        expect[lead] = -1.5 * total
    np.testing.assert_allclose(y, expect, rtol=1e-12)
    check_gradient(layer, bottom, top)


# -- Tile -------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_tile(axis):
    x = randn(2, 3, 2)
    layer, bottom, top = make_layer(
        f'name: "t" type: "Tile" tile_param {{ axis: {axis} tiles: 3 }}', [x])
    y = forward(layer, bottom, top)[0]
    np.testing.assert_array_equal(y, np.tile(x, [3 if a == axis % 3 else 1 for a in range(3)]))
    check_gradient(layer, bottom, top)
    with pytest.raises(ConfigError, match="tiles"):
        make_layer('name: "t" type: "Tile"', [x])


# -- Parameter --------------------------------------------------------------------------------
def test_parameter():
    layer, bottom, top = make_layer(
        'name: "p" type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }', [])
    assert layer.blobs[0].shape == (2, 3)
    np.testing.assert_array_equal(forward(layer, bottom, top)[0], 0)
    layer.blobs[0].data[...] = w = randn(2, 3)
    np.testing.assert_array_equal(forward(layer, bottom, top)[0], w)
    check_gradient(layer, bottom, top)


# -- BatchReindex -----------------------------------------------------------------------------
def test_batch_reindex():
    x = randn(4, 2, 3)
    perm = np.array([3, 0, 3, 1, 1, 1], dtype=float)
    layer, bottom, top = make_layer('name: "b" type: "BatchReindex"', [x, perm])
    y = forward(layer, bottom, top)[0]
    assert y.shape == (6, 2, 3)
    for i, p in enumerate(perm):
        np.testing.assert_array_equal(y[i], x[int(p)])
    check_gradient(layer, bottom, top, check_bottoms=[0])
    assert not layer.allow_force_backward(1)
    with pytest.raises(ConfigError, match="indices"):
        layer.backward(top, [True, True], bottom)
    bottom[1].data[0] = 4
    with pytest.raises(DataError, match=r"'b'.*bottom1.*\[0, 4\)"):
        forward(layer, bottom, top)


# -- Filter -----------------------------------------------------------------------------------
def test_filter():
    a, b = randn(5, 2, 3), randn(5, 4)
    selector = np.array([0, 1, 0, 1, 1], dtype=float).reshape(5, 1)
    layer, bottom, top = make_layer('name: "f" type: "Filter"', [a, b, selector], n_tops=2)
    ya, yb = forward(layer, bottom, top)
    keep = [n for n in range(5) if selector[n, 0] != 0]
    np.testing.assert_array_equal(ya, np.stack([a[n] for n in keep]))
    np.testing.assert_array_equal(yb, np.stack([b[n] for n in keep]))
    check_gradient(layer, bottom, top, check_bottoms=[0, 1])
    with pytest.raises(ConfigError, match="one top per data bottom"):
        make_layer('name: "f" type: "Filter"', [a, b, selector], n_tops=1)


# -- Embed ------------------------------------------------------------------------------------
EMBED = """name: "e" type: "Embed" embed_param {{ num_output: 3 input_dim: 5 bias_term: {bias}
  weight_filler {{ type: "gaussian" std: 1 }} bias_filler {{ type: "gaussian" std: 1 }} }}"""


@pytest.mark.parametrize("bias", ["true", "false"])
def test_embed(bias):
    words = np.array([[0, 4, 2], [2, 2, 1]], dtype=float)
    layer, bottom, top = make_layer(EMBED.format(bias=bias), [words])
    assert layer.blobs[0].shape == (5, 3)
    y = forward(layer, bottom, top)[0]
    assert y.shape == (2, 3, 3)
    w = layer.blobs[0].data
    for i, j in itertools.product(range(2), range(3)):
        expect = w[int(words[i, j])] + (layer.blobs[1].data if bias == "true" else 0)
        np.testing.assert_allclose(y[i, j], expect, rtol=1e-12)
    check_gradient(layer, bottom, top, check_bottoms=[])
    bottom[0].data[0, 0] = 1.5
    with pytest.raises(DataError, match="1.5"):
        forward(layer, bottom, top)
