"""Every CUDA source owlnet ships, in one registry (``ALL``) that the tests iterate.

Each entry is an elementwise kernel in CuPy's ``ElementwiseKernel`` form: typed parameter
lists and a body run once per index ``i`` (``0 <= i < size of the non-raw arrays``, or the
``size`` given to the launch when every array is raw).
Bodies are plain C (no CuPy helpers, no C++): ``raw`` parameters are indexed explicitly
with a flat index (``x[k]``; CuPy passes them as CArray objects, so no pointer arithmetic),
non-raw parameters name the element at ``i``, ``T`` is the float type. That keeps
every body checkable without a GPU, two ways (tests/test_gpu_sources.py):

* NVRTC compiles each one for sm_90 inside the source CuPy would generate for it;
* the system C compiler builds each one inside ``for (i = begin; i < end; ++i) { body }``
  with ``typedef float T;`` and the result is compared with the NumPy path.

A helper shared by several bodies goes in ``preamble``, declared with ``OWL_FN`` (a device
function under CUDA, a static inline function in C). Nothing may be compiled by owlnet from
anywhere else: ``kernels.gpu`` builds its kernels from this registry only.
"""
from __future__ import annotations

from dataclasses import dataclass

#: Defines ``OWL_FN`` for CUDA (NVRTC, nvcc) and for a C compiler; prepended to every preamble.
FUNCTION_PREFIX = """
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define OWL_FN __device__ __forceinline__
#else
#define OWL_FN static inline
#endif
"""


@dataclass(frozen=True)
class Elementwise:
    """One ``cupy.ElementwiseKernel``: ``in_params``/``out_params`` in CuPy's syntax.

    ``arrays`` names the non-raw parameters that are passed arrays (element ``i`` of each);
    the other non-raw parameters are scalars. CuPy tells them apart by the argument given;
    the checks need to know, and so does the reader.
    """

    name: str
    in_params: str
    out_params: str
    body: str
    preamble: str = ""
    arrays: tuple = ()


# -- im2col / col2im ----------------------------------------------------------------------
# The geometry travels as int32 scalars; indices into arrays are 64-bit (a batch of 128
# AlexNet conv1 images has 140M column entries).
GEOMETRY = ("int32 n, int32 c, int32 h, int32 w, int32 kh, int32 kw, int32 oh, int32 ow, "
            "int32 sh, int32 sw, int32 ph, int32 pw, int32 dh, int32 dw")

# One thread per column entry: row (ch, ki, kj), column (img, y, x) of the output grid.
IM2COL = Elementwise("owlnet_im2col", f"raw T images, {GEOMETRY}", "T col", """
    const long long columns = (long long)n * oh * ow;
    const long long row = i / columns;
    const long long column = i - row * columns;
    const int kj = (int)(row % kw);
    const int ki = (int)((row / kw) % kh);
    const long long ch = row / ((long long)kw * kh);
    const int x = (int)(column % ow);
    const int y = (int)((column / ow) % oh);
    const long long img = column / ((long long)ow * oh);
    const int in_y = y * sh - ph + ki * dh;
    const int in_x = x * sw - pw + kj * dw;
    if (in_y >= 0 && in_y < h && in_x >= 0 && in_x < w) {
        col = images[((img * c + ch) * h + in_y) * w + in_x];
    } else {
        col = (T)0;
    }
""", arrays=("col",))

# One thread per image pixel (a gather, no atomics): the sum of every column entry read from it.
COL2IM = Elementwise("owlnet_col2im", f"raw T cols, {GEOMETRY}", "T image", """
    const int x = (int)(i % w);
    const int y = (int)((i / w) % h);
    const long long plane = i / ((long long)w * h);
    const long long ch = plane % c;
    const long long img = plane / c;
    const long long columns = (long long)n * oh * ow;
    T total = (T)0;
    for (int ki = 0; ki < kh; ++ki) {
        const int from_y = y + ph - ki * dh;
        if (from_y < 0 || from_y % sh != 0 || from_y / sh >= oh) continue;
        for (int kj = 0; kj < kw; ++kj) {
            const int from_x = x + pw - kj * dw;
            if (from_x < 0 || from_x % sw != 0 || from_x / sw >= ow) continue;
            const long long row = (ch * kh + ki) * kw + kj;
            const long long column = (img * oh + from_y / sh) * ow + from_x / sw;
            total += cols[row * columns + column];
        }
    }
    image = total;
""", arrays=("image",))


