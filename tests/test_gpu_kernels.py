"""kernels.gpu's fused layer kernels (pooling, softmax, softmax loss, dropout) against the NumPy
layers (CPU path) on awkward geometries: on the CPU, fake CuPy (tests/fakecupy.py) launches the
registry bodies through the C harness; on a device (``gpu`` mark) real CuPy runs them."""
from __future__ import annotations

import numpy as np
import pytest

import cuda_harness
import fakecupy
from gradcheck import make_layer
from owlnet.kernels import counter_random, cuda_sources
from owlnet.kernels import gpu


@pytest.fixture(params=["fake", pytest.param("device", marks=pytest.mark.gpu)])
def cupy(request):
    if request.param == "device":
        from owlnet import backend
        yield backend.import_cupy()
        return
    with fakecupy.fake_gpu() as module:
        yield module


def _cpu_layer(text, x, top_diff_seed=5, n_tops=1):
    """Forward and backward of a layer on the CPU (float64): tops, bottom diff, the layer."""
    layer, bottom, top = make_layer(f'name: "l" {text}', [x], n_tops=n_tops)
    layer.forward(bottom, top)
    dy = np.random.default_rng(top_diff_seed).standard_normal(top[0].shape)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    return [t.data.copy() for t in top], bottom[0].diff.copy(), dy, layer


POOLS = {
    "max_ceil_edges": ('pool: MAX kernel_size: 3 stride: 2', (2, 3, 7, 6)),
    "max_stride2_pad1": ('pool: MAX kernel_size: 3 stride: 2 pad: 1', (2, 2, 9, 8)),
    "max_non_square": ("pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 "
                       "pad_w: 0", (1, 2, 8, 5)),
    "max_ties": ('pool: MAX kernel_size: 2 stride: 1', (2, 2, 5, 5)),
    "ave_stride2_pad1": ('pool: AVE kernel_size: 3 stride: 2 pad: 1', (2, 2, 9, 8)),
    "ave_non_square_pad": ('pool: AVE kernel_h: 3 kernel_w: 2 stride: 2 pad: 1', (2, 2, 6, 7)),
    "ave_global": ('pool: AVE global_pooling: true', (2, 3, 4, 5)),
    "max_global": ('pool: MAX global_pooling: true', (2, 3, 4, 5)),
}


@pytest.mark.parametrize("name", POOLS)
def test_pooling_matches_the_cpu_layer(cupy, name):
    params, shape = POOLS[name]
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, shape) * 1.0 if name == "max_ties" else rng.standard_normal(shape)
    is_max = "MAX" in params
    tops, dx_want, dy, layer = _cpu_layer(f'type: "Pooling" pooling_param {{ {params} }}', x,
                                          n_tops=2 if is_max else 1)
    geometry = (tuple(layer.kernel), tuple(layer.stride), tuple(layer.pad))
    xd, dyd = cupy.asarray(x), cupy.asarray(dy)
    y = cupy.full(tops[0].shape, np.nan)
    dx = cupy.full(x.shape, np.nan)
    if is_max:
        argmax = cupy.full(tops[0].shape, -7, dtype=np.int32)
        gpu.max_pool_forward(xd, y, argmax, *geometry)
        gpu.max_pool_backward(dyd, argmax, dx, *geometry)
        np.testing.assert_array_equal(argmax.get(), tops[1])
    else:
        gpu.ave_pool_forward(xd, y, *geometry)
        gpu.ave_pool_backward(dyd, dx, *geometry)
    np.testing.assert_allclose(y.get(), tops[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx.get(), dx_want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape, axis", [((3, 4, 2), 1), ((2, 3, 5), 2), ((4, 6), 1)])
def test_softmax_matches_the_cpu_layer(cupy, shape, axis):
    x = np.random.default_rng(2).standard_normal(shape) * 5
    tops, _, _, _ = _cpu_layer(f'type: "Softmax" softmax_param {{ axis: {axis} }}', x)
    y = cupy.empty(shape)
    gpu.softmax_forward(cupy.asarray(x), y, axis)
    np.testing.assert_allclose(y.get(), tops[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("ignore", [None, 1])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_loss_matches_the_cpu_layer(cupy, ignore, dtype):
    """VALID normalisation: loss = sum / counted, dx = (prob - onehot) / counted."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 4, 3)) * 3
    labels = rng.integers(0, 4, (5, 3)).astype(np.float64)
    labels[0, 0] = 3
    extra = f"loss_param {{ ignore_label: {ignore} normalization: VALID }}" if ignore is not None \
        else "loss_param { normalization: VALID }"
    layer, bottom, top = make_layer(f'name: "l" type: "SoftmaxWithLoss" {extra}', [x, labels])
    layer.forward(bottom, top)
    top[0].diff[...] = 1
    layer.backward(top, [True, False], bottom)
    prob = cupy.empty(x.shape, dtype=dtype)
    xd, ld = cupy.asarray(x.astype(dtype)), cupy.asarray(labels.astype(dtype))
    loss, counted = gpu.softmax_loss_forward(xd, ld, prob, 1, ignore)
    assert type(loss) is not np.ndarray and loss.ndim == 0       # stays on the device
    tol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(float(loss) / float(counted), float(top[0].data), rtol=tol)
    dx = cupy.empty(x.shape, dtype=dtype)
    gpu.softmax_loss_backward(prob, ld, dx, 1, 1.0 / float(counted), ignore)
    np.testing.assert_allclose(dx.get(), bottom[0].diff, rtol=tol, atol=tol)


def test_dropout_mask_is_the_numpy_mask(cupy):
    """The GPU body and counter_random draw the same mask bit for bit; Caffe's scaling."""
    ratio, shape = 0.3, (64, 50, 7)
    key = counter_random.draw_key(seed=1701, iteration=12, layer="drop6")
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    y, keep = cupy.empty(shape, np.float32), cupy.empty(shape, np.uint8)
    gpu.dropout_forward(cupy.asarray(x), y, keep, ratio, key)
    want = counter_random.dropout_keep(key, shape, ratio)
    np.testing.assert_array_equal(keep.get().astype(bool), want)
    np.testing.assert_array_equal(y.get(), np.where(want, x * np.float32(1 / 0.7), 0))
    assert abs(want.mean() - 0.7) < 0.01
    dx = cupy.empty(shape, np.float32)
    gpu.dropout_backward(cupy.asarray(x), keep, dx, ratio)
    np.testing.assert_array_equal(dx.get(), y.get())


def test_counter_bits_agree_past_two_to_the_32():
    """Element indices above 2^32 (the high word enters the mix) agree between C and NumPy."""
    key = counter_random.draw_key(7, 3, 2)
    begin = 2 ** 32 - 6
    x = np.ones(12, np.float32)
    y, keep = np.empty(12, np.float32), np.empty(12, np.uint8)
    cuda_harness.c_kernel(cuda_sources.DROPOUT_FORWARD)(x, key, counter_random.threshold(0.5),
                                                        2.0, y, keep, begin=begin,
                                                        end=begin + 12)
    want = counter_random.bits(key, 12, start=begin) > counter_random.threshold(0.5)
    np.testing.assert_array_equal(keep.astype(bool), want)


def test_draw_keys_differ_by_seed_iteration_and_layer():
    keys = {counter_random.draw_key(s, i, layer) for s in (0, 1) for i in (0, 1, 2 ** 33)
            for layer in ("drop6", "drop7", 0)}
    assert len(keys) == 18
