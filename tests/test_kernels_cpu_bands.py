"""The CPU depthwise and pooling kernels cut into pieces (images, bands of channels or planes):
against float64 loop references on awkward geometries, with pieces forced small (uneven
counts) and the threads on, and the same results as in one piece."""
import numpy as np
import pytest

from owlnet.kernels import cpu
from owlnet.layer_types.vision import _pooled_size
from test_kernels_cpu import reference_conv

RNG = np.random.default_rng(7)


@pytest.fixture
def tiny_bands(monkeypatch):
    """Depthwise pieces of ``depthwise_work`` multiply-adds, pooling bands of ``pool_bytes``,
    split over the threads (three of native.c's for pooling) however small the input."""
    def force(depthwise_work, pool_bytes):
        monkeypatch.setattr(cpu.depthwise, "_PIECE_MULTIPLY_ADDS", depthwise_work)
        monkeypatch.setattr(cpu.pooling, "_POOL_BAND_BYTES", pool_bytes)
        monkeypatch.setattr(cpu.pooling, "_SERIAL_BYTES", 0)
        monkeypatch.setattr(cpu.shared, "SPLIT_BYTES", 0)
        monkeypatch.setattr(cpu.pooling.threads, "workers", lambda: 3)
    return force


# -- depthwise: pieces of images or bands of channels -----------------------------------------
# (x shape, w shape, pad, stride, dilation)
DEPTHWISE = [
    ((2, 6, 7, 8), (6, 1, 3, 3), (1, 1), (1, 1), (1, 1)),
    ((1, 3, 8, 8), (6, 1, 3, 2), (2, 1), (1, 2), (2, 1)),       # multiplier 2, dilated
    ((2, 5, 9, 7), (5, 1, 3, 3), (1, 0), (2, 2), (1, 1)),
    ((3, 5, 6, 66), (5, 1, 3, 3), (1, 1), (1, 1), (1, 1)),
    ((1, 3, 9, 70), (6, 1, 3, 3), (1, 1), (2, 2), (1, 1)),      # batch 1, multiplier 2, stride 2
    ((2, 4, 10, 36), (4, 1, 3, 3), (2, 2), (1, 1), (2, 2)),     # dilated
    ((2, 3, 11, 40), (3, 1, 3, 2), (1, 0), (2, 1), (1, 1)),     # non-square, one-axis pad
    ((1, 7, 5, 97), (7, 1, 1, 5), (0, 2), (1, 3), (1, 1)),      # stride 3, odd widths
]


def _depthwise_all(x, w, dy, pad, stride, dilation):
    group = x.shape[1]
    y, dx, dw = (np.full(a.shape, np.nan, dtype=x.dtype) for a in (dy, x, w))
    cpu.conv_forward(x, w, y, pad, stride, dilation, group)
    cpu.conv_backward_data(dy, w, dx, pad, stride, dilation, group)
    cpu.conv_backward_filter(x, dy, dw, pad, stride, dilation, group)
    return y, dx, dw