# -- pooling (Caffe's windows: start p*s - pad, end min(start + k, size [+ pad])) ------------------
POOL_GEOMETRY = ("int32 h, int32 w, int32 oh, int32 ow, int32 kh, int32 kw, "
                 "int32 sh, int32 sw, int32 ph, int32 pw")

# One thread per output: the largest in-image value of its window and its index y*W + x in
# the plane (the first one in row-major order on ties).
MAX_POOL_FORWARD = Elementwise(
    "owlnet_max_pool_forward", f"raw T x, {POOL_GEOMETRY}", "T y, int32 argmax", """
    const int px = (int)(i % ow);
    const int py = (int)((i / ow) % oh);
    const long long plane = i / ((long long)ow * oh);
    int y0 = py * sh - ph;
    int x0 = px * sw - pw;
    const int y1 = y0 + kh < h ? y0 + kh : h;
    const int x1 = x0 + kw < w ? x0 + kw : w;
    y0 = y0 > 0 ? y0 : 0;
    x0 = x0 > 0 ? x0 : 0;
    const long long base = plane * h * w;
    int best_at = y0 * w + x0;
    T best = x[base + best_at];
    for (int yy = y0; yy < y1; ++yy) {
        for (int xx = x0; xx < x1; ++xx) {
            if (x[base + yy * w + xx] > best) {
                best = x[base + yy * w + xx];
                best_at = yy * w + xx;
            }
        }
    }
    y = best;
    argmax = best_at;
""", arrays=("y", "argmax"))

# One thread per input pixel (a gather): the gradients of the outputs whose maximum it was.
MAX_POOL_BACKWARD = Elementwise(
    "owlnet_max_pool_backward", f"raw T dy, raw int32 argmax, {POOL_GEOMETRY}", "T dx", """
    const int xx = (int)(i % w);
    const int yy = (int)((i / w) % h);
    const long long plane = i / ((long long)w * h);
    const int py0 = yy + ph < kh ? 0 : (yy + ph - kh) / sh + 1;
    const int px0 = xx + pw < kw ? 0 : (xx + pw - kw) / sw + 1;
    const int py1 = (yy + ph) / sh + 1 < oh ? (yy + ph) / sh + 1 : oh;
    const int px1 = (xx + pw) / sw + 1 < ow ? (xx + pw) / sw + 1 : ow;
    const long long offset = plane * oh * ow;
    const int here = yy * w + xx;
    T total = (T)0;
    for (int py = py0; py < py1; ++py) {
        for (int px = px0; px < px1; ++px) {
            if (argmax[offset + py * ow + px] == here) total += dy[offset + py * ow + px];
        }
    }
    dx = total;
""", arrays=("dx",))

# One thread per output: the in-image sum over the window clipped to the padded image, divided
# by that clipped window's area (pad included, as Caffe).
AVE_POOL_FORWARD = Elementwise(
    "owlnet_ave_pool_forward", f"raw T x, {POOL_GEOMETRY}", "T y", """
    const int px = (int)(i % ow);
    const int py = (int)((i / ow) % oh);
    const long long plane = i / ((long long)ow * oh);
    int y0 = py * sh - ph;
    int x0 = px * sw - pw;
    int y1 = y0 + kh < h + ph ? y0 + kh : h + ph;
    int x1 = x0 + kw < w + pw ? x0 + kw : w + pw;
    const int area = (y1 - y0) * (x1 - x0);
    y0 = y0 > 0 ? y0 : 0;
    x0 = x0 > 0 ? x0 : 0;
    y1 = y1 < h ? y1 : h;
    x1 = x1 < w ? x1 : w;
    const long long base = plane * h * w;
    T total = (T)0;
    for (int yy = y0; yy < y1; ++yy) {
        for (int xx = x0; xx < x1; ++xx) total += x[base + yy * w + xx];
    }
    y = total / (T)area;
""", arrays=("y",))

