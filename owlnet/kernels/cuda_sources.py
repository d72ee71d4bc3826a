"""Every CUDA source owlnet ships, in one registry (``ALL``) that the tests iterate.

Each entry is an elementwise kernel in CuPy's ``ElementwiseKernel`` form: typed parameter
lists and a body run once per index ``i`` (``0 <= i < size of the first non-raw array``).
Bodies are plain C (no CuPy helpers, no C++): ``raw`` parameters are pointers indexed
explicitly, non-raw parameters name the element at ``i``, ``T`` is the float type. That keeps
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

    ``arrays`` names the non-raw parameters of a fixed type (``int32 argmax``) that are
    passed arrays, not scalars (CuPy tells them apart by the argument; the checks need to
    know). Non-raw ``T`` parameters are always arrays.
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
""")

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
""")

ALL = (IM2COL, COL2IM)
