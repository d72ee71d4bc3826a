"""CuPy kernels: convolution (cuDNN frontend graphs, or im2col + cuBLAS), im2col / col2im
with the column layout of ``kernels.cpu``, and the fused kernels of ``cuda_sources``.

Importing this module needs neither CuPy nor cuDNN: both are imported on first use.

Convolution: ``conv_forward``, ``conv_backward_data`` and ``conv_backward_filter`` overwrite
their output and always succeed. Each call finds its plan, chosen once per (kind, shapes,
group, padding, stride, dilation, engine, math mode, dtype, device) and cached:

* a cuDNN graph (NVIDIA's ``nvidia-cudnn-frontend``, ``import cudnn``) when the engine is not
  "caffe", the arrays are C-contiguous float32 and the graph builds. cuDNN always gets the
  whole batch (its tensors are declared 16-byte aligned: a batch slice need not be). In the
  strict "fp32" math mode the plans that use tensor cores (TF32) are deselected, and so are
  plans needing more than ``WORKSPACE_LIMIT`` of scratch; of the rest, the heuristics' first
  that builds runs, or with ``backend.cudnn_autotune()`` ($OWLNET_CUDNN_AUTOTUNE=1) the
  fastest, timed once per shape.
* otherwise im2col + one cuBLAS product per group, over batch chunks whose column matrix fits
  the workspace.

When cuDNN cannot be used at all (the frontend or libcudnn missing, no handle) one warning says
so and every convolution takes im2col; a graph that fails to validate, is unsupported or does
not build is logged once for its shape, which then takes im2col. cuDNN plans and im2col's
column matrices share one workspace per device, grown on demand up to ``WORKSPACE_LIMIT``.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os

from .. import backend
from .. import logging as owl_logging
from . import counter_random, cublas, cuda_sources

#: Bytes of the shared per-device workspace (cuDNN scratch, im2col columns), at most.
WORKSPACE_LIMIT = int(os.environ.get("OWLNET_GPU_WORKSPACE_MB", "512")) << 20
#: cuDNN declares every tensor this aligned; other pointers go to im2col.
_ALIGNMENT = 16


# -- kernels from the registry --------------------------------------------------------------
@functools.cache
def elementwise(source: cuda_sources.Elementwise):
    """The ``cupy.ElementwiseKernel`` for a registry entry (compiled on first launch)."""
    cupy = backend.import_cupy()
    return cupy.ElementwiseKernel(source.in_params, source.out_params, source.body, source.name,
                                  preamble=cuda_sources.FUNCTION_PREFIX + source.preamble)


def im2col(images, kernel, pad, stride, dilation, out_size, out=None):
    """``(N, C, H, W)`` images -> ``(C*kh*kw, N*OH*OW)`` patch matrix (``kernels.cpu`` layout),
    written into ``out`` when given."""
    cupy = backend.import_cupy()
    images = cupy.ascontiguousarray(images)
    n, c, h, w = images.shape
    oh, ow = out_size
    if out is None:
        out = cupy.empty((c * kernel[0] * kernel[1], n * oh * ow), dtype=images.dtype)
    elementwise(cuda_sources.IM2COL)(images, n, c, h, w, *kernel, oh, ow, *stride, *pad,
                                     *dilation, out)
    return out


def col2im(cols, image_shape, kernel, pad, stride, dilation, out_size, out=None):
    """Adjoint of :func:`im2col`: sum the ``(C*kh*kw, N*OH*OW)`` matrix back onto images,
    written into ``out`` (shape ``image_shape``, C-contiguous) when given."""
    cupy = backend.import_cupy()
    cols = cupy.ascontiguousarray(cols)
    n, c, h, w = image_shape
    oh, ow = out_size
    if out is None:
        out = cupy.empty(tuple(image_shape), dtype=cols.dtype)
    elementwise(cuda_sources.COL2IM)(cols, n, c, h, w, *kernel, oh, ow, *stride, *pad,
                                     *dilation, out)
    return out


# -- the shared workspace ----------------------------------------------------------------------
_workspaces: dict = {}      # device id -> uint8 device array


def workspace(nbytes: int):
    """This device's workspace, at least ``nbytes`` long (grown, never shrunk)."""
    cupy = backend.import_cupy()
    device = cupy.cuda.Device().id
    buffer = _workspaces.get(device)
    if buffer is None or buffer.size < nbytes:
        buffer = _workspaces[device] = None     # free the old one before allocating
        buffer = _workspaces[device] = cupy.empty(max(int(nbytes), _ALIGNMENT), dtype=cupy.uint8)
    return buffer


