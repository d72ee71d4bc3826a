"""WindowData: R-CNN style training windows cut from images listed in a window file (Caffe).

The window file is a sequence of records::

    # <image index>
    <image path (relative to root_folder)>
    <channels>
    <height>
    <width>
    <number of windows>
    <class> <overlap> <x1> <y1> <x2> <y2>      (one line per window, corners inclusive)

A window with overlap >= fg_threshold is foreground (its class must be positive); one with
overlap < bg_threshold is background (its class becomes 0); the others are not used.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from .. import backend
from ..data.transform import DataTransformer
from ..errors import ConfigError, DataError
from .base import Layer, SeededSource, register


def _round(value):
    """C's round(): halves away from zero."""
    return int(math.copysign(math.floor(abs(value) + 0.5), value))


def read_window_file(path, root_folder=""):
    """[(image path, (C, H, W), [(label, overlap, x1, y1, x2, y2), ...]), ...]; a DataError
    naming the file and line for anything malformed."""
    try:
        with open(path) as f:
            lines = [line.split() for line in f]
    except OSError as exc:
        raise DataError(f"window file '{path}' cannot be read: {exc.strerror}") from None
    images = []
    pos = 0

    def take(count, what):
        nonlocal pos
        while pos < len(lines) and not lines[pos]:
            pos += 1
        if pos >= len(lines) or len(lines[pos]) != count:
            found = " ".join(lines[pos]) if pos < len(lines) else "end of file"
            raise DataError(f"{path}:{pos + 1}: expected {what}, found '{found}'")
        pos += 1
        return lines[pos - 1]

    def number(text, kind, what):
        try:
            return kind(text)
        except ValueError:
            raise DataError(f"{path}:{pos}: {what} '{text}' is not a number") from None

    while any(lines[pos:]):
        hashtag = take(2, "'# <image index>'")
        if hashtag[0] != "#":
            raise DataError(f"{path}:{pos}: expected '# <image index>', found "
                            f"'{' '.join(hashtag)}'")
        image_path = root_folder + take(1, "an image path")[0]     # Caffe concatenates
        size = tuple(number(take(1, f"the image {what}")[0], int, what)
                     for what in ("channels", "height", "width"))
        windows = []
        for _ in range(number(take(1, "the number of windows")[0], int, "window count")):
            fields = take(6, "'<class> <overlap> <x1> <y1> <x2> <y2>'")
            label, overlap = number(fields[0], int, "class"), number(fields[1], float, "overlap")
            corners = tuple(number(v, int, "coordinate") for v in fields[2:])
            windows.append((label, overlap) + corners)
        images.append((image_path, size, windows))
    return images


def _warp_window(image, box, crop_size, context_pad, square, mirror):
    """Caffe's window crop: returns (patch h x w x C, pad_h, pad_w) where the patch goes at
    (pad_h, pad_w) of a zero crop_size x crop_size frame.

    With context_pad p or square mode, the window (centre c, half sizes hw, hh; hw = hh = the
    larger in square mode) is scaled by crop / (crop - 2p) to x1 = round(cx - hw*s),
    x2 = round(cx + hw*s) (likewise y), clipped to the image; the clipped part is warped to
    round(clipped size * crop / unclipped size) and offset by the rounded scaled clipping on
    the top and on the left (on the right when mirrored). Otherwise the window is warped to
    crop x crop. Warping is bilinear (OpenCV INTER_LINEAR); mirroring flips the patch."""
    x1, y1, x2, y2 = box
    pad_h = pad_w = 0
    size = (crop_size, crop_size)       # (width, height)
    if context_pad > 0 or square:
        scale = crop_size / (crop_size - 2 * context_pad)
        half_h, half_w = (y2 - y1 + 1) / 2, (x2 - x1 + 1) / 2
        cx, cy = x1 + half_w, y1 + half_h
        if square:
            half_h = half_w = max(half_h, half_w)
        x1, x2 = _round(cx - half_w * scale), _round(cx + half_w * scale)
        y1, y2 = _round(cy - half_h * scale), _round(cy + half_h * scale)
        unclipped_h, unclipped_w = y2 - y1 + 1, x2 - x1 + 1
        rows, cols = image.shape[:2]
        pad_x1, pad_y1 = max(0, -x1), max(0, -y1)
        pad_x2, pad_y2 = max(0, x2 - cols + 1), max(0, y2 - rows + 1)
        x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - pad_y2
        scale_x, scale_y = crop_size / unclipped_w, crop_size / unclipped_h
        width = _round((x2 - x1 + 1) * scale_x)
        height = _round((y2 - y1 + 1) * scale_y)
        pad_h = _round(pad_y1 * scale_y)
        pad_w = _round((pad_x2 if mirror else pad_x1) * scale_x)
        size = (min(width, crop_size - pad_w), min(height, crop_size - pad_h))
    patch = cv2.resize(image[y1:y2 + 1, x1:x2 + 1], size, interpolation=cv2.INTER_LINEAR)
    if patch.ndim == 2:
        patch = patch[:, :, None]
    if mirror:
        patch = patch[:, ::-1]
    return patch, pad_h, pad_w


