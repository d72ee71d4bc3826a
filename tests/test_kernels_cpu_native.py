"""The compiled per-channel kernels (BatchNorm's batch statistics, Scale, channel sums, ReLU's
gradient, LRN across channels) against float64 NumPy references, cut into bands or not, and
the loader's error when the compiled library is missing."""
import importlib.machinery

import numpy as np
import pytest

from owlnet.errors import OwlnetError
from owlnet.kernels import cpu

RNG = np.random.default_rng(5)
SHAPES = [(2, 3, 13), (4, 5, 64), (1, 2, 1), (3, 7, 29)]   # (outer, C, inner): runs of 8 and not


@pytest.fixture(params=["one band", "many bands"])
def bands(request, monkeypatch):
    if request.param == "many bands":
        _one_band_a_channel(monkeypatch)
    return request.param


def _one_band_a_channel(monkeypatch):
    """The per-channel passes cut into a band a channel however small, on three threads."""
    monkeypatch.setattr(cpu.normalization, "_BAND_BYTES", 1)
    monkeypatch.setattr(cpu.normalization, "_SERIAL_BYTES", 0)
    monkeypatch.setattr(cpu.normalization.threads, "workers", lambda: 3)


def test_bands_on_native_threads_give_one_band_bits(monkeypatch):
    """Cut into one band a channel, on three of native.c's threads, the passes give the bits
    of one band on one thread (each channel summed by one band, in one order)."""
    shape = (3, 37, 203)
    x, dy = (RNG.standard_normal(shape).astype(np.float32) for _ in range(2))
    scale, bias = (RNG.standard_normal(shape[1]).astype(np.float32) for _ in range(2))

    def passes():
        y, kept, dx, relu_dx = (np.empty_like(x) for _ in range(4))
        stats = cpu.batch_norm_forward(x, y, kept, 1e-5, scale, bias, relu=True)
        sums = cpu.batch_norm_backward(dy, kept, stats[2], dx, scale, relu_top=y)
        cpu.relu_backward(dy, y, relu_dx)
        return [y, kept, dx, relu_dx, *stats, *sums, cpu.channel_sums(dy, x)]

    one = passes()
    _one_band_a_channel(monkeypatch)
    for _ in range(20):
        for got, want in zip(passes(), one):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_norm_against_float64(bands, shape, dtype):
    x = (RNG.standard_normal(shape) * 3 + 1).astype(dtype)
    eps = 1e-5
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2))
    var = ((x64 - mean[:, None]) ** 2).mean(axis=(0, 2))
    normalized = (x64 - mean[:, None]) / np.sqrt(var[:, None] + eps)
    y, kept = np.full_like(x, np.nan), np.full_like(x, np.nan)
    got = cpu.batch_norm_forward(x, y, kept, eps)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    for value, want in zip(got, (mean, var, 1 / np.sqrt(var + eps))):
        assert value.dtype == dtype
        np.testing.assert_allclose(value, want, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(y, normalized, rtol=tolerance * 10, atol=tolerance * 10)
    np.testing.assert_array_equal(kept, y)
    in_place = x.copy()
    cpu.batch_norm_forward(in_place, in_place, None, eps)
    np.testing.assert_array_equal(in_place, y)

    dy = RNG.standard_normal(shape).astype(dtype)
    dy64 = dy.astype(np.float64)
    inv_std = got[2]
    want = (dy64 - dy64.mean(axis=(0, 2))[:, None]
            - y * (dy64 * y).mean(axis=(0, 2))[:, None]) * inv_std[:, None]
    dx = np.full_like(x, np.nan)
    cpu.batch_norm_backward(dy, y, inv_std, dx)
    np.testing.assert_allclose(dx, want, rtol=tolerance * 10, atol=tolerance * 10)
    cpu.batch_norm_backward(dy, y, inv_std, dy)                    # dx is dy
    np.testing.assert_array_equal(dy, dx)


@pytest.mark.parametrize("shape", SHAPES)
def test_channel_sums(bands, shape):
    a = RNG.standard_normal(shape).astype(np.float32)
    b = RNG.standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(cpu.channel_sums(a), a.astype(np.float64).sum(axis=(0, 2)),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cpu.channel_sums(a, b),
                               (a.astype(np.float64) * b).sum(axis=(0, 2)), rtol=1e-6, atol=1e-6)


def test_relu_backward_is_dy_times_the_sign_test(bands):
    x = RNG.standard_normal(1001).astype(np.float32)
    x[:5] = [0, -0.0, np.nan, np.inf, -np.inf]
    dy = RNG.standard_normal(1001).astype(np.float32)
    dy[5:8] = [np.nan, np.inf, np.nan]
    x[5], x[6], x[7] = -1, -1, 1                  # NaN * 0, inf * 0 are NaN, as dy * (x > 0)
    dx = np.empty_like(dy)
    cpu.relu_backward(dy, x, dx)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(dx, dy * (x > 0))
    cpu.relu_backward(dy, x, dy)
    np.testing.assert_array_equal(dy, dx)


def test_missing_library_says_how_to_build_it(monkeypatch):
    monkeypatch.setattr(importlib.machinery, "EXTENSION_SUFFIXES", [".not-built.so"])
    with pytest.raises(OwlnetError, match="make install"):
        cpu.native._library_path()


def test_kernels_reject_other_element_types():
    x = np.zeros((2, 3, 4), dtype=np.float16)
    with pytest.raises(TypeError, match="float32 or float64"):
        cpu.channel_sums(x)


@pytest.mark.parametrize("size, beta", [(5, 0.75), (3, 0.6), (7, 0.75)])
def test_lrn_across_channels_against_float64(size, beta):
    x = RNG.standard_normal((2, 6, 5, 67)).astype(np.float32)    # 335 positions: blocks of 256
    coeff, shift = 1e-2 / size, 2.0
    x64 = x.astype(np.float64)
    squares = x64 * x64
    sums = np.zeros_like(x64)
    for c in range(x.shape[1]):
        sums[:, c] = squares[:, max(0, c - size // 2):c + size // 2 + 1].sum(axis=1)
    scale_want = shift + coeff * sums
    y, scale, power = (np.full_like(x, np.nan) for _ in range(3))
    cpu.lrn_across_channels_forward(x, y, scale, power, size, coeff, shift, beta)
    np.testing.assert_allclose(scale, scale_want, rtol=1e-6)
    np.testing.assert_allclose(power, scale_want ** -beta, rtol=1e-6)
    np.testing.assert_allclose(y, x64 * scale_want ** -beta, rtol=1e-6, atol=1e-7)
    alone = np.full_like(x, np.nan)
    cpu.lrn_across_channels_forward(x, alone, None, None, size, coeff, shift, beta)
    np.testing.assert_array_equal(alone, y)


@pytest.mark.parametrize("size, beta, channels", [(5, 0.75, 6), (3, 0.6, 7), (7, 0.75, 3)])
def test_lrn_across_channels_backward_against_float64(size, beta, channels):
    """dx = dy s^-beta - 2 coeff beta x (window sum of dy x s^-beta / s), written out here in
    float64 from the forward's s; 335 positions: blocks of 256 and a part."""
    x = RNG.standard_normal((2, channels, 5, 67)).astype(np.float32)
    dy = RNG.standard_normal(x.shape).astype(np.float32)
    coeff, shift = 1e-2 / size, 2.0
    y, scale, power = (np.empty_like(x) for _ in range(3))
    cpu.lrn_across_channels_forward(x, y, scale, power, size, coeff, shift, beta)
    x64, dy64, s64, p64 = (a.astype(np.float64) for a in (x, dy, scale, power))
    ratio = dy64 * x64 * p64 / s64
    window = np.zeros_like(ratio)
    for c in range(channels):
        window[:, c] = ratio[:, max(0, c - size // 2):c + size // 2 + 1].sum(axis=1)
    want = dy64 * p64 - 2 * coeff * beta * x64 * window
    dx = np.full_like(x, np.nan)
    cpu.lrn_across_channels_backward(x, dy, dx, scale, power, size, coeff, beta)
    np.testing.assert_allclose(dx, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_scale_forward_and_backward(bands, shape):
    x = RNG.standard_normal(shape).astype(np.float32)
    scale = RNG.standard_normal(shape[1]).astype(np.float32)
    bias = RNG.standard_normal(shape[1]).astype(np.float32)
    x64, s64 = x.astype(np.float64), scale.astype(np.float64)[:, None]
    y, kept = np.full_like(x, np.nan), np.full_like(x, np.nan)
    cpu.scale_forward(x, scale, bias, y, kept)
    np.testing.assert_array_equal(kept, x)
    np.testing.assert_allclose(y, x64 * s64 + bias[:, None], rtol=1e-6, atol=1e-6)
    in_place = x.copy()
    cpu.scale_forward(in_place, scale, None, in_place, None)
    np.testing.assert_allclose(in_place, x64 * s64, rtol=1e-6, atol=1e-6)
    # The affine and ReLU of a fused inference chain; a NaN stays NaN through the ReLU.
    first, x[0, 0, 0] = x[0, 0, 0], np.nan
    for factor, shift in ((scale, bias), (None, bias), (scale, None)):
        want = x.astype(np.float64) * (1 if factor is None else s64) + (
            0 if shift is None else bias[:, None])
        cpu.scale_forward(x, factor, shift, y, None, relu=True)
        np.testing.assert_allclose(y, np.maximum(want, 0), rtol=1e-6, atol=1e-6)
        assert y.size < 8 or (y == 0).any()
    x[0, 0, 0] = first

    dy = RNG.standard_normal(shape).astype(np.float32)
    dy64 = dy.astype(np.float64)
    dx = np.full_like(dy, np.nan)
    scale_sums, bias_sums = cpu.scale_backward(dy, x, scale, dx)
    np.testing.assert_allclose(scale_sums, (dy64 * x64).sum(axis=(0, 2)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bias_sums, dy64.sum(axis=(0, 2)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dy64 * s64, rtol=1e-6, atol=1e-6)
    # In place (dx is dy): the sums are of dy before it is overwritten.
    again = cpu.scale_backward(dy, x, scale, dy)
    np.testing.assert_array_equal(again[0], scale_sums)
    np.testing.assert_array_equal(again[1], bias_sums)
    np.testing.assert_array_equal(dy, dx)
    assert cpu.scale_backward(dx, None, scale, None)[0] is None


# -- native.c's own threads (pieces_run) -------------------------------------------------------
def _direct_case(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 8, 12, 20)).astype(np.float32)
    w = rng.standard_normal((10, 8, 3, 3)).astype(np.float32)
    return x, w


def _direct_forward(x, w):
    y = np.empty((x.shape[0], w.shape[0], x.shape[2], x.shape[3]), np.float32)
    cpu.direct.forward(x, w, y, (1, 1), (1, 1), (1, 1), 1)
    return y


@pytest.fixture
def many_pieces(monkeypatch):
    """The direct forward cut into many pieces on native.c's threads (two at least)."""
    monkeypatch.setattr(cpu.direct, "_PIECE_MULTIPLY_ADDS", 1)
    monkeypatch.setattr(cpu.direct, "_PARALLEL_MULTIPLY_ADDS", 0)
    monkeypatch.setattr(cpu.direct.threads, "workers", lambda: 2)


def test_threaded_forward_equals_one_thread_bit_for_bit(monkeypatch):
    x, w = _direct_case()
    one = _direct_forward(x, w)
    monkeypatch.setattr(cpu.direct, "_PIECE_MULTIPLY_ADDS", 1)
    monkeypatch.setattr(cpu.direct, "_PARALLEL_MULTIPLY_ADDS", 0)
    for call in range(300):         # the count changing from call to call: who takes part
        workers = (2, 8, 3, 5)[call % 4]            # must be read for each job afresh
        monkeypatch.setattr(cpu.direct.threads, "workers", lambda: workers)
        np.testing.assert_array_equal(_direct_forward(x, w), one)


def test_threaded_backward_filter_does_not_depend_on_the_threads(monkeypatch):
    """The backward-filter's runs are cut by the piece count alone: one worker or eight, the
    same bits; and the same values as the whole batch as one piece, to rounding."""
    x, w = _direct_case()
    dy = np.random.default_rng(9).standard_normal((3, 10, 12, 20)).astype(np.float32)

    def gradient():
        dw = np.empty_like(w)
        cpu.direct.backward_filter(x, dy, dw, (1, 1), (1, 1), (1, 1), 1)
        return dw
    whole = gradient()
    monkeypatch.setattr(cpu.direct, "_PIECE_MULTIPLY_ADDS", 1)
    monkeypatch.setattr(cpu.direct, "_PARALLEL_MULTIPLY_ADDS", 0)
    results = []
    for workers in (1, 2, 3, 8):
        monkeypatch.setattr(cpu.direct.threads, "workers", lambda: workers)
        results += [gradient() for _ in range(10)]
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])
    np.testing.assert_allclose(results[0], whole, rtol=1e-5, atol=1e-4)


def test_threaded_forward_from_two_python_threads(many_pieces):
    """Two callers at once: one runs on the workers, the other its pieces in turn; both are
    right and neither waits for ever."""
    import threading
    cases = [_direct_case(seed) for seed in (1, 2)]
    wanted = [_direct_forward(x, w) for x, w in cases]
    failures = []

    def caller(index):
        for _ in range(200):
            if not np.array_equal(_direct_forward(*cases[index]), wanted[index]):
                failures.append(index)
    callers = [threading.Thread(target=caller, args=(i,), daemon=True) for i in (0, 1)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in callers), "a caller hangs"
    assert failures == []


def test_threaded_forward_in_a_forked_child(many_pieces):
    """A child forked after the workers started has none: it starts its own."""
    import os
    x, w = _direct_case()
    wanted = _direct_forward(x, w)              # the parent's workers exist now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                # the child: report, never return to pytest
        try:
            ok = np.array_equal(_direct_forward(x, w), wanted)
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    import select
    ready, _, _ = select.select([read], [], [], 60)
    answer = os.read(read, 1) if ready else b""
    os.close(read)
    if not ready:
        os.kill(pid, 9)
    os.waitpid(pid, 0)
    assert answer == b"1", "the forked child hangs or computes wrongly"


def test_python_workers_park_the_native_ones():
    """Before Python's worker threads run pieces, native.c's stop spinning (pieces_park)."""
    from owlnet.kernels import threads
    from owlnet.kernels.cpu import native
    native.function("conv_direct_forward_framed", np.float32)      # loads the library
    assert any(getattr(hook, "__name__", "") == "pieces_park" for hook in threads.before_parallel)


# -- the direct convolution's builds -----------------------------------------------------------
def _direct_both(x, w, dy, pad, stride):
    y = np.full(dy.shape, np.nan, dtype=x.dtype)
    dw = np.full_like(w, np.nan)
    cpu.direct.forward(x, w, y, pad, stride, (1, 1), 1)
    cpu.direct.backward_filter(x, dy, dw, pad, stride, (1, 1), 1)
    return y, dw


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width, channels, stride", [
    (5, 10, 1),      # rows of part of a vector (AVX-512: its 32-byte build)
    (13, 20, 1),     # one vector a row, part of it used
    (40, 10, 1),     # rows of several vectors, the last tile of channels part empty
    (41, 17, 2)])    # two column phases
def test_direct_builds_agree_with_each_other_and_the_reference(monkeypatch, dtype, width,
                                                               channels, stride):
    """Where the CPU has AVX-512 its builds (64-byte vectors, bigger tiles) give the forward of
    the AVX2 build bit for bit (each output sums its window in the same order) and the
    backward-filter to rounding (its lanes split the outputs otherwise); both against
    float64 loops."""
    from test_kernels_cpu import reference_conv
    rng = np.random.default_rng(width)
    x = rng.standard_normal((2, 3, 7, width)).astype(dtype)
    w = rng.standard_normal((channels, 3, 3, 3)).astype(dtype)
    pad, strides = (1, 1), (stride, stride)
    want = reference_conv(x.astype(np.float64), w.astype(np.float64), pad, strides, (1, 1), 1)
    dy = rng.standard_normal(want.shape).astype(dtype)
    found = _direct_both(x, w, dy, pad, strides)
    native = cpu.native
    native.function("conv_direct_tile", dtype)              # the builds known
    single = native._builds[None]
    monkeypatch.setattr(native, "_builds", {None: single, 32: single})
    monkeypatch.setattr(native, "_functions", {})
    assert cpu.direct.vector_bytes(width, dtype) == 32
    narrow = _direct_both(x, w, dy, pad, strides)
    np.testing.assert_array_equal(found[0], narrow[0])
    tolerance = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(found[1], narrow[1], rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(found[0], want, rtol=tolerance, atol=tolerance)
    # dw[m, c, i, j] = the sum over images and outputs of dy times the input entry (c, i, j)
    # of the output's window reads.
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    oh, ow = want.shape[2:]
    dw_want = np.empty(w.shape)
    for i, j in np.ndindex(3, 3):
        read = padded[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
        dw_want[:, :, i, j] = np.einsum("nmrq,ncrq->mc", dy.astype(np.float64), read)
    np.testing.assert_allclose(found[1], dw_want, rtol=tolerance, atol=tolerance * 10)


@pytest.mark.parametrize("algorithm", ["direct", "im2col", "depthwise"])
@pytest.mark.parametrize("width, channels", [(5, 10), (13, 20), (40, 10)])
def test_conv_forward_shift_and_relu_as_a_pass_after(monkeypatch, algorithm, width, channels):
    """conv_forward's epilogue (the direct and depthwise kernels', as they store their
    outputs; im2col's as a pass after) gives the bits of the convolution, then + shift per
    channel, then max(., 0) with NaN kept; without a shift the ReLU alone (a -0.0 stays
    -0.0); with a scale too, conv * scale + shift."""
    from test_kernels_cpu import choose
    choose(monkeypatch, algorithm)
    rng = np.random.default_rng(width)
    inputs = channels if algorithm == "depthwise" else 3
    x = rng.standard_normal((2, inputs, 7, width)).astype(np.float32)
    x[1, 2, 3, 2] = np.nan
    w = rng.standard_normal((channels, inputs // (channels if algorithm == "depthwise" else 1),
                             3, 3)).astype(np.float32)
    shift = rng.standard_normal(channels).astype(np.float32)
    geometry = ((1, 1), (1, 1), (1, 1), channels if algorithm == "depthwise" else 1)
    assert cpu.convolution._algorithm(x.shape, w.shape, x.shape, (1, 1), (1, 1),
                                      geometry[-1]) == algorithm
    plain = np.empty((2, channels, 7, width), np.float32)
    cpu.conv_forward(x, w, plain, *geometry)
    assert np.isnan(plain).any()
    for add in (shift, None):
        want = plain + shift[:, None, None] if add is not None else plain.copy()
        want = np.where(want < 0, np.float32(0), want)
        y = np.full_like(plain, 7.0)
        cpu.conv_forward(x, w, y, *geometry, shift=add, relu=True)
        np.testing.assert_array_equal(y, want)
        assert np.array_equal(np.signbit(y), np.signbit(want))
    y = np.empty_like(plain)
    cpu.conv_forward(x, w, y, *geometry, shift=shift)
    np.testing.assert_array_equal(y, plain + shift[:, None, None])
    # With a scale: conv * scale + shift (a multiply-add: float64 for the reference).
    scale = rng.standard_normal(channels).astype(np.float32)
    cpu.conv_forward(x, w, y, *geometry, scale=scale, shift=shift, relu=True)
    want = np.maximum(plain.astype(np.float64) * scale[:, None, None] + shift[:, None, None], 0)
    want[np.isnan(plain)] = np.nan
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
