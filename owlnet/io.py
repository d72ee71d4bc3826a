"""pycaffe's ``caffe.io``: images in, net inputs out, and Caffe's records as arrays.

Conventions are pycaffe's, so scripts written for it give the same numbers:

* :func:`load_image` gives H x W x C float32 in [0, 1], RGB (C = 3), or H x W x 1 grey with
  ``color=False``, grey being ``0.2125 R + 0.7154 G + 0.0721 B`` (scikit-image's weights,
  which pycaffe uses; OpenCV's own grey conversion uses other weights).
* :func:`resize_image` is scikit-image's ``resize(order=1, mode="constant")`` as pycaffe calls
  it, for 1- and 3-channel images: the image is first stretched to [0, 1] by its min and max,
  then output pixel ``i`` samples input coordinate ``(i + 0.5) * n / m - 0.5`` bilinearly,
  with zeros beyond the border (so border pixels lean toward the image's minimum, as in
  pycaffe), after a Gaussian blur of sigma ``(n / m - 1) / 2`` along each axis that shrinks
  (scikit-image's anti-aliasing, on by default since its version 0.15; pass
  ``anti_aliasing=False`` for the numbers of older installs). Other channel counts follow
  ``scipy.ndimage.zoom``: corners map to corners.
* :class:`Transformer` turns such images into net input (C x H x W, scaled, mean-subtracted)
  and back, in pycaffe's order: resize, transpose, channel swap, raw scale, mean, input scale.

BlobProto files and arrays: :func:`blobproto_to_array` and :func:`array_to_blobproto` wrap
``owlnet.fileio`` (owlnet's own blob-file code), Datums wrap ``owlnet.data.datum``.
"""
from __future__ import annotations

import cv2
import numpy as np

from . import fileio
from .data import datum as datum_io
from .errors import ConfigError, DataError, ShapeError
from .proto import caffe_pb2

_GREY_WEIGHTS = np.array([0.2125, 0.7154, 0.0721])


class ArrayShapeError(ShapeError, ValueError):
    """An array or setting of the wrong shape; also a ValueError, as pycaffe raises."""


class UnsupportedSettingError(ConfigError, ValueError):
    """A setting pycaffe takes that owlnet does not implement; also a ValueError."""


# -- images -----------------------------------------------------------------------------------
def load_image(filename, color: bool = True) -> np.ndarray:
    """An image file as H x W x 3 RGB (or H x W x 1 grey) float32 in [0, 1].

    8-bit images are divided by 255, 16-bit ones by 65535; an alpha channel is dropped (for
    grey, the image is first laid over white, as scikit-image does); a grey file loaded with
    ``color=True`` has its channel repeated three times.
    """
    image = cv2.imread(str(filename), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DataError(f"cannot read image file '{filename}' (missing, or not an image)")
    if image.dtype == np.uint8:
        scaled = image / 255.0
    elif image.dtype == np.uint16:
        scaled = image / 65535.0
    else:
        scaled = image.astype(np.float64)
    if scaled.ndim == 2:
        scaled = scaled[:, :, np.newaxis]
    elif scaled.shape[2] == 4 and not color:      # BGRA -> RGB over a white background
        scaled = scaled[:, :, 2::-1] * scaled[:, :, 3:] + (1 - scaled[:, :, 3:])
    else:
        scaled = scaled[:, :, 2::-1] if scaled.shape[2] >= 3 else scaled[:, :, :1]  # BGR -> RGB
    if not color:
        if scaled.shape[2] == 3:
            scaled = scaled @ _GREY_WEIGHTS
        return scaled.reshape(scaled.shape[0], scaled.shape[1], 1).astype(np.float32)
    if scaled.shape[2] == 1:
        scaled = np.repeat(scaled, 3, axis=2)
    return scaled.astype(np.float32)


def resize_image(im, new_dims, interp_order: int = 1, anti_aliasing=None) -> np.ndarray:
    """``im`` (H x W x K) resized to ``new_dims`` (height, width), float32, as pycaffe does.

    ``anti_aliasing`` None: blur before shrinking, as current scikit-image does by default.
    Only ``interp_order=1`` (bilinear, pycaffe's default and the only order its own callers
    use) is implemented.
    """
    if interp_order != 1:
        raise UnsupportedSettingError(f"resize_image: interp_order {interp_order} is not "
                                      "supported (only 1, bilinear)")
    im = np.asarray(im)
    height, width = (int(d) for d in new_dims)
    if im.shape[-1] not in (1, 3):
        out = _linear_axis(_linear_axis(im.astype(np.float64), height, 0, corners=True),
                           width, 1, corners=True)
        return out.astype(np.float32)
    low, high = float(im.min()), float(im.max())
    if high <= low:
        return np.full((height, width, im.shape[-1]), low, dtype=np.float32)
    unit = (im.astype(np.float64) - low) / (high - low)
    shrinks = height < im.shape[0] or width < im.shape[1]
    if anti_aliasing if anti_aliasing is not None else shrinks:
        for axis, size in ((0, height), (1, width)):
            unit = _gaussian_axis(unit, max(0.0, (im.shape[axis] / size - 1) / 2), axis)
    out = _linear_axis(_linear_axis(unit, height, 0), width, 1)
    return (out * (high - low) + low).astype(np.float32)


def _gaussian_axis(array, sigma: float, axis: int) -> np.ndarray:
    """Blur along ``axis`` with a normalised Gaussian of ``sigma`` cut at 4 sigma, zeros
    beyond the border (scipy.ndimage.gaussian_filter1d's kernel, mode grid-constant)."""
    if sigma <= 1e-15:
        return array
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 / (sigma * sigma) * offsets ** 2)
    kernel /= kernel.sum()
    moved = np.moveaxis(array, axis, 0)
    padded = np.concatenate([np.zeros((radius,) + moved.shape[1:]), moved,
                             np.zeros((radius,) + moved.shape[1:])])
    out = np.zeros_like(moved)
    for k, weight in enumerate(kernel):
        out += weight * padded[k:k + moved.shape[0]]
    return np.moveaxis(out, 0, axis)


