"""Caffe's DataTransformer, in two stages.

For an example ``x`` (C x H x W) with crop offsets ``(h0, w0)`` and crop size ``s`` (the whole
image when ``crop_size`` is 0), Caffe's output is::

    y[c, i, j'] = (x[c, h0 + i, w0 + j] - mean[c, h0 + i, w0 + j]) * scale,   j' = s-1-j if mirrored else j

with ``mean`` the mean file (cropped at the same offsets as the image) or ``mean_value[c]``.
Offsets are random (uniform over every valid position) at TRAIN and centred,
``((H - s) // 2, (W - s) // 2)``, at TEST; mirroring is a fair coin whenever ``mirror`` is
set, at TEST too, as in Caffe.

* Stage 1, :meth:`DataTransformer.crop_mirror`, runs per example in the prefetch threads on
  uint8 (or float) host arrays and returns the offsets and mirror flag it used.
* Stage 2, :meth:`DataTransformer.normalize`, converts a whole batch to float, subtracts the
  mean and scales, written against ``xp`` so it runs on the device holding the batch.

Randomness is a pure function of (layer seed, stream index of the example), so batches do not
depend on thread timing, prefetch depth, or where a run was resumed.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..errors import ConfigError, DataError, OwlnetError
from ..fileio import read_mean_binaryproto
from ..proto import caffe_pb2
from .datum import describe_key

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 arrays (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def random_words(seed: int, stream_index: int, count: int) -> np.ndarray:
    """``count`` pseudo-random uint64 words determined by (seed, stream_index) alone."""
    base = _splitmix64(np.array([seed % (1 << 64)], dtype=np.uint64))
    keyed = _splitmix64(base ^ np.uint64(stream_index % (1 << 64)))
    return _splitmix64(keyed + np.arange(count, dtype=np.uint64) * _GOLDEN)


class DataTransformer:
    """Crop, mirror, mean subtraction and scaling as ``TransformationParameter`` asks."""

    def __init__(self, param: caffe_pb2.TransformationParameter, phase, where: str = "data"):
        self.where = where
        self.phase = phase
        self.crop_size = int(param.crop_size)
        self.mirror = bool(param.mirror)
        self.scale = float(param.scale)
        self.force_color = bool(param.force_color)
        self.force_gray = bool(param.force_gray)
        if self.force_color and self.force_gray:
            raise ConfigError(f"{where}: force_color and force_gray cannot both be set")
        self.mean_file = param.mean_file if param.HasField("mean_file") else None
        self.mean = None
        self.mean_values = None
        if self.mean_file is not None and len(param.mean_value):
            raise ConfigError(f"{where}: set mean_file or mean_value, not both")
        if self.mean_file is not None:
            try:
                self.mean = read_mean_binaryproto(self.mean_file)
            except OwlnetError as exc:
                raise DataError(f"{where}: mean_file: {exc}") from None
            if self.mean.ndim != 3:
                raise DataError(f"{where}: mean file '{self.mean_file}' has shape "
                                f"{self.mean.shape}, expected 1 x C x H x W")
        elif len(param.mean_value):
            self.mean_values = np.asarray(param.mean_value, dtype=np.float64)
        self._device_means: dict = {}

    # -- shapes -----------------------------------------------------------------------------
    def output_shape(self, shape) -> tuple:
        """The C x h x w shape an example of ``shape`` (C x H x W) becomes."""
        c, h, w = shape
        return (c, self.crop_size, self.crop_size) if self.crop_size else (c, h, w)

    def check_example(self, shape, key) -> None:
        """DataError unless an example of ``shape`` fits the crop size and the mean."""
        c, h, w = shape
        if self.crop_size and (h < self.crop_size or w < self.crop_size):
            raise DataError(f"{self.where}: record '{describe_key(key)}' of shape {tuple(shape)} "
                            f"is smaller than crop_size {self.crop_size}")
        if self.mean is not None and tuple(shape) != self.mean.shape:
            raise DataError(f"{self.where}: mean file '{self.mean_file}' has shape "
                            f"{self.mean.shape} but record '{describe_key(key)}' has shape "
                            f"{tuple(shape)}")
        if self.mean_values is not None and len(self.mean_values) not in (1, c):
            raise ConfigError(f"{self.where}: {len(self.mean_values)} mean_value entries for "
                              f"record '{describe_key(key)}' with {c} channels; give 1 or {c}")

    # -- stage 1: per example, host, uint8 -----------------------------------------------------
    def draw(self, shape, seed: int, stream_index: int) -> tuple[int, int, bool]:
        """Crop offsets and mirror flag of the example at ``stream_index``."""
        _, h, w = shape
        words = random_words(seed, stream_index, 3)
        h_off = w_off = 0
        if self.crop_size:
            if self.phase == caffe_pb2.TRAIN:
                h_off = int(words[0] % np.uint64(h - self.crop_size + 1))
                w_off = int(words[1] % np.uint64(w - self.crop_size + 1))
            else:
                h_off = (h - self.crop_size) // 2
                w_off = (w - self.crop_size) // 2
        mirrored = self.mirror and bool(words[2] & np.uint64(1))
        return h_off, w_off, mirrored

    def crop_mirror(self, example: np.ndarray, seed: int, stream_index: int, key):
        """Stage 1: ``(cropped example, h_off, w_off, mirrored)``; the example keeps its dtype."""
        self.check_example(example.shape, key)
        h_off, w_off, mirrored = self.draw(example.shape, seed, stream_index)
        _, h, w = self.output_shape(example.shape)
        out = example[:, h_off:h_off + h, w_off:w_off + w]
        if mirrored:
            out = out[:, :, ::-1]
        # One contiguous copy here, on the decode pool's thread, so the batch is assembled
        # by plain memory copies.
        return np.ascontiguousarray(out), h_off, w_off, mirrored

    # -- stage 2: whole batch, any device -----------------------------------------------------
    def normalize(self, batch, h_offs, w_offs, mirrored, out) -> None:
        """Stage 2: ``out[...] = (batch - mean) * scale`` for an N x C x h x w batch on any device.

        ``h_offs``, ``w_offs``, ``mirrored`` (host arrays, one entry per example) place each
        example's window in the mean file.
        """
        xp = backend.array_module(out)
        if self.mean is not None:
            xp.subtract(batch, self._mean_windows(xp, out.shape, h_offs, w_offs, mirrored), out=out)
        else:
            out[...] = batch
            if self.mean_values is not None and len(self.mean_values) == 1:
                out -= out.dtype.type(self.mean_values[0])
            elif self.mean_values is not None:
                out -= self._device_mean_values(xp, out.dtype)
        if self.scale != 1.0:
            out *= out.dtype.type(self.scale)

    def _device_mean_values(self, xp, dtype):
        """``mean_value`` as a 1 x C x 1 x 1 array on the batch's device, copied there once."""
        key = (xp.__name__, np.dtype(dtype).str)
        values = self._device_means.get(key)
        if values is None:
            values = xp.asarray(self.mean_values, dtype=dtype).reshape(1, -1, 1, 1)
            self._device_means[key] = values
        return values

    def _mean_windows(self, xp, shape, h_offs, w_offs, mirrored):
        """The mean file cut at each example's window (N x C x h x w), mirrored where it was.

        A window of the mirrored mean at column w equals, read left to right, the window of the
        left-right flipped mean at column W - w_size - w; both means sit in one (2, C, H, W)
        array viewed as all its windows, so a single gather serves the whole batch.
        """
        pair = self._device_means.get(xp.__name__)
        if pair is None:
            pair = xp.ascontiguousarray(xp.stack([xp.asarray(self.mean),
                                                  xp.asarray(self.mean)[:, :, ::-1]]))
            self._device_means[xp.__name__] = pair
        _, _, h, w = shape
        _, channels, height, width = pair.shape
        if (h, w) == (height, width) and not np.any(mirrored):
            return pair[0][np.newaxis]
        strides = pair.strides
        windows = xp.lib.stride_tricks.as_strided(
            pair, shape=(2, channels, height - h + 1, width - w + 1, h, w),
            strides=strides[:2] + strides[2:] + strides[2:])
        flip = np.asarray(mirrored, dtype=bool)
        cols = np.where(flip, width - w - np.asarray(w_offs), np.asarray(w_offs))
        return windows[xp.asarray(flip.astype(np.intp)), :, xp.asarray(np.asarray(h_offs)),
                       xp.asarray(cols)]
