"""Caffe's Datum record: arrays in, arrays out, and encoded (JPEG/PNG) images.

A Datum holds one C x H x W example with an integer label, as raw uint8 bytes in C, H, W
order (``data``), as floats (``float_data``), or as a whole image file (``encoded``, decoded
with OpenCV into BGR, then H x W x C -> C x H x W). Also here: reading image files and image
list files ("path label" per line) as Caffe's ImageData layer and convert_imageset do. Every
failure names the record's LMDB key, the file, or file:line, so the user knows what to fix.
"""
from __future__ import annotations

import os

import cv2
import numpy as np
from google.protobuf.message import DecodeError

from ..errors import ConfigError, DataError
from ..proto import caffe_pb2


def describe_key(key) -> str:
    """A printable form of an LMDB key (bytes or str) for messages."""
    if isinstance(key, (bytes, bytearray)):
        return bytes(key).decode("utf-8", errors="replace")
    return str(key)


def parse_datum(raw: bytes, key) -> caffe_pb2.Datum:
    """Parse serialized Datum bytes; bytes that are not a Datum raise DataError naming ``key``."""
    datum = caffe_pb2.Datum()
    try:
        datum.ParseFromString(raw)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise DataError(f"record '{describe_key(key)}': not a valid Datum ({exc})") from None
    return datum


def array_to_datum(arr, label: int = 0) -> caffe_pb2.Datum:
    """A Datum from a C x H x W array: uint8 goes to ``data`` (bytes), anything else to ``float_data``."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise DataError(f"a Datum needs a 3-d C x H x W array, got shape {arr.shape}")
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = arr.shape
    if arr.dtype == np.uint8:
        datum.data = np.ascontiguousarray(arr).tobytes()
    else:
        datum.float_data.extend(arr.astype(np.float32).reshape(-1).tolist())
    datum.label = int(label)
    return datum


def image_to_chw(image: np.ndarray) -> np.ndarray:
    """An OpenCV image (H x W or H x W x C, BGR) as a C x H x W array (a view when possible)."""
    if image.ndim == 2:
        return image[np.newaxis]
    return image.transpose(2, 0, 1)


def decode_image(buffer, key, force_color: bool = False, force_gray: bool = False) -> np.ndarray:
    """Decode an encoded image to a C x H x W uint8 array (BGR for colour).

    Without a force flag the image keeps its own channels (OpenCV's IMREAD_UNCHANGED, as
    Caffe's native decode); ``force_color`` gives 3 channels, ``force_gray`` one.
    """
    if force_color and force_gray:
        raise ConfigError("force_color and force_gray cannot both be set")
    if force_color:
        flag = cv2.IMREAD_COLOR
    elif force_gray:
        flag = cv2.IMREAD_GRAYSCALE
    else:
        flag = cv2.IMREAD_UNCHANGED
    raw = np.frombuffer(buffer, dtype=np.uint8)
    image = cv2.imdecode(raw, flag) if raw.size else None
    if image is None:
        raise DataError(f"record '{describe_key(key)}': encoded image cannot be decoded "
                        f"({raw.size} bytes)")
    if image.dtype != np.uint8:
        raise DataError(f"record '{describe_key(key)}': decoded image has type {image.dtype}, "
                        f"only 8-bit images are supported")
    return image_to_chw(image)


def datum_to_array(datum, key="?", force_color: bool = False, force_gray: bool = False) -> np.ndarray:
    """The Datum's example as a C x H x W array: uint8 for ``data``/encoded, float32 for ``float_data``.

    ``force_color``/``force_gray`` apply to encoded Datums only, as in Caffe. A raw Datum whose
    value count is not C*H*W raises DataError naming ``key``.
    """
    if datum.encoded:
        return decode_image(datum.data, key, force_color, force_gray)
    shape = (datum.channels, datum.height, datum.width)
    expected = shape[0] * shape[1] * shape[2]
    if min(shape) <= 0:
        raise DataError(f"record '{describe_key(key)}': Datum declares shape {shape}")
    if datum.data:
        if len(datum.data) != expected:
            raise DataError(f"record '{describe_key(key)}': Datum of shape {shape} needs {expected} "
                            f"bytes, holds {len(datum.data)}")
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape)
    if len(datum.float_data) != expected:
        raise DataError(f"record '{describe_key(key)}': Datum of shape {shape} needs {expected} "
                        f"values, holds {len(datum.float_data)} floats and no bytes")
    return np.asarray(datum.float_data, dtype=np.float32).reshape(shape)


def encode_image(image: np.ndarray, encode_type: str = "png") -> bytes:
    """Encode an OpenCV image (H x W or H x W x C, BGR) as ``encode_type`` (png, jpg, ...)."""
    ext = "." + encode_type.lower().lstrip(".")
    try:
        ok, buffer = cv2.imencode(ext, image)
    except cv2.error as exc:
        raise DataError(f"cannot encode an image of shape {image.shape} as '{ext}': {exc}") from None
    if not ok:
        raise DataError(f"cannot encode an image of shape {image.shape} as '{ext}'")
    return buffer.tobytes()


def encoded_datum(payload: bytes, label: int) -> caffe_pb2.Datum:
    """A Datum holding a whole image file (``encoded`` true, no shape fields, as Caffe writes it)."""
    datum = caffe_pb2.Datum()
    datum.data = payload
    datum.label = int(label)
    datum.encoded = True
    return datum


def resolve_list_path(root: str, name: str, list_file, number: int) -> str:
    """The file a list line names: ``name`` under ``root`` (as is when there is no root).

    With a root, the result must stay inside it: ``..`` that climbs out, or an absolute path
    elsewhere, is a DataError naming the list file and line.
    """
    if not root:
        return name
    base = os.path.normpath(root)
    path = os.path.normpath(name if os.path.isabs(name) else os.path.join(base, name))
    if os.path.commonpath([base, path]) != base:
        raise DataError(f"{list_file}:{number}: path '{name}' leads outside root folder '{root}'")
    return path


def read_image_list(path) -> list[tuple[str, int, int]]:
    """Parse an image list file, one ``path label`` per line, into ``(path, label, line_number)``.

    The label is the last whitespace-separated field (so paths may hold spaces, as in Caffe);
    blank lines are skipped. A line without an integer label raises DataError naming file:line.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise DataError(f"image list '{path}' cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"image list '{path}' is not UTF-8 text ({exc.reason})") from None
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.rsplit(None, 1)
        try:
            if len(fields) != 2:
                raise ValueError
            label = int(fields[1])
        except ValueError:
            raise DataError(f"{path}:{number}: expected 'PATH LABEL' with an integer label, "
                            f"got {line.strip()!r}") from None
        entries.append((fields[0].strip(), label, number))
    return entries


def load_image(path, is_color: bool = True, new_height: int = 0, new_width: int = 0) -> np.ndarray:
    """Read an image file as OpenCV does for Caffe: H x W x 3 BGR (or H x W gray), uint8.

    It is resized (bilinear) to ``new_height x new_width`` when both are positive. A file that
    cannot be read or decoded raises DataError naming it.
    """
    image = cv2.imread(os.fspath(path), cv2.IMREAD_COLOR if is_color else cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise DataError(f"image '{path}' cannot be read or decoded")
    if new_height > 0 and new_width > 0:
        image = cv2.resize(image, (new_width, new_height), interpolation=cv2.INTER_LINEAR)
    return image