# One thread per input pixel: its share of every window containing it.
AVE_POOL_BACKWARD = Elementwise(
    "owlnet_ave_pool_backward", f"raw T dy, {POOL_GEOMETRY}", "T dx", """
    const int xx = (int)(i % w) + pw;
    const int yy = (int)((i / w) % h) + ph;
    const long long plane = i / ((long long)w * h);
    const int py0 = yy < kh ? 0 : (yy - kh) / sh + 1;
    const int px0 = xx < kw ? 0 : (xx - kw) / sw + 1;
    const int py1 = yy / sh + 1 < oh ? yy / sh + 1 : oh;
    const int px1 = xx / sw + 1 < ow ? xx / sw + 1 : ow;
    const long long offset = plane * oh * ow;
    T total = (T)0;
    for (int py = py0; py < py1; ++py) {
        for (int px = px0; px < px1; ++px) {
            const int y0 = py * sh - ph;
            const int x0 = px * sw - pw;
            const int y1 = y0 + kh < h + ph ? y0 + kh : h + ph;
            const int x1 = x0 + kw < w + pw ? x0 + kw : w + pw;
            total += dy[offset + py * ow + px] / (T)((y1 - y0) * (x1 - x0));
        }
    }
    dx = total;
""", arrays=("dx",))

# -- softmax and softmax loss over axis ``channels`` of an (outer, channels, inner) array ------
# One thread per (outer, inner) position: the channel maximum, then exp(x - max) / sum.
SOFTMAX = Elementwise(
    "owlnet_softmax", "raw T x, int32 channels, int32 inner", "raw T y", """
    const long long base = (i / inner) * channels * inner + i % inner;
    T top = x[base];
    for (int c = 1; c < channels; ++c) top = x[base + c * inner] > top ? x[base + c * inner] : top;
    T total = (T)0;
    for (int c = 0; c < channels; ++c) {
        const T e = exp(x[base + c * inner] - top);
        y[base + c * inner] = e;
        total += e;
    }
    for (int c = 0; c < channels; ++c) y[base + c * inner] /= total;
""")

# One thread per (outer, inner) position with probabilities ``prob`` (SOFTMAX's output):
# -log(max(prob[label], FLT_MIN)), and 1 for a counted position (0 where the label is ignored).
SOFTMAX_LOSS = Elementwise(
    "owlnet_softmax_loss",
    "raw T prob, raw T labels, int32 channels, int32 inner, int32 ignore, int32 ignore_label",
    "T loss, T counted", """
    const int label = (int)labels[i];
    if (ignore && label == ignore_label) {
        loss = (T)0;
        counted = (T)0;
    } else {
        const T p = prob[(i / inner) * channels * inner + (long long)label * inner + i % inner];
        loss = -log(p > (T)1.175494351e-38 ? p : (T)1.175494351e-38);
        counted = (T)1;
    }
""", arrays=("loss", "counted"))

# One thread per element: dx = scale * (prob - [c == label]), zero where the label is ignored.
SOFTMAX_LOSS_BACKWARD = Elementwise(
    "owlnet_softmax_loss_backward",
    "T prob, raw T labels, int32 channels, int32 inner, int32 ignore, int32 ignore_label, "
    "T scale", "T dx", """
    const long long position = (i / ((long long)channels * inner)) * inner + i % inner;
    const int c = (int)((i / inner) % channels);
    const int label = (int)labels[position];
    if (ignore && label == ignore_label) {
        dx = (T)0;
    } else {
        dx = scale * (prob - (c == label ? (T)1 : (T)0));
    }
""", arrays=("prob", "dx"))

# -- dropout with a counter-based generator --------------------------------------------------------
# owl_random(key, i): 32 random bits for element i, a pure function of (key, i) (a murmur3-style
# integer mix; kernels.counter_random computes the same numbers with NumPy, and the key).
RANDOM_PREAMBLE = """
OWL_FN unsigned int owl_mix(unsigned int v) {
    v ^= v >> 16;
    v *= 0x7feb352dU;
    v ^= v >> 15;
    v *= 0x846ca68bU;
    v ^= v >> 16;
    return v;
}
OWL_FN unsigned int owl_random(unsigned int key, unsigned long long index) {
    const unsigned int high = owl_mix((unsigned int)(index >> 32) + 0x9e3779b9U);
    return owl_mix(key ^ owl_mix((unsigned int)index ^ high));
}
"""

# Caffe's rule: keep where the random word is above threshold = ratio * UINT_MAX;
# y = x * keep * scale with scale = 1 / (1 - ratio).
DROPOUT_FORWARD = Elementwise(
    "owlnet_dropout_forward", "T x, uint32 key, uint32 threshold, T scale", "T y, uint8 keep", """
    const unsigned char kept = owl_random(key, (unsigned long long)i) > threshold;
    keep = kept;
    y = kept ? x * scale : (T)0;
""", preamble=RANDOM_PREAMBLE, arrays=("x", "y", "keep"))

