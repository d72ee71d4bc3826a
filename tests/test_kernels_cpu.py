"""The CPU convolution kernels: every algorithm against a loop reference, the two backward
kernels as exact adjoints of the forward one, and pieces run on worker threads. The cases
written "im2col" run twice, as im2col and as direct (the compiled loops), the window size that
chooses between them forced either way."""
import numpy as np
import pytest

from owlnet import kernels
from owlnet.kernels import cpu

RNG = np.random.default_rng(99)


def reference_conv(x, w, pad, stride, dilation, group):
    """y[n, m, r, q] = sum over c in m's group, i, j of w[m, c, i, j] * x[n, c, r*s - p + i*d,
    q*s - p + j*d], zero outside; a loop over output positions, float64."""
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    oh = (h + 2 * pad[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * pad[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    y = np.zeros((n, m, oh, ow))
    mg = m // group
    for out in range(m):
        channels = slice(out // mg * cg, out // mg * cg + cg)
        for r in range(oh):
            for q in range(ow):
                for i in range(kh):
                    for j in range(kw):
                        hh = r * stride[0] - pad[0] + i * dilation[0]
                        ww = q * stride[1] - pad[1] + j * dilation[1]
                        if 0 <= hh < h and 0 <= ww < wd:
                            y[:, out, r, q] += x[:, channels, hh, ww] @ w[out, :, i, j]
    return y


# (x shape, w shape, pad, stride, dilation, group, algorithm the kernels must pick)
CASES = [
    ((2, 6, 7, 8), (6, 1, 3, 3), (1, 1), (1, 1), (1, 1), 6, "depthwise"),
    ((2, 4, 9, 7), (4, 1, 3, 3), (1, 0), (2, 2), (1, 1), 4, "depthwise"),
    ((1, 3, 8, 8), (6, 1, 3, 2), (2, 1), (1, 2), (2, 1), 3, "depthwise"),   # multiplier 2
    ((2, 3, 4, 40), (3, 1, 3, 3), (1, 1), (1, 1), (1, 1), 3, "depthwise"),  # long output rows
    ((1, 2, 5, 70), (4, 1, 3, 3), (0, 1), (1, 2), (1, 1), 2, "depthwise"),
    ((3, 5, 4, 6), (7, 5, 1, 1), (0, 0), (1, 1), (1, 1), 1, "pointwise"),
    # rows of more than 8: with AVX-512 the forward and backward-data are direct (the latter
    # reading the weights transposed), 20 and 7 channels each a tile and a part
    ((2, 20, 3, 12), (7, 20, 1, 1), (0, 0), (1, 1), (1, 1), 1, "pointwise"),
    ((2, 4, 6, 5), (6, 2, 3, 3), (1, 1), (2, 1), (1, 1), 2, "im2col"),
    ((2, 3, 20, 18), (4, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1, "im2col"),    # long output rows
    ((2, 4, 5, 5), (4, 4, 1, 1), (0, 0), (2, 2), (1, 1), 1, "im2col"),      # strided 1x1
    # M <= C, stride 1: backward data as a convolution with the flipped kernel
    ((2, 5, 6, 7), (4, 5, 3, 2), (1, 0), (1, 1), (2, 1), 1, "im2col"),      # dilated
    ((2, 4, 3, 20), (4, 4, 3, 3), (1, 3), (1, 1), (1, 1), 1, "im2col"),     # pad > k - 1: col2im
    # M > C, same size, short rows or a small window: flipped where the CPU has AVX-512,
    # else col2im
    ((2, 3, 7, 9), (5, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1, "im2col"),
    ((1, 2, 4, 20), (3, 2, 3, 3), (1, 1), (1, 1), (1, 1), 1, "im2col"),
    ((2, 6, 11, 21), (14, 3, 3, 5), (1, 2), (2, 3), (1, 2), 2, "im2col"),   # channel tiles, tails
]
CASES = [case for case in CASES for algorithm in (
    ("im2col", "direct") if case[-1] == "im2col" else (case[-1],))
    for case in [case[:-1] + (algorithm,)]]


@pytest.fixture(autouse=True)
def window_choice(request, monkeypatch):
    """For a case of algorithm "im2col" or "direct", the window size between them set so that
    the case gets that algorithm."""
    algorithm = request.node.callspec.params.get("algorithm") \
        if hasattr(request.node, "callspec") else None
    if algorithm in ("im2col", "direct"):
        choose(monkeypatch, algorithm)


def choose(monkeypatch, algorithm):
    """Direct or im2col for every convolution that is neither depthwise nor pointwise (and no
    Winograd: its own tests are in test_kernels_cpu_winograd.py)."""
    monkeypatch.setattr(cpu.winograd, "MIN_CHANNELS", 10 ** 9)
    for name in ("_DIRECT_WINDOW", "_DIRECT_WINDOW_ONE_THREAD", "_DIRECT_WINDOW_WHOLE_TILES",
                 "_DIRECT_WINDOW_FORWARD", "_DIRECT_WINDOW_FORWARD_AVX512",
                 "_DIRECT_WINDOW_SHORT_ROWS_AVX512"):
        monkeypatch.setattr(cpu.convolution, name, 0 if algorithm == "im2col" else 10 ** 9)


def _arrays(x_shape, w_shape, pad, stride, dilation, group, dtype=np.float64):
    x = RNG.standard_normal(x_shape).astype(dtype)
    w = RNG.standard_normal(w_shape).astype(dtype)
    y = reference_conv(x, w, pad, stride, dilation, group)
    return x, w, y


@pytest.mark.parametrize("x_shape, w_shape, pad, stride, dilation, group, algorithm", CASES)
def test_forward_matches_loops_and_backward_is_its_adjoint(x_shape, w_shape, pad, stride,
                                                          dilation, group, algorithm):
    x, w, expected = _arrays(x_shape, w_shape, pad, stride, dilation, group)
    assert cpu.convolution._algorithm(x_shape, w_shape, expected.shape, pad, stride,
                                      group) == algorithm
    y = np.full(expected.shape, np.nan)
    cpu.conv_forward(x, w, y, pad, stride, dilation, group)
    np.testing.assert_allclose(y, expected, atol=1e-12)
    # <conv(x, w), dy> = <x, conv_backward_data(dy, w)> = <w, conv_backward_filter(x, dy)>
    dy = RNG.standard_normal(y.shape)
    dx, dw = np.full(x.shape, np.nan), np.full(w.shape, np.nan)
    cpu.conv_backward_data(dy, w, dx, pad, stride, dilation, group)
    cpu.conv_backward_filter(x, dy, dw, pad, stride, dilation, group)
    inner = np.sum(y * dy)
    assert np.sum(x * dx) == pytest.approx(inner, rel=1e-12)
    assert np.sum(w * dw) == pytest.approx(inner, rel=1e-12)
    # Each gradient element on its own: the directional derivative along a unit vector.
    probe = (0,) * x.ndim
    bump = np.zeros_like(x)
    bump[probe] = 1
    assert dx[probe] == pytest.approx(np.sum(reference_conv(bump, w, pad, stride, dilation,
                                                            group) * dy), abs=1e-12)


@pytest.mark.parametrize("x_shape, w_shape, pad, stride, dilation, group, algorithm", CASES)
def test_float32_stays_float32(x_shape, w_shape, pad, stride, dilation, group, algorithm):
    x, w, expected = _arrays(x_shape, w_shape, pad, stride, dilation, group, np.float32)
    y = np.empty(expected.shape, np.float32)
    cpu.conv_forward(x, w, y, pad, stride, dilation, group, engine="caffe")
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    dx, dw = np.empty_like(x), np.empty_like(w)
    cpu.conv_backward_data(y, w, dx, pad, stride, dilation, group)
    cpu.conv_backward_filter(x, y, dw, pad, stride, dilation, group)
    assert dx.dtype == dw.dtype == np.float32


@pytest.mark.parametrize("x_shape, w_shape, pad, stride, group, layout", [
    ((5, 4, 9, 7), (6, 2, 3, 3), (1, 1), (2, 1), 2, "direct"),              # images
    ((2, 3, 9, 20), (13, 3, 3, 3), (1, 1), (1, 1), 1, "direct"),            # bands of rows
    ((5, 4, 9, 7), (6, 2, 3, 3), (1, 1), (2, 1), 2, "channels-last"),
    ((3, 2, 6, 20), (4, 2, 3, 3), (1, 1), (1, 1), 1, "channel-major"),    # C < kw
    ((3, 2, 9, 9), (4, 1, 3, 3), (1, 1), (1, 2), 2, "batch-last"),         # C < kw, short rows
    ((3, 4, 6, 20), (5, 4, 1, 1), (0, 0), (1, 1), 1, "pointwise"),
    ((2, 4, 3, 3), (32, 2, 3, 3), (1, 1), (1, 1), 2, "channel bands"),   # few positions
    ((2, 2, 3, 5), (16, 2, 3, 3), (1, 1), (1, 1), 1, "channel bands"),   # C < kw
])
def test_pieces_match_the_whole(monkeypatch, x_shape, w_shape, pad, stride, group, layout):
    """Cut into pieces (bands of rows or pixels, images) and run on the worker threads, every
    kernel gives what one piece gives, to rounding (the products differ in size)."""
    dilation = (1, 1)
    if layout != "direct":
        choose(monkeypatch, "im2col")
    x, w, expected = _arrays(x_shape, w_shape, pad, stride, dilation, group)
    dy = RNG.standard_normal(expected.shape)
    results = []
    for pieces in ("one", "many"):
        if pieces == "many":
            monkeypatch.setattr(cpu.shared, "PARALLEL_MULTIPLY_ADDS", 0)
            monkeypatch.setattr(cpu.shared, "PIECE_ELEMENTS", 1)
            monkeypatch.setattr(cpu.shared, "PIECE_POSITIONS", 2 * expected.shape[3])
            if layout == "direct":
                monkeypatch.setattr(cpu.direct, "_PIECE_MULTIPLY_ADDS", 1)
                monkeypatch.setattr(cpu.direct, "_PARALLEL_MULTIPLY_ADDS", 0)
                pieces, parallel = cpu.direct._pieces(x_shape[0], group, expected.shape[2],
                                                      expected.size * w[0].size), True
            elif layout == "pointwise":
                pieces, parallel = cpu.convolution._pointwise_pieces(3, 4, 5, 120)
            elif layout == "channel bands":
                monkeypatch.setattr(cpu.shared, "PIECE_POSITIONS", 128)
                columns = cpu.convolution._Columns(x, w.shape, pad, stride, dilation, group,
                                       expected.shape[2:])
                pieces, parallel = columns.channel_bands, columns.parallel
            else:
                columns = cpu.convolution._Columns(x, w.shape, pad, stride, dilation, group,
                                       expected.shape[2:])
                pieces, parallel = columns.pieces, columns.parallel
                assert columns.layout == layout
            assert parallel and len(pieces) > 2
        y, dx, dw = np.empty(dy.shape), np.empty_like(x), np.empty_like(w)
        cpu.conv_forward(x, w, y, pad, stride, dilation, group)
        cpu.conv_backward_data(dy, w, dx, pad, stride, dilation, group)
        cpu.conv_backward_filter(x, dy, dw, pad, stride, dilation, group)
        results.append((y, dx, dw))
    np.testing.assert_allclose(results[0][0], expected, atol=1e-12)
    for got, whole in zip(results[1], results[0]):
        np.testing.assert_allclose(got, whole, rtol=1e-12, atol=1e-12)


def test_dispatch_by_array_module():
    assert kernels.get(np) is cpu


def test_kernels_import_leaves_gpu_module_unloaded():
    import subprocess
    import sys
    code = ("import sys, numpy, owlnet.kernels as k; k.get(numpy); "
            "print('owlnet.kernels.gpu' in sys.modules, 'cupy' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.split() == ["False", "False"], done.stderr


def test_the_forward_takes_direct_further_than_the_backward():
    """A 3x3 convolution of 32 channels (288 inputs per window) too big for one thread, rows
    of 55: direct forward (native threads), im2col backward (the BLAS's products)."""
    shapes = ((2, 32, 55, 55), (64, 32, 3, 3), (2, 64, 55, 55), (1, 1), (1, 1), 1)
    assert cpu.convolution._algorithm(*shapes, forward=True) == "direct"
    assert cpu.convolution._algorithm(*shapes) == "im2col"
