"""The array module (NumPy on the CPU, CuPy on the GPU), the device, the dtype, the RNG, the
blob size limit, and where blob arrays live (the device scope).

Layers never import numpy or cupy for their math: they take ``xp = array_module(blob)``
so one code path serves both devices. Only ``owlnet.kernels`` holds per-device code.

Device scope: a blob's ``data``/``diff`` are host NumPy arrays (pycaffe's view) except inside
``device_arrays()``, where they are the arrays the engine computes on (CuPy in GPU mode).
The net, the solver and the trainers run inside it; user code runs outside. On the CPU both
are the same NumPy arrays. The scope is per thread.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading

import numpy as np

_state = {
    "mode": "cpu",        # "cpu" | "gpu"
    "device": 0,
    "dtype": np.float32,  # tests switch to float64 for gradient checks
    "math": os.environ.get("OWLNET_MATH", "fp32"),
    "autotune": os.environ.get("OWLNET_CUDNN_AUTOTUNE", "0") == "1",
}
_rng = np.random.default_rng(0)
_scope = threading.local()

#: Largest number of elements in one blob (2^31: 8 GiB of float32); the environment variable
#: OWLNET_MAX_BLOB_ELEMENTS overrides it. Files declaring bigger blobs are refused with it too.
MAX_BLOB_ELEMENTS = 2 ** 31


def max_blob_elements() -> int:
    """The blob size limit: $OWLNET_MAX_BLOB_ELEMENTS when set, else MAX_BLOB_ELEMENTS."""
    value = os.environ.get("OWLNET_MAX_BLOB_ELEMENTS")
    if not value:
        return MAX_BLOB_ELEMENTS
    try:
        return int(value)
    except ValueError:
        from .errors import ConfigError
        raise ConfigError(f"OWLNET_MAX_BLOB_ELEMENTS={value!r} is not an integer") from None


def mode() -> str:
    return _state["mode"]


def set_mode_cpu() -> None:
    _state["mode"] = "cpu"


def set_mode_gpu() -> None:
    import_cupy()
    _state["mode"] = "gpu"
    import_cupy().cuda.Device(_state["device"]).use()
    _apply_math_mode()


def set_device(index: int) -> None:
    _state["device"] = int(index)
    if _state["mode"] == "gpu":
        import_cupy().cuda.Device(_state["device"]).use()


def device() -> int:
    return _state["device"]


def math_mode() -> str:
    """'fp32' (strict float32, the default) or 'tf32' (opt-in, GPU only)."""
    return _state["math"]


def set_math_mode(name: str) -> None:
    from .errors import ConfigError
    if name not in ("fp32", "tf32"):
        raise ConfigError(f"math mode must be 'fp32' or 'tf32', not {name!r}")
    _state["math"] = name
    if _state["mode"] == "gpu":
        _apply_math_mode()


def cudnn_autotune() -> bool:
    """Whether each new cuDNN convolution shape times every plan that fits the workspace and
    keeps the fastest (PyTorch's ``cudnn.benchmark``), rather than the heuristics' first
    choice. Off by default ($OWLNET_CUDNN_AUTOTUNE=1 turns it on): timings vary, so two
    runs may pick different plans and differ in the last bits."""
    return _state["autotune"]


def set_cudnn_autotune(on: bool) -> None:
    _state["autotune"] = bool(on)


def _apply_math_mode() -> None:
    """Make every CuPy matrix product of float32 follow the math mode: cuBLAS compute type
    32F_FAST_TF32 for "tf32", plain 32F for "fp32" (CuPy reads $CUPY_TF32 only once, at its
    first product; setting the compute type works at any time). cuDNN graphs follow the mode
    in kernels.gpu."""
    import importlib  # noqa: PLC0415
    linalg = importlib.import_module("cupy._core._routines_linalg")
    tf32 = _state["math"] == "tf32"
    linalg.set_compute_type(np.float32,
                            linalg.COMPUTE_TYPE_TF32 if tf32 else linalg.COMPUTE_TYPE_FP32)
    if not tf32 and os.environ.get("NVIDIA_TF32_OVERRIDE", "") not in ("", "0"):
        from . import logging as owl_logging  # noqa: PLC0415
        owl_logging.logger.warning("NVIDIA_TF32_OVERRIDE is set: the driver may use TF32 "
                                   "even in the strict fp32 math mode; unset it for fp32")


def import_cupy():
    """Import CuPy, with a clear error when the GPU extra is not installed."""
    try:
        import cupy  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the machine
        from .errors import OwlnetError
        raise OwlnetError("GPU mode needs CuPy: pip install 'owlnet[gpu]'") from exc
    return cupy


def xp():
    """The array module of the current mode."""
    return import_cupy() if _state["mode"] == "gpu" else np


def array_module(array):
    """numpy or cupy, whichever owns ``array`` (numpy whenever CuPy was never imported)."""
    cupy = sys.modules.get("cupy")
    if type(array) is np.ndarray or cupy is None:
        return np
    return cupy.get_array_module(array)


def to_host(array) -> np.ndarray:
    return array if type(array) is np.ndarray else array.get()


@contextlib.contextmanager
def device_arrays():
    """Inside (this thread): blob ``data``/``diff`` are the engine's device arrays and
    :func:`to_device` gives device arrays. Nests; also usable as a decorator."""
    _scope.depth = getattr(_scope, "depth", 0) + 1
    try:
        yield
    finally:
        _scope.depth -= 1


def in_device_scope() -> bool:
    """True inside :func:`device_arrays` in GPU mode: blob arrays are device arrays here."""
    return _state["mode"] == "gpu" and getattr(_scope, "depth", 0) > 0


def to_device(array):
    """A host array as the kind of array ``blob.data`` gives here: a device copy inside
    :func:`device_arrays` in GPU mode, else the NumPy array itself (no copy on the CPU)."""
    if in_device_scope():
        return import_cupy().asarray(array)
    return np.asarray(array)


def dtype():
    """The floating-point type of blobs created now (float32; float64 in gradient checks)."""
    return _state["dtype"]


@contextlib.contextmanager
def dtype_scope(new_dtype):
    old = _state["dtype"]
    _state["dtype"] = np.dtype(new_dtype).type
    try:
        yield
    finally:
        _state["dtype"] = old


_seed = {"value": None}


def set_random_seed(seed: int) -> None:
    """Seed the generator used by fillers, dropout masks, random crops and shuffles."""
    global _rng
    _rng = np.random.default_rng(int(seed))
    _seed["value"] = int(seed) & 0xFFFFFFFF


def random_seed() -> int:
    """The seed last given to :func:`set_random_seed` (the solver's ``random_seed``), else
    one drawn once for this process: the key of the GPU's counter-based draws (Dropout)."""
    if _seed["value"] is None:
        _seed["value"] = int.from_bytes(os.urandom(4), "little")
    return _seed["value"]


def rng() -> np.random.Generator:
    """The global host generator (its state is saved with a snapshot)."""
    return _rng


def set_rng(generator: np.random.Generator) -> None:
    global _rng
    _rng = generator
