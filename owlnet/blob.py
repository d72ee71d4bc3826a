"""Blob: an N-d array of data and the gradient (diff) of the loss with respect to it, each kept
on the host and the device and synchronised lazily, as Caffe's SyncedMemory."""
from __future__ import annotations

import math

import numpy as np

from . import backend
from .errors import ShapeError

HOST, DEVICE, SYNCED = "host", "device", "synced"


class SyncedArray:
    """One array with a host (NumPy) copy and a device copy, either allocated on first use.

    ``head`` says which copy is current: HOST (the device copy is stale), DEVICE (the host
    copy is stale) or SYNCED (both equal). :meth:`host` and :meth:`device` return the copy
    for writing (copying the other one in first when it is newer) and move the head there;
    :meth:`host_readonly` only reads. In CPU mode the device copy is the host copy: no
    transfers ever happen. A copy is always made into the existing array, so views handed out
    (an arena slice given to :meth:`rebind`) stay valid.
    """

    __slots__ = ("_host", "_device", "head")

    def __init__(self, host=None, device=None, head=HOST):
        self._host, self._device, self.head = host, device, head

    @classmethod
    def zeros(cls, shape, dtype):
        if backend.mode() == "gpu":
            return cls(device=backend.import_cupy().zeros(shape, dtype=dtype), head=DEVICE)
        return cls(host=np.zeros(shape, dtype=dtype), head=HOST)

    def _any(self):
        return self._host if self._host is not None else self._device

    @property
    def shape(self):
        return self._any().shape

    @property
    def dtype(self):
        return self._any().dtype

    def _download(self):
        if self._host is None:
            self._host = np.empty(self._device.shape, dtype=self._device.dtype)
        self._device.get(out=self._host)

    def host(self):
        """The host copy, to read or write: the device copy is stale afterwards."""
        if self.head == DEVICE:
            self._download()
        self.head = HOST
        return self._host

    def host_readonly(self):
        """The host copy, read-only (a non-writeable view); the device copy stays valid."""
        if self.head == DEVICE:
            self._download()
            self.head = SYNCED
        view = self._host.view()
        view.flags.writeable = False
        return view

    def device(self):
        """The device copy (the host copy in CPU mode), to read or write."""
        if backend.mode() != "gpu":
            return self.host()
        if self._device is None:
            self._device = backend.import_cupy().empty(self._host.shape, dtype=self._host.dtype)
        if self.head == HOST:
            self._device.set(self._host)
        self.head = DEVICE
        return self._device

    def rebind(self, array, keep_values: bool):
        """Use ``array`` (a device array in GPU mode, else NumPy) as the device copy from now
        on, first copying the current values into it if ``keep_values``."""
        if keep_values:
            array[...] = self.device().reshape(array.shape)
        if backend.mode() == "gpu" and type(array) is not np.ndarray:
            if self._host is not None and self._host.shape != array.shape:
                self._host = None                   # reallocated on the next download
            self._device, self.head = array, DEVICE
        else:
            self._host, self._device, self.head = array, None, HOST


