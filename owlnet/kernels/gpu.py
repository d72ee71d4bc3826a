"""CuPy kernels: im2col / col2im with the column layout of ``kernels.cpu``, and convolution
through cuDNN graphs (NVIDIA's ``nvidia-cudnn-frontend``, ``import cudnn``).

Importing this module needs neither CuPy nor cuDNN: both are imported on first use.

Convolution: ``conv_forward``, ``conv_backward_data`` and ``conv_backward_filter`` run one
cuDNN graph each, built once per (shapes, padding, stride, dilation, math mode, device) and
cached. Arrays must be C-contiguous float32. Groups follow from the shapes (input channels /
the weight's second axis). In the strict "fp32" math mode the plans that use tensor cores
(TF32) are deselected; "tf32" keeps them. Each returns False, having done nothing, when it
cannot serve the arrays (the cuDNN frontend is not installed, the dtype is not float32, or
cuDNN has no plan for the shapes); the caller then uses im2col and a matrix product. Missing
cuDNN is logged once.
"""
from __future__ import annotations

import functools
import math

from .. import backend
from .. import logging as owl_logging


# -- im2col / col2im -------------------------------------------------------------------------
# Both kernels take the geometry as int32 scalars; indices into the arrays are 64-bit.

_GEOMETRY_ARGS = ("int32 n, int32 c, int32 h, int32 w, int32 kh, int32 kw, int32 oh, int32 ow, "
                  "int32 sh, int32 sw, int32 ph, int32 pw, int32 dh, int32 dw")

# One thread per column entry: row (ch, ki, kj), column (img, y, x) of the output grid.
_IM2COL_BODY = """
    const long long columns = (long long)n * oh * ow;
    const long long row = i / columns;
    const long long column = i - row * columns;
    const int kj = row % kw;
    const int ki = (row / kw) % kh;
    const long long ch = row / ((long long)kw * kh);
    const int x = column % ow;
    const int y = (column / ow) % oh;
    const long long img = column / ((long long)ow * oh);
    const int in_y = y * sh - ph + ki * dh;
    const int in_x = x * sw - pw + kj * dw;
    if (in_y >= 0 && in_y < h && in_x >= 0 && in_x < w) {
        col = images[((img * c + ch) * h + in_y) * w + in_x];
    } else {
        col = (T)0;
    }
"""

# One thread per image pixel (gather, no atomics): the sum of every column entry read from it.
_COL2IM_BODY = """
    const int x = i % w;
    const int y = (i / w) % h;
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
"""


@functools.cache
def _column_kernels():
    cupy = backend.import_cupy()
    im2col_kernel = cupy.ElementwiseKernel(f"raw T images, {_GEOMETRY_ARGS}", "T col",
                                           _IM2COL_BODY, "owlnet_im2col")
    col2im_kernel = cupy.ElementwiseKernel(f"raw T cols, {_GEOMETRY_ARGS}", "T image",
                                           _COL2IM_BODY, "owlnet_col2im")
    return im2col_kernel, col2im_kernel


def im2col(images, kernel, pad, stride, dilation, out_size):
    """``(N, C, H, W)`` images -> ``(C*kh*kw, N*OH*OW)`` patch matrix (``kernels.cpu`` layout)."""
    cupy = backend.import_cupy()
    images = cupy.ascontiguousarray(images)
    n, c, h, w = images.shape
    oh, ow = out_size
    cols = cupy.empty((c * kernel[0] * kernel[1], n * oh * ow), dtype=images.dtype)
    _column_kernels()[0](images, n, c, h, w, *kernel, oh, ow, *stride, *pad, *dilation, cols)
    return cols


def col2im(cols, image_shape, kernel, pad, stride, dilation, out_size):
    """Adjoint of :func:`im2col`: sum the ``(C*kh*kw, N*OH*OW)`` matrix back onto images."""
    cupy = backend.import_cupy()
    cols = cupy.ascontiguousarray(cols)
    n, c, h, w = image_shape
    oh, ow = out_size
    images = cupy.empty(tuple(image_shape), dtype=cols.dtype)
    _column_kernels()[1](cols, n, c, h, w, *kernel, oh, ow, *stride, *pad, *dilation, images)
    return images


# -- cuDNN convolution ---------------------------------------------------------------------
_graphs: dict = {}      # key -> _Plan, or None when cuDNN has no plan for that key
_handles: dict = {}     # device id -> [cudnn handle, stream pointer last set on it]


@functools.cache
def _cudnn():
    """The ``cudnn`` module, or None (logged once) when the frontend is not installed."""
    try:
        import cudnn  # noqa: PLC0415
    except ImportError as exc:
        owl_logging.warning(f"cuDNN frontend not available ({exc}); convolution uses im2col and "
                            "cuBLAS (pip install nvidia-cudnn-frontend for the cuDNN path)")
        return None
    return cudnn


def _handle(cudnn, cupy):
    """This device's cuDNN handle, bound to the current CuPy stream."""
    device = cupy.cuda.Device().id
    entry = _handles.get(device)
    if entry is None:
        entry = _handles[device] = [cudnn.create_handle(), None]
    stream = cupy.cuda.get_current_stream().ptr
    if entry[1] != stream:
        cudnn.set_stream(handle=entry[0], stream=stream)
        entry[1] = stream
    return entry[0]


