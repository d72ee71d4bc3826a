"""The Winograd convolutions F(4x4, 3x3) and F(2x2, 5x5) of ``kernels.cpu.winograd``: forward,
backward-data and backward-filter against float64 sums written here, the epilogue, the kept
weight transforms (changed weights are seen), results that do not depend on how the work is
cut, the AVX2 build beside the AVX-512 one, and which convolutions the entry points send to
it."""
import numpy as np
import pytest

from owlnet.kernels import cpu
from owlnet.kernels.cpu import native, winograd


@pytest.fixture(autouse=True)
def fresh_plans():
    """Plans are made once per geometry: the tests that change the module's constants see
    their own."""
    winograd._planned.cache_clear()
    yield
    winograd._planned.cache_clear()


def correlate(x, w, pad):
    """y[n, k, r, q] = sum over c, i, j of w[k, c, i, j] * x[n, c, r + i - ph, q + j - pw]
    (zero outside the image), in float64: a product of shifted planes per kernel entry."""
    n, c, h, wd = x.shape
    ph, pw = pad
    kernel = w.shape[2]
    padded = np.zeros((n, c, h + 2 * ph, wd + 2 * pw))
    padded[:, :, ph:ph + h, pw:pw + wd] = x
    oh, ow = h + 2 * ph - kernel + 1, wd + 2 * pw - kernel + 1
    y = np.zeros((n, w.shape[0], oh, ow))
    for i in range(kernel):
        for j in range(kernel):
            y += np.einsum("kc,nchw->nkhw", w[:, :, i, j].astype(np.float64),
                           padded[:, :, i:i + oh, j:j + ow])
    return y


def case(x_shape, k, seed=0, kernel=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((k, x_shape[1], kernel, kernel)) / np.sqrt(kernel ** 2 * x_shape[1])
    return x, w.astype(np.float32)


def run(x, w, pad, **epilogue):
    oh, ow = (size + 2 * p - w.shape[2] + 1 for size, p in zip(x.shape[2:], pad))
    y = np.full((x.shape[0], w.shape[0], oh, ow), np.nan, np.float32)
    planned = winograd.plan(x.shape, w.shape, y.shape, pad, (1, 1), (1, 1), 1, np.float32)
    winograd.forward(planned, x, w, y, **epilogue)
    return y


# Relative to the outputs' largest magnitude; the direct kernel's own error is ~1e-7 here.
TOLERANCE = 3e-5

SHAPES = [
    ((2, 16, 32, 32), 16, (1, 1), 3),     # whole blocks, one vector of channels
    ((2, 64, 8, 8), 64, (1, 1), 3),       # few blocks: bands of output channels
    ((1, 13, 7, 9), 21, (1, 1), 3),       # channels padded, blocks cut at the plane's edge
    ((3, 8, 5, 6), 8, (0, 2), 3),         # no padding in rows, two in columns
    ((2, 40, 11, 3), 35, (2, 1), 3),      # a plane one block wide
    ((1, 96, 14, 14), 130, (1, 1), 3),    # several vectors of output channels, a partial one
    ((2, 16, 9, 9), 16, (2, 2), 5),       # 5x5: 2x2 blocks, the last cut
    ((1, 13, 7, 9), 21, (1, 2), 5),
    ((3, 8, 12, 12), 10, (0, 0), 5),      # LeNet's kind: no padding
]


@pytest.mark.parametrize("x_shape, k, pad, kernel", SHAPES)
def test_forward_against_float64(x_shape, k, pad, kernel):
    x, w = case(x_shape, k, kernel=kernel)
    want = correlate(x, w, pad)
    y = run(x, w, pad)
    assert np.abs(y - want).max() <= TOLERANCE * np.abs(want).max()


def test_epilogue_scale_shift_relu_keeps_nan():
    x, w = case((2, 12, 9, 10), 20, seed=1)
    x[1, 3, 4, 4] = np.nan
    rng = np.random.default_rng(2)
    scale, shift = rng.standard_normal(20).astype(np.float32), rng.standard_normal(20).astype(
        np.float32)
    plain = run(x, w, (1, 1))
    assert np.isnan(plain).any()
    y = run(x, w, (1, 1), scale=scale, shift=shift, relu=True)
    want = plain * scale[:, None, None] + shift[:, None, None]
    want = np.where(want < 0, np.float32(0), want)
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(plain))
    np.testing.assert_array_equal(run(x, w, (1, 1), shift=shift), plain + shift[:, None, None])


