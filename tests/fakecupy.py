"""A stand-in for CuPy backed by NumPy, to run owlnet's GPU code paths on the CPU.

Device arrays are :class:`DeviceArray` (a NumPy subclass with CuPy's ``.get()``, ``.set()``,
``.data.ptr``) and the module counts host <-> device transfers in ``transfers``. It is as
strict as CuPy where CuPy refuses things: a ufunc or NumPy function mixing a host array with
a device array raises TypeError, and so does ``device[...] = host_array`` ("non-scalar
numpy.ndarray cannot be used for fill"). ``ElementwiseKernel`` runs the kernel body through
the C harness (tests/cuda_harness.py), so kernels.gpu executes owlnet's real kernel bodies;
``kernels.cublas`` gets :class:`Cublas`, the same BLAS calls in NumPy on the same memory.

Streams and CUDA graphs, as CuPy's: ``cuda.Stream`` (``with stream:`` makes it current),
``begin_capture()`` / ``end_capture()`` giving a graph whose ``launch()`` replays what was
recorded, and memory pools (``cuda.MemoryPool``, ``cuda.using_allocator``). Between
``begin_capture`` and ``end_capture`` every operation on device arrays is recorded as a
callable that writes the same memory again (its own result buffer, its ``out``, its target),
creating a filled array included (``zeros``, ``arange``, ``array``, a copying
``ascontiguousarray``: CuPy writes them with a memset, kernel or copy on the stream, which the
graph replays; only ``empty`` writes nothing), and its effects are undone at ``end_capture``
(a capture does not run the work); and, as
CUDA refuses them there, the fake refuses with ``CaptureError``: a host sync (``float``,
``bool``, ``int``, ``.get()``, ``.item()``, boolean-mask indexing), a host-to-device copy
(``asarray``/``.set`` of a host array), work on another stream than the one capturing, a
CuPy product that calls cuBLAS (``matmul``, ``@``, ``dot``, ``einsum``...: CuPy 14's own
refusal, NotImplementedError), and taking new memory from the device (a pool growing past its high-water mark: the blocks an
eager warm-up left free are all a capture may use).

Use :func:`installed` (a context manager) to put the module in ``sys.modules['cupy']`` and
restore what was there, or :func:`fake_gpu` to also run owlnet in GPU mode on it.
"""
from __future__ import annotations

import contextlib
import ctypes
import sys
import types
from collections import Counter

import numpy as np

import cuda_harness
from owlnet.kernels import cuda_sources

transfers = Counter()      # "to_device" / "to_host" -> count


class CaptureError(RuntimeError):
    """What CUDA's stream capture refuses (cudaErrorStreamCaptureUnsupported and kin)."""


# The capture in progress: the stream capturing, the recorded replays, the saved contents of
# the buffers written (restored at the end), and the nesting depth of recorded operations
# (an operation's inner NumPy calls are not recorded again).
_capture = {"stream": None, "records": None, "saved": None, "depth": 0}


def _recording():
    return _capture["records"] is not None and _capture["depth"] == 0


def _refuse_in_capture(what):
    if _capture["records"] is not None:
        raise CaptureError(f"{what} during stream capture (CUDA refuses it: "
                           "cudaErrorStreamCaptureUnsupported)")


# CuPy's products that call cuBLAS through its own wrappers (matmul and ``@`` too).
_CUBLAS_FUNCTIONS = {np.dot, np.vdot, np.inner, np.outer, np.tensordot, np.einsum, np.matmul}


def _refuse_cublas_in_capture():
    """CuPy 14 checks the stream before each cuBLAS call and raises during a capture."""
    if _capture["records"] is not None:
        raise NotImplementedError("calling cuBLAS API during stream capture is currently "
                                  "unsupported")


class _Interface:
    """An ``__array_interface__`` holding the memory's owner (not the device array)."""

    def __init__(self, array):
        self.__array_interface__ = array.__array_interface__
        owner = array
        while isinstance(owner.base, np.ndarray):
            owner = owner.base
        self.owner = owner


