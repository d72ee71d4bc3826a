"""Small array functions shared by the layers and the tools (NumPy or CuPy alike)."""
from __future__ import annotations

from . import backend


def softmax(x, axis):
    """Numerically stable softmax of ``x`` along ``axis``:
    ``exp(x - max) / sum(exp(x - max))``."""
    xp = backend.array_module(x)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e
