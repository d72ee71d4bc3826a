"""Every CUDA source owlnet ships, checked without a GPU.

* NVRTC compiles each registry kernel for sm_90 (needs the cupy-cuda13x and nvidia-cuda-nvrtc
  wheels; skipped where they are absent);
* the C harness runs each body on the CPU against the NumPy path, on awkward geometries;
* nothing outside the registry is compiled (no other ElementwiseKernel / RawKernel source).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import cuda_harness
import column_reference
from owlnet.kernels import cuda_sources

ROOT = Path(__file__).resolve().parents[1]


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as exc:  # not installed, or no libnvrtc found
        pytest.skip(f"NVRTC not available ({exc})")
    return nvrtc


def _compile(nvrtc, source, dtype, raw_ndim, index_32_bits):
    """Compile CuPy's own source for ``source`` (skip where this CuPy lacks its generator)."""
    try:
        code, options = cuda_harness.cupy_program(source, dtype, raw_ndim, index_32_bits)
    except (AttributeError, TypeError, ImportError) as exc:
        pytest.skip(f"CuPy's kernel code generator is not reachable here ({exc})")
    program = nvrtc.createProgram(code, f"{source.name}.cu", [], [])
    try:
        nvrtc.compileProgram(program, options)
        return nvrtc.getCUBIN(program)
    except Exception as exc:
        raise AssertionError(f"{source.name}: {exc}\n{nvrtc.getProgramLog(program)}") from None
    finally:
        nvrtc.destroyProgram(program)


# float: raw arrays seen as 4-d, 32-bit indexing; double: 1-d raw arrays, 64-bit indexing.
@pytest.mark.parametrize("dtype, raw_ndim, index_32_bits",
                         [(np.float32, 4, True), (np.float64, 1, False)],
                         ids=["float_4d_i32", "double_1d_i64"])
@pytest.mark.parametrize("source", cuda_sources.ALL, ids=lambda s: s.name)
def test_nvrtc_compiles_cupys_source_for_sm90(source, dtype, raw_ndim, index_32_bits):
    """The exact translation unit CuPy builds for the kernel, compiled as CuPy compiles it."""
    cubin = _compile(_nvrtc(), source, dtype, raw_ndim, index_32_bits)
    assert len(cubin) > 1000


def test_nvrtc_rejects_a_broken_body():
    """The compile test can fail: a body with an undeclared name does not compile."""
    nvrtc = _nvrtc()
    broken = cuda_sources.Elementwise("broken", "raw T a", "T b", "b = a[i] + undeclared;",
                                      arrays=("b",))
    with pytest.raises(AssertionError, match="undeclared"):
        _compile(nvrtc, broken, np.float32, 1, True)


def test_every_kernel_comes_from_the_registry():
    """kernels.gpu builds kernels in one place, from registry entries; no other CUDA source."""
    constructors = re.compile(r"\b(ElementwiseKernel|RawKernel|RawModule|ReductionKernel)\(")
    hits = []
    for path in sorted((ROOT / "owlnet").rglob("*.py")):
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if constructors.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{line_no}")
    assert len(hits) == 1 and hits[0].startswith("owlnet/kernels/gpu.py"), hits
    names = [s.name for s in cuda_sources.ALL]
    assert len(set(names)) == len(names)


# -- im2col / col2im on the CPU through the C harness ------------------------------------------
GEOMETRIES = {   # image shape, kernel, pad, stride, dilation
    "stride2_pad1": ((2, 3, 9, 8), (3, 3), (1, 1), (2, 2), (1, 1)),
    "dilation2": ((2, 2, 11, 10), (3, 3), (2, 1), (1, 1), (2, 2)),
    "non_square": ((3, 2, 7, 12), (2, 5), (0, 2), (1, 3), (1, 1)),
    "pad_over_kernel": ((1, 2, 5, 6), (2, 3), (3, 4), (2, 1), (1, 2)),
    "one_by_one": ((2, 4, 5, 3), (1, 1), (0, 0), (1, 1), (1, 1)),
}


