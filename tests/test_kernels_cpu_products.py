"""The fully connected layers' products (``kernels.cpu.products``) in each way they are cut
into pieces, against one NumPy product in float64."""
import numpy as np
import pytest

from owlnet.kernels.cpu import products, shared

RNG = np.random.default_rng(11)


# (rows, inner, columns, b transposed): the regimes of matmul's docstring.
CASES = [
    (4, 3000, 3000, True),      # few rows, b's columns contiguous: blocks of columns
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
