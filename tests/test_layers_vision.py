"""Convolution, Deconvolution, Pooling and LRN against naive float64 loops, plus gradients."""
import math

import numpy as np
import pytest
from gradcheck import check_gradient, forward, make_layer

import owlnet.layer_types.vision  # noqa: F401  (registers the layer types)
from owlnet.errors import ConfigError, ShapeError

RNG = np.random.default_rng(1234)


def randn(*shape):
    return RNG.standard_normal(shape)


def conv_text(kind, num_output, extra="", bias=True):
    return f"""name: "c" type: "{kind}" convolution_param {{
        num_output: {num_output} bias_term: {str(bias).lower()} {extra}
        weight_filler {{ type: "gaussian" std: 0.5 }}
        bias_filler {{ type: "gaussian" std: 0.5 }} }}"""


# -- naive references -------------------------------------------------------------------------
def naive_conv(x, w, b, stride, pad, dilation, group):
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    oh = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    ow = (wd + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    y = np.zeros((n, m, oh, ow))
    mg = m // group
    for img in range(n):
        for out in range(m):
            g = out // mg
            for r in range(oh):
                for q in range(ow):
                    acc = 0.0 if b is None else b[out]
                    for ci in range(cg):
                        for i in range(kh):
                            for j in range(kw):
                                hh, ww = r * sh - ph + i * dh, q * sw - pw + j * dw
                                if 0 <= hh < h and 0 <= ww < wd:
                                    acc += w[out, ci, i, j] * x[img, g * cg + ci, hh, ww]
                    y[img, out, r, q] = acc
    return y


def naive_deconv(x, w, b, stride, pad, dilation, group):
    n, c, h, wd = x.shape
    _, mg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    oh = sh * (h - 1) + dh * (kh - 1) + 1 - 2 * ph
    ow = sw * (wd - 1) + dw * (kw - 1) + 1 - 2 * pw
    y = np.zeros((n, mg * group, oh, ow))
    cg = c // group
    for img in range(n):
        for ci in range(c):
            g = ci // cg
            for r in range(h):
                for q in range(wd):
                    for mo in range(mg):
                        for i in range(kh):
                            for j in range(kw):
                                hh, ww = r * sh - ph + i * dh, q * sw - pw + j * dw
                                if 0 <= hh < oh and 0 <= ww < ow:
                                    y[img, g * mg + mo, hh, ww] += (w[ci, mo, i, j]
                                                                    * x[img, ci, r, q])
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    return y


def naive_pool(x, kernel, stride, pad, method, ceil_mode=True):
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    round_ = math.ceil if ceil_mode else math.floor
    oh = int(round_((h + 2 * ph - kh) / sh)) + 1
    ow = int(round_((w + 2 * pw - kw) / sw)) + 1
    if ph or pw:  # Caffe checks both axes when either is padded
        if (oh - 1) * sh >= h + ph:
            oh -= 1
        if (ow - 1) * sw >= w + pw:
            ow -= 1
    y = np.zeros((n, c, oh, ow))
    mask = np.zeros((n, c, oh, ow))
    for img in range(n):
        for ch in range(c):
            for r in range(oh):
                for q in range(ow):
                    hs, ws = r * sh - ph, q * sw - pw
                    he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
                    area = (he - hs) * (we - ws)
                    hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
                    if method == "AVE":
                        y[img, ch, r, q] = x[img, ch, hs:he, ws:we].sum() / area
                    else:
                        best, where = -np.inf, -1
                        for hh in range(hs, he):
                            for ww in range(ws, we):
                                if x[img, ch, hh, ww] > best:
                                    best, where = x[img, ch, hh, ww], hh * w + ww
                        y[img, ch, r, q], mask[img, ch, r, q] = best, where
    return y, mask


def naive_lrn(x, size, alpha, beta, k, within):
    n, c, h, w = x.shape
    half = size // 2
    y = np.zeros_like(x)
    for img in range(n):
        for ch in range(c):
            for r in range(h):
                for q in range(w):
                    if within:
                        patch = x[img, ch, max(r - half, 0):r + half + 1,
                                  max(q - half, 0):q + half + 1]
                        scale = 1 + alpha / size ** 2 * np.sum(patch ** 2)
                    else:
                        patch = x[img, max(ch - half, 0):ch + half + 1, r, q]
                        scale = k + alpha / size * np.sum(patch ** 2)
                    y[img, ch, r, q] = x[img, ch, r, q] * scale ** -beta
    return y


# -- Convolution ------------------------------------------------------------------------------
CONV_CASES = [
    # (bottom shape, num_output, params text, stride, pad, dilation, group)
    ((2, 3, 5, 7), 4, "kernel_size: 3", (1, 1), (0, 0), (1, 1), 1),
    ((1, 2, 6, 5), 3, "kernel_size: 3 stride: 2 pad: 1", (2, 2), (1, 1), (1, 1), 1),
    ((2, 4, 5, 6), 6, "kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 0 group: 2",
     (1, 2), (1, 0), (1, 1), 2),
    ((1, 2, 7, 6), 2, "kernel_size: 3 dilation: 2 pad: 1", (1, 1), (1, 1), (2, 2), 1),
    ((2, 4, 3, 5), 6, "kernel_size: 1 group: 2", (1, 1), (0, 0), (1, 1), 2),
    ((1, 3, 4, 5), 2, "kernel_size: 2 kernel_size: 3 stride: 1 stride: 2 pad: 0 pad: 1",
     (1, 2), (0, 1), (1, 1), 1),
]


@pytest.mark.parametrize("shape, m, extra, stride, pad, dilation, group", CONV_CASES)
def test_convolution_forward_matches_loops(shape, m, extra, stride, pad, dilation, group):
    x = randn(*shape)
    layer, bottom, top = make_layer(conv_text("Convolution", m, extra), [x])
    w, b = layer.blobs[0].data, layer.blobs[1].data
    assert w.shape[:2] == (m, shape[1] // group)
    (y,) = forward(layer, bottom, top)
    np.testing.assert_allclose(y, naive_conv(x, w, b, stride, pad, dilation, group), atol=1e-12)


@pytest.mark.parametrize("shape, m, extra, stride, pad, dilation, group", CONV_CASES)
def test_convolution_gradient(shape, m, extra, stride, pad, dilation, group):
    layer, bottom, top = make_layer(conv_text("Convolution", m, extra), [randn(*shape)])
    check_gradient(layer, bottom, top)


def test_convolution_float32_and_no_bias():
    x = randn(2, 3, 6, 5)
    layer, bottom, top = make_layer(conv_text("Convolution", 4, "kernel_size: 3 pad: 1", False),
                                    [x], dtype=np.float32)
    assert len(layer.blobs) == 1
    (y,) = forward(layer, bottom, top)
    assert y.dtype == np.float32
    expected = naive_conv(x.astype(np.float32).astype(np.float64),
                          layer.blobs[0].data.astype(np.float64), None, (1, 1), (1, 1), (1, 1), 1)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_convolution_accumulates_param_grads_and_respects_propagate_flags():
    layer, bottom, top = make_layer(conv_text("Convolution", 2, "kernel_size: 2"),
                                    [randn(1, 2, 3, 4)])
    forward(layer, bottom, top)
    top[0].diff[...] = randn(*top[0].shape)
    layer.backward(top, [True], bottom)
    once = [p.diff.copy() for p in layer.blobs]
    sentinel = randn(*bottom[0].shape)
    bottom[0].diff[...] = sentinel
    layer.param_propagate_down = [True, False]
    layer.backward(top, [False], bottom)
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * once[0])
    np.testing.assert_allclose(layer.blobs[1].diff, once[1])
    np.testing.assert_array_equal(bottom[0].diff, sentinel)


def test_convolution_two_bottoms_share_weights():
    a, b = randn(1, 2, 4, 3), randn(1, 2, 4, 3)
    layer, bottom, top = make_layer(
        """name: "c" type: "Convolution" convolution_param { num_output: 2 kernel_size: 2
           weight_filler { type: "gaussian" } }""", [a, b], n_tops=2)
    ya, yb = forward(layer, bottom, top)
    w, bias = layer.blobs[0].data, layer.blobs[1].data
    np.testing.assert_allclose(ya, naive_conv(a, w, bias, (1, 1), (0, 0), (1, 1), 1), atol=1e-12)
    np.testing.assert_allclose(yb, naive_conv(b, w, bias, (1, 1), (0, 0), (1, 1), 1), atol=1e-12)
    check_gradient(layer, bottom, top)


def test_convolution_channel_axis_2_flattens_leading_axes():
    x = randn(2, 1, 2, 4, 3)
    layer, bottom, top = make_layer(conv_text("Convolution", 3, "kernel_size: 2 axis: 2"), [x])
    (y,) = forward(layer, bottom, top)
    assert y.shape == (2, 1, 3, 3, 2)
    expected = naive_conv(x.reshape(2, 2, 4, 3), layer.blobs[0].data, layer.blobs[1].data,
                          (1, 1), (0, 0), (1, 1), 1)
    np.testing.assert_allclose(y.reshape(expected.shape), expected, atol=1e-12)
    check_gradient(layer, bottom, top)


def test_alexnet_conv1_shape():
    layer, _, top = make_layer(conv_text("Convolution", 96, "kernel_size: 11 stride: 4"),
                               [np.zeros((1, 3, 227, 227))])
    assert top[0].shape == (1, 96, 55, 55)
    assert layer.blobs[0].shape == (96, 3, 11, 11)


@pytest.mark.parametrize("extra, shape, error, words", [
    ("kernel_size: 3 group: 2", (1, 3, 5, 5), ConfigError, "divisible by group"),
    ("kernel_size: 3", (1, 2, 5, 5), None, None),
    ("pad: 1", (1, 2, 5, 5), ConfigError, "kernel_size"),
    ("kernel_size: 3 kernel_h: 3 kernel_w: 3", (1, 2, 5, 5), ConfigError, "not both"),
    ("kernel_h: 3", (1, 2, 5, 5), ConfigError, "together"),
    ("kernel_size: 1 kernel_size: 2 kernel_size: 3", (1, 2, 5, 5), ConfigError, "1 or 2"),
    ("kernel_size: 3 stride: 0", (1, 2, 5, 5), ConfigError, "stride"),
    ("kernel_size: 7", (1, 2, 5, 5), ShapeError, "output size"),
    ("kernel_size: 3", (2, 5), ConfigError, "spatial"),   # 1-d and 3-d: volume.py
])
def test_convolution_bad_params(extra, shape, error, words):
    text = conv_text("Convolution", 4, extra)
    if error is None:
        make_layer(text, [np.zeros(shape)])
        return
    with pytest.raises(error, match=words) as info:
        make_layer(text, [np.zeros(shape)])
    assert "'c'" in str(info.value)


def test_convolution_rejects_channel_change_on_reshape():
    layer, bottom, top = make_layer(conv_text("Convolution", 4, "kernel_size: 1"),
                                    [np.zeros((1, 2, 3, 3))])
    bottom[0].reshape(1, 3, 3, 3)
    with pytest.raises(ShapeError, match=r"\(1, 3, 3, 3\)"):
        layer.reshape(bottom, top)


def test_convolution_odd_num_output_for_group():
    with pytest.raises(ConfigError, match="num_output 3"):
        make_layer(conv_text("Convolution", 3, "kernel_size: 1 group: 2"), [np.zeros((1, 2, 2, 2))])


# -- Deconvolution ----------------------------------------------------------------------------
DECONV_CASES = [
    ((2, 3, 3, 4), 2, "kernel_size: 3 stride: 2", (2, 2), (0, 0), (1, 1), 1),
    ((1, 4, 3, 2), 4, "kernel_size: 4 stride: 2 pad: 1 group: 2", (2, 2), (1, 1), (1, 1), 2),
    ((1, 2, 3, 3), 3, "kernel_size: 2 dilation: 2 stride: 1", (1, 1), (0, 0), (2, 2), 1),
    ((2, 3, 2, 3), 2, "kernel_size: 1", (1, 1), (0, 0), (1, 1), 1),
]


@pytest.mark.parametrize("shape, m, extra, stride, pad, dilation, group", DECONV_CASES)
def test_deconvolution_forward_matches_loops(shape, m, extra, stride, pad, dilation, group):
    x = randn(*shape)
    layer, bottom, top = make_layer(conv_text("Deconvolution", m, extra), [x])
    w, b = layer.blobs[0].data, layer.blobs[1].data
    assert w.shape[:2] == (shape[1], m // group)
    (y,) = forward(layer, bottom, top)
    np.testing.assert_allclose(y, naive_deconv(x, w, b, stride, pad, dilation, group), atol=1e-12)


@pytest.mark.parametrize("shape, m, extra, stride, pad, dilation, group", DECONV_CASES)
def test_deconvolution_gradient(shape, m, extra, stride, pad, dilation, group):
    layer, bottom, top = make_layer(conv_text("Deconvolution", m, extra), [randn(*shape)])
    check_gradient(layer, bottom, top)


def test_deconvolution_upsampling_shape():
    _, _, top = make_layer(conv_text("Deconvolution", 5, "kernel_size: 4 stride: 2 pad: 1"),
                           [np.zeros((1, 5, 7, 9))])
    assert top[0].shape == (1, 5, 14, 18)


# -- Pooling ----------------------------------------------------------------------------------
def pool_text(method, extra):
    return f'name: "p" type: "Pooling" pooling_param {{ pool: {method} {extra} }}'


POOL_CASES = [
    # (bottom shape, params text, kernel, stride, pad)
    ((2, 2, 7, 7), "kernel_size: 3 stride: 2", (3, 3), (2, 2), (0, 0)),        # exact fit
    ((2, 3, 4, 6), "kernel_size: 2 stride: 2", (2, 2), (2, 2), (0, 0)),        # tiling fast path
    ((1, 2, 6, 8), "kernel_size: 3 stride: 2", (3, 3), (2, 2), (0, 0)),        # clipped last
    ((1, 3, 7, 6), "kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1)),
    ((1, 2, 6, 6), "kernel_size: 2 stride: 2 pad: 1", (2, 2), (2, 2), (1, 1)),  # decrement rule
    ((2, 1, 5, 7), "kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 0",
     (2, 3), (1, 2), (1, 0)),
    ((1, 2, 2, 3), "kernel_size: 3 stride: 2", (3, 3), (2, 2), (0, 0)),        # kernel > image
    # pad_h alone also trims the last column window, which would start past the image
    ((1, 2, 4, 5), "kernel_h: 2 kernel_w: 1 stride: 3 pad_h: 1 pad_w: 0", (2, 1), (3, 3), (1, 0)),
    # three column phases, windows wider than the stride, a leading pad of two columns
    ((2, 2, 7, 11), "kernel_h: 3 kernel_w: 4 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 2",
     (3, 4), (2, 3), (1, 2)),
]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("shape, extra, kernel, stride, pad", POOL_CASES)
def test_pooling_forward_matches_loops(method, shape, extra, kernel, stride, pad):
    x = randn(*shape)
    n_tops = 2 if method == "MAX" else 1
    layer, bottom, top = make_layer(pool_text(method, extra), [x], n_tops=n_tops)
    outputs = forward(layer, bottom, top)
    expected, mask = naive_pool(x, kernel, stride, pad, method)
    np.testing.assert_allclose(outputs[0], expected, atol=1e-12)
    if method == "MAX":
        np.testing.assert_array_equal(outputs[1], mask)
        # Without an argmax to keep (a layer that never runs backward): rows, then columns.
        layer, bottom, top = make_layer(pool_text(method, extra), [x])
        layer.runs_backward = False
        np.testing.assert_array_equal(forward(layer, bottom, top)[0], expected)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("shape, extra, kernel, stride, pad", POOL_CASES)
def test_pooling_gradient(method, shape, extra, kernel, stride, pad):
    layer, bottom, top = make_layer(pool_text(method, extra), [randn(*shape)])
    # MAX is piecewise linear; random normal inputs have no ties closer than the step.
    check_gradient(layer, bottom, top, step=1e-7)


def test_pooling_floor_round_mode():
    x = randn(1, 1, 6, 8)
    layer, bottom, top = make_layer(pool_text("AVE", "kernel_size: 3 stride: 2 round_mode: FLOOR"),
                                    [x])
    (y,) = forward(layer, bottom, top)
    assert y.shape == (1, 1, 2, 3)
    np.testing.assert_allclose(y, naive_pool(x, (3, 3), (2, 2), (0, 0), "AVE", False)[0])


def test_pooling_max_ties_pick_first_in_window():
    x = np.zeros((1, 1, 3, 3))
    layer, bottom, top = make_layer(pool_text("MAX", "kernel_size: 2 stride: 1"), [x], n_tops=2)
    _, mask = forward(layer, bottom, top)
    np.testing.assert_array_equal(mask[0, 0], [[0, 1], [3, 4]])


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_global_pooling(method):
    x = randn(2, 3, 3, 5)
    layer, bottom, top = make_layer(pool_text(method, "global_pooling: true"), [x])
    (y,) = forward(layer, bottom, top)
    reduce = np.max if method == "MAX" else np.mean
    np.testing.assert_allclose(y, reduce(x, axis=(2, 3), keepdims=True), atol=1e-12)
    check_gradient(layer, bottom, top, step=1e-7)


def test_alexnet_pool1_shape():
    _, _, top = make_layer(pool_text("MAX", "kernel_size: 3 stride: 2"),
                           [np.zeros((1, 96, 55, 55))])
    assert top[0].shape == (1, 96, 27, 27)


@pytest.mark.parametrize("text, n_tops, error, words", [
    (pool_text("STOCHASTIC", "kernel_size: 2 pad: 1"), 1, ConfigError, "ignores pad"),
    (pool_text("AVE", "kernel_size: 2"), 2, ConfigError, "second"),
    (pool_text("MAX", "stride: 2"), 1, ConfigError, "kernel_size"),
    (pool_text("MAX", "kernel_size: 2 pad: 2"), 1, ConfigError, "smaller than kernel"),
    (pool_text("MAX", "global_pooling: true kernel_size: 2"), 1, ConfigError, "global"),
    (pool_text("MAX", "global_pooling: true stride: 2"), 1, ConfigError, "stride 1"),
    (pool_text("MAX", "kernel_size: 2 stride: 0"), 1, ConfigError, "positive"),
    (pool_text("MAX", "kernel_size: 5 stride: 1"), 1, ShapeError, "pooled size"),
    (pool_text("MAX", "kernel_size: 2 pad_w: 1"), 1, ConfigError, "pad_h and pad_w"),
    (pool_text("MAX", "kernel_size: 2 pad: 1 pad_h: 1 pad_w: 1"), 1, ConfigError, "pad_h"),
    (pool_text("MAX", "kernel_size: 2 stride: 1 stride_h: 1 stride_w: 1"), 1, ConfigError,
     "stride_h"),
])
def test_pooling_bad_params(text, n_tops, error, words):
    with pytest.raises(error, match=words) as info:
        make_layer(text, [np.zeros((1, 2, 3, 3))], n_tops=n_tops)
    assert "'p'" in str(info.value)


# -- LRN --------------------------------------------------------------------------------------
LRN_CASES = [
    ("", (2, 7, 2, 3), 5, 1.0, 0.75, 1.0, False),
    ("local_size: 3 alpha: 0.5 beta: 0.6 k: 2", (1, 4, 3, 2), 3, 0.5, 0.6, 2.0, False),
    ("local_size: 3 alpha: 2 beta: 0.75 norm_region: WITHIN_CHANNEL", (2, 2, 4, 5), 3,
     2.0, 0.75, 1.0, True),
    ("local_size: 5 alpha: 1.5 beta: 0.5 k: 3 norm_region: WITHIN_CHANNEL", (1, 2, 3, 6), 5,
     1.5, 0.5, 1.0, True),
]


@pytest.mark.parametrize("extra, shape, size, alpha, beta, k, within", LRN_CASES)
def test_lrn_forward_matches_loops(extra, shape, size, alpha, beta, k, within):
    x = randn(*shape)
    layer, bottom, top = make_layer(f'name: "n" type: "LRN" lrn_param {{ {extra} }}', [x])
    (y,) = forward(layer, bottom, top)
    # the proto stores alpha, beta and k as float32
    alpha, beta, k = (float(np.float32(v)) for v in (alpha, beta, k))
    np.testing.assert_allclose(y, naive_lrn(x, size, alpha, beta, k, within), rtol=1e-12)


@pytest.mark.parametrize("extra, shape, size, alpha, beta, k, within", LRN_CASES)
def test_lrn_gradient(extra, shape, size, alpha, beta, k, within):
    layer, bottom, top = make_layer(f'name: "n" type: "LRN" lrn_param {{ {extra} }}',
                                    [randn(*shape)])
    check_gradient(layer, bottom, top)


def test_lrn_rejects_even_size():
    with pytest.raises(ConfigError, match="odd"):
        make_layer('name: "n" type: "LRN" lrn_param { local_size: 4 }', [np.zeros((1, 4, 2, 2))])