def test_changed_weights_are_transformed_again():
    """The transform is kept by the weights' address; an edit in place (a solver's update, a
    user's assignment) is seen at the next call, as is another array at another address."""
    x, w = case((1, 16, 8, 8), 16, seed=3)
    first = run(x, w, (1, 1))
    np.testing.assert_array_equal(run(x, w, (1, 1)), first)
    w[3, 5, 1, 2] += 1.0
    w[15, 0, 0, 0] = -w[15, 0, 0, 0]
    changed = run(x, w, (1, 1))
    want = correlate(x, w, (1, 1))
    assert np.abs(changed - want).max() <= TOLERANCE * np.abs(want).max()
    other = -w
    np.testing.assert_allclose(run(x, other, (1, 1)), -changed, rtol=1e-6, atol=1e-6)


def test_kept_transforms_stay_within_their_budget(monkeypatch):
    monkeypatch.setattr(winograd, "_KEPT_BYTES", 1)
    monkeypatch.setattr(winograd, "_kept", type(winograd._kept)())
    monkeypatch.setattr(winograd, "_kept_bytes", [0])
    x, _ = case((1, 8, 6, 6), 8)
    weights = [case((1, 8, 6, 6), 8, seed=s)[1] for s in range(5)]
    outputs = [run(x, w, (1, 1)) for w in weights]
    assert len(winograd._kept) == 1
    for w, y in zip(weights, outputs):      # dropped transforms are made again
        np.testing.assert_array_equal(run(x, w, (1, 1)), y)


@pytest.mark.parametrize("x_shape, k, pad, kernel", SHAPES[:3] + SHAPES[-1:])
def test_results_do_not_depend_on_the_cut(monkeypatch, x_shape, k, pad, kernel):
    """Chunks of blocks, bands of output channels, one thread or several: every output is the
    same sum over the input channels in the same order, so the same bits."""
    x, w = case(x_shape, k, kernel=kernel)
    whole = run(x, w, pad)
    monkeypatch.setattr(winograd, "_PARALLEL_MULTIPLY_ADDS", 0)
    cuts = []
    for workers, least, most in ((1, 1, 1), (2, 1, 1), (8, 2, 1 << 30), (3, 1, 1 << 30)):
        monkeypatch.setattr(winograd.threads, "workers", lambda count=workers: count)
        monkeypatch.setattr(winograd, "_MIN_BLOCKS", least)
        monkeypatch.setattr(winograd, "_CHUNK_BYTES", most)
        winograd._planned.cache_clear()
        planned = winograd.plan(x.shape, w.shape, whole.shape, pad, (1, 1), (1, 1), 1,
                                np.float32)
        cuts.append((planned.chunk, planned.band))
        np.testing.assert_array_equal(run(x, w, pad), whole)
    assert len(set(cuts)) > 1


def test_cut_reads_least_and_gives_every_worker_a_piece():
    lanes = 16
    # Few blocks, many channels: one chunk, the output channels in bands.
    chunk, band = winograd._cut(8, 64, 64, lanes, 2)
    assert chunk == 8 and band == 32
    # Many blocks, few channels: chunks, all the output channels in each.
    chunk, band = winograd._cut(2048, 16, 16, lanes, 2)
    assert band == 16 and 2048 / chunk >= 2 and 36 * 4 * chunk * 32 <= winograd._CHUNK_BYTES
    # One worker: no band cut.
    assert winograd._cut(8, 64, 64, lanes, 1) == (8, 64)


