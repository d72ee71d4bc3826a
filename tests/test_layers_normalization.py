"""BatchNorm, Scale, Bias and MVN: forward against float64 loops written here, backward by
central differences, in-place runs against out-of-place ones, and bad parameters."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from gradcheck import TEST, TRAIN, assert_same_both_ways, check_gradient, forward, make_layer

from owlnet.errors import ConfigError, ShapeError

RS = np.random.default_rng(77)


def normal(*shape):
    return RS.standard_normal(shape)


def per_channel_stats(x):
    """Mean and biased variance of every channel (axis 1), by explicit loops."""
    channels = x.shape[1] if x.ndim > 1 else 1
    means, variances = [], []
    for c in range(channels):
        values = (x[:, c] if x.ndim > 1 else x).reshape(-1)
        mean = sum(values) / len(values)
        means.append(mean)
        variances.append(sum((v - mean) ** 2 for v in values) / len(values))
    return np.array(means), np.array(variances)


def channel_view(v, ndim):
    return v.reshape((1, -1) + (1,) * (ndim - 2))


# -- BatchNorm -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 2, 3), (4, 3), (1, 2, 3, 1)])
def test_batchnorm_train(shape):
    x = normal(*shape) * 2 + 0.5
    layer, bottom, top = make_layer('type: "BatchNorm" batch_norm_param { eps: 0.001 }', [x],
                                    phase=TRAIN)
    assert layer.param_propagate_down == [False, False, False]
    (y,) = forward(layer, bottom, top)
    mean, var = per_channel_stats(x)
    eps = np.float32(0.001)
    np.testing.assert_allclose(
        y, (x - channel_view(mean, x.ndim)) / np.sqrt(channel_view(var, x.ndim) + eps),
        rtol=1e-10, atol=1e-12)
    check_gradient(layer, bottom, top)
    for blob in layer.blobs:
        assert not blob.diff.any()


def test_batchnorm_moving_averages_over_two_forwards():
    x1, x2 = normal(2, 3, 2, 2), normal(2, 3, 2, 2) * 3 - 1
    layer, bottom, top = make_layer(
        'type: "BatchNorm" batch_norm_param { moving_average_fraction: 0.75 }', [x1])
    forward(layer, bottom, top)
    bottom[0].data[...] = x2
    forward(layer, bottom, top)
    (m1, v1), (m2, v2) = per_channel_stats(x1), per_channel_stats(x2)
    m = 2 * 2 * 2
    correction = m / (m - 1)
    np.testing.assert_allclose(layer.blobs[2].data, [0.75 * 1 + 1])
    np.testing.assert_allclose(layer.blobs[0].data, 0.75 * m1 + m2)
    np.testing.assert_allclose(layer.blobs[1].data, 0.75 * correction * v1 + correction * v2)


def test_batchnorm_defaults():
    layer, _, _ = make_layer('type: "BatchNorm"', [np.ones((2, 4))], phase=TRAIN)
    assert (layer.use_global_stats, layer.eps) == (False, pytest.approx(1e-5))
    assert layer.moving_average_fraction == pytest.approx(0.999)
    assert [b.shape for b in layer.blobs] == [(4,), (4,), (1,)]
    assert [p.lr_mult for p in layer.param.param] == [0, 0, 0]
    layer, _, _ = make_layer('type: "BatchNorm"', [np.ones((2, 4))], phase=TEST)
    assert layer.use_global_stats
    layer, _, _ = make_layer('type: "BatchNorm" batch_norm_param { use_global_stats: false }',
                             [np.ones((2, 4))], phase=TEST)
    assert not layer.use_global_stats


@pytest.mark.parametrize("shape", [(2, 3, 2, 3), (3, 3)])
def test_batchnorm_global_stats(shape):
    x = normal(*shape)
    layer, bottom, top = make_layer(
        'type: "BatchNorm" batch_norm_param { use_global_stats: true eps: 0.01 }', [x])
    stored_mean, stored_var, stored_count = normal(3), RS.uniform(0.5, 2, 3), 2.5
    layer.blobs[0].data[...] = stored_mean
    layer.blobs[1].data[...] = stored_var
    layer.blobs[2].data[...] = stored_count
    (y,) = forward(layer, bottom, top)
    expected = np.empty_like(x)
    for c in range(3):
        mean, var = stored_mean[c] / stored_count, stored_var[c] / stored_count
        expected[:, c] = (x[:, c] - mean) / np.sqrt(var + np.float32(0.01))
    np.testing.assert_allclose(y, expected, rtol=1e-10)
    np.testing.assert_array_equal(layer.blobs[2].data, [2.5])  # not updated
    check_gradient(layer, bottom, top, check_params=False)
    for blob in layer.blobs:
        assert not blob.diff.any()


def test_batchnorm_global_stats_with_zero_count_uses_zero_statistics():
    x = normal(2, 3)
    layer, bottom, top = make_layer('type: "BatchNorm"', [x], phase=TEST)
    layer.blobs[0].data[...] = 5.0  # ignored: the count is 0
    (y,) = forward(layer, bottom, top)
    np.testing.assert_allclose(y, x / np.sqrt(np.float32(1e-5)))


@pytest.mark.parametrize("phase", [TRAIN, TEST])
def test_batchnorm_in_place(phase):
    assert_same_both_ways('type: "BatchNorm"', normal(2, 3, 2, 2), phase=phase)


def test_batchnorm_backward_survives_a_following_in_place_layer():
    x = normal(3, 2, 2, 2)
    dy = normal(3, 2, 2, 2)
    layer, bottom, top = make_layer('type: "BatchNorm"', [x])
    forward(layer, bottom, top)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    expected = bottom[0].diff.copy()
    top[0].data[...] = -7.0  # as a Scale running in place on this top would do
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(bottom[0].diff, expected)


def test_batchnorm_refuses_learned_statistics_and_channel_changes():
    with pytest.raises(ConfigError, match="lr_mult"):
        make_layer('name: "bn" type: "BatchNorm" param { lr_mult: 1 }', [np.ones((2, 3))])
    layer, bottom, top = make_layer('name: "bn" type: "BatchNorm"', [np.ones((2, 3))])
    bottom[0].reshape(2, 4)
    with pytest.raises(ShapeError, match="'bn'.*3 channels"):
        layer.reshape(bottom, top)


# -- Scale -----------------------------------------------------------------------------------
def naive_broadcast(op, x, operand, axis):
    """Combine every x[index] with operand[index[axis : axis + operand.ndim]], one at a time."""
    out = np.empty_like(x)
    for index in itertools.product(*(range(n) for n in x.shape)):
        out[index] = op(x[index], operand[index[axis:axis + operand.ndim]])
    return out


SCALE_CASES = [
    # (scale_param text, x shape, learned operand shape, axis used)
    ("", (2, 3, 2, 3), (3,), 1),
    ("axis: 0 num_axes: 2", (2, 3, 4), (2, 3), 0),
    ("axis: 1 num_axes: -1", (1, 3, 2, 2), (3, 2, 2), 1),
    ("num_axes: 0", (2, 3, 2), (), 0),
    ("axis: -1", (2, 3, 4), (4,), 2),
    ("axis: 1 num_axes: 2", (3, 2, 4), (2, 4), 1),
    ("", (4, 5), (5,), 1),
]


@pytest.mark.parametrize("bias_term", [False, True])
@pytest.mark.parametrize("params, shape, operand_shape, axis", SCALE_CASES)
def test_scale_learned(params, shape, operand_shape, axis, bias_term):
    text = (f'type: "Scale" scale_param {{ {params} filler {{ type: "gaussian" }} '
            f'bias_term: {str(bias_term).lower()} bias_filler {{ type: "uniform" min: -1 }} }}')
    x = normal(*shape)
    layer, bottom, top = make_layer(text, [x])
    assert [b.shape for b in layer.blobs] == [operand_shape] * (2 if bias_term else 1)
    scale = layer.blobs[0].data
    (y,) = forward(layer, bottom, top)
    expected = naive_broadcast(lambda a, s: a * s, x, scale, axis)
    if bias_term:
        expected += naive_broadcast(lambda a, b: b, x, layer.blobs[1].data, axis)
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    check_gradient(layer, bottom, top)


def test_scale_default_fillers():
    layer, _, _ = make_layer('type: "Scale" scale_param { bias_term: true }', [normal(2, 3)])
    np.testing.assert_array_equal(layer.blobs[0].data, np.ones(3))
    np.testing.assert_array_equal(layer.blobs[1].data, np.zeros(3))


@pytest.mark.parametrize("bias_term", [False, True])
@pytest.mark.parametrize("params, shape, operand_shape, axis", [
    ("", (2, 3, 2, 4), (3, 2), 1),
    ("axis: 0", (2, 3, 2), (2,), 0),
    ("", (2, 3, 2), (), 0),
    ("axis: -2", (1, 2, 3, 2), (3, 2), 2),
])
def test_scale_from_second_bottom(params, shape, operand_shape, axis, bias_term):
    text = (f'type: "Scale" scale_param {{ {params} bias_term: {str(bias_term).lower()} '
            'bias_filler { type: "gaussian" } }')
    x, scale = normal(*shape), normal(*operand_shape)
    layer, bottom, top = make_layer(text, [x, scale])
    assert [b.shape for b in layer.blobs] == ([operand_shape] if bias_term else [])
    (y,) = forward(layer, bottom, top)
    expected = naive_broadcast(lambda a, s: a * s, x, scale, axis)
    if bias_term:
        expected += naive_broadcast(lambda a, b: b, x, layer.blobs[0].data, axis)
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    check_gradient(layer, bottom, top)


def test_scale_second_bottom_gradient_is_written_not_added():
    layer, bottom, top = make_layer('type: "Scale"', [normal(2, 3, 2), normal(3)])
    forward(layer, bottom, top)
    top[0].diff[...] = normal(2, 3, 2)
    bottom[1].diff[...] = 100.0
    layer.backward(top, [False, True], bottom)
    expected = (top[0].diff * bottom[0].data).sum(axis=(0, 2))
    np.testing.assert_allclose(bottom[1].diff, expected)


@pytest.mark.parametrize("bias_term", [False, True])
def test_scale_in_place(bias_term):
    text = (f'type: "Scale" scale_param {{ filler {{ type: "gaussian" }} '
            f'bias_term: {str(bias_term).lower()} bias_filler {{ type: "gaussian" }} }}')
    assert_same_both_ways(text, normal(2, 3, 2, 2))


def test_scale_bad_shapes():
    with pytest.raises(ShapeError, match="'s'.*does not match"):
        make_layer('name: "s" type: "Scale"', [normal(2, 3, 4), normal(4)])
    with pytest.raises(ConfigError, match="num_axes"):
        make_layer('name: "s" type: "Scale" scale_param { num_axes: -2 }', [normal(2, 3)])
    with pytest.raises(ShapeError, match="'s'.*runs past"):
        make_layer('name: "s" type: "Scale" scale_param { axis: 1 num_axes: 3 }',
                   [normal(2, 3, 4)])
    with pytest.raises(ShapeError, match="'s'.*axis 5"):
        make_layer('name: "s" type: "Scale" scale_param { axis: 5 }', [normal(2, 3)])
    layer, bottom, top = make_layer('name: "s" type: "Scale"', [normal(2, 3)])
    bottom[0].reshape(2, 4)
    with pytest.raises(ShapeError, match="'s'"):
        layer.reshape(bottom, top)


# -- Bias ------------------------------------------------------------------------------------
@pytest.mark.parametrize("params, shape, operand_shape, axis", SCALE_CASES)
def test_bias_learned(params, shape, operand_shape, axis):
    text = f'type: "Bias" bias_param {{ {params} filler {{ type: "gaussian" }} }}'
    x = normal(*shape)
    layer, bottom, top = make_layer(text, [x])
    assert layer.blobs[0].shape == operand_shape
    (y,) = forward(layer, bottom, top)
    np.testing.assert_allclose(y, naive_broadcast(lambda a, b: a + b, x, layer.blobs[0].data,
                                                  axis), rtol=1e-12)
    check_gradient(layer, bottom, top)


def test_bias_default_filler_is_zero():
    layer, _, _ = make_layer('type: "Bias"', [normal(2, 3, 2)])
    np.testing.assert_array_equal(layer.blobs[0].data, np.zeros(3))


@pytest.mark.parametrize("params, shape, operand_shape, axis", [
    ("", (2, 3, 2, 4), (3, 2), 1), ("axis: 0", (2, 3), (2, 3), 0), ("", (2, 3), (), 0)])
def test_bias_from_second_bottom(params, shape, operand_shape, axis):
    x, bias = normal(*shape), normal(*operand_shape)
    layer, bottom, top = make_layer(f'type: "Bias" bias_param {{ {params} }}', [x, bias])
    assert layer.blobs == []
    (y,) = forward(layer, bottom, top)
    np.testing.assert_allclose(y, naive_broadcast(lambda a, b: a + b, x, bias, axis))
    check_gradient(layer, bottom, top)


def test_bias_in_place():
    assert_same_both_ways('type: "Bias" bias_param { filler { type: "gaussian" } }',
                          normal(2, 3, 2))


# -- MVN -------------------------------------------------------------------------------------
def naive_mvn(x, groups, normalize_variance, eps):
    out = np.empty(x.shape)
    flat_in, flat_out = x.reshape(groups, -1), out.reshape(groups, -1)
    for g in range(groups):
        values = flat_in[g]
        mean = sum(values) / len(values)
        std = np.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        flat_out[g] = (values - mean) / (std + eps) if normalize_variance else values - mean
    return out


@pytest.mark.parametrize("normalize_variance", [True, False])
@pytest.mark.parametrize("across_channels", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 2, 3), (1, 2, 3, 1), (3, 4)])
def test_mvn(shape, across_channels, normalize_variance):
    text = (f'type: "MVN" mvn_param {{ across_channels: {str(across_channels).lower()} '
            f'normalize_variance: {str(normalize_variance).lower()} }}')
    x = normal(*shape) * 2 + 1
    layer, bottom, top = make_layer(text, [x])
    (y,) = forward(layer, bottom, top)
    groups = shape[0] if across_channels else shape[0] * shape[1]
    eps = float(np.float32(1e-9))
    np.testing.assert_allclose(y, naive_mvn(x, groups, normalize_variance, eps),
                               rtol=1e-10, atol=1e-12)
    if groups < x.size:  # a group of one value is constant: no smooth gradient to check
        check_gradient(layer, bottom, top)


def test_mvn_in_place():
    assert_same_both_ways('type: "MVN"', normal(2, 3, 2, 2))