def workspace_buffers() -> list:
    """The workspaces allocated now. A captured CUDA graph holds their addresses: its owner
    keeps these arrays alive, so growing the workspace later cannot free memory it uses."""
    return list(_workspaces.values())


def _scratch(shape, dtype):
    """A C-contiguous array of ``shape`` laid over the start of the workspace."""
    cupy = backend.import_cupy()
    nbytes = math.prod(shape) * cupy.dtype(dtype).itemsize
    return cupy.ndarray(shape, dtype=dtype, memptr=workspace(nbytes).data)


# -- plans -------------------------------------------------------------------------------------
class ConvGeometry:
    """Shapes and settings of one convolution call, as a hashable plan key."""

    __slots__ = ("kind", "x_shape", "w_shape", "y_shape", "pad", "stride", "dilation", "group",
                 "key")

    def __init__(self, kind, x_shape, w_shape, y_shape, pad, stride, dilation, group, extra):
        self.kind = kind
        self.x_shape, self.w_shape, self.y_shape = tuple(x_shape), tuple(w_shape), tuple(y_shape)
        self.pad, self.stride, self.dilation = tuple(pad), tuple(stride), tuple(dilation)
        self.group = int(group)
        if self.x_shape[1] != self.w_shape[1] * self.group or self.w_shape[0] % self.group:
            raise ValueError(f"convolution shapes do not fit group {group}: input "
                             f"{self.x_shape}, weights {self.w_shape}")
        self.key = (kind, self.x_shape, self.w_shape, self.y_shape, self.pad, self.stride,
                    self.dilation, self.group) + tuple(extra)

    @property
    def kernel(self):
        return self.w_shape[2:]

    @property
    def out_size(self):
        return self.y_shape[2:]


