"""Element-wise layers: forward against float64 formulas written here, backward by central
differences, in-place runs against out-of-place ones, and bad parameters."""
from __future__ import annotations

import math

import numpy as np
import pytest
from gradcheck import (TEST, TRAIN, assert_same_both_ways, check_gradient, forward,
                       layer_param, make_layer)

from owlnet import backend
from owlnet.blob import Blob
from owlnet.errors import ConfigError, ShapeError
from owlnet.layer_types import create_layer

RS = np.random.default_rng(2024)


def away_from_zero(shape, low=0.1, high=1.5):
    """Values of random sign with |x| in [low, high]: no kinks inside a finite-difference step."""
    magnitude = RS.uniform(low, high, size=shape)
    return np.where(RS.random(shape) < 0.5, -magnitude, magnitude)


def elementwise(fn, x):
    """Apply a scalar Python function to every element (the slow, obviously right way)."""
    return np.array([fn(float(v)) for v in x.reshape(-1)]).reshape(x.shape)


@pytest.mark.parametrize("slope", [0.0, 0.25, -0.5])
def test_relu_in_place(slope):
    assert_same_both_ways(f'type: "ReLU" relu_param {{ negative_slope: {slope} }}',
                          away_from_zero((2, 3, 2, 3)))


# -- PReLU -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("shape", [(1, 3, 2, 5), (3, 4)])
def test_prelu(shared, shape):
    x = away_from_zero(shape)
    text = (f'type: "PReLU" prelu_param {{ channel_shared: {str(shared).lower()} '
            'filler { type: "uniform" min: -0.5 max: 0.9 } }')
    layer, bottom, top = make_layer(text, [x])
    slopes = layer.blobs[0].data.copy()
    assert slopes.shape == (() if shared else (shape[1],))
    (y,) = forward(layer, bottom, top)
    expected = np.empty_like(x)
    for c in range(shape[1]):
        a = slopes if shared else slopes[c]
        xc = x[:, c]
        expected[:, c] = np.maximum(xc, 0) + a * np.minimum(xc, 0)
    np.testing.assert_allclose(y, expected)
    check_gradient(layer, bottom, top)


def test_prelu_default_slope_is_quarter():
    layer, _, _ = make_layer('type: "PReLU"', [np.ones((2, 5, 1, 1))])
    np.testing.assert_array_equal(layer.blobs[0].data, np.full(5, 0.25))


@pytest.mark.parametrize("shared", [False, True])
def test_prelu_in_place(shared):
    text = (f'type: "PReLU" prelu_param {{ channel_shared: {str(shared).lower()} '
            'filler { type: "gaussian" std: 0.5 } }')
    assert_same_both_ways(text, away_from_zero((2, 3, 2, 2)))


def test_prelu_needs_two_axes():
    with pytest.raises(ShapeError, match="PReLU"):
        make_layer('name: "p" type: "PReLU"', [np.ones(4)])


# -- smooth activations ----------------------------------------------------------------------
SMOOTH = {
    'type: "ELU" elu_param { alpha: 0.75 }':
        lambda v: v if v > 0 else 0.75 * (math.exp(v) - 1),
    'type: "ELU"':
        lambda v: v if v > 0 else math.exp(v) - 1,
    'type: "Sigmoid"': lambda v: 1 / (1 + math.exp(-v)),
    'type: "TanH"': math.tanh,
    'type: "AbsVal"': abs,
    'type: "BNLL"': lambda v: math.log(1 + math.exp(v)),
    'type: "Swish"': lambda v: v / (1 + math.exp(-v)),
    'type: "Swish" swish_param { beta: 1.75 }': lambda v: v / (1 + math.exp(-1.75 * v)),
    'type: "Clip" clip_param { min: -0.625 max: 0.8125 }': lambda v: min(max(v, -0.625), 0.8125),
    'type: "Power" power_param { power: 3 scale: 0.5 shift: -0.25 }':
        lambda v: (0.5 * v - 0.25) ** 3,
    'type: "Power" power_param { power: 2 scale: -1.5 shift: 0.25 }':
        lambda v: (0.25 - 1.5 * v) ** 2,
    'type: "Power" power_param { power: 0.5 scale: 0.5 shift: 1 }':
        lambda v: math.sqrt(1 + 0.5 * v),
    'type: "Power" power_param { power: -1.5 scale: 0.5 shift: 1 }':
        lambda v: (1 + 0.5 * v) ** -1.5,
    'type: "Power" power_param { power: 1 scale: 2 shift: 3 }': lambda v: 2 * v + 3,
    'type: "Power"': lambda v: v,
    'type: "Exp"': math.exp,
    'type: "Exp" exp_param { base: 2 scale: 0.5 shift: 1 }': lambda v: 2 ** (1 + 0.5 * v),
    'type: "Log" log_param { shift: 2 }': lambda v: math.log(2 + v),
    'type: "Log" log_param { base: 10 scale: 3 shift: 5 }': lambda v: math.log10(5 + 3 * v),
}


@pytest.mark.parametrize("text", list(SMOOTH))
@pytest.mark.parametrize("shape", [(1, 2, 3, 4), (3, 5)])
def test_smooth_activation(text, shape):
    x = away_from_zero(shape)
    x = np.where(np.abs(np.abs(x) - 0.7) < 0.15, 0.4, x)  # keep off the Clip corners
    layer, bottom, top = make_layer(text, [x])
    (y,) = forward(layer, bottom, top)
    np.testing.assert_allclose(y, elementwise(SMOOTH[text], x), rtol=1e-12, atol=1e-14)
    check_gradient(layer, bottom, top)


