"""BlobProto <-> array conversion and binaryproto files (pycaffe's ``caffe.io`` names).

A BlobProto carries its shape either in ``shape.dim`` (current Caffe) or in the legacy
``num/channels/height/width`` fields; values in ``data`` (float) or ``double_data``.
Declared sizes are checked against a limit before anything is allocated, so a hostile
file cannot make us take memory it does not contain.
"""
from __future__ import annotations

import math
import os

import numpy as np
from google.protobuf.message import DecodeError

from .backend import MAX_BLOB_ELEMENTS, max_blob_elements  # noqa: F401 (the limit's home)
from .errors import ConfigError, SnapshotError
from .proto import caffe_pb2

def blob_shape(proto) -> tuple:
    """The shape a BlobProto declares (legacy 4-d fields when ``shape`` is absent)."""
    if proto.HasField("shape"):
        return tuple(int(d) for d in proto.shape.dim)
    if any(proto.HasField(f) for f in ("num", "channels", "height", "width")):
        return (proto.num, proto.channels, proto.height, proto.width)
    n = len(proto.data) or len(proto.double_data)
    return (n,)


def blobproto_to_array(proto, where: str = "blob", diff: bool = False) -> np.ndarray:
    """The blob's data (or diff) as a float32 array of its declared shape."""
    shape = blob_shape(proto)
    if any(d < 0 for d in shape):
        raise SnapshotError(f"{where}: negative dimension in shape {shape}")
    count = math.prod(shape)
    limit = max_blob_elements()
    if count > limit:
        raise SnapshotError(f"{where}: declared shape {shape} has {count} elements, "
                            f"over the limit of {limit} (OWLNET_MAX_BLOB_ELEMENTS)")
    values = (proto.double_diff or proto.diff) if diff else (proto.double_data or proto.data)
    if len(values) != count:
        raise SnapshotError(f"{where}: shape {shape} needs {count} values, the file holds "
                            f"{len(values)}")
    return np.asarray(values, dtype=np.float32).reshape(shape)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _packed_floats(field_number: int, values) -> bytes:
    """The wire bytes of a packed ``repeated float`` field: tag, length, little-endian floats."""
    raw = np.ascontiguousarray(values, dtype="<f4").tobytes()
    return _varint(field_number << 3 | 2) + _varint(len(raw)) + raw


def array_to_blobproto(data, diff=None, proto=None):
    """Fill (or create) a BlobProto with ``shape`` and float ``data`` (and ``diff``).

    The values are handed to protobuf as packed wire bytes (fields 5 and 6), which is ten times
    faster than assigning a Python list for large blobs.
    """
    proto = caffe_pb2.BlobProto() if proto is None else proto
    data = np.asarray(data, dtype=np.float32)
    proto.shape.dim[:] = data.shape
    proto.ClearField("data")
    proto.ClearField("diff")
    payload = _packed_floats(5, data)
    if diff is not None:
        payload += _packed_floats(6, diff)
    proto.MergeFromString(payload)
    return proto


def import_h5py(what: str):
    """The h5py module, which HDF5 files need; a ConfigError naming ``what`` when absent."""
    try:
        import h5py
    except ImportError:
        raise ConfigError(f"{what} needs the h5py package (pip install 'owlnet[hdf5]')") from None
    return h5py


def read_hdf5_array(dataset, where: str, error=SnapshotError) -> np.ndarray:
    """An h5py dataset of numbers (float, int or uint, any compression) as float32, as Caffe's
    hdf5_load_nd_dataset converts it; ``error`` (naming ``where``) for other types, a size
    over the blob limit or unreadable (truncated, corrupt) contents."""
    if dataset.dtype.kind not in "fiu":
        raise error(f"{where}: dataset of type {dataset.dtype}; only float or integer "
                    "datasets can be read")
    limit = max_blob_elements()
    if dataset.size > limit:
        raise error(f"{where}: shape {dataset.shape} has {dataset.size} elements, over the "
                    f"limit of {limit} (OWLNET_MAX_BLOB_ELEMENTS)")
    try:
        return np.asarray(dataset.astype(np.float32)[()])
    except (OSError, ValueError) as exc:
        raise error(f"{where}: cannot read the dataset ({exc})") from None


def parse_binary(message, path, kind: str):
    """Parse a binary protobuf file into ``message``; errors name the file."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot read {kind}: {exc.strerror or exc}") from None
    try:
        message.ParseFromString(raw)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise SnapshotError(f"{path}: not a valid {kind} ({exc})") from None
    return message


def atomic_write(path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so readers see the old file or the whole new one.

    The bytes go to a temporary file in the same folder, are fsync'ed, and replace ``path``
    by rename; the folder is fsync'ed so the rename survives a crash.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise SnapshotError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        raise SnapshotError(f"wrote {path} but cannot sync its folder {folder}: "
                            f"{exc.strerror or exc}") from None
    finally:
        os.close(fd)


def read_mean_binaryproto(path) -> np.ndarray:
    """A mean image (binaryproto BlobProto) as a float32 array, without the leading num=1 axis."""
    proto = parse_binary(caffe_pb2.BlobProto(), path, "binaryproto mean")
    mean = blobproto_to_array(proto, where=str(path))
    if mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    return mean


def write_mean_binaryproto(path, mean) -> None:
    """Write a (C, H, W) mean as a 1 x C x H x W BlobProto in the legacy 4-d fields, as Caffe does."""
    mean = np.asarray(mean, dtype=np.float32)
    if mean.ndim == 3:
        mean = mean[np.newaxis]
    proto = caffe_pb2.BlobProto()
    proto.num, proto.channels, proto.height, proto.width = mean.shape
    proto.data[:] = mean.reshape(-1).tolist()
    atomic_write(path, proto.SerializeToString())
