"""The array module (NumPy on the CPU, CuPy on the GPU), the device, the dtype and the RNG.

Layers never import numpy or cupy for their math: they take ``xp = array_module(blob)``
so one code path serves both devices. Only ``owlnet.kernels`` holds per-device code.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np

_state = {
    "mode": "cpu",        # "cpu" | "gpu"
    "device": 0,
    "dtype": np.float32,  # tests switch to float64 for gradient checks
    "math": os.environ.get("OWLNET_MATH", "fp32"),
}
_rng = np.random.default_rng(0)


def mode() -> str:
    return _state["mode"]


def set_mode_cpu() -> None:
    _state["mode"] = "cpu"


def set_mode_gpu() -> None:
    import_cupy()
    _state["mode"] = "gpu"
    import_cupy().cuda.Device(_state["device"]).use()


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
    """numpy or cupy, whichever owns ``array``."""
    if isinstance(array, np.ndarray):
        return np
    return import_cupy().get_array_module(array)


def to_host(array) -> np.ndarray:
    return array if isinstance(array, np.ndarray) else array.get()


def to_device(array):
    """Move a host array to the current mode's device (no copy on the CPU)."""
    if _state["mode"] == "gpu":
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


def set_random_seed(seed: int) -> None:
    """Seed the generator used by fillers, dropout masks, random crops and shuffles."""
    global _rng
    _rng = np.random.default_rng(int(seed))


def rng() -> np.random.Generator:
    """The global host generator (its state is saved with a snapshot)."""
    return _rng


def set_rng(generator: np.random.Generator) -> None:
    global _rng
    _rng = generator