@pytest.mark.parametrize("text", [t for t in SMOOTH if '"AbsVal"' not in t])
def test_smooth_activation_in_place(text):
    assert_same_both_ways(text, away_from_zero((2, 3, 2)))


def test_power_with_zero_derivative():
    x = away_from_zero((2, 3))
    for text, value in [('type: "Power" power_param { power: 0 shift: 3 }', 1.0),
                        ('type: "Power" power_param { power: 3 scale: 0 shift: 2 }', 8.0)]:
        layer, bottom, top = make_layer(text, [x])
        (y,) = forward(layer, bottom, top)
        np.testing.assert_array_equal(y, np.full(x.shape, value))
        check_gradient(layer, bottom, top)


def test_bnll_and_sigmoid_are_stable_for_large_inputs():
    x = np.array([[-1000.0, -40.0, 0.0, 40.0, 1000.0]])
    layer, bottom, top = make_layer('type: "BNLL"', [x])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        (y,) = forward(layer, bottom, top)
    np.testing.assert_allclose(y, [[0.0, math.exp(-40), math.log(2), 40.0, 1000.0]],
                               rtol=1e-12, atol=1e-300)
    layer, bottom, top = make_layer('type: "Sigmoid"', [x])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        (y,) = forward(layer, bottom, top)
    np.testing.assert_allclose(y, [[0.0, 1 / (1 + math.exp(40)), 0.5, 1 / (1 + math.exp(-40)),
                                    1.0]], rtol=1e-12, atol=1e-16)


def test_absval_refuses_in_place():
    with backend.dtype_scope(np.float64):
        blob = Blob((2, 3))
        layer = create_layer(layer_param('name: "a" type: "AbsVal"'), TRAIN)
        layer.setup([blob], [blob])
        with pytest.raises(ConfigError, match="in place"):
            layer.reshape([blob], [blob])


@pytest.mark.parametrize("text", [
    'name: "e" type: "Exp" exp_param { base: -2 }',
    'name: "e" type: "Exp" exp_param { base: 0 }',
    'name: "l" type: "Log" log_param { base: 0 }',
    'name: "l" type: "Log" log_param { base: 1 }',
    'name: "c" type: "Clip" clip_param { min: 1 max: 0 }',
    'name: "d" type: "Dropout" dropout_param { dropout_ratio: 1 }',
    'name: "d" type: "Dropout" dropout_param { dropout_ratio: -0.1 }',
])
def test_bad_parameters(text):
    with pytest.raises(ConfigError, match="layer '[elcd]'"):
        make_layer(text, [np.ones((2, 3))])


def test_neuron_layers_take_one_bottom():
    with pytest.raises(ConfigError, match="exactly 1 bottom"):
        make_layer('type: "ReLU"', [np.ones(3), np.ones(3)])


# -- Threshold -------------------------------------------------------------------------------
def test_threshold():
    x = np.array([[-1.0, 0.2, 0.3, 0.30001, 5.0], [0.0, 0.299, 0.3, 1.0, -0.3]])
    layer, bottom, top = make_layer('type: "Threshold" threshold_param { threshold: 0.3 }', [x])
    (y,) = forward(layer, bottom, top)
    np.testing.assert_array_equal(y, [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]])
    layer.backward(top, [False], bottom)  # nothing asked, nothing raised
    with pytest.raises(ConfigError, match="no gradient"):
        layer.backward(top, [True], bottom)


def test_threshold_default_is_zero():
    layer, bottom, top = make_layer('type: "Threshold"', [np.array([-0.5, 0.0, 0.5])])
    np.testing.assert_array_equal(forward(layer, bottom, top)[0], [0, 0, 1])


# -- Dropout ---------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.5, 0.2, 0.0])
def test_dropout_train(ratio):
    x = away_from_zero((4, 5, 10, 10))
    layer, bottom, top = make_layer(f'type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}',
                                    [x], phase=TRAIN)
    (y,) = forward(layer, bottom, top)
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / (1 - ratio))
    assert abs(kept.mean() - (1 - ratio)) < 0.03
    dy = RS.standard_normal(x.shape)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(bottom[0].diff, np.where(kept, dy / (1 - ratio), 0.0))


def test_dropout_seed_fixes_mask():
    x = away_from_zero((3, 7))
    layer, bottom, top = make_layer('type: "Dropout"', [x], phase=TRAIN)
    backend.set_random_seed(11)
    (first,) = forward(layer, bottom, top)
    (second,) = forward(layer, bottom, top)
    backend.set_random_seed(11)
    (again,) = forward(layer, bottom, top)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, second)


def test_dropout_test_phase_is_identity():
    x = away_from_zero((2, 3, 4))
    layer, bottom, top = make_layer('type: "Dropout" dropout_param { dropout_ratio: 0.3 }',
                                    [x], phase=TEST)
    (y,) = forward(layer, bottom, top)
    np.testing.assert_array_equal(y, x)
    check_gradient(layer, bottom, top)


def test_dropout_gradient_with_fixed_mask():
    x = away_from_zero((1, 3, 2, 5))
    layer, bottom, top = make_layer('type: "Dropout" dropout_param { dropout_ratio: 0.4 }',
                                    [x], phase=TRAIN)
    check_gradient(layer, bottom, top, reseed=5)


@pytest.mark.parametrize("phase", [TRAIN, TEST])
def test_dropout_in_place(phase):
    assert_same_both_ways('type: "Dropout"', away_from_zero((2, 3, 4)), phase=phase)
