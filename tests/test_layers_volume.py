"""Pooling STOCHASTIC and N-d (3-d) Convolution / Pooling: forward against independent
float64 loops, backward by central differences."""
import itertools

import numpy as np
import pytest

import owlnet.layer_types  # noqa: F401  (registers the layer types)
from gradcheck import TEST, TRAIN, check_gradient, forward, make_layer
from owlnet.errors import ConfigError

rs = np.random.default_rng(29)

STO = 'name: "s" type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 3 stride: 2 }'


def windows_2d(x, k, s):
    """{(oh, ow): list of (h, w)} for Caffe's stochastic windows (no pad, clipped, ceil)."""
    h, w = x.shape[2:]
    oh, ow = -(-(h - k) // s) + 1, -(-(w - k) // s) + 1
    return {(i, j): [(a, b) for a in range(i * s, min(i * s + k, h))
                     for b in range(j * s, min(j * s + k, w))]
            for i, j in itertools.product(range(oh), range(ow))}


def test_stochastic_test_phase_weighted_average():
    x = rs.random((2, 2, 6, 5)) + 0.1
    layer, bottom, top = make_layer(STO, [x], phase=TEST)
    y = forward(layer, bottom, top)[0]
    wins = windows_2d(x, 3, 2)
    assert y.shape == (2, 2, 3, 2)
    for n, c in itertools.product(range(2), range(2)):
        for (i, j), cells in wins.items():
            vals = [x[n, c, a, b] for a, b in cells]
            assert y[n, c, i, j] == pytest.approx(sum(v * v for v in vals) / sum(vals), rel=1e-12)
    check_gradient(layer, bottom, top)


def test_stochastic_train_samples_in_proportion():
    x = np.zeros((1, 1, 3, 3))
    x[0, 0] = [[1, 0, 2], [0, 0, 0], [0, 3, 0]]        # one window: 1, 2, 3 of 6
    layer, bottom, top = make_layer(STO, [x], phase=TRAIN)
    picks = [float(forward(layer, bottom, top)[0][0, 0, 0, 0]) for _ in range(3000)]
    freq = {v: picks.count(v) / len(picks) for v in (1.0, 2.0, 3.0)}
    assert set(picks) == {1.0, 2.0, 3.0}
    for v, f in freq.items():
        assert abs(f - v / 6) < 0.04, freq


def test_stochastic_train_value_and_gradient():
    x = rs.random((1, 2, 5, 5)) + 0.1
    layer, bottom, top = make_layer(STO, [x], phase=TRAIN)
    y = forward(layer, bottom, top)[0]
    for c in range(2):
        for (i, j), cells in windows_2d(x, 3, 2).items():
            assert y[0, c, i, j] in [x[0, c, a, b] for a, b in cells]
    # with the draws fixed, the output is the picked value: gradient 1 there, 0 elsewhere
    check_gradient(layer, bottom, top, reseed=4)


CONV3 = """name: "c" type: "Convolution" convolution_param {{ num_output: 4 group: 2 {geo}
  weight_filler {{ type: "gaussian" std: 0.5 }} bias_filler {{ type: "gaussian" std: 0.5 }} }}"""


@pytest.mark.parametrize("geo", ["kernel_size: 2", "kernel_size: 3 kernel_size: 1 kernel_size: 2 "
                                 "pad: 1 stride: 2 stride: 1 stride: 1",
                                 "kernel_size: 2 dilation: 2 pad: 1"])
def test_convolution_3d(geo):
    x = rs.standard_normal((2, 4, 4, 3, 5))
    layer, bottom, top = make_layer(CONV3.format(geo=geo), [x])
    w, b = layer.blobs[0].data, layer.blobs[1].data
    kernel, per_group = w.shape[2:], w.shape[1]
    p = _geometry(geo)
    y = forward(layer, bottom, top)[0]
    out = tuple((s + 2 * p["pad"][a] - (p["dilation"][a] * (kernel[a] - 1) + 1))
                // p["stride"][a] + 1 for a, s in enumerate(x.shape[2:]))
    assert y.shape == (2, 4) + out
    expect = np.zeros(y.shape)
    for n, m in itertools.product(range(2), range(4)):
        g = m // 2
        for o in itertools.product(*[range(v) for v in out]):
            total = b[m]
            for c, j in itertools.product(range(per_group),
                                          itertools.product(*[range(k) for k in kernel])):
                pos = [o[a] * p["stride"][a] - p["pad"][a] + j[a] * p["dilation"][a]
                       for a in range(3)]
                if all(0 <= pos[a] < x.shape[2 + a] for a in range(3)):
                    total += w[(m, c) + j] * x[(n, g * per_group + c) + tuple(pos)]
            expect[(n, m) + o] = total
    np.testing.assert_allclose(y, expect, rtol=1e-10, atol=1e-12)
    check_gradient(layer, bottom, top)


def _geometry(geo):
    fields = {"kernel_size": [], "pad": [], "stride": [], "dilation": []}
    words = geo.split()
    for name, value in zip(words[::2], words[1::2]):
        fields[name.rstrip(":")].append(int(value))
    return {k: (v * 3 if len(v) == 1 else v or [0 if k == "pad" else 1] * 3)
            for k, v in fields.items()}


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pooling_3d(method):
    x = rs.standard_normal((1, 2, 4, 5, 3))
    text = (f'name: "p" type: "Pooling" '
            f'pooling_param {{ pool: {method} kernel_size: 2 stride: 2 pad: 1 }}')
    layer, bottom, top = make_layer(text, [x])
    y = forward(layer, bottom, top)[0]
    size, k, s, pad = x.shape[2:], 2, 2, 1
    pooled = []
    for d in size:
        n = -(-(d + 2 * pad - k) // s) + 1
        if (n - 1) * s >= d + pad:
            n -= 1
        pooled.append(n)
    assert y.shape == (1, 2) + tuple(pooled)
    for c, o in itertools.product(range(2), itertools.product(*[range(v) for v in pooled])):
        starts = [o[a] * s - pad for a in range(3)]
        cells = [x[(0, c) + pos] for pos in itertools.product(
            *[range(max(st, 0), min(st + k, size[a])) for a, st in enumerate(starts)])]
        if method == "MAX":
            expect = max(cells)
        else:
            area = np.prod([min(st + k, size[a] + pad) - st for a, st in enumerate(starts)])
            expect = sum(cells) / area
        assert y[(0, c) + o] == pytest.approx(expect, rel=1e-12)
    check_gradient(layer, bottom, top)


def test_nd_refusals():
    x = np.zeros((1, 2, 3, 3, 3))
    with pytest.raises(ConfigError, match="kernel_h"):
        make_layer(CONV3.format(geo="kernel_h: 2 kernel_w: 2"), [x])
    with pytest.raises(ConfigError, match="Deconvolution.*N-d is supported for Convolution"):
        make_layer('name: "d" type: "Deconvolution" convolution_param { num_output: 2 '
                   'kernel_size: 2 }', [x])
    with pytest.raises(ConfigError, match="MAX and AVE"):
        make_layer(STO, [x])
    with pytest.raises(ConfigError, match="exactly 1 top"):
        make_layer('name: "p" type: "Pooling" pooling_param { kernel_size: 2 }', [x], n_tops=2)
