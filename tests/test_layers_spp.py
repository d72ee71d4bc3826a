"""SPP: forward against bins computed here from Caffe's level rule, backward by central
differences."""
import itertools
import math

import numpy as np
import pytest

import owlnet.layer_types  # noqa: F401  (registers the layer types)
from gradcheck import check_gradient, forward, make_layer
from owlnet.errors import ConfigError

rs = np.random.default_rng(19)


def spp_reference(x, height, method):
    n, c, h, w = x.shape
    parts = []
    for level in range(height):
        bins = 2 ** level
        kh, kw = math.ceil(h / bins), math.ceil(w / bins)
        ph, pw = (kh * bins - h + 1) // 2, (kw * bins - w + 1) // 2
        out = np.zeros((n, c, bins, bins))
        for i, j in itertools.product(range(bins), range(bins)):
            hs, ws = i * kh - ph, j * kw - pw
            rows = slice(max(hs, 0), min(hs + kh, h))
            cols = slice(max(ws, 0), min(ws + kw, w))
            window = x[:, :, rows, cols].reshape(n, c, -1)
            if method == "MAX":
                out[:, :, i, j] = window.max(axis=2)
            else:
                area = (min(hs + kh, h + ph) - hs) * (min(ws + kw, w + pw) - ws)
                out[:, :, i, j] = window.sum(axis=2) / area
        parts.append(out.reshape(n, -1))
    return np.concatenate(parts, axis=1)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_spp(method):
    x = rs.standard_normal((2, 2, 6, 7))
    text = f'name: "s" type: "SPP" spp_param {{ pyramid_height: 3 pool: {method} }}'
    layer, bottom, top = make_layer(text, [x])
    y = forward(layer, bottom, top)[0]
    assert y.shape == (2, 2 * (1 + 4 + 16))
    np.testing.assert_allclose(y, spp_reference(x, 3, method), rtol=1e-12)
    check_gradient(layer, bottom, top)
    # another input size rebuilds the pyramid; the top length stays
    bottom[0].reshape(2, 2, 8, 6)
    bottom[0].data[...] = x2 = rs.standard_normal((2, 2, 8, 6))
    y2 = forward(layer, bottom, top)[0]
    np.testing.assert_allclose(y2, spp_reference(x2, 3, method), rtol=1e-12)
    # as in Caffe, a side too small for the finest level needs a pad as large as the kernel
    bottom[0].reshape(2, 2, 8, 5)
    with pytest.raises(ConfigError, match=r"s_pool2.*pad"):
        forward(layer, bottom, top)


def test_spp_height_one_and_errors():
    x = rs.standard_normal((1, 3, 4, 5))
    layer, bottom, top = make_layer('name: "s" type: "SPP" spp_param { pyramid_height: 1 }', [x])
    y = forward(layer, bottom, top)[0]
    assert y.shape == (1, 3, 1, 1)
    np.testing.assert_allclose(y.reshape(1, 3), x.reshape(1, 3, -1).max(axis=2))
    with pytest.raises(ConfigError, match="pyramid_height"):
        make_layer('name: "s" type: "SPP"', [x])


def test_spp_stochastic_needs_sides_the_levels_divide():
    # Caffe's stochastic pooling ignores pad, and SPP pads the levels whose bins do not divide
    # the input; the error names the SPP layer and its level, not an internal Pooling's pad
    x = np.abs(rs.standard_normal((1, 1, 6, 7)))
    text = 'name: "s" type: "SPP" spp_param { pyramid_height: 2 pool: STOCHASTIC }'
    with pytest.raises(ConfigError, match=r"layer 's' \(SPP\).*level 1.*6 x 7"):
        make_layer(text, [x])
    layer, bottom, top = make_layer(text, [np.abs(rs.standard_normal((1, 1, 4, 6)))])
    assert forward(layer, bottom, top)[0].shape == (1, 5)