def _plain(value):
    """Device arrays as plain NumPy views of their memory (lists and tuples too), holding
    the memory but not the device arrays (whose pool blocks go back when the program drops
    them, though a record still writes their memory)."""
    if isinstance(value, DeviceArray):
        return np.asarray(_Interface(value))
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _save(*targets):
    """Before a recorded write: keep the targets' contents (restored at end_capture)."""
    for target in targets:
        if isinstance(target, np.ndarray):
            _capture["saved"].append((target, np.array(target)))


@contextlib.contextmanager
def _operation(targets=()):
    """Around one device operation: during a capture, check the stream, save what it
    writes, and keep its inner calls out of the record."""
    if not _recording():
        yield
        return
    if get_current_stream() is not _capture["stream"]:
        raise CaptureError("a launch on another stream than the one capturing "
                           "(cudaErrorStreamCaptureImplicit)")
    _save(*_plain(list(targets)))
    _capture["depth"] += 1
    try:
        yield
    finally:
        _capture["depth"] -= 1


def _record(replay):
    if _recording():
        _capture["records"].append(replay)


def _copy_into(result):
    """A replay step: write ``compute()``'s value into ``result``'s memory (its buffer)."""
    buffers = [_plain(r) for r in (result if isinstance(result, tuple) else (result,))
               if isinstance(r, np.ndarray)]

    def write(values):
        values = values if isinstance(values, tuple) else (values,)
        for buffer, value in zip(buffers, values):
            np.copyto(buffer, value, casting="unsafe")
    return write


# -- memory pools -----------------------------------------------------------------------------
class MemoryPool:
    """CuPy's memory pool, by its byte counts: ``used_bytes`` (live arrays) and
    ``total_bytes`` (taken from the device: the high-water mark of ``used``, as an ideal pool
    that reuses every freed block). CuPy's real pool rounds each block up to 512 bytes and
    reuses a free block only if one large enough is free, so it needs at least as much: a
    capture holding more live bytes at some point than the warm-up ever did would need new
    device memory there too, unless fragmentation happened to leave a spare block."""

    def __init__(self):
        self.used, self.total, self.frees = 0, 0, 0

    def malloc(self, nbytes):
        self.used += nbytes
        if self.used > self.total:
            if _capture["records"] is not None:
                self.used -= nbytes
                raise CaptureError(f"an allocation of {nbytes} bytes needs new device memory "
                                   "during stream capture (no free block in the pool)")
            self.total = self.used
        return _Block(self, nbytes)

    def used_bytes(self):
        return self.used

    def total_bytes(self):
        return self.total

    def free_all_blocks(self):
        self.frees += 1
        self.total = self.used


class _Block:
    """One allocation; returned to its pool when the last array using it goes."""

    def __init__(self, pool, nbytes):
        self.pool, self.nbytes = pool, nbytes

    def __del__(self):
        self.pool.used -= self.nbytes


_default_pool = MemoryPool()
_allocators = []            # using_allocator's stack of pools


def get_default_memory_pool():
    return _default_pool


@contextlib.contextmanager
def using_allocator(allocator):
    """Allocate from ``allocator`` (a pool's ``malloc``) inside the block."""
    _allocators.append(allocator.__self__)
    try:
        yield
    finally:
        _allocators.pop()


def _allocate(nbytes):
    return (_allocators[-1] if _allocators else _default_pool).malloc(int(nbytes))