@register("WindowData")
class WindowDataLayer(Layer, SeededSource):
    """Tops: data (batch, C, crop, crop) and label (batch). Each batch holds
    batch - int(batch * fg_fraction) background windows, then int(batch * fg_fraction)
    foreground ones, each drawn uniformly with replacement, mirrored with probability 1/2 when
    ``mirror``, cut and warped by :func:`_warp_window` (crop_mode "warp" or "square",
    context_pad), then (pixel - mean) * scale inside the patch, 0 in its padding. mean_file
    (centred on the crop) or mean_value, scale, crop_size and mirror come from transform_param
    (Caffe moves window_data_param's legacy copies there). Draws depend on (layer seed, batch
    index) only, so a resumed run continues the same sequence."""

    exact_bottoms = 0
    exact_tops = 2
    is_data = True

    def layer_setup(self, bottom, top):
        p = self.param.window_data_param
        where = f"layer '{self.name}' (WindowData)"
        self.transformer = DataTransformer(self.param.transform_param, self.phase, where=where)
        self.crop_size = self.transformer.crop_size
        if self.crop_size <= 0:
            self.fail("crop_size (transform_param) must be positive", ConfigError)
        if p.batch_size <= 0:
            self.fail("window_data_param.batch_size must be positive", ConfigError)
        if p.crop_mode not in ("warp", "square"):
            self.fail(f"crop_mode must be 'warp' or 'square', got '{p.crop_mode}'", ConfigError)
        if 2 * p.context_pad >= self.crop_size:
            self.fail(f"context_pad {p.context_pad} leaves no room in crop_size "
                      f"{self.crop_size}", ConfigError)
        self.images = read_window_file(p.source, p.root_folder)
        if not self.images:
            raise DataError(f"{where}: window file '{p.source}' lists no images")
        self.windows = {True: [], False: []}
        for index, (path, size, windows) in enumerate(self.images):
            for label, overlap, *box in windows:
                if overlap >= p.fg_threshold:
                    if label <= 0:
                        raise DataError(f"{where}: window file '{p.source}', image {path}: "
                                        f"foreground window {box} has class {label}, not > 0")
                    self.windows[True].append((index, label, box))
                elif overlap < p.bg_threshold:
                    self.windows[False].append((index, 0, box))
        self.num_fg = int(p.batch_size * p.fg_fraction)
        self.counts = {False: p.batch_size - self.num_fg, True: self.num_fg}
        for fg in (False, True):
            if self.counts[fg] and not self.windows[fg]:
                raise DataError(f"{where}: window file '{p.source}' has no "
                                f"{'fore' if fg else 'back'}ground windows to sample")
        self.channels = self.images[0][1][0]
        if self.channels not in (1, 3):
            self.fail(f"images must have 1 or 3 channels, '{self.images[0][0]}' declares "
                      f"{self.channels}", ConfigError)
        mean = self.transformer.mean
        if mean is not None and (mean.shape[0] != self.channels or mean.shape[1] != mean.shape[2]
                                 or mean.shape[1] < self.crop_size):
            raise DataError(f"{where}: mean file shape {mean.shape} must be square, with "
                            f"{self.channels} channels and sides >= crop_size {self.crop_size}")
        self.cache = {} if p.cache_images else None
        self.seed = int(backend.rng().integers(1 << 63))
        self.batches_consumed = 0
        top[0].reshape((p.batch_size, self.channels, self.crop_size, self.crop_size))
        top[1].reshape((p.batch_size,))

    def reshape(self, bottom, top):
        pass

    def _image(self, index):
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        path = self.images[index][0]
        image = cv2.imread(path, cv2.IMREAD_COLOR if self.channels == 3 else cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise DataError(f"layer '{self.name}' (WindowData): image '{path}' cannot be read "
                            "or decoded")
        if self.cache is not None:
            self.cache[index] = image
        return image

    def make_batch(self, batch_index):
        """(data, labels) of batch ``batch_index`` as float64 host arrays."""
        p = self.param.window_data_param
        rng = np.random.default_rng([self.seed, batch_index])
        crop = self.crop_size
        data = np.zeros((p.batch_size, self.channels, crop, crop))
        labels = np.zeros(p.batch_size)
        t = self.transformer
        item = 0
        for fg in (False, True):
            for _ in range(self.counts[fg]):
                index, label, box = self.windows[fg][rng.integers(len(self.windows[fg]))]
                mirror = t.mirror and bool(rng.integers(2))
                patch, pad_h, pad_w = _warp_window(self._image(index), box, crop, p.context_pad,
                                                   p.crop_mode == "square", mirror)
                values = patch.transpose(2, 0, 1).astype(np.float64)
                rows = slice(pad_h, pad_h + values.shape[1])
                cols = slice(pad_w, pad_w + values.shape[2])
                if t.mean is not None:
                    off = (t.mean.shape[1] - crop) // 2
                    values = values - t.mean[:, off:off + crop, off:off + crop][:, rows, cols]
                elif t.mean_values is not None:
                    values = values - t.mean_values.reshape(-1, 1, 1)
                data[item, :, rows, cols] = values * t.scale
                labels[item] = label
                item += 1
        return data, labels

    def forward(self, bottom, top):
        data, labels = self.make_batch(self.batches_consumed)
        top[0].data[...] = backend.to_device(data.astype(top[0].data.dtype))
        top[1].data[...] = backend.to_device(labels.astype(top[1].data.dtype))
        self.batches_consumed += 1

    def backward(self, top, propagate_down, bottom):
        pass

    def resume(self, batches: int, seed: int) -> None:
        self.batches_consumed, self.seed = batches, seed
