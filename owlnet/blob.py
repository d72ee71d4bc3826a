"""Blob: an N-d array of data and the gradient (diff) of the loss with respect to it."""
from __future__ import annotations

import math

import numpy as np

from . import backend
from .errors import ShapeError
from .fileio import max_blob_elements


class Blob:
    """Data and diff of one shape, as pycaffe's Blob.

    ``data`` and ``diff`` are the arrays themselves (NumPy on the CPU), so writes through
    ``blob.data[...] = x`` are seen by the next ``forward``. ``reshape`` keeps the arrays when
    the shape is unchanged and reallocates (zeroed) otherwise.
    """

    __slots__ = ("_data", "_diff", "name")

    def __init__(self, shape=(), dtype=None, name: str = ""):
        self.name = name
        self._data = None
        self._diff = None
        self._alloc(tuple(int(s) for s in shape), dtype or backend.dtype())

    def _alloc(self, shape, dtype):
        for s in shape:
            if s < 0:
                raise ShapeError(f"blob '{self.name}': negative dimension in shape {shape}")
        limit = max_blob_elements()
        if math.prod(shape) > limit:
            raise ShapeError(f"blob '{self.name}': shape {shape} has {math.prod(shape)} elements, "
                             f"over the limit of {limit} (OWLNET_MAX_BLOB_ELEMENTS)")
        xp = backend.xp()
        self._data = xp.zeros(shape, dtype=dtype)
        self._diff = xp.zeros(shape, dtype=dtype)

    # -- shape ---------------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return tuple(self._data.shape)

    @property
    def count(self) -> int:
        return int(self._data.size)

    @property
    def num_axes(self) -> int:
        return self._data.ndim

    def _legacy(self, axis):
        return self.shape[axis] if self.num_axes > axis else 1

    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    def reshape(self, *shape) -> None:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        shape = tuple(int(s) for s in shape)
        if shape == self.shape:
            return
        if int(np.prod(shape, dtype=np.int64)) == self.count and self.count > 0:
            self._data = self._data.reshape(shape)
            self._diff = self._diff.reshape(shape)
            return
        self._alloc(shape, self._data.dtype)

    def reshape_like(self, other: "Blob") -> None:
        self.reshape(other.shape)

    def count_from(self, start: int, end: int | None = None) -> int:
        dims = self.shape[start:end]
        return int(np.prod(dims, dtype=np.int64)) if dims else 1

    def canonical_axis(self, axis: int) -> int:
        n = self.num_axes
        if not -n <= axis < max(n, 1):
            raise ShapeError(f"axis {axis} out of range for blob '{self.name}' of shape {self.shape}")
        return axis % n if n else 0

    # -- arrays --------------------------------------------------------------------------
    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        self._assign("_data", value)

    @property
    def diff(self):
        return self._diff

    @diff.setter
    def diff(self, value):
        self._assign("_diff", value)

    def _assign(self, slot, value):
        target = getattr(self, slot)
        value = backend.array_module(target).asarray(value)
        if value.shape != target.shape:
            raise ShapeError(f"blob '{self.name}': cannot assign an array of shape "
                             f"{tuple(value.shape)} to a blob of shape {self.shape}")
        target[...] = value

    def share_data(self, other: "Blob") -> None:
        """Use ``other``'s data array (Caffe's ShareData): both see the same values."""
        self._data = other._data

    def bind(self, data, diff) -> None:
        """Use the arrays ``data`` and ``diff`` (of this blob's shape; views into a parameter
        arena) as this blob's data and diff."""
        self._data, self._diff = data, diff

    def share_diff(self, other: "Blob") -> None:
        self._diff = other._diff

    def __repr__(self):
        return f"Blob({self.name!r}, shape={self.shape})"