# -- streams and graphs ------------------------------------------------------------------------
class Stream:
    """A CuPy stream: ``with stream:`` makes it current; it captures graphs."""

    _count = 0
    log: list = []          # ("copy" | "record" | "wait" | "host waits", stream name, ...)

    def __init__(self, null=False, non_blocking=False, name=None):
        Stream._count += 1
        self.ptr = 0 if null else Stream._count
        self.non_blocking = non_blocking
        self.name = name or ("compute" if null else f"stream{Stream._count}")
        self.events = 0

    def __enter__(self):
        _streams.append(self)
        return self

    def __exit__(self, *exc):
        _streams.pop()

    def synchronize(self):
        _refuse_in_capture("Stream.synchronize")

    def record(self, event=None):
        """An event marking the work queued so far (the fake runs it at once)."""
        self.events += 1
        self.log.append(("record", self.name, self.events))
        event = event or Event()
        event.stream, event.number = self, self.events
        return event

    def wait_event(self, event):
        self.log.append(("wait", self.name, event.stream.name, event.number))

    def begin_capture(self, mode=None):
        if _capture["records"] is not None:
            raise CaptureError("a capture is already in progress")
        _capture.update(stream=self, records=[], saved=[], depth=0)

    def is_capturing(self):
        return _capture["stream"] is self

    def end_capture(self):
        if _capture["stream"] is not self:
            raise CaptureError("end_capture on a stream that is not capturing")
        records, saved = _capture["records"], _capture["saved"]
        _capture.update(stream=None, records=None, saved=None, depth=0)
        for target, contents in reversed(saved):
            target[...] = contents
        return Graph(records)


#: The fake device's clock in ms: nothing advances it but a test (``advance_clock``).
_clock = [0.0]


def advance_clock(ms):
    """Let ``ms`` of device time pass (for code that times work with events)."""
    _clock[0] += ms


class Event:
    stream, number, time = None, 0, 0.0

    def record(self, stream=None):
        self.stream, self.time = stream or get_current_stream(), _clock[0]

    def synchronize(self):
        _refuse_in_capture("Event.synchronize")
        Stream.log.append(("host waits", self.stream and self.stream.name, self.number))


class Graph:
    """A captured graph: ``launch`` runs the recorded operations again, in order."""

    def __init__(self, records):
        self.records = records

    def launch(self, stream=None):
        if _capture["records"] is not None:
            raise CaptureError("a graph launched during a capture")
        for replay in self.records:
            replay()

    def upload(self, stream=None):
        pass


_null_stream = Stream.null = Stream(null=True)
_streams = []


def get_current_stream():
    return _streams[-1] if _streams else _null_stream


def _is_host(value):
    return type(value) is np.ndarray and value.ndim > 0


def _refuse_mixing(values, what):
    if any(_is_host(v) for v in values):
        raise TypeError(f"{what}: a numpy.ndarray mixed with device arrays (CuPy refuses this)")


class _Memory:
    """What ``DeviceArray.data`` returns: CuPy's MemoryPointer (``.ptr``) over the buffer."""

    def __init__(self, array):
        self.array, self.ptr = array, array.__array_interface__["data"][0]


