"""Helpers for tests that build whole nets without their data files."""
import numpy as np

from owlnet import config
from owlnet.data.datum import array_to_datum
from owlnet.data.db import LMDBWriter

DATA_TYPES = {"Data", "ImageData", "WindowData", "HDF5Data", "MemoryData"}


def swap_data_layers(source, batch: int, image_shape):
    """The NetParameter of ``source`` (path, text or message) with every data layer replaced by
    an Input layer: images of ``batch`` x ``image_shape`` (channels, height, width before any
    crop, the crop applied) and, for further tops, labels of shape (batch,)."""
    param, _ = config.read_net(str(source) if not hasattr(source, "layer") else source)
    c, h, w = image_shape
    for layer in param.layer:
        if layer.type not in DATA_TYPES:
            continue
        crop = layer.transform_param.crop_size
        layer.type = "Input"
        for field in ("data_param", "image_data_param", "transform_param"):
            layer.ClearField(field)
        layer.input_param.shape.add().dim.extend((batch, c, crop or h, crop or w))
        for _ in layer.top[1:]:
            layer.input_param.shape.add().dim.append(batch)
    return param


def write_bar_lmdb(path, n: int, seed: int, size: int = 8, bar: int = 150, spacing: int = 2,
                   bad=None):
    """``n`` grey ``size`` x ``size`` Datums of 3 classes, class k a horizontal bar ``bar``
    brighter than the noise at rows ``spacing * k`` to ``spacing * k + 2``; keys in ``bad``
    hold those bytes instead."""
    rng = np.random.default_rng(seed)
    with LMDBWriter(str(path)) as db:
        for i in range(n):
            key, label = f"{i:08d}".encode(), i % 3
            image = rng.integers(0, 60, (1, size, size), dtype=np.uint8)
            image[0, label * spacing: label * spacing + 3, :] += bar
            value = array_to_datum(image, label).SerializeToString()
            db.put(key, (bad or {}).get(key, value))
