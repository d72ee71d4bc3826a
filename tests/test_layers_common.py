"""Common layers: forward against independent float64 math, backward by central differences."""
import itertools

import numpy as np
import pytest

import owlnet.layer_types.common  # noqa: F401  (registers the layer types)
from gradcheck import check_gradient, forward, make_layer
from owlnet.blob import Blob
from owlnet.errors import ConfigError, ShapeError

rs = np.random.default_rng(3)


def randn(*shape):
    return rs.standard_normal(shape)


# -- InnerProduct ------------------------------------------------------------------------------
IP = """name: "ip" type: "InnerProduct"
inner_product_param {{ num_output: {n} {extra}
  weight_filler {{ type: "gaussian" std: 0.5 }}
  bias_filler {{ type: "uniform" min: -1 max: 1 }} }}"""


@pytest.mark.parametrize("shape,axis,transpose", [((2, 3, 2), 1, False), ((1, 5), 1, True),
                                                  ((2, 3, 2), 2, False), ((2, 3, 2), -1, True)])
def test_inner_product(shape, axis, transpose):
    x = randn(*shape)
    extra = f"axis: {axis} transpose: {'true' if transpose else 'false'}"
    layer, bottom, top = make_layer(IP.format(n=3, extra=extra), [x])
    w, b = layer.blobs[0].data, layer.blobs[1].data
    ax = axis % len(shape)
    k = int(np.prod(shape[ax:]))
    assert w.shape == ((k, 3) if transpose else (3, k))
    y = forward(layer, bottom, top)[0]
    rows = x.reshape(-1, k)
    expect = np.zeros((rows.shape[0], 3))
    for m in range(rows.shape[0]):
        for o in range(3):
            weights = w[:, o] if transpose else w[o]
            expect[m, o] = sum(rows[m, i] * weights[i] for i in range(k)) + b[o]
    assert y.shape == shape[:ax] + (3,)
    np.testing.assert_allclose(y.reshape(-1, 3), expect, rtol=1e-12)
    check_gradient(layer, bottom, top)


def test_inner_product_accumulates_and_no_bias():
    x = randn(2, 4)
    layer, bottom, top = make_layer(IP.format(n=2, extra="bias_term: false"), [x])
    assert len(layer.blobs) == 1
    forward(layer, bottom, top)
    top[0].diff[...] = 1.0
    layer.blobs[0].diff[...] = 0.0
    layer.backward(top, [False], bottom)
    once = layer.blobs[0].diff.copy()
    layer.backward(top, [False], bottom)
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * once)
    np.testing.assert_allclose(once, np.ones((2, 1)) * x.sum(axis=0))


def test_inner_product_bad_input():
    layer, bottom, top = make_layer(IP.format(n=2, extra=""), [randn(2, 4)])
    bottom[0].reshape(2, 5)
    with pytest.raises(ShapeError, match="ip"):
        layer.reshape(bottom, top)
    with pytest.raises(ConfigError, match="num_output"):
        make_layer('name: "ip" type: "InnerProduct"', [randn(2, 4)])


# -- Eltwise -------------------------------------------------------------------------------
def test_eltwise_sum_coeff():
    a, b, c = randn(2, 3, 2), randn(2, 3, 2), randn(2, 3, 2)
    text = ('name: "e" type: "Eltwise" '
            'eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 }')
    layer, bottom, top = make_layer(text, [a, b, c])
    y = forward(layer, bottom, top)[0]
    np.testing.assert_allclose(y, a - 0.5 * b + 2 * c)
    check_gradient(layer, bottom, top)


@pytest.mark.parametrize("in_place", [0, 1, 2])
def test_eltwise_sum_in_place_on_any_bottom(in_place):
    """The sum is written into the top: a top that is one of the bottoms (the first, the
    second, or one added later) still gets a + b + c, in that order of additions."""
    a, b, c = (randn(2, 3, 2).astype(np.float32) for _ in range(3))
    text = 'name: "e" type: "Eltwise" eltwise_param { operation: SUM }'
    layer, bottom, top = make_layer(text, [a, b, c], dtype=np.float32)
    top = [bottom[in_place]]
    layer.forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, (a + b) + c)


