"""ReLU6, ShuffleChannel, Permute, Upsample, Interp: forward against independent float64
loops, backward by central differences."""
import itertools

import numpy as np
import pytest

import owlnet.layer_types  # noqa: F401  (registers the layer types)
from gradcheck import assert_same_both_ways, check_gradient, forward, make_layer
from owlnet.errors import ConfigError

rs = np.random.default_rng(11)


def randn(*shape):
    return rs.standard_normal(shape)


def test_relu6():
    x = 4 * randn(2, 3, 4)
    x[0, 0, 0], x[0, 0, 1] = 6.5, -0.3
    layer, bottom, top = make_layer('name: "r" type: "ReLU6"', [x])
    y = forward(layer, bottom, top)[0]
    expect = np.array([0.0 if v < 0 else 6.0 if v > 6 else v for v in x.ravel()])
    np.testing.assert_array_equal(y.ravel(), expect)
    # keep finite differences away from the kinks at 0 and 6
    x[np.abs(x) < 0.01] = 0.5
    x[np.abs(x - 6) < 0.01] = 5.5
    layer, bottom, top = make_layer('name: "r" type: "ReLU6"', [x])
    check_gradient(layer, bottom, top)
    assert_same_both_ways('name: "r" type: "ReLU6"', x)


def test_shuffle_channel():
    x = randn(2, 6, 2, 2)
    layer, bottom, top = make_layer(
        'name: "s" type: "ShuffleChannel" shuffle_channel_param { group: 3 }', [x])
    y = forward(layer, bottom, top)[0]
    groups, per = 3, 2
    for g, k in itertools.product(range(groups), range(per)):
        np.testing.assert_array_equal(y[:, k * groups + g], x[:, g * per + k])
    check_gradient(layer, bottom, top)
    with pytest.raises(Exception, match="divisible"):
        make_layer('name: "s" type: "ShuffleChannel" shuffle_channel_param { group: 4 }', [x])


@pytest.mark.parametrize("order,full", [([0, 2, 3, 1], (0, 2, 3, 1)), ([1], (1, 0, 2, 3)),
                                        ([], (0, 1, 2, 3))])
def test_permute(order, full):
    x = randn(2, 3, 4, 5)
    text = 'name: "p" type: "Permute" permute_param { %s }' % " ".join(f"order: {a}" for a in order)
    layer, bottom, top = make_layer(text, [x])
    y = forward(layer, bottom, top)[0]
    assert y.shape == tuple(x.shape[a] for a in full)
    for idx in itertools.product(*[range(d) for d in y.shape]):
        src = [0] * 4
        for i, a in enumerate(full):
            src[a] = idx[i]
        assert y[idx] == x[tuple(src)]
    layer, bottom, top = make_layer(text, [randn(1, 2, 2, 3)])
    check_gradient(layer, bottom, top)
    with pytest.raises(ConfigError, match="distinct"):
        make_layer('name: "p" type: "Permute" permute_param { order: 0 order: 0 }', [x])


def test_upsample_nearest():
    x = randn(2, 2, 2, 3)
    layer, bottom, top = make_layer('name: "u" type: "Upsample" upsample_param { scale: 2 }', [x])
    y = forward(layer, bottom, top)[0]
    assert y.shape == (2, 2, 4, 6)
    for n, c, h, w in itertools.product(*[range(d) for d in y.shape]):
        assert y[n, c, h, w] == x[n, c, h // 2, w // 2]
    check_gradient(layer, bottom, top)
    with pytest.raises(ConfigError, match="SegNet"):
        make_layer('name: "u" type: "Upsample" upsample_param { scale: 2 }', [x, x])


def interp_reference(x, out_h, out_w, pad_beg=0, pad_end=0):
    """Corner-aligned bilinear resize written point by point."""
    h_in, w_in = x.shape[2] + pad_beg + pad_end, x.shape[3] + pad_beg + pad_end
    crop = x[:, :, -pad_beg:-pad_beg + h_in, -pad_beg:-pad_beg + w_in]
    y = np.zeros(x.shape[:2] + (out_h, out_w))
    for o, q in itertools.product(range(out_h), range(out_w)):
        fy = (h_in - 1) / (out_h - 1) * o if out_h > 1 else 0.0
        fx = (w_in - 1) / (out_w - 1) * q if out_w > 1 else 0.0
        y0, x0 = int(np.floor(fy)), int(np.floor(fx))
        y1, x1 = min(y0 + 1, h_in - 1), min(x0 + 1, w_in - 1)
        ay, ax = fy - y0, fx - x0
        y[:, :, o, q] = ((1 - ay) * ((1 - ax) * crop[:, :, y0, x0] + ax * crop[:, :, y0, x1])
                         + ay * ((1 - ax) * crop[:, :, y1, x0] + ax * crop[:, :, y1, x1]))
    return y


@pytest.mark.parametrize("param,size", [
    ("zoom_factor: 2", (5, 7)),            # H + (H - 1)(z - 1)
    ("shrink_factor: 2", (2, 2)),          # (H - 1)/s + 1
    ("height: 4 width: 6", (4, 6)),
    ("shrink_factor: 2 zoom_factor: 3", (4, 4)),
    ("zoom_factor: 2 pad_beg: -1 pad_end: 0", (3, 5)),
])
def test_interp(param, size):
    x = randn(2, 2, 3, 4)
    layer, bottom, top = make_layer(f'name: "i" type: "Interp" interp_param {{ {param} }}', [x])
    y = forward(layer, bottom, top)[0]
    pad_beg = -1 if "pad_beg" in param else 0
    assert y.shape[2:] == size
    np.testing.assert_allclose(y, interp_reference(x, *size, pad_beg=pad_beg), rtol=1e-12,
                               atol=1e-14)
    check_gradient(layer, bottom, top)


def test_interp_size_from_second_bottom_and_bad_pads():
    x, ref = randn(1, 2, 3, 3), randn(1, 5, 4, 6)
    layer, bottom, top = make_layer('name: "i" type: "Interp"', [x, ref])
    y = forward(layer, bottom, top)[0]
    np.testing.assert_allclose(y, interp_reference(x, 4, 6), rtol=1e-12)
    check_gradient(layer, bottom, top, check_bottoms=[0])
    with pytest.raises(ConfigError, match="pad_beg"):
        make_layer('name: "i" type: "Interp" interp_param { zoom_factor: 2 pad_beg: 1 }', [x])
    with pytest.raises(ConfigError, match="zoom_factor"):
        make_layer('name: "i" type: "Interp"', [x])