class DeviceArray(np.ndarray):
    """An array "on the device": NumPy storage, CuPy's manners. An array owning its memory
    holds a block of the current memory pool; views hold their base's."""

    def __array_finalize__(self, obj):
        if self.base is None or (type(obj) is np.ndarray and obj.base is None):
            self._block = _allocate(self.nbytes)        # new memory (or a new result wrapped)
        else:
            self._block = getattr(obj, "_block", None)

    @property
    def data(self):
        return _Memory(self)

    def get(self, out=None):
        _refuse_in_capture("a device-to-host copy (.get())")
        transfers["to_host"] += 1
        if out is None:
            return np.array(self.view(np.ndarray))
        out[...] = self.view(np.ndarray)
        return out

    def set(self, host, stream=None):
        _refuse_in_capture("a host-to-device copy (.set())")
        transfers["to_device"] += 1
        if stream is not None:
            stream.log.append(("copy", stream.name))
        self.view(np.ndarray)[...] = host

    def __setitem__(self, key, value):
        if _is_host(value):
            raise TypeError("non-scalar numpy.ndarray cannot be used for fill")
        plain_self, plain_key, plain_value = _plain(self), _plain(key), _plain(value)
        with _operation([self]):
            plain_self[plain_key] = plain_value
        _record(lambda: plain_self.__setitem__(plain_key, plain_value))

    def __getitem__(self, key):
        keys = key if isinstance(key, tuple) else (key,)
        advanced = [k for k in keys if isinstance(k, (np.ndarray, list))]
        if any(np.asarray(k).dtype == bool for k in advanced):
            _refuse_in_capture("boolean-mask indexing (its size is read on the host)")
        if not advanced:
            result = super().__getitem__(key)
            if isinstance(result, np.generic):        # CuPy gives a 0-d view
                result = super().__getitem__(keys + (Ellipsis,))
            return result
        plain_self, plain_key = _plain(self), _plain(key)
        with _operation():
            result = _wrap(plain_self[plain_key])
        write = _copy_into(result)
        _record(lambda: write(plain_self[plain_key]))
        return result

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        outs = kwargs.get("out", ())
        _refuse_mixing(inputs + tuple(outs), ufunc.__name__)
        if ufunc is np.matmul:
            _refuse_cublas_in_capture()
        plain, plain_kwargs = _plain(list(inputs)), _plain(kwargs)
        if outs:
            plain_kwargs["out"] = _plain(tuple(outs))
        targets = list(outs) + ([inputs[0]] if method == "at" else [])
        with _operation(targets):
            result = getattr(ufunc, method)(*plain, **plain_kwargs)
        call = getattr(ufunc, method)
        if outs or method == "at":
            _record(lambda: call(*plain, **plain_kwargs))
            return outs[0] if len(outs) == 1 else outs if outs else None
        result = _wrap(result)
        write = _copy_into(result)
        _record(lambda: write(call(*plain, **plain_kwargs)))
        return result

    def __array_function__(self, func, types_, args, kwargs):
        flat = list(args) + list(kwargs.values())
        flat += [v for a in args if isinstance(a, (list, tuple)) for v in a]
        _refuse_mixing(flat, func.__name__)
        if func in _CUBLAS_FUNCTIONS:
            _refuse_cublas_in_capture()
        targets = [kwargs["out"]] if isinstance(kwargs.get("out"), DeviceArray) else []
        if func in _IN_PLACE:
            targets.append(args[0])
        with _operation(targets):
            result = _wrap(super().__array_function__(func, types_, args, kwargs))
        plain_args, plain_kwargs = _plain(args), _plain(kwargs)
        if targets:
            _record(lambda: func(*plain_args, **plain_kwargs))
        elif isinstance(result, (np.ndarray, tuple)):
            write = _copy_into(result)
            _record(lambda: write(func(*plain_args, **plain_kwargs)))
        return result

    def _copying(name):  # noqa: N805 - builds methods below
        """A method that may give new memory (a copy): recorded as writing it again."""
        def method(self, *args, **kwargs):
            with _operation():
                result = getattr(np.ndarray, name)(self, *args, **kwargs)
            if isinstance(result, DeviceArray) and not np.shares_memory(result, self):
                result = _detach(result)
                plain_self, write = _plain(self), _copy_into(result)
                _record(lambda: write(getattr(plain_self, name)(*args, **kwargs)))
            return result
        method.__name__ = name
        return method

    astype, copy, ravel = _copying("astype"), _copying("copy"), _copying("ravel")
    flatten, reshape = _copying("flatten"), _copying("reshape")
    argmax, argmin = _copying("argmax"), _copying("argmin")

    def fill(self, value):
        plain_self = _plain(self)
        with _operation([self]):
            plain_self.fill(value)
        _record(lambda: plain_self.fill(value))

    def _host_read(name):  # noqa: N805 - builds methods below
        def method(self, *args):
            _refuse_in_capture(f"a host read of a device value ({name})")
            return getattr(self.view(np.ndarray), name)(*args)
        method.__name__ = name
        return method

    __float__, __int__, __bool__ = _host_read("__float__"), _host_read("__int__"), \
        _host_read("__bool__")
    __index__, item, tolist = _host_read("__index__"), _host_read("item"), _host_read("tolist")