def _linear_axis(array, size: int, axis: int, corners: bool = False) -> np.ndarray:
    """Linear interpolation of ``array`` to ``size`` samples along ``axis``.

    Pixel centres (``corners=False``): sample ``i`` is at ``(i + 0.5) * n / size - 0.5``, zeros
    beyond the border. ``corners=True``: at ``i * (n - 1) / (size - 1)``, always inside.
    """
    n = array.shape[axis]
    positions = np.arange(size, dtype=np.float64)
    if corners:
        coords = positions * ((n - 1) / max(size - 1, 1))
    else:
        coords = (positions + 0.5) * (n / size) - 0.5
    below = np.floor(coords).astype(np.int64)
    weight = coords - below
    moved = np.moveaxis(array, axis, 0)
    zero = np.zeros((1,) + moved.shape[1:])
    padded = np.concatenate([zero, moved, zero])        # index j + 1 holds sample j
    low = padded[np.clip(below + 1, 0, n + 1)]
    high = padded[np.clip(below + 2, 0, n + 1)]
    shape = (size,) + (1,) * (moved.ndim - 1)
    out = low * (1 - weight).reshape(shape) + high * weight.reshape(shape)
    return np.moveaxis(out, 0, axis)


def oversample(images, crop_dims) -> np.ndarray:
    """Ten crops of each H x W x K image: the four corners and the centre, then the same
    five mirrored left-right (pycaffe's order). Returns (10 N) x ch x cw x K float32."""
    images = [np.asarray(im) for im in images]
    h, w = images[0].shape[:2]
    ch, cw = (int(d) for d in crop_dims)
    centre = (int(h / 2.0 - ch / 2.0), int(w / 2.0 - cw / 2.0))
    corners = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), centre]
    crops = np.empty((10 * len(images), ch, cw, images[0].shape[-1]), dtype=np.float32)
    for n, im in enumerate(images):
        for k, (top, left) in enumerate(corners):
            crop = im[top:top + ch, left:left + cw, :]
            crops[10 * n + k] = crop
            crops[10 * n + 5 + k] = crop[:, ::-1, :]
    return crops