class Blob:
    """Data and diff of one shape, as pycaffe's Blob.

    ``data`` and ``diff`` are host NumPy arrays, synchronised with the device on demand, so
    ``blob.data[...] = x`` is seen by the next ``forward`` and ``net.forward()`` returns NumPy
    arrays whatever the mode. Each access hands out the host copy for writing (as pycaffe's
    ``mutable_cpu_data``): take ``blob.data`` again after a forward rather than keeping an old
    reference. Inside ``backend.device_arrays()`` (where the net and the solver run) ``data``
    and ``diff`` are the device arrays instead; ``device_data``/``device_diff`` are always
    those, and ``read_data()``/``read_diff()`` are read-only host views that leave the device
    copy valid. On the CPU all of these are the same NumPy arrays. ``reshape`` keeps the
    arrays when the element count is unchanged and reallocates (zeroed) otherwise.
    """

    __slots__ = ("_data", "_diff", "_shape", "name")

    def __init__(self, shape=(), dtype=None, name: str = ""):
        self.name = name
        self._alloc(tuple(int(s) for s in shape), dtype or backend.dtype())

    def _alloc(self, shape, dtype):
        for s in shape:
            if s < 0:
                raise ShapeError(f"blob '{self.name}': negative dimension in shape {shape}")
        limit = backend.max_blob_elements()
        if math.prod(shape) > limit:
            raise ShapeError(f"blob '{self.name}': shape {shape} has {math.prod(shape)} elements, "
                             f"over the limit of {limit} (OWLNET_MAX_BLOB_ELEMENTS)")
        self._shape = shape
        self._data = SyncedArray.zeros(shape, dtype)
        self._diff = SyncedArray.zeros(shape, dtype)

    # -- shape ---------------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return self._shape

    @property
    def count(self) -> int:
        return math.prod(self._shape)

    @property
    def num_axes(self) -> int:
        return len(self._shape)

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
        if shape == self._shape:
            return
        if math.prod(shape) == self.count and self.count > 0:
            self._shape = shape
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
    def _shaped(self, array):
        return array if array.shape == self._shape else array.reshape(self._shape)

    @property
    def data(self):
        synced = self._data
        return self._shaped(synced.device() if backend.in_device_scope() else synced.host())

    @data.setter
    def data(self, value):
        self._assign(self.data, value)

    @property
    def diff(self):
        synced = self._diff
        return self._shaped(synced.device() if backend.in_device_scope() else synced.host())

    @diff.setter
    def diff(self, value):
        self._assign(self.diff, value)

    @property
    def device_data(self):
        """The engine's data array (CuPy in GPU mode, NumPy on the CPU), for writing."""
        return self._shaped(self._data.device())

    @property
    def device_diff(self):
        return self._shaped(self._diff.device())

    def read_data(self) -> np.ndarray:
        """The data on the host, read-only, without invalidating the device copy."""
        return self._shaped(self._data.host_readonly())

    def read_diff(self) -> np.ndarray:
        return self._shaped(self._diff.host_readonly())

    def _assign(self, target, value):
        value = backend.array_module(target).asarray(value)
        if value.shape != target.shape:
            raise ShapeError(f"blob '{self.name}': cannot assign an array of shape "
                             f"{tuple(value.shape)} to a blob of shape {self.shape}")
        target[...] = value

    def bind(self, data=None, diff=None, keep_values: bool = False) -> None:
        """Keep data and/or diff in the given engine arrays from now on (device arrays in GPU
        mode, NumPy on the CPU; e.g. views into a flat parameter arena), C-contiguous, their
        values as they are (``keep_values`` copies the blob's current values in first). The
        blob takes their shape; a blob of another element count gets both arrays. Blobs
        sharing this one's data follow."""
        given = [a for a in (data, diff) if a is not None]
        shape = tuple(given[0].shape) if given else self._shape
        for array in given:
            if tuple(array.shape) != shape or not array.flags.c_contiguous:
                raise ShapeError(f"blob '{self.name}': cannot bind to arrays of shapes "
                                 f"{[tuple(a.shape) for a in given]}: data and diff need one "
                                 "shape and C-contiguous arrays")
        if len(given) == 1 and math.prod(shape) != self.count:
            raise ShapeError(f"blob '{self.name}': binding only one of data and diff needs "
                             f"{self.count} elements, the array given has {math.prod(shape)}")
        for synced, array in ((self._data, data), (self._diff, diff)):
            if array is not None:
                synced.rebind(array, keep_values)
        self._shape = shape

    def share_data(self, other: "Blob") -> None:
        """Use ``other``'s data (Caffe's ShareData): both see the same values."""
        self._data = other._data

    def __repr__(self):
        return f"Blob({self.name!r}, shape={self.shape})"


def device_current(blobs) -> None:
    """Make the device copies of these blobs' data and diff the current ones (uploading what
    was written on the host) before code writes their device arrays directly, not through
    the blobs (an arena's flat buffers: clearing diffs, an update, a reduction). Without it a
    pending host write would later overwrite that work, or a synced host copy would stay
    stale. Nothing to do on the CPU."""
    if backend.mode() != "gpu":
        return
    for blob in blobs:
        blob._data.device()
        blob._diff.device()