def _strides(shape):
    """C-contiguous strides in elements."""
    return [math.prod(shape[k + 1:]) for k in range(len(shape))]


class _Plan:
    """A built cuDNN graph, its tensors in call order and its workspace."""

    __slots__ = ("graph", "tensors", "workspace")

    def __init__(self, graph, tensors, workspace):
        self.graph, self.tensors, self.workspace = graph, tensors, workspace

    def run(self, handle, *arrays):
        pointers = {t: a.data.ptr for t, a in zip(self.tensors, arrays)}
        self.graph.execute(pointers, self.workspace.data.ptr, handle=handle)


def _build(cudnn, cupy, handle, kind, x_shape, w_shape, y_shape, pad, stride, dilation):
    """Build the ``kind`` ("fprop" | "dgrad" | "wgrad") graph; tensors in run() order."""
    f32 = cudnn.data_type.FLOAT
    g = cudnn.pygraph(io_data_type=f32, intermediate_data_type=f32, compute_data_type=f32,
                      handle=handle)

    def tensor(name, shape):
        return g.tensor(name=name, dim=list(shape), stride=_strides(shape), data_type=f32)

    geometry = dict(padding=list(pad), stride=list(stride), dilation=list(dilation))
    if kind == "fprop":
        x, w = tensor("x", x_shape), tensor("w", w_shape)
        out = g.conv_fprop(image=x, weight=w, **geometry)
        out.set_output(True).set_dim(list(y_shape)).set_stride(_strides(y_shape))
        tensors = (x, w, out)
    elif kind == "dgrad":
        dy, w = tensor("dy", y_shape), tensor("w", w_shape)
        out = g.conv_dgrad(loss=dy, filter=w, **geometry)
        out.set_output(True).set_dim(list(x_shape)).set_stride(_strides(x_shape))
        tensors = (dy, w, out)
    else:
        x, dy = tensor("x", x_shape), tensor("dy", y_shape)
        out = g.conv_wgrad(image=x, loss=dy, **geometry)
        out.set_output(True).set_dim(list(w_shape)).set_stride(_strides(w_shape))
        tensors = (x, dy, out)
    out.set_data_type(f32)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    if backend.math_mode() == "fp32":
        # Strict float32: drop the TF32 tensor-core plans (only effective at this point).
        g.deselect_numeric_notes([cudnn.numerical_note.TENSOR_CORE])
    g.check_support()
    g.build_plans()
    workspace = cupy.empty(max(int(g.get_workspace_size()), 1), dtype=cupy.uint8)
    return _Plan(g, tensors, workspace)


def _run(kind, x_shape, w_shape, y_shape, pad, stride, dilation, arrays) -> bool:
    """Run the cached graph for this convolution on ``arrays``; False if it cannot."""
    if any(a.dtype.name != "float32" or not a.flags.c_contiguous for a in arrays):
        return False
    cudnn = _cudnn()
    if cudnn is None:
        return False
    cupy = backend.import_cupy()
    handle = _handle(cudnn, cupy)
    key = (kind, tuple(x_shape), tuple(w_shape), tuple(y_shape), tuple(pad), tuple(stride),
           tuple(dilation), backend.math_mode(), cupy.cuda.Device().id)
    if key not in _graphs:
        try:
            _graphs[key] = _build(cudnn, cupy, handle, kind, x_shape, w_shape, y_shape, pad,
                                  stride, dilation)
        except cudnn.cudnnGraphNotSupportedError as exc:
            owl_logging.warning(f"cuDNN has no {kind} plan for input {tuple(x_shape)}, weights "
                                f"{tuple(w_shape)} ({exc}); using im2col for it")
            _graphs[key] = None
    plan = _graphs[key]
    if plan is None:
        return False
    plan.run(handle, *arrays)
    return True


def conv_forward(x, w, y, pad, stride, dilation) -> bool:
    """``y = conv(x, w)`` (no bias) written into ``y``: x ``(N, C, H, W)``, w
    ``(M, C/group, kh, kw)``, y ``(N, M, OH, OW)``, all C-contiguous. False: not done."""
    return _run("fprop", x.shape, w.shape, y.shape, pad, stride, dilation, (x, w, y))


def conv_backward_data(dy, w, dx, pad, stride, dilation) -> bool:
    """``dx`` = gradient of ``conv(x, w)`` with respect to x for output gradient ``dy``,
    written (not added) into ``dx``. False: not done."""
    return _run("dgrad", dx.shape, w.shape, dy.shape, pad, stride, dilation, (dy, w, dx))


def conv_backward_filter(x, dy, dw, pad, stride, dilation) -> bool:
    """``dw`` = gradient of ``conv(x, w)`` with respect to w for output gradient ``dy``,
    written (not added) into ``dw`` (the caller accumulates). False: not done."""
    return _run("wgrad", x.shape, dw.shape, dy.shape, pad, stride, dilation, (x, dy, dw))