#: NumPy functions that write their first argument.
_IN_PLACE = {np.copyto, np.put, np.place, np.putmask}


def _detach(array):
    """A device array that owns its memory, as a view holding its pool block (so records can
    hold the memory without the block)."""
    if array.base is not None:
        return array
    view = array.view(DeviceArray)
    view._block, array._block = array._block, None
    return view


def _wrap(result):
    if isinstance(result, tuple):
        return tuple(_wrap(r) for r in result)
    if isinstance(result, DeviceArray):
        return _detach(result)
    if isinstance(result, np.ndarray):
        return result.view(DeviceArray)
    if isinstance(result, np.generic):
        return np.asarray(result).view(DeviceArray)
    return result


def asarray(value, dtype=None):
    if isinstance(value, DeviceArray):
        return value if dtype is None else value.astype(dtype, copy=False)
    _refuse_in_capture("a host-to-device copy (asarray of a host value)")
    if isinstance(value, np.ndarray) and value.ndim > 0:
        transfers["to_device"] += 1
    return np.array(value, dtype=dtype).view(DeviceArray)


def asnumpy(value):
    return value.get() if isinstance(value, DeviceArray) else np.asarray(value)


def get_array_module(*values):
    return module if any(isinstance(v, DeviceArray) for v in values) else np


def _filled(make):
    """A new device array ``make()`` (a NumPy array) whose contents CuPy writes on the device:
    a memset, fill or copy kernel on the current stream, which a capture records, so each
    replay writes them again (``cupy.zeros`` re-zeroes its memory on every replay; a copy
    reads its source's contents at replay time, not at capture)."""
    with _operation():
        result = make().view(DeviceArray)
    write = _copy_into(result)
    _record(lambda: write(make()))
    return result


def _creator(name):
    """``cupy.zeros``, ``cupy.array`` and kin (see :func:`_filled`); ``empty`` writes
    nothing, and ``ascontiguousarray`` of a C-contiguous device array is that array, as in
    CuPy."""
    def create(*args, **kwargs):
        source = args[0] if args else None
        if name == "empty":
            return np.empty(*args, **kwargs).view(DeviceArray)
        if isinstance(source, DeviceArray) and name == "ascontiguousarray" and \
                source.flags.c_contiguous and kwargs.get("dtype", source.dtype) == source.dtype:
            return source
        if _is_host(source):
            _refuse_in_capture(f"a host-to-device copy ({name} of a host array)")
        plain_args, plain_kwargs = _plain(args), _plain(kwargs)
        return _filled(lambda: getattr(np, name)(*plain_args, **plain_kwargs))
    create.__name__ = name
    return create


def _like(name):
    """``zeros_like`` and kin, built from the shape (NumPy's own copies a host array in);
    recorded as :func:`_creator`'s."""
    def create(array, dtype=None, **kwargs):
        shape, dtype = array.shape, dtype or array.dtype    # (a record holds no array)

        def make():
            return getattr(np, name)(shape, dtype=dtype, **kwargs)
        if name == "empty":
            return make().view(DeviceArray)
        return _filled(make)
    create.__name__ = f"{name}_like"
    return create


def ndarray(shape, dtype=float, memptr=None):
    """CuPy's constructor: an array over ``memptr`` (a ``.data`` of another array)."""
    if memptr is None:
        return np.empty(shape, dtype).view(DeviceArray)
    count = int(np.prod(shape, dtype=np.int64))
    base = memptr.array.view(np.ndarray).reshape(-1).view(np.uint8)
    return np.frombuffer(base, dtype=dtype, count=count).reshape(shape).view(DeviceArray)


