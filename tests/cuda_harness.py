"""Run and compile owlnet's CUDA kernel bodies without a GPU.

* :func:`c_kernel` builds one ``cuda_sources.Elementwise`` entry with the system C compiler,
  its body inside ``for (i = begin; i < end; ++i) { ... }`` with ``typedef float T;`` (or
  double), and returns a callable with CuPy's calling convention (inputs, then outputs).
  Non-raw arrays hold the elements ``begin .. end - 1`` only, so a slice of a huge launch
  (AlexNet conv1 at batch 128) can be checked without computing all of it.
* :func:`cupy_program` is the CUDA source CuPy itself generates for such a kernel, with the
  options CuPy compiles it with, which tests hand to NVRTC.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from owlnet.kernels import cuda_sources

_C_TYPES = {"int32": ("int", ctypes.c_int32, np.int32), "int64": ("long long", ctypes.c_int64, np.int64),
            "uint32": ("unsigned int", ctypes.c_uint32, np.uint32),
            "uint64": ("unsigned long long", ctypes.c_uint64, np.uint64),
            "float32": ("float", ctypes.c_float, np.float32),
            "float64": ("double", ctypes.c_double, np.float64),
            "uint8": ("unsigned char", None, np.uint8)}
_T_NAMES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
# Builds are cached by the hash of their source, across runs (a changed body is a new file).
_BUILD_DIR = Path(tempfile.gettempdir()) / f"owlnet-c-harness-{os.getuid()}"


def params(text):
    """``"raw T x, int32 n"`` -> ``[(raw, type, name), ...]``."""
    out = []
    for item in text.split(","):
        words = item.split()
        if not words:
            continue
        raw = words[0] == "raw"
        if raw:
            words = words[1:]
        out.append((raw, words[0], words[1]))
    return out


def _c_type(type_name, t_name):
    return t_name if type_name == "T" else _C_TYPES[type_name][0]


def _signature(source, t_name, pointer, binding):
    """(arguments, bindings) of a kernel: raw arrays as pointers, non-raw arrays as a pointer
    named ``pointer`` plus ``binding`` (the name as element i), scalars by value."""
    args, bindings = [], []
    arrays = _array_names(source)
    for raw, type_name, name in params(source.in_params) + params(source.out_params):
        c_type = _c_type(type_name, t_name)
        if raw:
            args.append(f"{c_type}* {name}")
        elif name in arrays:
            args.append(f"{c_type}* {pointer.format(name=name)}")
            bindings.append(binding.format(name=name, c_type=c_type))
        else:
            args.append(f"{c_type} {name}")
    return args, bindings


def c_source(source: cuda_sources.Elementwise, t_name: str = "float") -> str:
    """The C translation unit of one kernel: ``void owl_run(begin, end, params...)``."""
    args, macros = _signature(source, t_name, "{name}_window",
                              "#define {name} ({name}_window[i - begin])")
    return "\n".join([
        f"typedef {t_name} T;",
        "#include <math.h>",
        cuda_sources.FUNCTION_PREFIX, source.preamble,
        f"void owl_run(long long begin, long long end, {', '.join(args)}) {{",
        *macros,
        "    for (long long i = begin; i < end; ++i) {",
        source.body,
        "    }",
        "}"])


def _array_names(source):
    """Non-raw parameters passed arrays (the registry's ``arrays``); the others are scalars."""
    return set(source.arrays)


@functools.cache
def _compiled(source: cuda_sources.Elementwise, t_name: str):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler")
    text = c_source(source, t_name)
    digest = hashlib.sha1(text.encode()).hexdigest()[:16]
    _BUILD_DIR.mkdir(exist_ok=True)
    library = _BUILD_DIR / f"{source.name}_{digest}.so"
    if not library.exists():
        c_file = _BUILD_DIR / f"{source.name}_{digest}.{os.getpid()}.c"
        c_file.write_text(text)
        partial = c_file.with_suffix(".so")
        done = subprocess.run([compiler, "-O2", "-std=c99", "-Wall", "-Werror", "-shared",
                               "-fPIC", "-o", str(partial), str(c_file), "-lm"],
                              capture_output=True, text=True)
        c_file.unlink()
        if done.returncode:
            raise RuntimeError(f"{source.name} does not build as C:\n{done.stderr}")
        os.replace(partial, library)
    return ctypes.CDLL(str(library)).owl_run


def c_kernel(source: cuda_sources.Elementwise, dtype=np.float32):
    """A callable ``kernel(*inputs, *outputs, begin=0, end=None)`` running the C build;
    ``end`` defaults to ``begin`` + the size of the non-raw arrays (required when all are raw)."""
    t_name = _T_NAMES[np.dtype(dtype)]
    function = _compiled(source, t_name)
    specs = params(source.in_params) + params(source.out_params)
    arrays = _array_names(source)

    def run(*values, begin=0, end=None):
        if len(values) != len(specs):
            raise TypeError(f"{source.name} takes {len(specs)} arguments, got {len(values)}")
        if end is None:
            end = begin + next(np.asarray(v).size for (raw, _, name), v in zip(specs, values)
                               if not raw and name in arrays)
        c_args = [ctypes.c_longlong(begin), ctypes.c_longlong(end)]
        for (raw, type_name, name), value in zip(specs, values):
            if raw or name in arrays:
                want = np.dtype(dtype) if type_name == "T" else np.dtype(_C_TYPES[type_name][2])
                if not (isinstance(value, np.ndarray) and value.dtype == want
                        and value.flags.c_contiguous):
                    raise TypeError(f"{source.name}: {name} must be a C-contiguous {want} array")
                if not raw and value.size != end - begin:
                    raise ValueError(f"{source.name}: {name} holds {value.size} elements for "
                                     f"indices {begin}..{end - 1}")
                c_args.append(ctypes.c_void_p(value.ctypes.data))
            elif type_name == "T":
                c_args.append((ctypes.c_float if t_name == "float" else ctypes.c_double)(value))
            else:
                c_args.append(_C_TYPES[type_name][1](value))
        function(*c_args)

    return run


def cupy_program(source: cuda_sources.Elementwise, dtype=np.float32, raw_ndim: int = 1,
                 index_32_bits: bool = True):
    """The CUDA source CuPy generates for this kernel (its own code generator, no device
    needed) and the NVRTC options CuPy compiles it with, for sm_90: ``(source, options)``.
    ``raw_ndim`` is the number of axes of the raw arrays passed; non-raw arrays are contiguous
    (CuPy collapses them to one axis). Uses CuPy internals: raises AttributeError or TypeError
    when a CuPy version lacks them."""
    import cupy
    from cupy._core import _carray, _kernel, core
    kernel = cupy.ElementwiseKernel(source.in_params, source.out_params, source.body,
                                    source.name, preamble=cuda_sources.FUNCTION_PREFIX +
                                    source.preamble)
    dtype = np.dtype(dtype)
    array_kind, indexer_kind, scalar_kind = 1, 2, 3       # CuPy's _ArgKind values
    infos = []
    for param in kernel.params:
        if param.name == "_ind":
            infos.append(_kernel._ArgInfo(indexer_kind, _carray.Indexer, None, 1, True,
                                          index_32_bits))
            continue
        param_dtype = dtype if param.dtype is None else np.dtype(param.dtype)
        if param.raw or param.name in source.arrays:
            infos.append(_kernel._ArgInfo(array_kind, cupy.ndarray, param_dtype,
                                          raw_ndim if param.raw else 1, True, index_32_bits))
        else:
            infos.append(_kernel._ArgInfo(scalar_kind, param_dtype.type, param_dtype, 0, True,
                                          index_32_bits))
    code = _kernel._get_elementwise_kernel_code(
        tuple(infos), _kernel._TypeMap((("T", dtype),)), kernel.params, kernel.operation,
        kernel.name, kernel.preamble)
    options = ["--gpu-architecture=sm_90", f"-I{core._get_header_dir_path()}",
               *core._get_cccl_include_options(), "-ftz=true", "--std=c++17"]
    return "#include <cupy/carray.cuh>\n" + code, options
