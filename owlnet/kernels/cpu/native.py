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
from pathlib import Path

import numpy as np

from .. import threads
from ...errors import OwlnetError

_POINTER, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_POOL_GEOMETRY = [_INT] * 10

# Argument types of every function Python calls (each exists as name_f32 and name_f64).
_SIGNATURES = {
    "pool_forward": [_POINTER] * 4 + [_INT, _I64] + _POOL_GEOMETRY,
    "max_pool_backward": [_POINTER, _POINTER, _POINTER, _I64] + _POOL_GEOMETRY,
    "ave_pool_backward": [_POINTER, _POINTER, _I64] + _POOL_GEOMETRY,
    "conv_direct_forward_framed": [_POINTER, _POINTER, _I64] + [_INT] * 7
    + [_POINTER, _INT, _POINTER, _POINTER, _I64, _I64] + [_INT] * 4 + [_POINTER, _INT, _INT],
    "conv_direct_backward_filter_framed": [_POINTER, _POINTER, _I64] + [_INT] * 7
    + [_POINTER, _INT, _POINTER, _I64, _POINTER, _I64, _I64, _I64] + [_INT] * 5
    + [_POINTER, _POINTER, _INT, _INT],
    "col2im": [_POINTER, _POINTER] + [_INT] * 16,
    "batch_norm_backward": [_POINTER] * 8 + [_I64, _INT, _I64, _INT, _INT],
    "channel_pass": [_POINTER] * 6 + [_I64, _INT, _I64, _INT, _INT],
    "scale_forward": [_POINTER] * 5 + [_I64, _INT, _I64, _INT, _INT, _INT],
    "relu_backward": [_POINTER] * 3 + [_I64],
    "depthwise_forward": [_POINTER, _POINTER] + [_INT] * 6 + [_POINTER, _INT, _POINTER, _POINTER,
                                                              _I64] + [_INT] * 8,
    "depthwise_backward_filter": [_POINTER, _POINTER] + [_INT] * 6 + [_POINTER, _INT, _POINTER,
                                                                      _POINTER, _I64]
    + [_INT] * 8,
    "depthwise_backward_data": [_POINTER] * 4 + [_I64] + [_INT] * 18,
}
# Functions whose last arguments are of the element type: (other arguments, how many).
_TYPED_LAST = {"batch_norm_forward": ([_POINTER] * 8 + [_I64, _INT, _I64, _INT, _INT, _INT], 1),
               "lrn_forward": ([_POINTER] * 4 + [_I64, _INT, _I64, _INT], 3)}
_SCALARS = {"f32": ctypes.c_float, "f64": ctypes.c_double}
_SUFFIXES = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}

_functions = {}
_lock = threading.Lock()


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


def _load():
    library = ctypes.CDLL(str(_library_path()))
    # Vectorised kernels come as name_fast (AVX2 with FMA) and name_baseline.
    variant = "fast" if library.has_avx2_fma() else "baseline"
    loaded = {}
    for dtype, suffix in _SUFFIXES.items():
        signatures = dict(_SIGNATURES)
        signatures.update({name: arguments + [_SCALARS[suffix]] * count
                           for name, (arguments, count) in _TYPED_LAST.items()})
        for name, arguments in signatures.items():
            symbol = f"{name}_{suffix}"
            if hasattr(library, f"{symbol}_{variant}"):
                symbol = f"{symbol}_{variant}"
            function = getattr(library, symbol)
            function.argtypes, function.restype = arguments, None
            loaded[name, dtype] = function
    library.pieces_park.argtypes, library.pieces_park.restype = [], None
    threads.before_parallel.append(library.pieces_park)
    _functions.update(loaded)


def function(name, dtype):
    """The compiled ``name`` for elements of ``dtype`` (float32 or float64)."""
    if not _functions:
        with _lock:
            if not _functions:
                _load()
    try:
        return _functions[name, np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"owlnet's CPU kernel {name} takes float32 or float64 arrays, "
                        f"not {np.dtype(dtype)}") from None


def address(array, first=0):
    """The address of ``array``'s element ``first`` (flat, C order)."""
    return array.ctypes.data + first * array.itemsize


def addresses(*arrays):
    """Each array's address, None (a null pointer) for None."""
    return [None if array is None else address(array) for array in arrays]
