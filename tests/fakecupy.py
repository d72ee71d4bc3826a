"""A stand-in for CuPy backed by NumPy, to run owlnet's GPU code paths on the CPU.

Device arrays are :class:`DeviceArray` (a NumPy subclass with CuPy's ``.get()``, ``.set()``,
``.data.ptr``) and the module counts host <-> device transfers in ``transfers``. It is as
strict as CuPy where CuPy refuses things: a ufunc or NumPy function mixing a host array with
a device array raises TypeError, and so does ``device[...] = host_array`` ("non-scalar
numpy.ndarray cannot be used for fill"). ``ElementwiseKernel`` runs the kernel body through
the C harness (tests/cuda_harness.py), so kernels.gpu executes owlnet's real kernel bodies.

Use :func:`installed` (a context manager) to put the module in ``sys.modules['cupy']`` and
restore what was there, or :func:`fake_gpu` to also run owlnet in GPU mode on it.
"""
from __future__ import annotations

import contextlib
import sys
import types
from collections import Counter

import numpy as np

import cuda_harness
from owlnet.kernels import cuda_sources

transfers = Counter()      # "to_device" / "to_host" -> count


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
    """An array "on the device": NumPy storage, CuPy's manners."""

    @property
    def data(self):
        return _Memory(self)

    def get(self, out=None):
        transfers["to_host"] += 1
        if out is None:
            return np.array(self.view(np.ndarray))
        out[...] = self.view(np.ndarray)
        return out

    def set(self, host, stream=None):
        transfers["to_device"] += 1
        if stream is not None:
            stream.log.append(("copy", stream.name))
        self.view(np.ndarray)[...] = host

    def __setitem__(self, key, value):
        if _is_host(value):
            raise TypeError("non-scalar numpy.ndarray cannot be used for fill")
        super().__setitem__(key, value)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        outs = kwargs.get("out", ())
        _refuse_mixing(inputs + tuple(outs), ufunc.__name__)
        plain = [i.view(np.ndarray) if isinstance(i, DeviceArray) else i for i in inputs]
        if outs:
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, DeviceArray) else o
                                  for o in outs)
        result = getattr(ufunc, method)(*plain, **kwargs)
        if outs:
            return outs[0] if len(outs) == 1 else outs
        return _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        flat = list(args) + list(kwargs.values())
        flat += [v for a in args if isinstance(a, (list, tuple)) for v in a]
        _refuse_mixing(flat, func.__name__)
        return _wrap(super().__array_function__(func, types_, args, kwargs))

    def __float__(self):
        return float(self.view(np.ndarray))


def _wrap(result):
    if isinstance(result, tuple):
        return tuple(_wrap(r) for r in result)
    if isinstance(result, np.ndarray):
        return result.view(DeviceArray)
    if isinstance(result, np.generic):
        return np.asarray(result).view(DeviceArray)
    return result


def asarray(value, dtype=None):
    if isinstance(value, DeviceArray):
        return value if dtype is None else value.astype(dtype, copy=False)
    if isinstance(value, np.ndarray) and value.ndim > 0:
        transfers["to_device"] += 1
    return np.array(value, dtype=dtype).view(DeviceArray)


def asnumpy(value):
    return value.get() if isinstance(value, DeviceArray) else np.asarray(value)


def get_array_module(*values):
    return module if any(isinstance(v, DeviceArray) for v in values) else np


def _creator(name):
    def create(*args, **kwargs):
        return getattr(np, name)(*args, **kwargs).view(DeviceArray)
    create.__name__ = name
    return create


def _like(name):
    """``zeros_like`` and kin, built from the shape (NumPy's own copies a host array in)."""
    def create(array, dtype=None, **kwargs):
        return getattr(np, name)(array.shape, dtype=dtype or array.dtype, **kwargs) \
            .view(DeviceArray)
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
        host = [a.view(np.ndarray) if isinstance(a, DeviceArray) else a for a in args]
        if any(isinstance(a, np.ndarray) and not isinstance(a, DeviceArray) for a in args):
            raise TypeError(f"{self.source.name}: a host array given to a device kernel")
        cuda_harness.c_kernel(self.source, dtype)(*host, end=size)
        return args[-1]


class _Device:
    def __init__(self, index=0):
        self.id = int(index)

    def use(self):
        pass

    def synchronize(self):
        pass


class _Event:
    def __init__(self, stream, number):
        self.stream, self.number = stream, number

    def synchronize(self):
        _Stream.log.append(("host waits", self.stream.name, self.number))


class _Stream:
    """Streams and events that only log what is asked of them (in ``_Stream.log``)."""
    ptr = 0
    log: list = []
    count = 0

    def __init__(self, non_blocking=False, name=None):
        _Stream.count += 1
        self.name = name or f"stream{_Stream.count}"
        self.events = 0

    def record(self):
        self.events += 1
        self.log.append(("record", self.name, self.events))
        return _Event(self, self.events)

    def wait_event(self, event):
        self.log.append(("wait", self.name, event.stream.name, event.number))


_COMPUTE = _Stream(name="compute")
cuda = types.SimpleNamespace(Device=_Device, Stream=_Stream, get_current_stream=lambda: _COMPUTE,
                             alloc_pinned_memory=lambda nbytes: bytearray(nbytes),
                             runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))

class _MemoryPool:
    """CuPy's default memory pool, as far as owlnet asks it (nothing is cached here)."""
    frees = 0

    def free_all_blocks(self):
        _MemoryPool.frees += 1

    def total_bytes(self):
        return 0


module = types.ModuleType("cupy")
for _name in ("zeros", "empty", "ones", "full", "arange", "ascontiguousarray", "array"):
    setattr(module, _name, _creator(_name))
for _name in ("zeros", "empty", "ones"):
    setattr(module, f"{_name}_like", _like(_name))
for _name, _value in dict(asarray=asarray, asnumpy=asnumpy, get_array_module=get_array_module,
                          ndarray=ndarray, ElementwiseKernel=ElementwiseKernel, cuda=cuda,
                          DeviceArray=DeviceArray, transfers=transfers,
                          get_default_memory_pool=_MemoryPool).items():
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
    saved = {name: sys.modules.get(name) for name in _MODULES}
    sys.modules.update(_MODULES)
    transfers.clear()
    linalg.compute_types.clear()
    try:
        yield module
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def _clear_gpu_caches():
    """kernels.gpu keeps kernels, plans, handles and workspaces per process: a fake's must not
    outlive the fake (nor a real device's leak into it)."""
    from owlnet.kernels import gpu
    for cache in (gpu._plans, gpu._handles, gpu._workspaces):
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
