"""Counter-based random numbers: the same bits on every device, from (seed, iteration, layer).

``bits(key, count)`` gives 32 random bits for each element index ``0 .. count - 1`` of a draw,
each a pure function of (key, index): no generator state to carry, save or replay, so a
resumed run draws what the uninterrupted run drew, and the GPU kernel (``owl_random`` in
``cuda_sources.RANDOM_PREAMBLE``) and NumPy here produce the same numbers. The mixing step is
a murmur3-style 32-bit finaliser (xor-shift, multiply, xor-shift, multiply, xor-shift), used
twice per element; ``draw_key(seed, iteration, layer)`` folds the three counters the same way.
Dropout follows Caffe: keep where the bits are above ``threshold(ratio) = ratio * UINT_MAX``.
"""
from __future__ import annotations

import zlib

import numpy as np

_MASK = 0xFFFFFFFF
_M1, _M2 = 0x7FEB352D, 0x846CA68B
_GOLDEN = 0x9E3779B9


def _mix(v):
    """The 32-bit mix, on a uint32 array (wrapping arithmetic) or a Python int."""
    if isinstance(v, int):
        v &= _MASK
        v ^= v >> 16
        v = (v * _M1) & _MASK
        v ^= v >> 15
        v = (v * _M2) & _MASK
        return v ^ (v >> 16)
    v = v ^ (v >> np.uint32(16))
    v *= np.uint32(_M1)
    v ^= v >> np.uint32(15)
    v *= np.uint32(_M2)
    return v ^ (v >> np.uint32(16))


def layer_number(layer) -> int:
    """A layer index as it is, a layer name as its CRC-32."""
    return zlib.crc32(layer.encode()) if isinstance(layer, str) else int(layer)


def draw_key(seed: int, iteration: int, layer) -> int:
    """The 32-bit key of one draw; ``layer`` is an index or a layer name."""
    return _mix(_mix(_mix(int(seed)) ^ (int(iteration) & _MASK) ^ _mix(int(iteration) >> 32))
                ^ _mix(layer_number(layer)))


def key_parts(seed: int, layer) -> tuple:
    """``(mix(seed), mix(layer))``: the parts of :func:`draw_key` that do not change with the
    iteration, for a kernel that folds in the iteration itself."""
    return _mix(int(seed)), _mix(layer_number(layer))


def bits(key: int, count: int, start: int = 0) -> np.ndarray:
    """``owl_random(key, i)`` for ``i = start .. start + count - 1`` as uint32."""
    index = np.arange(start, start + count, dtype=np.uint64)
    high = _mix((index >> np.uint64(32)).astype(np.uint32) + np.uint32(_GOLDEN))
    return _mix(np.uint32(key) ^ _mix(index.astype(np.uint32) ^ high))


def threshold(ratio: float) -> int:
    """Caffe's dropout threshold: an element is kept where its bits exceed this."""
    return int(float(ratio) * _MASK)


def dropout_keep(key: int, shape, ratio: float) -> np.ndarray:
    """The dropout mask (True: kept) of a draw over an array of ``shape``."""
    return (bits(key, int(np.prod(shape, dtype=np.int64))) > threshold(ratio)).reshape(shape)
