"""Matrix products on the GPU through libcublas itself (ctypes), so that they can be captured.

CuPy 14 refuses every cuBLAS call made while a stream captures a CUDA graph ("calling cuBLAS
API during stream capture is currently unsupported": its wrappers check the stream before
binding it to their handle), which left every net with an InnerProduct or an im2col
convolution out of the captured training step. cuBLAS itself may be captured when the caller
gives the handle its workspace (``cublasSetWorkspace``: no allocation inside the capture), so
owlnet's products call the library directly: one handle per device with a fixed workspace,
bound before each call to the current CuPy stream and set to the math mode ("fp32": the
default math, no tensor cores for float32; "tf32": ``CUBLAS_TF32_TENSOR_OP_MATH``).

Row-major arrays meet column-major BLAS through the transpose: ``out = a @ b`` with ``out`` of
shape (M, N) row-major is, read column-major, ``out^T = b^T a^T`` (an N x M matrix), so the
call passes ``b`` first. An operand whose rows are contiguous is, read column-major, its own
transpose (``op N``); one whose columns are contiguous (a ``.T`` view) is itself (``op T``);
its other stride is the leading dimension. Operands with neither stride 1 are copied.

The library sits behind :data:`_state` ``["library"]`` (:class:`Library`, loaded on first use);
tests put a NumPy emulation of the same five calls there to run this module without a GPU.
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np

from .. import backend
from ..errors import OwlnetError

#: Bytes of each handle's workspace (cuBLAS asks for 32 MiB on Hopper, 4 MiB before it).
WORKSPACE_BYTES = 32 << 20
OP_N, OP_T = 0, 1
#: cublasMath_t values for owlnet's math modes.
MATH_MODES = {"fp32": 0, "tf32": 3}

_state = {"library": None}
_handles: dict = {}         # device id -> _Handle
_lock = threading.Lock()


class CublasError(OwlnetError):
    """libcublas could not be loaded, or a call returned an error status."""


class Library:
    """The five libcublas calls owlnet makes, through ctypes."""

    _SIGNATURES = {
        "cublasCreate_v2": [ctypes.c_void_p],
        "cublasSetStream_v2": [ctypes.c_void_p, ctypes.c_void_p],
        "cublasSetWorkspace_v2": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t],
        "cublasSetMathMode": [ctypes.c_void_p, ctypes.c_int],
    }

    def __init__(self):
        self.lib = _open_libcublas()
        for name, arguments in self._SIGNATURES.items():
            function = getattr(self.lib, name)
            function.argtypes, function.restype = arguments, ctypes.c_int
        self.gemms = {}
        for dtype, name, scalar in ((np.float32, "cublasSgemm_v2", ctypes.c_float),
                                    (np.float64, "cublasDgemm_v2", ctypes.c_double)):
            function = getattr(self.lib, name)
            pointer = ctypes.c_void_p
            function.argtypes = ([pointer] + [ctypes.c_int] * 5
                                 + [pointer, pointer, ctypes.c_int, pointer, ctypes.c_int,
                                    pointer, pointer, ctypes.c_int])
            function.restype = ctypes.c_int
            self.gemms[np.dtype(dtype)] = (function, scalar)

    def _check(self, name, status):
        if status != 0:
            raise CublasError(f"{name} failed with cuBLAS status {status}")

    def create(self):
        handle = ctypes.c_void_p()
        self._check("cublasCreate", self.lib.cublasCreate_v2(ctypes.byref(handle)))
        return handle.value

    def set_stream(self, handle, stream):
        self._check("cublasSetStream", self.lib.cublasSetStream_v2(handle, stream))

    def set_workspace(self, handle, pointer, nbytes):
        self._check("cublasSetWorkspace",
                    self.lib.cublasSetWorkspace_v2(handle, pointer, nbytes))

    def set_math_mode(self, handle, mode):
        self._check("cublasSetMathMode", self.lib.cublasSetMathMode(handle, mode))

    def gemm(self, handle, dtype, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c,
             ldc):
        """Column-major ``C = alpha op(A) op(B) + beta C`` (``C`` m x n) on device pointers."""
        function, scalar = self.gemms[np.dtype(dtype)]
        self._check("cublas gemm", function(
            handle, transa, transb, m, n, k, ctypes.byref(scalar(alpha)), a, lda, b, ldb,
            ctypes.byref(scalar(beta)), c, ldc))


def _open_libcublas():
    """libcublas as CuPy 14 finds it (cuda-pathfinder: the nvidia-cublas wheel, or the system
    library), else by its soname."""
    names = []
    try:
        from cuda import pathfinder  # noqa: PLC0415 - CuPy 14's dependency
        path = pathfinder.load_nvidia_dynamic_lib("cublas").abs_path
        if path:
            names.append(path)
    except Exception:  # noqa: BLE001 - any failure: try the sonames below
        pass
    names += ["libcublas.so.13", "libcublas.so.12"]
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise CublasError("libcublas was not found (tried " + ", ".join(names) + "): install "
                      "owlnet[gpu], whose CuPy brings it")


class _Handle:
    """One device's cuBLAS handle, its workspace, and what was last set on it. The workspace
    is its own device allocation (``cupy.cuda.Memory``), outside every memory pool: a captured
    step's private pool may go before the handle does."""

    def __init__(self, library, cupy):
        self.handle = library.create()
        self.workspace = cupy.cuda.Memory(WORKSPACE_BYTES)
        library.set_workspace(self.handle, self.workspace.ptr, WORKSPACE_BYTES)
        self.stream = None
        self.math = None