class ElementwiseKernel:
    """CuPy's ElementwiseKernel over the C harness: the registry entry is found by name."""

    def __init__(self, in_params, out_params, body, name, preamble=""):
        matches = [s for s in cuda_sources.ALL if s.name == name]
        if len(matches) != 1 or matches[0].body != body:
            raise AssertionError(f"kernel {name!r} is not a registry entry")
        self.source = matches[0]

    def __call__(self, *args, size=None):
        specs = cuda_harness.params(self.source.in_params) + cuda_harness.params(
            self.source.out_params)
        dtype = next(a.dtype for (raw, t, _), a in zip(specs, args)
                     if t == "T" and isinstance(a, np.ndarray))
        host = [_plain(a) for a in args]
        if any(isinstance(a, np.ndarray) and not isinstance(a, DeviceArray) for a in args):
            raise TypeError(f"{self.source.name}: a host array given to a device kernel")
        kernel = cuda_harness.c_kernel(self.source, dtype)
        outputs = args[len(args) - len(cuda_harness.params(self.source.out_params)):]
        with _operation(outputs):
            kernel(*host, end=size)
        _record(lambda: kernel(*host, end=size))
        return args[-1]


class Cublas:
    """``kernels.cublas.Library`` in NumPy: the same five calls on the same memory (pointers
    read as column-major matrices), as strict as cuBLAS about leading dimensions, and, during
    a capture, recorded like any launch and refused when the handle is bound to another stream
    than the one capturing. ``calls`` keeps each product's BLAS arguments."""

    def __init__(self):
        self.streams, self.workspaces, self.math, self.calls = {}, {}, {}, []

    def create(self):
        handle = len(self.streams) + 1
        self.streams[handle] = None
        return handle

    def set_stream(self, handle, stream):
        self.streams[handle] = stream

    def set_workspace(self, handle, pointer, nbytes):
        self.workspaces[handle] = (pointer, nbytes)

    def set_math_mode(self, handle, mode):
        self.math[handle] = mode

    def gemm(self, handle, dtype, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c,
             ldc):
        if _recording() and self.streams[handle] != _capture["stream"].ptr:
            raise CaptureError("cuBLAS bound to another stream than the one capturing")
        left = _column_major(a, dtype, *((m, k) if transa == 0 else (k, m)), lda)
        right = _column_major(b, dtype, *((k, n) if transb == 0 else (n, k)), ldb)
        out = _column_major(c, dtype, m, n, ldc)
        left, right = (left if transa == 0 else left.T), (right if transb == 0 else right.T)
        self.calls.append((transa, transb, m, n, k, lda, ldb, ldc, beta))

        def run():
            product = alpha * (left @ right)
            out[...] = product if beta == 0 else beta * out + product
        with _operation((out,)):
            run()
        _record(run)


def _column_major(pointer, dtype, rows, cols, ld):
    """The column-major ``rows x cols`` matrix at ``pointer`` (leading dimension ``ld``) as a
    NumPy view of that memory; ValueError where cuBLAS says CUBLAS_STATUS_INVALID_VALUE."""
    if ld < max(1, rows):
        raise ValueError(f"leading dimension {ld} < {rows} rows (CUBLAS_STATUS_INVALID_VALUE)")
    itemsize = np.dtype(dtype).itemsize
    span = (cols - 1) * ld + rows
    memory = (ctypes.c_char * (span * itemsize)).from_address(pointer)
    flat = np.frombuffer(memory, dtype=dtype, count=span)
    return np.lib.stride_tricks.as_strided(flat, shape=(rows, cols),
                                           strides=(itemsize, ld * itemsize))


class _Device:
    def __init__(self, index=0):
        self.id = int(index)
        self.pci_bus_id = f"0000:{self.id + 1:02x}:00.0"

    def use(self):
        pass

    def synchronize(self):
        pass