@pytest.mark.parametrize("x_shape, w_shape, pad, stride, dilation", DEPTHWISE)
def test_depthwise_bands_match_loops(tiny_bands, x_shape, w_shape, pad, stride, dilation):
    x, w = RNG.standard_normal(x_shape), RNG.standard_normal(w_shape)
    expected = reference_conv(x, w, pad, stride, dilation, x_shape[1])
    dy = RNG.standard_normal(expected.shape)
    whole = _depthwise_all(x, w, dy, pad, stride, dilation)
    tiny_bands(depthwise_work=1, pool_bytes=1)
    assert len(cpu.depthwise._pieces(x_shape[0], w_shape[0], dy.size * w[0].size)) > 1
    banded = _depthwise_all(x, w, dy, pad, stride, dilation)
    for one, many in zip(whole, banded):
        np.testing.assert_array_equal(many, one)
    y, dx, dw = banded
    np.testing.assert_allclose(y, expected, atol=1e-12)
    # <conv(x, w), dy> = <x, dx> = <w, dw>, and one element of each gradient on its own.
    inner = np.sum(expected * dy)
    assert np.sum(x * dx) == pytest.approx(inner, rel=1e-12)
    assert np.sum(w * dw) == pytest.approx(inner, rel=1e-12)
    probe = (0, x_shape[1] - 1, x_shape[2] // 2, x_shape[3] - 1)
    bump = np.zeros_like(x)
    bump[probe] = 1
    assert dx[probe] == pytest.approx(np.sum(reference_conv(bump, w, pad, stride, dilation,
                                                            x_shape[1]) * dy), abs=1e-12)
    bump = np.zeros_like(w)
    bump[-1, 0, -1, 0] = 1
    assert dw[-1, 0, -1, 0] == pytest.approx(np.sum(reference_conv(x, bump, pad, stride,
                                                                   dilation, x_shape[1]) * dy))


def test_depthwise_uneven_bands_and_float32(tiny_bands):
    x = RNG.standard_normal((3, 7, 12, 64)).astype(np.float32)
    w = RNG.standard_normal((7, 1, 3, 3)).astype(np.float32)
    args = ((1, 1), (2, 2), (1, 1))
    dy = RNG.standard_normal((3, 7, 6, 32)).astype(np.float32)
    whole = _depthwise_all(x, w, dy, *args)
    tiny_bands(depthwise_work=1, pool_bytes=1)
    pieces = cpu.depthwise._pieces(3, 7, dy.size * 9)             # bands of 2, 2, 3 channels
    assert len(pieces) == 9 and len({stop - start for _, _, start, stop in pieces}) == 2
    for one, many in zip(whole, _depthwise_all(x, w, dy, *args)):
        assert many.dtype == np.float32
        np.testing.assert_array_equal(many, one)
    np.testing.assert_allclose(whole[0], reference_conv(x.astype(np.float64), w, *args, 7),
                               rtol=1e-4, atol=1e-4)


# -- pooling ---------------------------------------------------------------------------------
def reference_pool(x, kernel, stride, pad, method):
    """Caffe's pooling by loops over output positions, float64: tops, the MAX plane index
    (first maximum in row-major order over the in-image pixels), and the backward as a
    function of dy."""
    n, c, h, w = x.shape
    out = tuple(_pooled_size(x.shape[2 + a], kernel[a], pad[a], stride[a], True, any(pad))
                for a in range(2))
    y, index = np.empty((n, c) + out), np.empty((n, c) + out, dtype=np.int64)
    windows = {}
    for r in range(out[0]):
        for q in range(out[1]):
            hs, ws = r * stride[0] - pad[0], q * stride[1] - pad[1]
            area = (min(hs + kernel[0], h + pad[0]) - hs) * (min(ws + kernel[1], w + pad[1]) - ws)
            rows = slice(max(hs, 0), min(hs + kernel[0], h))
            columns = slice(max(ws, 0), min(ws + kernel[1], w))
            window = x[:, :, rows, columns].reshape(n, c, -1)
            width = columns.stop - columns.start
            first = window.argmax(axis=-1)
            index[:, :, r, q] = (rows.start + first // width) * w + columns.start + first % width
            y[:, :, r, q] = window.max(axis=-1) if method == "MAX" else window.sum(-1) / area
            windows[r, q] = rows, columns, area

    def backward(dy):
        dx = np.zeros_like(x)
        for (r, q), (rows, columns, area) in windows.items():
            if method == "AVE":
                dx[:, :, rows, columns] += dy[:, :, r, q, None, None] / area
            else:
                planes = dx.reshape(n, c, -1)
                np.add.at(planes, (*np.indices((n, c)), index[:, :, r, q]), dy[:, :, r, q])
        return dx
    return y, index, backward


# (method, x shape, kernel, stride, pad, integer values: ties in windows)
POOLS = [
    ("MAX", (2, 3, 7, 6), (3, 3), (2, 2), (0, 0), False),  # ceil mode: last windows overhang
    ("MAX", (1, 5, 9, 8), (3, 3), (2, 2), (1, 1), False),  # batch 1, stride 2 with pad
    ("MAX", (2, 3, 8, 9), (3, 2), (1, 2), (1, 1), False),  # kernel > stride on rows
    ("MAX", (2, 4, 6, 6), (2, 2), (2, 2), (0, 0), False),  # windows tile the image
    ("MAX", (3, 2, 5, 7), (5, 7), (1, 1), (0, 0), False),  # one window: global
    ("MAX", (2, 3, 7, 6), (3, 3), (2, 2), (0, 0), True),
    ("MAX", (1, 5, 9, 8), (3, 3), (1, 1), (1, 1), True),
    ("MAX", (3, 2, 5, 7), (5, 7), (1, 1), (0, 0), True),
    ("MAX", (1, 3, 9, 41), (3, 3), (2, 2), (1, 1), True),  # rows of several vectors
    ("AVE", (2, 3, 7, 6), (3, 3), (2, 2), (0, 0), False),
    ("AVE", (1, 5, 9, 8), (3, 3), (2, 2), (1, 1), False),  # divisor counts pad, not overhang
    ("AVE", (2, 3, 8, 9), (2, 3), (2, 1), (1, 2), False),
    ("AVE", (3, 2, 5, 7), (5, 7), (1, 1), (0, 0), False),
]


def _pool_all(method, x, dy, kernel, stride, pad):
    y, dx = np.full(dy.shape, np.nan, dtype=x.dtype), np.full(x.shape, np.nan, dtype=x.dtype)
    if method == "AVE":
        cpu.ave_pool_forward(x, y, kernel, stride, pad)
        cpu.ave_pool_backward(dy, dx, kernel, stride, pad)
        return y, dx
    index = np.full(dy.shape, -7, dtype=np.int32)
    cpu.max_pool_forward(x, y, index, kernel, stride, pad)
    cpu.max_pool_backward(dy, index, dx, kernel, stride, pad)
    alone = np.full(dy.shape, np.nan, dtype=x.dtype)
    cpu.max_pool_forward(x, alone, None, kernel, stride, pad)
    np.testing.assert_array_equal(alone, y)
    return y, dx, index


@pytest.mark.parametrize("stride", [(1, 1), (2, 2), (3, 3)])
def test_max_pooling_float32_ties_pick_the_first(stride):
    x = RNG.integers(-1, 2, (2, 3, 11, 70)).astype(np.float32)
    y_want, index_want, _ = reference_pool(x.astype(np.float64), (3, 3), stride, (1, 1), "MAX")
    y, index = np.empty(y_want.shape, np.float32), np.empty(y_want.shape, np.int32)
    cpu.max_pool_forward(x, y, index, (3, 3), stride, (1, 1))
    np.testing.assert_array_equal(y, y_want)
    np.testing.assert_array_equal(index, index_want)


@pytest.mark.parametrize("method, shape, kernel, stride, pad, ties", POOLS)
def test_pooling_bands_match_loops(tiny_bands, method, shape, kernel, stride, pad, ties):
    x = RNG.integers(-2, 3, shape) * 1.0 if ties else RNG.standard_normal(shape)
    y_want, index_want, backward = reference_pool(x, kernel, stride, pad, method)
    dy = RNG.standard_normal(y_want.shape)
    whole = _pool_all(method, x, dy, kernel, stride, pad)
    tiny_bands(depthwise_work=1, pool_bytes=2 * shape[2] * shape[3] * 8)   # 2 planes a band
    banded = _pool_all(method, x, dy, kernel, stride, pad)
    for one, many in zip(whole, banded):
        np.testing.assert_array_equal(many, one)
    np.testing.assert_allclose(banded[0], y_want, atol=1e-12)
    np.testing.assert_allclose(banded[1], backward(dy), atol=1e-12)
    if method == "MAX":
        np.testing.assert_array_equal(banded[2], index_want)


def test_pooling_float32_with_odd_band_count(tiny_bands):
    x = RNG.standard_normal((3, 5, 11, 10)).astype(np.float32)
    tiny_bands(depthwise_work=1, pool_bytes=4 * 11 * 10 * 4)                # 4 bands of 3-4
    assert len(cpu.shared.bands(15, 11 * 10 * 4, cpu.pooling._POOL_BAND_BYTES)) == 4
    y_want, index_want, backward = reference_pool(x.astype(np.float64), (3, 3), (2, 2), (1, 1),
                                                  "MAX")
    dy = RNG.standard_normal(y_want.shape).astype(np.float32)
    y, dx, index = _pool_all("MAX", x, dy, (3, 3), (2, 2), (1, 1))
    assert y.dtype == dx.dtype == np.float32
    np.testing.assert_array_equal(y, y_want.astype(np.float32))
    np.testing.assert_array_equal(index, index_want)
    np.testing.assert_allclose(dx, backward(dy.astype(np.float64)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_shape, stride", [
    ((2, 5, 7, 5), (1, 1)),       # rows of part of a vector: each row's last vector spills
    ((2, 4, 9, 13), (2, 2)),      # 3x3 (its own unrolled loop), two column phases
    ((1, 6, 4, 70), (1, 1)),      # runs of four vectors, then one, then part of one
])
def test_depthwise_pieces_in_any_order_write_only_their_outputs(monkeypatch, tiny_bands, dtype,
                                                                x_shape, stride):
    """The forward stores a row's last partial vector whole only where the values past the
    row lie in outputs its piece writes later. Pieces run one at a time in reverse order
    (so a piece that spilled into the one before it in memory would spoil what that piece
    wrote), with y the front of a bigger buffer whose tail must stay untouched, give the
    outputs of the whole."""
    x = RNG.standard_normal(x_shape).astype(dtype)
    c = x_shape[1]
    w = RNG.standard_normal((c, 1, 3, 3)).astype(dtype)
    args = ((1, 1), stride, (1, 1), c)
    want = reference_conv(x.astype(np.float64), w.astype(np.float64), *args)
    whole = np.empty(want.shape, dtype)
    cpu.conv_forward(x, w, whole, *args)
    tiny_bands(depthwise_work=1, pool_bytes=1)
    pieces = cpu.depthwise._pieces
    monkeypatch.setattr(cpu.depthwise, "_pieces", lambda *shape: pieces(*shape)[::-1])
    monkeypatch.setattr(cpu.depthwise.threads, "workers", lambda: 1)
    assert len(cpu.depthwise._pieces(x_shape[0], c, want.size * 9)) > 2
    buffer = np.full(want.size + 64, 7.0, dtype)
    y = buffer[:want.size].reshape(want.shape)
    cpu.conv_forward(x, w, y, *args)
    np.testing.assert_array_equal(y, whole)
    assert (buffer[want.size:] == 7.0).all()
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, want, rtol=tolerance, atol=tolerance)
