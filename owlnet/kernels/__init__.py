"""Per-device kernels behind one name set: ``kernels.get(xp).conv_forward(...)``.

``cpu`` serves NumPy arrays; ``gpu``, with the same function names, serves CuPy arrays. Each
module chooses and runs its own algorithm for a call; layers only call the entry point.
``gpu`` is imported on first use (it imports CuPy only when a kernel runs).
"""
from __future__ import annotations

from . import cpu


def get(xp):
    """The kernel module for the array module ``xp`` (numpy or cupy)."""
    if xp.__name__ == "numpy":
        return cpu
    from . import gpu  # noqa: PLC0415  (not needed, nor imported, on CPU-only installs)
    return gpu