@pytest.mark.parametrize("stable", ["true", "false"])
def test_eltwise_prod(stable):
    a, b, c = randn(1, 3, 2), randn(1, 3, 2), randn(1, 3, 2)
    text = ('name: "e" type: "Eltwise" '
            f'eltwise_param {{ operation: PROD stable_prod_grad: {stable} }}')
    layer, bottom, top = make_layer(text, [a, b, c])
    y = forward(layer, bottom, top)[0]
    expect = np.array([p * q * r for p, q, r in zip(a.ravel(), b.ravel(), c.ravel())])
    np.testing.assert_allclose(y.ravel(), expect)
    check_gradient(layer, bottom, top)


def test_eltwise_max_and_ties():
    a, b, c = randn(2, 3), randn(2, 3), randn(2, 3)
    text = 'name: "e" type: "Eltwise" eltwise_param { operation: MAX }'
    layer, bottom, top = make_layer(text, [a, b, c])
    y = forward(layer, bottom, top)[0]
    np.testing.assert_allclose(y, np.maximum(np.maximum(a, b), c))
    check_gradient(layer, bottom, top)
    # Ties: bottom 1 beats bottom 0; bottom 2 needs to be strictly greater.
    ones = np.ones((1, 2))
    layer, bottom, top = make_layer(text, [ones, ones, ones])
    forward(layer, bottom, top)
    top[0].diff[...] = 1.0
    layer.backward(top, [True] * 3, bottom)
    assert [float(b.diff.sum()) for b in bottom] == [0.0, 2.0, 0.0]


def test_eltwise_bad_input():
    with pytest.raises(ShapeError, match=r"\(2, 3\).*\(2, 4\)|\(2, 4\).*\(2, 3\)"):
        make_layer('name: "e" type: "Eltwise"', [randn(2, 3), randn(2, 4)])
    with pytest.raises(ConfigError, match="coeff"):
        make_layer('name: "e" type: "Eltwise" eltwise_param { coeff: 1 }',
                   [randn(2, 3), randn(2, 3)])
    with pytest.raises(ConfigError, match="coeff"):
        make_layer('name: "e" type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 2 }',
                   [randn(2, 3), randn(2, 3)])


def test_eltwise_max_ignores_coeff():
    # Caffe accepts coefficients with MAX and ignores them.
    a, b = randn(2, 3), randn(2, 3)
    text = 'name: "e" type: "Eltwise" eltwise_param { operation: MAX coeff: 3 coeff: -2 }'
    layer, bottom, top = make_layer(text, [a, b])
    np.testing.assert_array_equal(forward(layer, bottom, top)[0], np.maximum(a, b))
    check_gradient(layer, bottom, top)


# -- Concat / Slice ------------------------------------------------------------------------
@pytest.mark.parametrize("param,axis", [("axis: 0", 0), ("", 1), ("axis: 2", 2),
                                        ("concat_dim: 2", 2), ("axis: -1", 2)])
def test_concat(param, axis):
    shapes = [(1, 2, 3), (1, 2, 3)]
    shapes = [tuple(s if i != axis else s + j for i, s in enumerate(shape))
              for j, shape in enumerate(shapes)]
    arrays = [randn(*s) for s in shapes]
    layer, bottom, top = make_layer(f'name: "c" type: "Concat" concat_param {{ {param} }}', arrays)
    y = forward(layer, bottom, top)[0]
    # Independent: walk the output index and pick the source element.
    sizes = [s[axis] for s in shapes]
    for idx in itertools.product(*[range(d) for d in y.shape]):
        pos, which = idx[axis], 0
        while pos >= sizes[which]:
            pos -= sizes[which]
            which += 1
        src = list(idx)
        src[axis] = pos
        assert y[idx] == arrays[which][tuple(src)]
    check_gradient(layer, bottom, top)


def test_concat_bad_input():
    with pytest.raises(ShapeError, match=r"\(1, 3, 3\).*\(1, 2, 2\)"):
        make_layer('name: "c" type: "Concat"', [randn(1, 2, 2), randn(1, 3, 2), randn(1, 3, 3)])
    with pytest.raises(ConfigError, match="not both"):
        make_layer('name: "c" type: "Concat" concat_param { axis: 1 concat_dim: 1 }',
                   [randn(1, 2), randn(1, 2)])