# The same, its key folded on the device from the iteration a captured graph reads at each
# replay (counter_random.draw_key with seed_mix = mix(seed), layer_mix = mix(layer)).
DROPOUT_FORWARD_COUNTED = Elementwise(
    "owlnet_dropout_forward_counted",
    "T x, raw uint64 iteration, uint32 seed_mix, uint32 layer_mix, uint32 threshold, T scale",
    "T y, uint8 keep", """
    const unsigned long long it = iteration[0];
    const unsigned int key = owl_mix(owl_mix(seed_mix ^ (unsigned int)it
                                             ^ owl_mix((unsigned int)(it >> 32))) ^ layer_mix);
    const unsigned char kept = owl_random(key, (unsigned long long)i) > threshold;
    keep = kept;
    y = kept ? x * scale : (T)0;
""", preamble=RANDOM_PREAMBLE, arrays=("x", "y", "keep"))

DROPOUT_BACKWARD = Elementwise(
    "owlnet_dropout_backward", "T dy, uint8 keep, T scale", "T dx", """
    dx = keep ? dy * scale : (T)0;
""", arrays=("dy", "keep", "dx"))

# -- BatchNorm with batch statistics (+ Scale, + ReLU), per channel c of (outer, C, inner) --
# The channel of flat index i is (i / inner) % channels. Statistics come from reductions in
# kernels.gpu; these bodies are the passes over every value between them.
BATCH_NORM_SQUARED_DEVIATION = Elementwise(
    "owlnet_batch_norm_squared_deviation", "T x, raw T mean, int32 channels, int64 inner",
    "T d", """
    const T centered = x - mean[(i / inner) % channels];
    d = centered * centered;
""", arrays=("x", "d"))

# xhat = (x - mean) * inv_std, kept when keep (``kept`` is then not ``y``); y = xhat, times
# scale[c] and plus bias[c] where has_scale / has_bias, through a ReLU where relu. ``y`` may
# be ``x``.
BATCH_NORM_APPLY = Elementwise(
    "owlnet_batch_norm_apply",
    "T x, raw T mean, raw T inv_std, raw T scale, raw T bias, int32 channels, int64 inner, "
    "int32 has_scale, int32 has_bias, int32 relu, int32 keep", "T y, raw T kept", """
    const long long c = (i / inner) % channels;
    const T xhat = (x - mean[c]) * inv_std[c];
    T v = xhat;
    if (keep) kept[i] = xhat;
    if (has_scale) v = v * scale[c];
    if (has_bias) v = v + bias[c];
    y = (relu && v < (T)0) ? (T)0 : v;
""", arrays=("x", "y"))

# The gradient through the ReLU that follows: g = dy * (top > 0); gx = g * xhat.
BATCH_NORM_GRADIENT_PRODUCTS = Elementwise(
    "owlnet_batch_norm_gradient_products", "T dy, T top, T xhat", "T g, T gx", """
    const T gated = dy * (T)(top > (T)0);
    g = gated;
    gx = gated * xhat;
""", arrays=("dy", "top", "xhat", "g", "gx"))

# dx = ((g - mean_g[c]) - xhat * mean_gx[c]) * factor[c]; ``dx`` may be ``g``.
BATCH_NORM_BACKWARD_APPLY = Elementwise(
    "owlnet_batch_norm_backward_apply",
    "T g, T xhat, raw T mean_g, raw T mean_gx, raw T factor, int32 channels, int64 inner",
    "T dx", """
    const long long c = (i / inner) % channels;
    dx = ((g - mean_g[c]) - xhat * mean_gx[c]) * factor[c];
""", arrays=("g", "xhat", "dx"))

ALL = (IM2COL, COL2IM, MAX_POOL_FORWARD, MAX_POOL_BACKWARD, AVE_POOL_FORWARD,
       AVE_POOL_BACKWARD, SOFTMAX, SOFTMAX_LOSS, SOFTMAX_LOSS_BACKWARD, DROPOUT_FORWARD,
       DROPOUT_FORWARD_COUNTED, DROPOUT_BACKWARD, BATCH_NORM_SQUARED_DEVIATION,
       BATCH_NORM_APPLY, BATCH_NORM_GRADIENT_PRODUCTS, BATCH_NORM_BACKWARD_APPLY)