def _library():
    if _state["library"] is None:
        with _lock:
            if _state["library"] is None:
                _state["library"] = Library()
    return _state["library"]


def _bound_handle(library, cupy):
    """This device's handle, bound to the current stream and set to the math mode."""
    device = cupy.cuda.Device().id
    entry = _handles.get(device)
    if entry is None:
        entry = _handles[device] = _Handle(library, cupy)
    stream = cupy.cuda.get_current_stream().ptr
    if entry.stream != stream:
        library.set_stream(entry.handle, stream)
        entry.stream = stream
    math = MATH_MODES[backend.math_mode()]
    if entry.math != math:
        library.set_math_mode(entry.handle, math)
        entry.math = math
    return entry.handle


def operand_layout(shape, strides, itemsize):
    """How BLAS reads a 2-d operand: (``transposed``, leading dimension) with ``transposed``
    False for contiguous rows and True for contiguous columns (a ``.T`` view), strides in
    bytes; None when neither stride is one element (the operand needs a copy)."""
    rows, cols = shape
    if any(s % itemsize for s in strides):
        return None
    row_stride, col_stride = (s // itemsize for s in strides)
    if cols == 1 or col_stride == 1:
        ld = cols if rows == 1 else row_stride
        if ld >= max(1, cols):
            return False, ld
    if rows == 1 or row_stride == 1:
        ld = rows if cols == 1 else col_stride
        if ld >= max(1, rows):
            return True, ld
    return None


def gemm(a, b, out, accumulate=False):
    """``out = a @ b``, or ``out += a @ b`` with ``accumulate``: 2-d float32 or float64 device
    arrays of one dtype, ``out`` not overlapping ``a`` or ``b``. One cuBLAS call on the current
    stream (plus a copy for an operand with no unit stride)."""
    cupy = backend.import_cupy()
    (m, k), (k2, n) = a.shape, b.shape
    if out.shape != (m, n) or k2 != k:
        raise ValueError(f"gemm: shapes {a.shape} @ {b.shape} -> {out.shape} do not agree")
    if not a.dtype == b.dtype == out.dtype or out.dtype not in (np.float32, np.float64):
        raise TypeError(f"gemm takes float32 or float64 arrays of one dtype, not "
                        f"{a.dtype}, {b.dtype} -> {out.dtype}")
    if m == 0 or n == 0:
        return
    if k == 0:
        if not accumulate:
            out.fill(0)
        return
    size = out.itemsize
    out_layout = operand_layout(out.shape, out.strides, size)
    if out_layout is None:
        result = cupy.ascontiguousarray(out) if accumulate else cupy.empty(out.shape, out.dtype)
        gemm(a, b, result, accumulate)
        out[...] = result
        return
    transposed, ldc = out_layout
    if transposed:                          # columns contiguous: out^T = b^T a^T, rows so
        gemm(b.T, a.T, out.T, accumulate)
        return
    layouts = []
    for operand in (a, b):
        layout = operand_layout(operand.shape, operand.strides, size)
        if layout is None:
            operand = cupy.ascontiguousarray(operand)
            layout = (False, operand.shape[1])
        layouts.append((operand, layout))
    (a, (a_transposed, lda)), (b, (b_transposed, ldb)) = layouts
    library = _library()
    handle = _bound_handle(library, cupy)
    library.gemm(handle, out.dtype, OP_T if b_transposed else OP_N,
                 OP_T if a_transposed else OP_N, n, m, k, 1.0, b.data.ptr, ldb,
                 a.data.ptr, lda, 1.0 if accumulate else 0.0, out.data.ptr, ldc)