def _out_size(shape, kernel, pad, stride, dilation):
    return tuple((shape[2 + a] + 2 * pad[a] - dilation[a] * (kernel[a] - 1) - 1) // stride[a] + 1
                 for a in range(2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", GEOMETRIES)
def test_column_bodies_match_numpy(name, dtype):
    shape, kernel, pad, stride, dilation = GEOMETRIES[name]
    out_size = _out_size(shape, kernel, pad, stride, dilation)
    geometry = (*shape, *kernel, *out_size, *stride, *pad, *dilation)
    rng = np.random.default_rng(0)
    images = rng.standard_normal(shape).astype(dtype)
    want = column_reference.im2col(images, kernel, pad, stride, dilation, out_size)
    got = np.full(want.shape, np.nan, dtype=dtype)
    cuda_harness.c_kernel(cuda_sources.IM2COL, dtype)(images, *geometry, got)
    np.testing.assert_array_equal(got, want)

    cols = rng.standard_normal(want.shape).astype(dtype)
    want_images = column_reference.col2im(cols, shape, kernel, pad, stride, dilation, out_size)
    got_images = np.full(shape, np.nan, dtype=dtype)
    cuda_harness.c_kernel(cuda_sources.COL2IM, dtype)(cols, *geometry, got_images)
    np.testing.assert_allclose(got_images, want_images, rtol=1e-5, atol=1e-5)


def test_im2col_alexnet_conv1_batch128_far_images():
    """conv1 at batch 128 (140M column entries in one launch): the columns of images 30, 90
    and 127, computed inside the full launch's index space, match that image's NumPy columns."""
    n, shape, kernel, stride, out_size = 128, (3, 227, 227), (11, 11), (4, 4), (55, 55)
    rng = np.random.default_rng(1)
    images = rng.standard_normal((n,) + shape).astype(np.float32)
    geometry = (n, *shape, *kernel, *out_size, *stride, 0, 0, 1, 1)
    per_image = out_size[0] * out_size[1]
    rows = shape[0] * kernel[0] * kernel[1]
    kernel_fn = cuda_harness.c_kernel(cuda_sources.IM2COL)
    assert rows * n * per_image > 2 ** 27
    for img in (30, 90, n - 1):
        want = column_reference.im2col(images[img:img + 1], kernel, (0, 0), stride, (1, 1), out_size)
        for row in (0, rows // 2, rows - 1):        # a few rows of that image's columns
            begin = row * n * per_image + img * per_image
            got = np.empty(per_image, np.float32)
            kernel_fn(images, *geometry, got, begin=begin, end=begin + per_image)
            np.testing.assert_array_equal(got, want[row])


def test_harness_catches_a_wrong_body():
    """An injected bug (stride ignored on the x axis) makes the comparison fail."""
    wrong = cuda_sources.Elementwise(
        "owlnet_im2col_wrong", cuda_sources.IM2COL.in_params, cuda_sources.IM2COL.out_params,
        cuda_sources.IM2COL.body.replace("x * sw - pw", "x - pw"), arrays=("col",))
    shape, kernel, pad, stride, dilation = GEOMETRIES["stride2_pad1"]
    out_size = _out_size(shape, kernel, pad, stride, dilation)
    images = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    want = column_reference.im2col(images, kernel, pad, stride, dilation, out_size)
    got = np.empty(want.shape, np.float32)
    cuda_harness.c_kernel(wrong)(images, *shape, *kernel, *out_size, *stride, *pad, *dilation, got)
    assert not np.array_equal(got, want)


# Where each registry kernel's body is run on the CPU and compared with the NumPy path. A new
# kernel fails the test below until it is added here with its check.
NUMERIC_CHECKS = {
    "owlnet_im2col": "test_gpu_sources.py::test_column_bodies_match_numpy",
    "owlnet_col2im": "test_gpu_sources.py::test_column_bodies_match_numpy",
    "owlnet_max_pool_forward": "test_gpu_kernels.py::test_pooling_matches_the_cpu_layer",
    "owlnet_max_pool_backward": "test_gpu_kernels.py::test_pooling_matches_the_cpu_layer",
    "owlnet_ave_pool_forward": "test_gpu_kernels.py::test_pooling_matches_the_cpu_layer",
    "owlnet_ave_pool_backward": "test_gpu_kernels.py::test_pooling_matches_the_cpu_layer",
    "owlnet_softmax": "test_gpu_kernels.py::test_softmax_matches_the_cpu_layer",
    "owlnet_softmax_loss": "test_gpu_kernels.py::test_softmax_loss_matches_the_cpu_layer",
    "owlnet_softmax_loss_backward": "test_gpu_kernels.py::test_softmax_loss_matches_the_cpu_layer",
    "owlnet_dropout_forward": "test_gpu_kernels.py::test_dropout_mask_is_the_numpy_mask",
    "owlnet_dropout_backward": "test_gpu_kernels.py::test_dropout_mask_is_the_numpy_mask",
    "owlnet_dropout_forward_counted":
        "test_captured_step.py::test_counted_dropout_draws_the_keyed_mask",
    **{f"owlnet_batch_norm_{part}": "test_fusion_training.py::test_kernels_follow_the_formulas"
       for part in ("squared_deviation", "apply", "gradient_products", "backward_apply")},
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_kernel_builds_as_plain_c_and_has_a_numeric_check(dtype):
    assert set(NUMERIC_CHECKS) == {s.name for s in cuda_sources.ALL}
    for where in set(NUMERIC_CHECKS.values()):
        file, test = where.split("::")
        assert f"def {test}(" in (ROOT / "tests" / file).read_text(), where
    for source in cuda_sources.ALL:
        cuda_harness.c_kernel(source, dtype)         # -Wall -Werror, C99