@pytest.mark.parametrize("param,axis,sizes", [("axis: 0 slice_point: 1", 0, [1, 2]),
                                              ("slice_point: 1 slice_point: 3", 1, [1, 2, 1]),
                                              ("axis: 2", 2, [2, 2]),
                                              ("slice_dim: 2 slice_point: 3", 2, [3, 1])])
def test_slice(param, axis, sizes):
    x = randn(3, 4, 4)
    layer, bottom, top = make_layer(f'name: "s" type: "Slice" slice_param {{ {param} }}', [x],
                                    n_tops=len(sizes))
    outs = forward(layer, bottom, top)
    start = 0
    for out, size in zip(outs, sizes):
        for idx in itertools.product(*[range(d) for d in out.shape]):
            src = list(idx)
            src[axis] += start
            assert out[idx] == x[tuple(src)]
        start += size
    check_gradient(layer, bottom, top)


def test_slice_bad_input():
    with pytest.raises(ShapeError, match="evenly divide"):
        make_layer('name: "s" type: "Slice"', [randn(1, 3)], n_tops=2)
    with pytest.raises(ConfigError, match="slice_point"):
        make_layer('name: "s" type: "Slice" slice_param { slice_point: 1 }', [randn(1, 4)],
                   n_tops=3)
    with pytest.raises(ShapeError, match="increase"):
        make_layer('name: "s" type: "Slice" slice_param { slice_point: 2 slice_point: 1 }',
                   [randn(1, 4)], n_tops=3)


# -- Split / Flatten / Reshape -----------------------------------------------------------------
def test_split():
    x = randn(2, 3)
    layer, bottom, top = make_layer('name: "s" type: "Split"', [x], n_tops=3)
    for out in forward(layer, bottom, top):
        np.testing.assert_array_equal(out, x)
    check_gradient(layer, bottom, top)
    top[0].diff[...], top[1].diff[...], top[2].diff[...] = 1.0, 2.0, 4.0
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, np.full((2, 3), 7.0))


@pytest.mark.parametrize("param,expect", [("", (2, 12)), ("axis: 2", (2, 3, 4)),
                                          ("axis: 0 end_axis: 1", (6, 2, 2)),
                                          ("axis: 1 end_axis: -2", (2, 6, 2))])
def test_flatten(param, expect):
    x = randn(2, 3, 2, 2)
    layer, bottom, top = make_layer(f'name: "f" type: "Flatten" flatten_param {{ {param} }}', [x])
    y = forward(layer, bottom, top)[0]
    assert y.shape == expect
    np.testing.assert_array_equal(y.ravel(), x.ravel())
    assert np.shares_memory(top[0].data, bottom[0].data)
    check_gradient(layer, bottom, top)


@pytest.mark.parametrize("param,expect", [
    ("shape { dim: 0 dim: -1 }", (2, 12)),
    ("shape { dim: 4 dim: 0 dim: 2 }", (4, 3, 2)),
    ("axis: 0 num_axes: 2 shape { dim: 6 }", (6, 4)),
    ("axis: -1 shape { dim: 1 }", (2, 3, 4, 1)),
    ("axis: 1 num_axes: 1 shape { dim: 3 dim: 1 }", (2, 3, 1, 4)),
    ("shape { dim: -1 }", (24,)),
])
def test_reshape(param, expect):
    x = randn(2, 3, 4)
    layer, bottom, top = make_layer(f'name: "r" type: "Reshape" reshape_param {{ {param} }}', [x])
    y = forward(layer, bottom, top)[0]
    assert y.shape == expect
    np.testing.assert_array_equal(y.ravel(), x.ravel())
    assert np.shares_memory(top[0].data, bottom[0].data)
    check_gradient(layer, bottom, top)


def test_reshape_bad_input():
    with pytest.raises(ShapeError, match=r"\(2, 3, 4\)"):
        make_layer('name: "r" type: "Reshape" reshape_param { shape { dim: 5 dim: -1 } }',
                   [randn(2, 3, 4)])
    with pytest.raises(ShapeError, match=r"\(2, 3, 4\)"):
        make_layer('name: "r" type: "Reshape" reshape_param { shape { dim: 5 dim: 5 } }',
                   [randn(2, 3, 4)])
    with pytest.raises(ConfigError, match="more than one -1"):
        make_layer('name: "r" type: "Reshape" reshape_param { shape { dim: -1 dim: -1 } }',
                   [randn(2, 3, 4)])