# -- net input --------------------------------------------------------------------------------
class Transformer:
    """Turns images into a net's input blob and back (pycaffe's ``caffe.io.Transformer``).

    ``inputs``: {input name: blob shape (N, C, H, W)}. :meth:`preprocess` takes an H x W x K
    image and returns C x H x W: resized to the blob's H x W (:func:`resize_image`), then
    transposed, channels reordered, multiplied by the raw scale, the mean subtracted, and
    multiplied by the input scale, each step only when set. :meth:`deprocess` undoes them.
    """

    def __init__(self, inputs):
        self.inputs = {name: tuple(int(d) for d in shape) for name, shape in inputs.items()}
        self.transpose, self.channel_swap = {}, {}
        self.raw_scale, self.mean, self.input_scale = {}, {}, {}

    def _check(self, name):
        if name not in self.inputs:
            raise ArrayShapeError(f"'{name}' is not one of the net inputs: "
                                  f"{', '.join(self.inputs)}")

    def preprocess(self, in_, data) -> np.ndarray:
        self._check(in_)
        image = np.asarray(data).astype(np.float32, copy=False)
        size = self.inputs[in_][2:]
        if image.shape[:2] != size:
            image = resize_image(image, size)
        if in_ in self.transpose:
            image = image.transpose(self.transpose[in_])
        if in_ in self.channel_swap:
            image = image[list(self.channel_swap[in_]), :, :]
        image = np.array(image, dtype=np.float32)
        if in_ in self.raw_scale:
            image *= self.raw_scale[in_]
        if in_ in self.mean:
            image -= self.mean[in_]
        if in_ in self.input_scale:
            image *= self.input_scale[in_]
        return image

    def deprocess(self, in_, data) -> np.ndarray:
        """Net input (C x H x W, or 1 x C x H x W) back to an image in the original layout."""
        self._check(in_)
        image = np.array(data, dtype=np.float32).squeeze()
        if in_ in self.input_scale:
            image /= self.input_scale[in_]
        if in_ in self.mean:
            image += self.mean[in_]
        if in_ in self.raw_scale:
            image /= self.raw_scale[in_]
        if in_ in self.channel_swap:
            image = image[np.argsort(self.channel_swap[in_]), :, :]
        if in_ in self.transpose:
            image = image.transpose(np.argsort(self.transpose[in_]))
        return image

    def set_transpose(self, in_, order) -> None:
        """Axis order from the image's layout to the blob's, e.g. (2, 0, 1) for H x W x C."""
        self._check(in_)
        if len(order) != len(self.inputs[in_]) - 1:
            raise ArrayShapeError(f"transpose order {tuple(order)} for '{in_}' needs "
                                  f"{len(self.inputs[in_]) - 1} axes")
        self.transpose[in_] = tuple(order)

    def set_channel_swap(self, in_, order) -> None:
        """New channel order, e.g. (2, 1, 0) for RGB images into a BGR-trained net."""
        self._check(in_)
        if len(order) != self.inputs[in_][1]:
            raise ArrayShapeError(f"channel swap {tuple(order)} for '{in_}' needs "
                                  f"{self.inputs[in_][1]} channels")
        self.channel_swap[in_] = tuple(order)

    def set_raw_scale(self, in_, scale) -> None:
        """Multiply by ``scale`` before the mean is taken off (255 for [0, 1] images)."""
        self._check(in_)
        self.raw_scale[in_] = scale

    def set_mean(self, in_, mean) -> None:
        """A mean per channel (1-d, C values) or per pixel (C x H x W, or H x W for C = 1)."""
        self._check(in_)
        mean = np.asarray(mean)
        channels = self.inputs[in_][1]
        if mean.ndim == 1:
            if mean.shape[0] != channels:
                raise ArrayShapeError(f"mean of {mean.shape[0]} channels for '{in_}', whose "
                                      f"blob has {channels}")
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            shape = (1,) + mean.shape if mean.ndim == 2 else mean.shape
            if shape != self.inputs[in_][1:]:
                raise ArrayShapeError(f"mean of shape {mean.shape} for '{in_}', whose blob "
                                      f"holds {self.inputs[in_][1:]}")
        self.mean[in_] = mean

    def set_input_scale(self, in_, scale) -> None:
        """Multiply by ``scale`` after the mean is taken off."""
        self._check(in_)
        self.input_scale[in_] = scale


# -- records ----------------------------------------------------------------------------------
def blobproto_to_array(blob, return_diff: bool = False) -> np.ndarray:
    """A BlobProto's data (or diff) as an array of its shape.

    A blob with neither ``shape`` nor the legacy num/channels/height/width has shape (), as
    in pycaffe: one value gives a 0-d array, more raise ValueError.
    """
    legacy = ("num", "channels", "height", "width")
    if not blob.HasField("shape") and not any(blob.HasField(f) for f in legacy):
        values = (blob.double_diff or blob.diff) if return_diff else (blob.double_data or blob.data)
        if len(values) != 1:
            raise ArrayShapeError(f"a BlobProto without a shape holds {len(values)} values; "
                                  "only a single value can be read as a scalar")
        return np.asarray(values[0], dtype=np.float32)
    return fileio.blobproto_to_array(blob, diff=return_diff)


def array_to_blobproto(arr, diff=None):
    """A BlobProto with the array's shape and values (and ``diff`` when given)."""
    return fileio.array_to_blobproto(arr, diff)


def arraylist_to_blobprotovector_str(arraylist) -> bytes:
    """Arrays as the serialized bytes of a BlobProtoVector."""
    vector = caffe_pb2.BlobProtoVector()
    for array in arraylist:
        fileio.array_to_blobproto(array, proto=vector.blobs.add())
    return vector.SerializeToString()


def blobprotovector_str_to_arraylist(payload: bytes) -> list:
    """The arrays of a serialized BlobProtoVector."""
    vector = caffe_pb2.BlobProtoVector()
    vector.ParseFromString(payload)
    return [blobproto_to_array(blob) for blob in vector.blobs]


def array_to_datum(arr, label=None):
    """A Datum of a C x H x W array (uint8 as bytes, else floats); no label when None."""
    if np.ndim(arr) != 3:
        raise ArrayShapeError(f"a Datum needs a 3-d C x H x W array, got shape "
                              f"{np.shape(arr)}")
    datum = datum_io.array_to_datum(arr, 0 if label is None else label)
    if label is None:
        datum.ClearField("label")
    return datum


def datum_to_array(datum) -> np.ndarray:
    """The Datum's example as C x H x W (uint8 for bytes, float32 for floats)."""
    return datum_io.datum_to_array(datum)


__all__ = ["Transformer", "load_image", "resize_image", "oversample", "blobproto_to_array",
           "array_to_blobproto", "arraylist_to_blobprotovector_str",
           "blobprotovector_str_to_arraylist", "array_to_datum", "datum_to_array",
           "ArrayShapeError", "UnsupportedSettingError"]
