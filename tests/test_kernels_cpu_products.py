"""The fully connected layers' products (``kernels.cpu.products``) in each way they are cut
into pieces, against one NumPy product in float64."""
import numpy as np
import pytest

from owlnet.kernels.cpu import products, shared

RNG = np.random.default_rng(11)


# (rows, inner, columns, b transposed): the regimes of matmul's docstring.
CASES = [
    (4, 3000, 3000, True),      # few rows, b's columns contiguous: few_rows_product
    (4, 3000, 3000, False),     # few rows, b's rows contiguous: bands of the inner dimension
    (64, 400, 400, True),       # rows for one band of rows only: bands of columns
    (64, 400, 400, False),
    (300, 200, 160, False),     # two bands of rows and more
    (16, 20, 30, False),        # small: one product
]


@pytest.mark.parametrize("rows, inner, columns, transposed", CASES)
def test_matmul_pieces_give_the_product(rows, inner, columns, transposed):
    a = RNG.standard_normal((rows, inner))
    b = RNG.standard_normal((columns, inner)).T if transposed else \
        RNG.standard_normal((inner, columns))
    big = rows * inner * columns >= shared.PARALLEL_MULTIPLY_ADDS
    assert big == (rows != 16)          # all but the last case are shared out
    out = np.full((rows, columns), np.nan)
    products.matmul(a, b, out)
    np.testing.assert_allclose(out, a @ b, rtol=1e-12, atol=1e-10)


def test_add_matmul_adds_in_bands():
    out = RNG.standard_normal((700, 500))
    a, b = RNG.standard_normal((700, 64)), RNG.standard_normal((64, 500))
    want = out + a @ b
    products.add_matmul(out, a, b)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows, inner, columns", [
    (1, 37, 5),          # one row; inner not a whole vector, outputs not a whole tile of 4
    (2, 1003, 131),      # a batch of 2 (two rows a tile), bands of 64 outputs and a tail
    (5, 256, 200),       # rows in pairs and one more
    (8, 64, 70),         # the most rows it takes
])
def test_few_rows_times_transposed_weights(monkeypatch, dtype, rows, inner, columns):
    """out = a @ w.T for at most _FEW_ROWS rows runs as native.c's few_rows_product: against
    a float64 product, with a and out rows of wider arrays (row strides other than the
    width), and with the same bits on one thread as on several."""
    wide = RNG.standard_normal((rows, inner + 3)).astype(dtype)
    a = wide[:, 1:inner + 1]
    w = RNG.standard_normal((columns, inner)).astype(dtype)
    frame = np.full((rows, columns + 5), np.nan, dtype)
    out = frame[:, 2:columns + 2]
    assert products._native_few_rows(a, w.T, out)
    monkeypatch.setattr(products, "_FEW_ROWS_PARALLEL_WEIGHTS", 0)
    products.matmul(a, w.T, out)
    want = a.astype(np.float64) @ w.T.astype(np.float64)
    tolerance = 1e-5 * np.sqrt(inner) if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, want, rtol=tolerance, atol=tolerance)
    assert np.isnan(frame[:, :2]).all() and np.isnan(frame[:, columns + 2:]).all()
    threaded = out.copy()
    monkeypatch.setattr(products, "_FEW_ROWS_PARALLEL_WEIGHTS", 1 << 40)
    out[...] = np.nan
    products.matmul(a, w.T, out)
    np.testing.assert_array_equal(out, threaded)


def test_few_rows_with_strided_weights_take_numpy():
    """A weight matrix whose rows are not contiguous (every other column) is not
    few_rows_product's: the product still comes out right."""
    a = RNG.standard_normal((2, 50)).astype(np.float32)
    w = RNG.standard_normal((30, 100)).astype(np.float32)[:, ::2]
    out = np.empty((2, 30), np.float32)
    assert not products._native_few_rows(a, w.T, out)
    products.matmul(a, w.T, out)
    np.testing.assert_allclose(out, a.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-5)
