"""kernels.cublas: row-major products as column-major BLAS calls, on the fake device (the
BLAS calls run in NumPy on the same memory, as strict about leading dimensions as cuBLAS)."""
from __future__ import annotations

import numpy as np
import pytest

import fakecupy
from owlnet import backend
from owlnet.kernels import cublas


def _views(rng, rows, cols, dtype):
    """The same (rows, cols) values as differently laid-out arrays (host copies)."""
    values = rng.standard_normal((rows, cols)).astype(dtype)
    padded = np.zeros((rows, cols + 3), dtype)
    padded[:, :cols] = values
    transposed = np.ascontiguousarray(values.T)
    both = np.zeros((rows * 2, cols * 2), dtype)
    both[::2, ::2] = values
    return values, {"contiguous": (values, lambda a: a),
                    "padded rows": (padded, lambda a: a[:, :cols]),
                    "a .T view": (transposed, lambda a: a.T),
                    "no unit stride": (both, lambda a: a[::2, ::2])}


LAYOUTS = ["contiguous", "padded rows", "a .T view", "no unit stride"]
SHAPES = [(5, 7, 3), (1, 4, 6), (6, 1, 2), (3, 5, 1), (1, 1, 1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m, k, n", SHAPES)
@pytest.mark.parametrize("a_layout", LAYOUTS)
@pytest.mark.parametrize("b_layout", LAYOUTS)
def test_product_of_any_layout_equals_numpy(dtype, m, k, n, a_layout, b_layout):
    rng = np.random.default_rng(m * 100 + k * 10 + n)
    a_values, a_views = _views(rng, m, k, dtype)
    b_values, b_views = _views(rng, k, n, dtype)
    start = rng.standard_normal((m, n)).astype(dtype)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    with fakecupy.fake_gpu() as cupy:
        (a_host, a_view), (b_host, b_view) = a_views[a_layout], b_views[b_layout]
        a, b = a_view(cupy.asarray(a_host)), b_view(cupy.asarray(b_host))
        out = cupy.asarray(start)
        cublas.gemm(a, b, out)
        np.testing.assert_allclose(out.get(), a_values @ b_values, rtol=tolerance,
                                   atol=tolerance)
        cublas.gemm(a, b, out, accumulate=True)
        np.testing.assert_allclose(out.get(), 2 * (a_values @ b_values), rtol=tolerance,
                                   atol=tolerance)


@pytest.mark.parametrize("out_layout", ["padded rows", "a .T view", "no unit stride"])
def test_output_of_any_layout(out_layout):
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((3, 5))
    values, views = _views(rng, 4, 5, np.float64)
    with fakecupy.fake_gpu() as cupy:
        host, view = views[out_layout]
        buffer = cupy.asarray(host)
        out = view(buffer)
        cublas.gemm(cupy.asarray(a), cupy.asarray(b), out, accumulate=True)
        np.testing.assert_allclose(out.get(), values + a @ b, rtol=1e-12)
        untouched = np.ones(host.shape, bool)
        view(untouched)[...] = False
        np.testing.assert_array_equal(buffer.get()[untouched], host[untouched])


def test_views_are_read_in_place_with_the_transpose_flags():
    """A ``.T`` view is read as it lies (op T), a padded one with its row stride as the
    leading dimension: no copies; the arguments are those of out^T = b^T a^T."""
    with fakecupy.fake_gpu() as cupy:
        library = cublas._state["library"]
        w = cupy.asarray(np.ones((10, 6)))         # (out, in), as InnerProduct holds it
        x = cupy.asarray(np.ones((4, 8)))[:, :6]   # rows padded to 8
        y = cupy.empty((4, 10))
        cublas.gemm(x, w.T, y)
        assert library.calls == [(cublas.OP_T, cublas.OP_N, 10, 4, 6, 6, 8, 10, 0.0)]


def test_shape_and_dtype_errors():
    with fakecupy.fake_gpu() as cupy:
        a, b = cupy.ones((2, 3), dtype=np.float32), cupy.ones((4, 2), dtype=np.float32)
        with pytest.raises(ValueError, match=r"\(2, 3\) @ \(4, 2\)"):
            cublas.gemm(a, b, cupy.empty((2, 2), dtype=np.float32))
        with pytest.raises(TypeError, match="float32 or float64"):
            cublas.gemm(a, a.T.astype(np.float64), cupy.empty((2, 2), dtype=np.float32))
        out = cupy.full((2, 2), 7.0, dtype=np.float32)
        cublas.gemm(cupy.ones((2, 0), np.float32), cupy.ones((0, 2), np.float32), out)
        np.testing.assert_array_equal(out.get(), 0)


def test_captured_product_replays_and_follows_the_math_mode():
    """The product is recorded by a capture on the handle's stream and replayed; the handle
    takes the math mode (cublasMath_t 3 for tf32, 0 for fp32)."""
    with fakecupy.fake_gpu() as cupy:
        library = cublas._state["library"]
        a, b = cupy.asarray(np.eye(3) * 2), cupy.asarray(np.arange(9.0).reshape(3, 3))
        out = cupy.zeros((3, 3))
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            cublas.gemm(a, b, out)              # eager: binds the handle to this stream
            out[...] = 0
            stream.begin_capture()
            cublas.gemm(a, b, out, accumulate=True)
            graph = stream.end_capture()
        np.testing.assert_array_equal(out.get(), 0)     # a capture runs nothing
        graph.launch(stream)
        graph.launch(stream)
        np.testing.assert_array_equal(out.get(), 4 * np.arange(9.0).reshape(3, 3))
        (handle,) = library.math
        assert library.math[handle] == 0
        backend.set_math_mode("tf32")
        try:
            cublas.gemm(a, b, out)
            assert library.math[handle] == 3
        finally:
            backend.set_math_mode("fp32")
        assert library.workspaces[handle][1] == cublas.WORKSPACE_BYTES


def test_cupy_products_are_refused_in_a_capture_as_cupy_14_does():
    """The fake refuses CuPy's own cuBLAS products during a capture (the failure a real H200
    showed): owlnet's layers must go through kernels.cublas."""
    with fakecupy.fake_gpu() as cupy:
        a = cupy.ones((2, 2))
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            try:
                with pytest.raises(NotImplementedError, match="cuBLAS API during stream capture"):
                    a @ a
            finally:
                stream.end_capture()


def test_missing_libcublas_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(cublas.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(name)))
    with pytest.raises(cublas.CublasError, match="libcublas was not found.*owlnet\\[gpu\\]"):
        cublas.Library()