def test_view_layers_refuse_in_place():
    from gradcheck import layer_param
    from owlnet.layer_types import create_layer
    blob = Blob((2, 3))
    layer = create_layer(layer_param('name: "f" type: "Flatten"'), 0)
    with pytest.raises(ConfigError, match="in place"):
        layer.setup([blob], [blob])


# -- Crop / Silence ------------------------------------------------------------------------
@pytest.mark.parametrize("param,offsets", [("", (0, 0, 0, 0)), ("offset: 1", (0, 0, 1, 1)),
                                           ("axis: 1 offset: 1 offset: 0 offset: 2", (0, 1, 0, 2)),
                                           ("axis: 0 offset: 1", (1, 1, 1, 1))])
def test_crop(param, offsets):
    x = randn(3, 3, 4, 5)
    ref = np.zeros((2, 2, 3, 3))
    layer, bottom, top = make_layer(f'name: "c" type: "Crop" crop_param {{ {param} }}', [x, ref])
    y = forward(layer, bottom, top)[0]
    start = 0 if "axis: 0" in param else (1 if "axis: 1" in param else 2)
    shape = x.shape[:start] + ref.shape[start:]
    assert y.shape == shape
    for idx in itertools.product(*[range(d) for d in shape]):
        assert y[idx] == x[tuple(i + (o if a >= start else 0)
                                 for a, (i, o) in enumerate(zip(idx, offsets)))]
    check_gradient(layer, bottom, top, check_bottoms=[0])


def test_crop_bad_input():
    with pytest.raises(ShapeError, match="exceeds"):
        make_layer('name: "c" type: "Crop" crop_param { offset: 3 }',
                   [randn(1, 1, 4, 4), randn(1, 1, 2, 2)])
    with pytest.raises(ConfigError, match="offsets"):
        make_layer('name: "c" type: "Crop" crop_param { offset: 0 offset: 0 offset: 0 }',
                   [randn(1, 1, 4, 4), randn(1, 1, 2, 2)])


def test_silence():
    layer, bottom, _ = make_layer('name: "s" type: "Silence"', [randn(2, 2), randn(3)], n_tops=0)
    layer.forward(bottom, [])
    for b in bottom:
        b.diff[...] = 5.0
    layer.backward([], [True, False], bottom)
    assert not bottom[0].diff.any() and (bottom[1].diff == 5.0).all()


# -- ArgMax --------------------------------------------------------------------------------
def caffe_order(values):
    """Indices by value descending, equal values by index descending (Caffe's pair sort)."""
    return [j for _, j in sorted(((v, j) for j, v in enumerate(values)), reverse=True)]


@pytest.mark.parametrize("top_k,out_max_val", [(1, False), (2, True), (3, False)])
def test_argmax_no_axis(top_k, out_max_val):
    x = np.round(randn(3, 2, 3), 0)  # rounding makes ties
    param = f"top_k: {top_k} out_max_val: {'true' if out_max_val else 'false'}"
    layer, bottom, top = make_layer(f'name: "a" type: "ArgMax" argmax_param {{ {param} }}', [x])
    y = forward(layer, bottom, top)[0]
    assert y.shape == (3, 2 if out_max_val else 1, top_k)
    for n in range(3):
        order = caffe_order(list(x[n].ravel()))[:top_k]
        assert list(y[n, 0]) == order
        if out_max_val:
            assert list(y[n, 1]) == [x[n].ravel()[j] for j in order]


@pytest.mark.parametrize("out_max_val", [False, True])
def test_argmax_axis(out_max_val):
    x = np.round(randn(2, 4, 3), 0)
    param = f"axis: 1 top_k: 2 out_max_val: {'true' if out_max_val else 'false'}"
    layer, bottom, top = make_layer(f'name: "a" type: "ArgMax" argmax_param {{ {param} }}', [x])
    y = forward(layer, bottom, top)[0]
    assert y.shape == (2, 2, 3)
    for n in range(2):
        for w in range(3):
            order = caffe_order(list(x[n, :, w]))[:2]
            expect = [x[n, j, w] for j in order] if out_max_val else order
            assert list(y[n, :, w]) == expect


