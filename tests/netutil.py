"""Helpers for tests that build whole nets without their data files."""
from owlnet import config

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