@pytest.mark.parametrize("kernel", [3, 5])
def test_builds_agree(monkeypatch, kernel):
    """The widest build, the narrower one that channel counts padded badly get (LeNet's 20
    and 50: with AVX-512, 32-byte vectors) and the AVX2 build sum each output in the same
    order over the same channels: the same values to rounding, and right."""
    x, w = case((2, 20, 9, 11), 50, seed=4, kernel=kernel)
    pad = (kernel // 2, kernel // 2)
    monkeypatch.setattr(winograd, "_NARROW_PADDING", 10 ** 9)
    found = [run(x, w, pad)]
    monkeypatch.undo()
    winograd._planned.cache_clear()
    assert winograd._lanes(20, 50) == min(native.vector_sizes()) // 4
    found.append(run(x, w, pad))
    native.function("winograd_forward", np.float32, max(native.vector_sizes()))
    single = native._builds[None]
    monkeypatch.setattr(native, "_builds", {None: single, 32: single})
    monkeypatch.setattr(native, "_functions", {})
    found.append(run(x, w, pad))
    want = correlate(x, w, pad)
    for y in found:
        np.testing.assert_allclose(y, found[0], rtol=1e-6, atol=1e-6)
        assert np.abs(y - want).max() <= TOLERANCE * np.abs(want).max()


@pytest.mark.parametrize("change, suits", [
    ({}, True),
    ({"dtype": np.float64}, False),          # the gradient checks' dtype keeps the direct sum
    ({"stride": (2, 2)}, False),
    ({"dilation": (2, 1)}, False),
    ({"group": 2}, False),
    ({"w_shape": (16, 16, 5, 5)}, True),
    ({"w_shape": (16, 16, 7, 7)}, False),
    ({"w_shape": (16, 16, 3, 5)}, False),
    ({"w_shape": (4, 16, 3, 3)}, False),     # fewer than MIN_CHANNELS outputs
    ({"x_shape": (2, 3, 8, 8), "w_shape": (16, 3, 3, 3)}, False),
    ({"x_shape": (64, 16, 1024, 1024)}, False),     # a frame beyond its scratch bound
])
def test_which_convolutions_it_serves(change, suits):
    geometry = {"x_shape": (2, 16, 8, 8), "w_shape": (16, 16, 3, 3), "pad": (1, 1),
                "stride": (1, 1), "dilation": (1, 1), "group": 1, "dtype": np.float32}
    geometry.update(change)
    assert winograd.suits(**geometry) == suits


@pytest.mark.parametrize("kernel, pad", [(3, (1, 1)), (5, (2, 1))])
def test_conv_forward_and_flipped_backward_data_use_it(monkeypatch, kernel, pad):
    """conv_forward sends a float32 3x3 or 5x5 convolution to Winograd, as does the
    backward-data of one with stride 1 (the forward of dy with the kernel flipped, read where
    it lies)."""
    calls = []
    forward = winograd.forward
    monkeypatch.setattr(winograd, "forward", lambda *a, **k: calls.append(
        (a[2].shape, a[0].flipped)) or forward(*a, **k))
    x, w = case((2, 16, 10, 10), 24, seed=5, kernel=kernel)
    y = run(x, w, pad)
    calls.clear()
    cpu.conv_forward(x, w, y, pad, (1, 1), (1, 1), 1)
    assert calls == [(w.shape, False)]
    dx = np.empty_like(x)
    cpu.conv_backward_data(y, w, dx, pad, (1, 1), (1, 1), 1)
    assert calls[1:] == [(w.shape, True)]
    flipped = w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1].astype(np.float64)
    want = correlate(y.astype(np.float64), flipped, tuple(kernel - 1 - p for p in pad))
    assert np.abs(dx - want).max() <= TOLERANCE * np.abs(want).max()
    # The same weights forward again: the flipped transform is kept apart from the plain one.
    again = np.empty_like(y)
    cpu.conv_forward(x, w, again, pad, (1, 1), (1, 1), 1)
    np.testing.assert_array_equal(again, y)


# -- the backward-filter ---------------------------------------------------------------------
def filter_gradient(x, dy, pad, kernel=3):
    """dw[k, c, i, j] = sum over images and outputs of dy[n, k, r, q] * x[n, c, r + i - ph,
    q + j - pw] (zero outside), in float64."""
    n, c, h, wd = x.shape
    ph, pw = pad
    padded = np.zeros((n, c, h + 2 * ph, wd + 2 * pw))
    padded[:, :, ph:ph + h, pw:pw + wd] = x
    oh, ow = dy.shape[2:]
    dw = np.empty((dy.shape[1], c, kernel, kernel))
    for i in range(kernel):
        for j in range(kernel):
            dw[:, :, i, j] = np.einsum("nkhw,nchw->kc", dy.astype(np.float64),
                                       padded[:, :, i:i + oh, j:j + ow])
    return dw


def gradient_case(x_shape, k, pad, seed=0, kernel=3):
    x, _ = case(x_shape, k, seed)
    oh, ow = (size + 2 * p - kernel + 1 for size, p in zip(x_shape[2:], pad))
    dy = np.random.default_rng(seed + 100).standard_normal((x_shape[0], k, oh, ow)).astype(
        np.float32)
    return x, dy