class ColumnPlan:
    """im2col + one matrix product per group, over batch ``chunks`` (slices of the batch)."""

    algorithm = "im2col"

    def __init__(self, geometry: ConvGeometry, itemsize: int):
        g = geometry
        n = g.x_shape[0]
        rows = g.x_shape[1] * g.kernel[0] * g.kernel[1]
        per_image = rows * g.out_size[0] * g.out_size[1] * itemsize
        step = max(1, min(n, WORKSPACE_LIMIT // max(1, per_image)))
        self.geometry = g
        self.chunks = [slice(start, min(start + step, n)) for start in range(0, n, step)]

    def _columns(self, x_part, dtype):
        g = self.geometry
        n = x_part.shape[0]
        cols = _scratch((g.x_shape[1] * g.kernel[0] * g.kernel[1], n * math.prod(g.out_size)),
                        dtype)
        return im2col(x_part, g.kernel, g.pad, g.stride, g.dilation, g.out_size, out=cols)

    def forward(self, x, w, y):
        cupy = backend.import_cupy()
        g = self.geometry
        weights = w.reshape(g.group, g.w_shape[0] // g.group, -1)
        for part in self.chunks:
            n = x[part].shape[0]
            cols = self._columns(x[part], x.dtype).reshape(g.group, weights.shape[2], -1)
            products = cupy.empty((g.group, weights.shape[1], cols.shape[2]), dtype=y.dtype)
            for k in range(g.group):
                cublas.gemm(weights[k], cols[k], products[k])
            y[part] = products.reshape(g.w_shape[0], n, *g.out_size).transpose(1, 0, 2, 3)

    def backward_data(self, dy, w, dx):
        cupy = backend.import_cupy()
        g = self.geometry
        weights = w.reshape(g.group, g.w_shape[0] // g.group, -1)
        for part in self.chunks:
            n = dy[part].shape[0]
            dy_groups = _positions(cupy, dy[part], g.group)
            dcols = _scratch((g.group, weights.shape[2], dy_groups.shape[2]), dy.dtype)
            for k in range(g.group):
                cublas.gemm(weights[k].T, dy_groups[k], dcols[k])
            target = dx[part] if dx.flags.c_contiguous else None
            images = col2im(dcols.reshape(-1, dcols.shape[2]), (n,) + g.x_shape[1:], g.kernel,
                            g.pad, g.stride, g.dilation, g.out_size, out=target)
            if target is None:
                dx[part] = images

    def backward_filter(self, x, dy, dw):
        cupy = backend.import_cupy()
        g = self.geometry
        grad = dw.reshape(g.group, g.w_shape[0] // g.group, -1)
        for index, part in enumerate(self.chunks):
            dy_groups = _positions(cupy, dy[part], g.group)
            cols = self._columns(x[part], x.dtype).reshape(g.group, grad.shape[2], -1)
            for k in range(g.group):    # the first chunk writes, the others add
                cublas.gemm(dy_groups[k], cols[k].T, grad[k], accumulate=index > 0)


def _positions(cupy, images, group):
    """``(n, M, OH, OW)`` -> ``(group, M/group, n*OH*OW)`` in im2col's column order (a copy)."""
    n, m = images.shape[:2]
    return cupy.ascontiguousarray(images.transpose(1, 0, 2, 3)).reshape(group, m // group, -1)


def define_graph(cudnn, handle, geometry: ConvGeometry):
    """The frontend graph of one convolution (not yet validated) and its tensors in call
    order: (x, w, y) for "fprop", (dy, w, dx) for "dgrad", (x, dy, dw) for "wgrad"."""
    g = geometry
    f32 = cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=f32, intermediate_data_type=f32, compute_data_type=f32,
                          handle=handle)

    def tensor(name, shape):
        return graph.tensor(name=name, dim=list(shape), stride=_strides(shape), data_type=f32)

    settings = dict(padding=list(g.pad), stride=list(g.stride), dilation=list(g.dilation))
    if g.kind == "fprop":
        x, w = tensor("x", g.x_shape), tensor("w", g.w_shape)
        out, out_shape = graph.conv_fprop(image=x, weight=w, **settings), g.y_shape
        tensors = (x, w, out)
    elif g.kind == "dgrad":
        dy, w = tensor("dy", g.y_shape), tensor("w", g.w_shape)
        out, out_shape = graph.conv_dgrad(loss=dy, filter=w, **settings), g.x_shape
        tensors = (dy, w, out)
    else:
        x, dy = tensor("x", g.x_shape), tensor("dy", g.y_shape)
        out, out_shape = graph.conv_wgrad(image=x, loss=dy, **settings), g.w_shape
        tensors = (x, dy, out)
    out.set_output(True).set_dim(list(out_shape)).set_stride(_strides(out_shape))
    out.set_data_type(f32)
    return graph, tensors


def _strides(shape):
    """C-contiguous strides in elements."""
    return [math.prod(shape[k + 1:]) for k in range(len(shape))]


class CudnnPlan:
    """A built cuDNN graph, the engine plan it runs, and its tensors in call order (x/dy/w
    first, the output last).

    The plans the heuristics offer are filtered (tensor-core plans in strict fp32, plans whose
    scratch exceeds ``WORKSPACE_LIMIT``) and then either the first one that builds is kept, or,
    with ``autotune``, each one that builds is timed on scratch arrays of the call's shapes
    and the fastest is kept."""

    algorithm = "cudnn"

    def __init__(self, cudnn, handle, geometry: ConvGeometry, strict_fp32: bool,
                 autotune: bool = False):
        graph, tensors = define_graph(cudnn, handle, geometry)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        if strict_fp32:
            # Only effective between create_execution_plans and check_support/build_plans.
            graph.deselect_numeric_notes([cudnn.numerical_note.TENSOR_CORE])
        # A plan needing more scratch than the shared workspace is dropped here, so the next
        # one runs rather than im2col.
        graph.deselect_workspace_greater_than(WORKSPACE_LIMIT)
        graph.check_support()
        self.graph, self.tensors, self.cudnn = graph, tensors, cudnn
        built, refusal = [], None
        for index in range(graph.get_execution_plan_count()):
            try:
                graph.build_plan_at_index(index)
            except Exception as exc:  # noqa: BLE001 deselected above, or it cannot build
                refusal = exc
                continue
            built.append(index)
            if not autotune:
                break
        if not built:
            raise RuntimeError(f"none of the {graph.get_execution_plan_count()} execution "
                               f"plans builds within {WORKSPACE_LIMIT} bytes of workspace; "
                               f"the last said: {refusal}")
        self.index = built[0] if len(built) == 1 else self._fastest(built, geometry, handle)
        self.workspace_size = int(graph.get_workspace_size_plan_at_index(self.index))
        # For a call whose arrays are not 16-byte aligned and contiguous (a batch slice).
        self.fallback = ColumnPlan(geometry, 4)

    def _fastest(self, indices, geometry, handle):
        """The index of the plan with the least time over scratch arrays (the best of three
        runs after one untimed run; a plan 4x slower than the best so far at its first
        timed run is not run again)."""
        cupy = backend.import_cupy()
        g = geometry
        shapes = {"fprop": (g.x_shape, g.w_shape, g.y_shape),
                  "dgrad": (g.y_shape, g.w_shape, g.x_shape),
                  "wgrad": (g.x_shape, g.y_shape, g.w_shape)}[g.kind]
        arrays = [cupy.zeros(shape, dtype=cupy.float32) for shape in shapes]
        pointers = {t: a.data.ptr for t, a in zip(self.tensors, arrays)}
        best, best_ms = indices[0], float("inf")
        for index in indices:
            space = cupy.empty(max(int(self.graph.get_workspace_size_plan_at_index(index)),
                                   _ALIGNMENT), dtype=cupy.uint8)
            ms = float("inf")
            for attempt in range(4):       # the first run is not timed
                start, end = cupy.cuda.Event(), cupy.cuda.Event()
                start.record()
                self.graph.execute_plan_at_index(pointers, space.data.ptr, index, handle=handle)
                end.record()
                end.synchronize()
                if attempt:
                    ms = min(ms, cupy.cuda.get_elapsed_time(start, end))
                    if ms > 4 * best_ms:
                        break
            if ms < best_ms:
                best, best_ms = index, ms
        return best

    def run(self, *arrays):
        """Execute on raw device pointers (capturable in a CUDA graph, unlike DLPack), on the
        current CuPy stream."""
        handle = _handle(self.cudnn, backend.import_cupy())
        pointers = {t: a.data.ptr for t, a in zip(self.tensors, arrays)}
        self.graph.execute_plan_at_index(pointers, workspace(self.workspace_size).data.ptr,
                                         self.index, handle=handle)


_plans: dict = {}           # plan key -> CudnnPlan | ColumnPlan
_handles: dict = {}         # device id -> [cudnn handle, stream pointer last set on it]
_cudnn_state = {"module": None, "failed": False}


def _warn(message):
    owl_logging.logger.warning(message)


def cudnn_module():
    """The ``cudnn`` module with a handle for this device, or None (said once) when cuDNN
    cannot be used: frontend not installed, libcudnn not found, no handle."""
    if _cudnn_state["failed"]:
        return None
    if _cudnn_state["module"] is None:
        try:
            import cudnn  # noqa: PLC0415
        except Exception as exc:  # ImportError; RuntimeError when libcudnn lacks a symbol
            return _cudnn_unusable(f"the cuDNN frontend does not import ({exc})")
        _cudnn_state["module"] = cudnn
    return _cudnn_state["module"]


def _cudnn_unusable(reason):
    _cudnn_state["failed"] = True
    _warn(f"cuDNN is not usable: {reason}; convolution runs as im2col + cuBLAS "
          "(pip install 'owlnet[gpu]' brings nvidia-cudnn-frontend and nvidia-cudnn-cu13)")
    return None


def _handle(cudnn, cupy):
    """This device's cuDNN handle bound to the current CuPy stream, or None (said once)."""
    device = cupy.cuda.Device().id
    entry = _handles.get(device)
    if entry is None:
        try:
            entry = [cudnn.create_handle(), None]
        except Exception as exc:  # "Unable to find symbol cudnnCreate": no libcudnn
            return _cudnn_unusable(f"cudnn.create_handle() failed ({exc})")
        _handles[device] = entry
    stream = cupy.cuda.get_current_stream().ptr
    if entry[1] != stream:
        cudnn.set_stream(handle=entry[0], stream=stream)
        entry[1] = stream
    return entry[0]


def _capturing(cupy) -> bool:
    """Whether the current stream is being captured (no timing runs then)."""
    return bool(cupy.cuda.get_current_stream().is_capturing())


def _aligned(arrays):
    return all(a.flags.c_contiguous and a.data.ptr % _ALIGNMENT == 0 for a in arrays)


#: Caffe's ConvolutionParameter.Engine values, by number and by name.
_ENGINES = {0: "default", 1: "caffe", 2: "cudnn", "default": "default", "caffe": "caffe",
            "cudnn": "cudnn"}


def plan(kind, x_shape, w_shape, y_shape, pad, stride, dilation, group, engine, dtype):
    """The cached plan (``CudnnPlan`` or ``ColumnPlan``) for one convolution; ``engine`` is
    Caffe's: "default" | "caffe" | "cudnn" (or the enum's number, any case)."""
    cupy = backend.import_cupy()
    dtype = cupy.dtype(dtype)
    engine = _ENGINES[engine.lower() if isinstance(engine, str) else int(engine)]
    geometry = ConvGeometry(kind, x_shape, w_shape, y_shape, pad, stride, dilation, group,
                            (engine, backend.math_mode(), dtype.str, cupy.cuda.Device().id,
                             backend.cudnn_autotune()))
    found = _plans.get(geometry.key)
    if found is not None:
        return found
    if engine != "caffe" and dtype == cupy.float32:
        cudnn = cudnn_module()
        handle = _handle(cudnn, cupy) if cudnn is not None else None
        if handle is not None:
            try:
                found = CudnnPlan(cudnn, handle, geometry, backend.math_mode() == "fp32",
                                  backend.cudnn_autotune() and not _capturing(cupy))
            except Exception as exc:  # validate / check_support / build_plans / workspace
                _warn(f"cuDNN has no {kind} graph for input {geometry.x_shape}, weights "
                      f"{geometry.w_shape}, group {geometry.group} ({exc}); this shape runs "
                      "as im2col + cuBLAS")
    if found is None:
        found = ColumnPlan(geometry, dtype.itemsize)
    _plans[geometry.key] = found
    return found


def _run(kind, method, arrays, x_shape, w_shape, y_shape, pad, stride, dilation, group,
         engine):
    found = plan(kind, x_shape, w_shape, y_shape, pad, stride, dilation, group, engine,
                 arrays[-1].dtype)
    if found.algorithm == "cudnn":
        if _aligned(arrays):
            found.run(*arrays)
            return
        found = found.fallback
    getattr(found, method)(*arrays)


def conv_forward(x, w, y, pad, stride, dilation, group, engine="default", scale=None,
                 shift=None, relu=False):
    """``y = conv(x, w)`` (no bias) written into ``y``: x ``(N, C, H, W)``, w
    ``(M, C/group, kh, kw)``, y ``(N, M, OH, OW)``; then times ``scale`` and plus ``shift``
    (M values each, or None) per channel and with ``relu`` max(., 0) taken (NaN kept), as one
    pass after."""
    _run("fprop", "forward", (x, w, y), x.shape, w.shape, y.shape, pad, stride, dilation, group,
         engine)
    if scale is not None or shift is not None or relu:
        y3 = y.reshape(y.shape[0], y.shape[1], -1)
        scale_forward(y3, scale, shift, y3, None, relu)


def conv_backward_data(dy, w, dx, pad, stride, dilation, group, engine="default"):
    """The gradient of ``conv(x, w)`` with respect to x for output gradient ``dy``, written
    (not added) into ``dx``."""
    _run("dgrad", "backward_data", (dy, w, dx), dx.shape, w.shape, dy.shape, pad, stride,
         dilation, group, engine)


def conv_backward_filter(x, dy, dw, pad, stride, dilation, group, engine="default"):
    """The gradient of ``conv(x, w)`` with respect to w for output gradient ``dy``, written
    (not added) into ``dw``."""
    _run("wgrad", "backward_filter", (x, dy, dw), x.shape, dw.shape, dy.shape, pad, stride,
         dilation, group, engine)


# -- fused layer kernels -----------------------------------------------------------------------
def matmul(a, b, out):
    """``out = a @ b`` (2-d), one cuBLAS product (capturable: ``kernels.cublas``)."""
    cublas.gemm(a, b, out)


def add_matmul(out, a, b):
    """``out += a @ b`` (2-d), one cuBLAS product accumulating into ``out``."""
    cublas.gemm(a, b, out, accumulate=True)


def _contiguous(array):
    return backend.import_cupy().ascontiguousarray(array)


def _pool_geometry(x_shape, y_shape, kernel, stride, pad):
    return (*x_shape[2:], *y_shape[2:], *kernel, *stride, *pad)


def max_pool_forward(x, y, argmax, kernel, stride, pad):
    """Caffe's MAX pooling of ``x`` (N, C, H, W) into ``y`` (N, C, OH, OW): each window's
    largest in-image value, and in ``argmax`` (int32, y's shape) its index h*W + w in the
    plane (the first in row-major order on ties)."""
    geometry = _pool_geometry(x.shape, y.shape, kernel, stride, pad)
    elementwise(cuda_sources.MAX_POOL_FORWARD)(_contiguous(x), *geometry, y, argmax)


def max_pool_backward(dy, argmax, dx, kernel, stride, pad):
    """``dx`` (written, not added) = the sum of ``dy`` over the outputs whose maximum each
    input pixel was (``argmax`` from :func:`max_pool_forward`)."""
    geometry = _pool_geometry(dx.shape, dy.shape, kernel, stride, pad)
    elementwise(cuda_sources.MAX_POOL_BACKWARD)(_contiguous(dy), _contiguous(argmax), *geometry,
                                                dx)


def ave_pool_forward(x, y, kernel, stride, pad):
    """Caffe's AVE pooling: the in-image sum of each window over the area of the window
    clipped to the padded image."""
    geometry = _pool_geometry(x.shape, y.shape, kernel, stride, pad)
    elementwise(cuda_sources.AVE_POOL_FORWARD)(_contiguous(x), *geometry, y)


def ave_pool_backward(dy, dx, kernel, stride, pad):
    """``dx`` (written) = each pixel's share of the gradient of every window containing it."""
    geometry = _pool_geometry(dx.shape, dy.shape, kernel, stride, pad)
    elementwise(cuda_sources.AVE_POOL_BACKWARD)(_contiguous(dy), *geometry, dx)


# -- per-channel passes of the training step (kernels.cpu.normalization's entry points) ------
def _channel_sum(a3):
    """The sum over outer and inner of ``a3`` (outer, C, inner), per channel: first along the
    contiguous inner axis (outer * C sums, enough to fill the device), then over outer. CuPy
    reduces axes (0, 2) in one go with one thread block per channel: 16-64 blocks on a GPU
    of 132 multiprocessors, which made these sums the largest part of ResNet-20's step."""
    return a3.sum(axis=2).sum(axis=0)


def batch_norm_forward(x3, y3, kept, eps, scale=None, bias=None, relu=False):
    """Batch statistics per channel of ``x3`` (outer, C, inner): ``(mean, var, inv_std)``,
    var biased, inv_std = 1 / sqrt(var + eps); xhat = (x - mean) * inv_std, written into
    ``kept`` unless None, and ``y3`` = xhat, or xhat * scale[c] + bias[c] (each when given),
    then max(., 0) with ``relu`` (``y3`` may be ``x3``). Two reductions and two passes over
    the values (``cuda_sources.BATCH_NORM_*``)."""
    cupy = backend.import_cupy()
    outer, channels, inner = x3.shape
    count = outer * inner
    mean = _channel_sum(x3) / count
    squares = kept if kept is not None else cupy.empty_like(x3)
    elementwise(cuda_sources.BATCH_NORM_SQUARED_DEVIATION)(x3, mean, channels, inner, squares)
    var = _channel_sum(squares) / count
    inv_std = 1 / cupy.sqrt(var + eps)
    elementwise(cuda_sources.BATCH_NORM_APPLY)(
        x3, mean, inv_std, inv_std if scale is None else scale,
        inv_std if bias is None else bias, channels, inner, int(scale is not None),
        int(bias is not None), int(relu), int(kept is not None), y3,
        y3 if kept is None else kept)
    return mean, var, inv_std


def batch_norm_backward(dy3, normalized3, inv_std, dx3, scale=None, relu_top=None):
    """g = dy, or dy * (top > 0) for ``relu_top``; ``dx3`` = (g - mean(g) - xhat *
    mean(g * xhat)) * inv_std * scale[c] (``dx3`` may be ``dy3``: both means are taken
    first). Returns ``(sum of g * xhat, sum of g)`` per channel."""
    cupy = backend.import_cupy()
    outer, channels, inner = dy3.shape
    count = outer * inner
    if relu_top is None:
        gated, products = dy3, cupy.multiply(dy3, normalized3)
    else:
        gated, products = cupy.empty_like(dy3), cupy.empty_like(dy3)
        elementwise(cuda_sources.BATCH_NORM_GRADIENT_PRODUCTS)(dy3, relu_top, normalized3,
                                                               gated, products)
    sum_g, sum_gx = _channel_sum(gated), _channel_sum(products)
    factor = inv_std if scale is None else inv_std * scale
    elementwise(cuda_sources.BATCH_NORM_BACKWARD_APPLY)(
        gated, normalized3, sum_g / count, sum_gx / count, factor, channels, inner, dx3)
    return sum_gx, sum_g


def channel_sums(a3, b3=None):
    """The sum over outer and inner of ``a3`` (times ``b3`` when given) per channel."""
    return _channel_sum(a3 if b3 is None else a3 * b3)


def scale_forward(x3, scale, bias, y3, kept, relu=False):
    """Scale's forward per channel: ``y3`` = x * scale[c] + bias[c] (each unless None), then
    max(., 0) with ``relu``, after copying x into ``kept`` unless None (``y3`` may be
    ``x3``)."""
    cupy = backend.import_cupy()
    if kept is not None:
        cupy.copyto(kept, x3)
    if scale is not None:
        cupy.multiply(x3, scale.reshape(1, -1, 1), out=y3)
    elif y3 is not x3:
        cupy.copyto(y3, x3)
    if bias is not None:
        y3 += bias.reshape(1, -1, 1)
    if relu:
        cupy.maximum(y3, 0, out=y3)


def scale_backward(dy3, x3, scale, dx3):
    """Scale's backward per channel: ``(sum of dy * x, sum of dy)`` (the first None when
    ``x3`` is None), and ``dx3`` = dy * scale[c] unless None (it may be ``dy3``)."""
    cupy = backend.import_cupy()
    sums = (None if x3 is None else _channel_sum(dy3 * x3), _channel_sum(dy3))
    if dx3 is not None:
        cupy.multiply(dy3, scale.reshape(1, -1, 1), out=dx3)
    return sums


def relu_backward(dy, x, dx):
    """``dx`` = dy * (x > 0) (``dx`` may be ``dy``)."""
    backend.import_cupy().multiply(dy, x > 0, out=dx)


def _channel_window_sums(a, size):
    """The sum of ``a`` (N, C, ...) over the ``size`` channels centred on each, inside the
    blob, in a new array."""
    sums = a.copy()
    for shift_by in range(1, min(size // 2, a.shape[1] - 1) + 1):
        sums[:, shift_by:] += a[:, :-shift_by]
        sums[:, :-shift_by] += a[:, shift_by:]
    return sums


def lrn_across_channels_forward(x, y, scale, power, size, coeff, shift, beta):
    """LRN across channels: s = shift + coeff * (sum of x^2 over the ``size`` channels centred
    on each, inside the blob), ``y`` = x * s^-beta; ``scale`` and ``power`` (both None, or
    arrays like x) get s and s^-beta."""
    cupy = backend.import_cupy()
    sums = _channel_window_sums(x * x, size)
    sums *= coeff
    sums += shift
    factor = sums ** -beta
    cupy.multiply(x, factor, out=y)
    if scale is not None:
        scale[...] = sums
        power[...] = factor


def lrn_across_channels_backward(x, dy, dx, scale, power, size, coeff, beta):
    """The gradient of LRN across channels, written into ``dx``: dy * s^-beta - 2 coeff beta
    * x * (sum over the ``size`` channels centred on each, inside the blob, of dy * x *
    s^-beta / s), with ``scale`` and ``power`` the forward's s and s^-beta."""
    cupy = backend.import_cupy()
    ratio = dy * x
    ratio *= power
    ratio /= scale
    sums = _channel_window_sums(ratio, size)
    sums *= x
    sums *= -2 * coeff * beta
    cupy.multiply(dy, power, out=dx)
    dx += sums


def _softmax_layout(shape, axis):
    """(outer, channels, inner) of an array softmaxed along ``axis``."""
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def softmax_forward(x, y, axis):
    """``y = exp(x - max) / sum exp(x - max)`` along ``axis``; ``y`` C-contiguous."""
    outer, channels, inner = _softmax_layout(x.shape, axis)
    elementwise(cuda_sources.SOFTMAX)(_contiguous(x), channels, inner, y, size=outer * inner)


def softmax_loss_forward(x, labels, prob, axis, ignore_label=None):
    """Softmax of ``x`` along ``axis`` into ``prob`` and the summed loss
    ``sum -log(max(prob[label], FLT_MIN))`` over positions whose label is not ``ignore_label``;
    returns (loss sum, counted positions) as 0-d device arrays (no host sync)."""
    cupy = backend.import_cupy()
    softmax_forward(x, prob, axis)
    outer, channels, inner = _softmax_layout(x.shape, axis)
    loss = cupy.empty(outer * inner, dtype=prob.dtype)
    counted = cupy.empty(outer * inner, dtype=prob.dtype)
    elementwise(cuda_sources.SOFTMAX_LOSS)(prob, _contiguous(labels).astype(prob.dtype, copy=False),
                                           channels, inner, int(ignore_label is not None),
                                           int(ignore_label or 0), loss, counted)
    return loss.sum(), counted.sum()


def softmax_loss_backward(prob, labels, dx, axis, scale, ignore_label=None):
    """``dx`` (written) = ``scale * (prob - onehot(label))``, zero at ignored positions;
    ``scale`` a number (loss weight / normaliser)."""
    _, channels, inner = _softmax_layout(prob.shape, axis)
    elementwise(cuda_sources.SOFTMAX_LOSS_BACKWARD)(
        prob, _contiguous(labels).astype(prob.dtype, copy=False), channels, inner,
        int(ignore_label is not None), int(ignore_label or 0), prob.dtype.type(scale), dx)


def dropout_forward(x, y, keep, ratio, key):
    """Caffe's dropout with counter-based bits (``counter_random``; ``key`` from
    ``counter_random.draw_key(seed, iteration, layer)``): ``keep`` (uint8, x's shape) marks the
    kept elements, ``y = x * keep / (1 - ratio)``. The mask equals
    ``counter_random.dropout_keep(key, x.shape, ratio)`` bit for bit."""
    cupy = backend.import_cupy()
    elementwise(cuda_sources.DROPOUT_FORWARD)(x, cupy.uint32(key),
                                              cupy.uint32(counter_random.threshold(ratio)),
                                              x.dtype.type(1.0 / (1.0 - ratio)), y, keep)


_iterations: dict = {}      # device id -> 0-d uint64 device array


def iteration_counter():
    """This device's iteration counter: a 0-d uint64 device array that the step executors
    set (:func:`set_iteration`) before each iteration's forward and that
    :func:`dropout_forward_counted` reads when it runs (so a replayed CUDA graph draws the
    masks of the iteration it replays)."""
    cupy = backend.import_cupy()
    device = cupy.cuda.Device().id
    counter = _iterations.get(device)
    if counter is None:
        counter = _iterations[device] = cupy.zeros((), dtype=cupy.uint64)
    return counter


def set_iteration(iteration: int) -> None:
    """Write ``iteration`` into :func:`iteration_counter` (a launch on the current stream;
    no host sync)."""
    iteration_counter().fill(int(iteration))


_draws = {"managed": 0}


@contextlib.contextmanager
def iteration_draws(iteration: int):
    """Inside: counter-based random kernels draw ``iteration``'s numbers (written into
    :func:`iteration_counter` first). The single-GPU step executors run each iteration in it,
    so a captured step's replays draw their own iteration's masks."""
    set_iteration(iteration)
    _draws["managed"] += 1
    try:
        yield
    finally:
        _draws["managed"] -= 1


def draws_managed() -> bool:
    """Whether an executor set the iteration the draws use (inside :func:`iteration_draws`);
    outside, a layer draws a fresh counter value from the host generator per call."""
    return _draws["managed"] > 0


def dropout_forward_counted(x, y, keep, ratio, seed, layer):
    """:func:`dropout_forward` with the key ``counter_random.draw_key(seed, iteration,
    layer)`` folded on the device from :func:`iteration_counter`: the same mask as
    ``dropout_forward(..., draw_key(seed, i, layer))`` at iteration ``i``, and capturable."""
    seed_mix, layer_mix = counter_random.key_parts(seed, layer)
    cupy = backend.import_cupy()
    elementwise(cuda_sources.DROPOUT_FORWARD_COUNTED)(
        x, iteration_counter(), cupy.uint32(seed_mix), cupy.uint32(layer_mix),
        cupy.uint32(counter_random.threshold(ratio)), x.dtype.type(1.0 / (1.0 - ratio)), y, keep)


def dropout_backward(dy, keep, dx, ratio):
    """``dx = dy * keep / (1 - ratio)`` (written)."""
    elementwise(cuda_sources.DROPOUT_BACKWARD)(dy, keep, dy.dtype.type(1.0 / (1.0 - ratio)), dx)