def _raw_memory(nbytes):
    """``cupy.cuda.Memory``: device memory of its own, outside the pools (``.ptr``)."""
    _refuse_in_capture("cudaMalloc")
    return _Memory(np.zeros(nbytes, dtype=np.uint8))


cuda = types.SimpleNamespace(Device=_Device, Stream=Stream, Graph=Graph, Event=Event,
                             Memory=_raw_memory,
                             get_elapsed_time=lambda start, end: end.time - start.time,
                             get_current_stream=get_current_stream, MemoryPool=MemoryPool,
                             using_allocator=using_allocator,
                             alloc_pinned_memory=lambda nbytes: bytearray(nbytes),
                             runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))

module = types.ModuleType("cupy")
for _name in ("zeros", "empty", "ones", "full", "arange", "ascontiguousarray", "array"):
    setattr(module, _name, _creator(_name))
for _name in ("zeros", "empty", "ones"):
    setattr(module, f"{_name}_like", _like(_name))
for _name, _value in dict(asarray=asarray, asnumpy=asnumpy, get_array_module=get_array_module,
                          ndarray=ndarray, ElementwiseKernel=ElementwiseKernel, cuda=cuda,
                          DeviceArray=DeviceArray, transfers=transfers,
                          get_default_memory_pool=get_default_memory_pool).items():
    setattr(module, _name, _value)
module.__getattr__ = lambda name: getattr(np, name)

# cupy._core._routines_linalg: the cuBLAS compute type per dtype (CuPy's names and values).
linalg = types.ModuleType("cupy._core._routines_linalg")
linalg.COMPUTE_TYPE_DEFAULT, linalg.COMPUTE_TYPE_FP32, linalg.COMPUTE_TYPE_TF32 = 1, 4, 6
linalg.compute_types = {}
linalg.set_compute_type = lambda dtype, kind: linalg.compute_types.__setitem__(np.dtype(dtype),
                                                                                kind)
core = types.ModuleType("cupy._core")
core._routines_linalg = linalg
_MODULES = {"cupy": module, "cupy._core": core, "cupy._core._routines_linalg": linalg}


@contextlib.contextmanager
def installed():
    """``import cupy`` gives this module inside the block; transfers start from zero."""
    from owlnet.kernels import cublas
    saved = {name: sys.modules.get(name) for name in _MODULES}
    saved_library = cublas._state["library"]
    sys.modules.update(_MODULES)
    transfers.clear()
    linalg.compute_types.clear()
    cublas._state["library"] = Cublas()
    cublas._handles.clear()
    try:
        yield module
    finally:
        cublas._state["library"] = saved_library
        cublas._handles.clear()
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def _clear_gpu_caches():
    """kernels.gpu and kernels.cublas keep kernels, plans, handles and workspaces per process,
    device_checks its flags: a fake's must not outlive the fake (nor a real device's leak
    into it)."""
    from owlnet import device_checks
    from owlnet.kernels import cublas, gpu
    for cache in (gpu._plans, gpu._handles, gpu._workspaces, gpu._iterations, cublas._handles,
                  device_checks._flags):
        cache.clear()
    gpu._cudnn_state.update(module=None, failed=False)
    gpu.elementwise.cache_clear()


@contextlib.contextmanager
def fake_gpu(cudnn=None):
    """owlnet in GPU mode on the fake device, ``import cudnn`` giving ``cudnn`` (None: not
    installed); kernels.gpu's caches emptied on entry and exit, CPU mode again afterwards."""
    from owlnet import backend
    saved = sys.modules.get("cudnn")
    with installed():
        sys.modules["cudnn"] = cudnn
        _clear_gpu_caches()
        backend.set_mode_gpu()
        try:
            yield module
        finally:
            backend.set_mode_cpu()
            _clear_gpu_caches()
            if saved is None:
                sys.modules.pop("cudnn", None)
            else:
                sys.modules["cudnn"] = saved
