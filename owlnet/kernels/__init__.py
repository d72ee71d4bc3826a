"""Per-device helper functions behind one name set: ``kernels.get(xp).im2col(...)``.

``cpu`` serves NumPy arrays; a ``gpu`` module with the same function names serves CuPy.
"""
from __future__ import annotations

import importlib

_MODULE_FOR = {"numpy": "cpu", "cupy": "gpu"}


def get(xp):
    """The kernel module for the array module ``xp`` (numpy or cupy)."""
    return importlib.import_module(f".{_MODULE_FOR[xp.__name__]}", __name__)