def test_argmax_bad_input():
    with pytest.raises(ConfigError, match="top_k"):
        make_layer('name: "a" type: "ArgMax" argmax_param { top_k: 5 }', [randn(2, 4)])
    layer, bottom, top = make_layer('name: "a" type: "ArgMax"', [randn(2, 4)])
    with pytest.raises(ConfigError, match="no backward"):
        layer.backward(top, [True], bottom)


# -- Softmax -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,axis", [((2, 3), 1), ((1, 3, 2, 2), 1), ((2, 3, 4), 2),
                                        ((3, 2), 0), ((2, 3, 2), -2)])
def test_softmax(shape, axis):
    x = randn(*shape) * 3
    text = f'name: "s" type: "Softmax" softmax_param {{ axis: {axis} }}'
    layer, bottom, top = make_layer(text, [x])
    y = forward(layer, bottom, top)[0]
    ax = axis % len(shape)
    moved = np.moveaxis(x, ax, -1)
    expect = np.empty_like(moved)
    for idx in np.ndindex(moved.shape[:-1]):
        e = [np.exp(v) for v in moved[idx]]
        expect[idx] = [v / sum(e) for v in e]
    np.testing.assert_allclose(y, np.moveaxis(expect, -1, ax), rtol=1e-12)
    check_gradient(layer, bottom, top)


def test_softmax_large_inputs_stay_finite():
    x = np.array([[1000.0, 1001.0, -1000.0]])
    layer, bottom, top = make_layer('name: "s" type: "Softmax"', [x])
    y = forward(layer, bottom, top)[0]
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y[0, :2], [1 / (1 + np.e), np.e / (1 + np.e)])


@pytest.mark.parametrize("parallel", [False, True])
def test_inner_product_weight_gradient_in_row_blocks_matches(monkeypatch, parallel):
    from owlnet.kernels import cpu
    x = np.random.default_rng(5).standard_normal((3, 7))
    layer, bottom, top = make_layer("""name: "ip" type: "InnerProduct" inner_product_param {
        num_output: 10 weight_filler { type: "gaussian" } }""", [x])
    forward(layer, bottom, top)
    top[0].diff[...] = np.random.default_rng(6).standard_normal(top[0].shape)
    layer.blobs[0].diff[...] = 1.0
    layer.backward(top, [False], bottom)
    whole = layer.blobs[0].diff.copy()
    monkeypatch.setattr(cpu.products, "_PRODUCT_BLOCK_ELEMENTS", 3 * 7)   # 3 rows a block: 4
    if parallel:
        monkeypatch.setattr(cpu.shared, "PARALLEL_MULTIPLY_ADDS", 0)
    layer.blobs[0].diff[...] = 1.0
    layer.backward(top, [False], bottom)
    np.testing.assert_allclose(layer.blobs[0].diff, whole, rtol=1e-13)
    np.testing.assert_allclose(whole, 1.0 + top[0].diff.T @ x, rtol=1e-13)


@pytest.mark.parametrize("transpose, rows", [(False, 2), (True, 2), (False, 300), (True, 300)])
def test_inner_product_in_column_or_row_blocks_matches(monkeypatch, transpose, rows):
    """Few rows: native.c's few_rows_product, or bands of the inner dimension summed
    (backward-data, and forward with transposed weights); many: bands of rows; on the worker
    threads."""
    from owlnet.kernels import cpu
    x = np.random.default_rng(7).standard_normal((rows, 9))
    layer, bottom, top = make_layer(f"""name: "ip" type: "InnerProduct" inner_product_param {{
        num_output: 21 transpose: {str(transpose).lower()} weight_filler {{ type: "gaussian" }} }}""",
                                    [x])
    w = layer.blobs[0].data
    weights_t = w if transpose else w.T
    # 2 rows: bands of 8 weight rows (3 pieces); 300 rows: bands of 128 rows
    monkeypatch.setattr(cpu.products, "_FEW_ROWS_BAND", 8)
    monkeypatch.setattr(cpu.products, "_FEW_ROWS_PARALLEL_WEIGHTS", 0)
    monkeypatch.setattr(cpu.shared, "PARALLEL_MULTIPLY_ADDS", 0)
    y = forward(layer, bottom, top)[0]
    np.testing.assert_allclose(y, x @ weights_t + layer.blobs[1].data, rtol=1e-13)
    top[0].diff[...] = np.random.default_rng(8).standard_normal(top[0].shape)
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(bottom[0].diff, top[0].diff @ weights_t.T, rtol=1e-13)
