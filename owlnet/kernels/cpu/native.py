"""The compiled CPU kernels of ``native.c``, loaded through ctypes.

``native.c`` is built into ``_native<suffix>.so`` beside this file when owlnet is installed
(``pip install`` / ``make install``: pyproject.toml's ext-modules, a C compiler needed).
ctypes releases the GIL for the length of a call, so pieces of one operation run side by side
on the worker threads of ``..threads``. Arrays travel as addresses (``address``): the caller
makes sure they are C-contiguous and of the function's element type.
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import threading
import weakref
from pathlib import Path

import numpy as np

from .. import threads
from ...errors import OwlnetError

_POINTER, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_POOL_GEOMETRY = [_INT] * 10

# Argument types of every function Python calls (each exists as name_f32 and name_f64).
_SIGNATURES = {
    "pool_bands": [_INT] + [_POINTER] * 6 + [_INT, _I64] + _POOL_GEOMETRY + [_INT, _INT],
    "conv_direct_forward_framed": [_POINTER, _POINTER, _I64] + [_INT] * 7
    + [_POINTER, _INT, _POINTER, _POINTER, _INT, _POINTER, _I64, _I64] + [_INT] * 4
    + [_POINTER, _INT, _POINTER, _POINTER, _INT, _INT, _INT],
    "conv_direct_backward_filter_framed": [_POINTER, _POINTER, _I64] + [_INT] * 7
    + [_POINTER, _INT, _POINTER, _I64, _POINTER, _I64, _I64, _I64] + [_INT] * 5
    + [_POINTER, _POINTER, _INT, _INT],
    "col2im": [_POINTER, _POINTER] + [_INT] * 16,
    "channel_bands": [_INT] + [_POINTER] * 8 + [_I64, _INT, _I64, _INT, ctypes.c_double, _INT,
                                                _INT],
    "depthwise_forward": [_POINTER, _POINTER, _I64] + [_INT] * 6 + [_POINTER, _INT, _POINTER,
                                                                    _POINTER] + [_INT] * 6
    + [_POINTER, _INT, _POINTER, _POINTER, _INT, _INT],
    "depthwise_backward_filter": [_POINTER, _POINTER] + [_INT] * 6 + [_POINTER, _INT, _POINTER,
                                                                      _POINTER, _I64]
    + [_INT] * 8,
    "depthwise_backward_data": [_POINTER] * 4 + [_I64] + [_INT] * 18,
    "few_rows_product": [_POINTER, _I64, _POINTER, _I64, _POINTER, _I64] + [_INT] * 5,
    "conv_direct_tile": [_INT],
    "winograd_forward": [_POINTER] * 5 + [_INT] * 16 + [_POINTER, _POINTER, _INT, _INT],
    "winograd_backward_filter": [_POINTER] * 3 + [_INT] * 15,
}
# Functions that return an int (the others return nothing).
_RETURNS_INT = ("conv_direct_tile", "winograd_forward", "winograd_backward_filter")
# The direct and Winograd convolutions' (Winograd's float32 only), whose AVX-512 builds come
# in two vector sizes (``function``).
_VECTOR_SIZED = ("conv_direct_forward_framed", "conv_direct_backward_filter_framed",
                 "conv_direct_tile", "winograd_forward", "winograd_backward_filter")
# Functions whose last arguments are of the element type: (other arguments, how many).
_TYPED_LAST = {"lrn_forward": ([_POINTER] * 4 + [_I64, _INT, _I64, _INT], 3),
               "lrn_backward": ([_POINTER] * 6 + [_I64, _INT, _I64, _INT], 1),
               "sgd_step": ([_POINTER] * 3 + [_I64, _INT], 3)}
_SCALARS = {"f32": ctypes.c_float, "f64": ctypes.c_double}
_SUFFIXES = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}

_lock = threading.Lock()
_library = []           # the loaded library, once loaded
_builds = {}            # vector bytes (None: the other kernels) -> the build bound
_functions = {}         # (name, dtype, vector bytes) -> the bound function


class NativeKernelsMissing(OwlnetError):
    """owlnet was installed without its compiled CPU kernels."""


def _library_path() -> Path:
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_native{suffix}"
        if path.exists():
            return path
    raise NativeKernelsMissing(
        f"owlnet's compiled CPU kernels are missing: no _native library beside {here / 'native.c'}"
        " (they are built when owlnet is installed: run `make install` or "
        "`pip install -e .` with a C compiler on the PATH)")


def _loaded():
    """The library, loaded on first use (then which builds its kernels come in is known)."""
    if not _library:
        with _lock:
            if not _library:
                library = ctypes.CDLL(str(_library_path()))
                library.pieces_park.argtypes, library.pieces_park.restype = [], None
                threads.before_parallel.append(library.pieces_park)
                # Vectorised kernels come as name_fast (AVX2 with FMA) and name_baseline; the
                # direct convolution's also as name_wide (64-byte vectors) and name_wide_half
                # (32) for AVX-512.
                variant = "fast" if library.has_avx2_fma() else "baseline"
                _builds.update({None: variant, 32: "wide_half", 64: "wide"}
                               if library.has_avx512() else {None: variant, 32: variant})
                _library.append(library)
    return _library[0]


def vector_sizes() -> list:
    """The vector sizes (bytes) the direct and Winograd convolutions come in on this CPU: [32],
    or [32, 64] with AVX-512."""
    _loaded()
    return sorted(size for size in _builds if size)


def function(name, dtype, vector_bytes=32):
    """The compiled ``name`` for elements of ``dtype`` (float32 or float64); for the direct
    and Winograd convolutions', the build with vectors of ``vector_bytes`` (one of
    ``vector_sizes()``)."""
    key = (name, np.dtype(dtype), vector_bytes)
    found = _functions.get(key)
    if found is None:
        found = _functions.setdefault(key, _bind(*key))
    return found


def _bind(name, dtype, vector_bytes):
    library = _loaded()
    if dtype not in _SUFFIXES:
        raise TypeError(f"owlnet's CPU kernel {name} takes float32 or float64 arrays, "
                        f"not {dtype}")
    suffix = _SUFFIXES[dtype]
    build = _builds[vector_bytes if name in _VECTOR_SIZED else None]
    symbol = f"{name}_{suffix}"
    if hasattr(library, f"{symbol}_{build}"):
        symbol = f"{symbol}_{build}"
    function = getattr(library, symbol)
    if name in _TYPED_LAST:
        arguments, count = _TYPED_LAST[name]
        function.argtypes = arguments + [_SCALARS[suffix]] * count
    else:
        function.argtypes = _SIGNATURES[name]
    function.restype = ctypes.c_int if name in _RETURNS_INT else None
    return function


_addresses = {}         # id(array) -> (weak reference to the array, its data address)


def address(array, first=0):
    """The address of ``array``'s element ``first`` (flat, C order). An array's address is
    asked for once and kept while the array lives (``array.ctypes`` makes an object at each
    call: about a microsecond, a few hundred times a small net's forward); owlnet never
    moves an array's data (no ndarray.resize)."""
    entry = _addresses.get(id(array))
    if entry is None or entry[0]() is not array:
        key = id(array)
        entry = (weakref.ref(array, lambda _, key=key: _addresses.pop(key, None)),
                 array.ctypes.data)
        _addresses[key] = entry
    return entry[1] + first * array.itemsize


def addresses(*arrays):
    """Each array's address, None (a null pointer) for None."""
    return [None if array is None else address(array) for array in arrays]