def run_gradient(x, dy, pad, kernel=3):
    dw = np.full((dy.shape[1], x.shape[1], kernel, kernel), np.nan, np.float32)
    planned = winograd.gradient_plan(x.shape, dw.shape, dy.shape, pad, (1, 1), (1, 1), 1,
                                     np.float32)
    winograd.backward_filter(planned, x, dy, dw)
    return dw


# Relative to the gradient's largest magnitude: sums over many blocks (the direct kernel's
# error is ~3e-7 here; 5x5's transforms reach 16, whose sums lose more).
GRADIENT_TOLERANCE = 5e-5


@pytest.mark.parametrize("x_shape, k, pad, kernel", SHAPES)
def test_backward_filter_against_float64(x_shape, k, pad, kernel):
    x, dy = gradient_case(x_shape, k, pad, kernel=kernel)
    want = filter_gradient(x, dy, pad, kernel)
    dw = run_gradient(x, dy, pad, kernel)
    assert np.abs(dw - want).max() <= GRADIENT_TOLERANCE * np.abs(want).max()


def test_backward_filter_passes_and_threads_give_the_same_bits(monkeypatch):
    """The sums run over the blocks in passes cut by shape alone, each position's sum by one
    thread: any number of threads gives the same bits, and passes of other sizes the same
    values to rounding."""
    x, dy = gradient_case((3, 16, 13, 11), 24, (1, 1))
    monkeypatch.setattr(winograd, "_PARALLEL_MULTIPLY_ADDS", 0)
    monkeypatch.setattr(winograd, "_PASS_BYTES", 36 * 4 * 32 * 5)      # passes of 5 blocks
    found = []
    for workers in (1, 2, 3, 8):
        monkeypatch.setattr(winograd.threads, "workers", lambda count=workers: count)
        winograd._planned.cache_clear()
        found.append(run_gradient(x, dy, (1, 1)))
    for dw in found[1:]:
        np.testing.assert_array_equal(dw, found[0])
    monkeypatch.setattr(winograd, "_PASS_BYTES", 1 << 30)             # one pass
    winograd._planned.cache_clear()
    whole = run_gradient(x, dy, (1, 1))
    np.testing.assert_allclose(whole, found[0], rtol=1e-5, atol=1e-5 * np.abs(whole).max())


def test_backward_filter_avx2_build_agrees(monkeypatch):
    x, dy = gradient_case((2, 20, 9, 11), 24, (1, 1), seed=6)
    wide = run_gradient(x, dy, (1, 1))
    native.function("winograd_backward_filter", np.float32, max(native.vector_sizes()))
    single = native._builds[None]
    monkeypatch.setattr(native, "_builds", {None: single, 32: single})
    monkeypatch.setattr(native, "_functions", {})
    narrow = run_gradient(x, dy, (1, 1))
    np.testing.assert_allclose(narrow, wide, rtol=1e-5, atol=1e-5 * np.abs(wide).max())


def test_conv_backward_filter_uses_it_within_its_scratch(monkeypatch):
    calls = []
    backward = winograd.backward_filter
    monkeypatch.setattr(winograd, "backward_filter", lambda *a: calls.append(a[3].shape)
                        or backward(*a))
    x, dy = gradient_case((2, 16, 10, 10), 24, (1, 1))
    dw = np.empty((24, 16, 3, 3), np.float32)
    cpu.conv_backward_filter(x, dy, dw, (1, 1), (1, 1), (1, 1), 1)
    assert calls == [(24, 16, 3, 3)]
    want = filter_gradient(x, dy, (1, 1))
    assert np.abs(dw - want).max() <= GRADIENT_TOLERANCE * np.abs(want).max()
    # Beyond the scratch bound: the direct kernel's.
    monkeypatch.setattr(winograd, "_SCRATCH_BYTES", 4 * 2 * 14 * 14 * 16)   # the frame alone
    winograd._planned.cache_clear()
    assert winograd.gradient_plan(x.shape, dw.shape, dy.shape, (1, 1), (1, 1), (1, 1), 1,
                                  np.float32) is None
    cpu.conv_backward_filter(x, dy, dw, (1, 1), (1, 1), (1, 1), 1)
    assert len(calls) == 1
    assert np.abs(dw - want).max() <= 1e-6 * np.abs(want).max()
