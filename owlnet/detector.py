"""Detector: a deploy net that classifies windows of images (pycaffe's ``caffe.Detector``).

``detect_windows([(image file, [(ymin, xmin, ymax, xmax), ...]), ...])`` crops each window,
warps it to the net's input size (with ``context_pad`` pixels of surrounding context, as
R-CNN does: the window is enlarged so that after warping it is framed by ``context_pad``
input pixels; parts of that frame outside the image are filled with the mean), runs the net
and returns ``[{"window", "prediction", "filename"}, ...]`` in input order.
"""
from __future__ import annotations

import numpy as np

from . import io
from .classifier import set_up_transformer
from .net import TEST, Net


class Detector(Net):
    """``Detector(model_file, pretrained_file, mean=None, input_scale=None, raw_scale=None,
    channel_swap=None, context_pad=None)``."""

    def __init__(self, model_file, pretrained_file, mean=None, input_scale=None,
                 raw_scale=None, channel_swap=None, context_pad=None):
        super().__init__(model_file, pretrained_file, TEST)
        self.transformer = set_up_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows) -> list:
        """Predictions for every window of every image (files read with io.load_image)."""
        crops = []
        for filename, windows in images_windows:
            image = io.load_image(filename).astype(np.float32)
            crops.extend(self.crop(image, window) for window in windows)
        in_ = self.inputs[0]
        caffe_in = np.stack([self.transformer.preprocess(in_, crop) for crop in crops])
        predictions = self.forward_all(**{in_: caffe_in})[self.outputs[0]]
        detections, index = [], 0
        for filename, windows in images_windows:
            for window in windows:
                detections.append({"window": window, "prediction": predictions[index],
                                   "filename": filename})
                index += 1
        return detections

    def crop(self, im, window) -> np.ndarray:
        """The window (ymin, xmin, ymax, xmax) of ``im``, with context when configured."""
        window = np.asarray(window)
        if not self.context_pad:
            return im[window[0]:window[2], window[1]:window[3]]
        size = self.blobs[self.inputs[0]].width          # square input assumed, as pycaffe
        scale = size / (1.0 * size - 2 * self.context_pad)
        half = (window[2:] - window[:2] + 1) / 2.0           # half height, half width
        centre = window[:2] + half
        box = np.round(np.concatenate([centre - scale * half, centre + scale * half]))
        full = box[2:] - box[:2] + 1
        unit = size / full                                   # input pixels per image pixel
        pad = np.round(np.maximum(0, -box[:2]) * unit).astype(int)   # frame outside the image
        height, width = im.shape[:2]
        box = np.clip(box, 0.0, [height, width, height, width])
        clipped = box[2:] - box[:2] + 1
        if not np.all(box[2:] > box[:2]):          # nothing of the image inside the box
            raise io.ArrayShapeError(f"window {tuple(int(v) for v in window)} (ymin, xmin, "
                                     f"ymax, xmax) lies outside the image of (height, width) "
                                     f"{(height, width)}")
        extent = np.minimum(np.round(clipped * unit).astype(int), size - pad)
        box = box.astype(int)
        context = io.resize_image(im[box[0]:box[2], box[1]:box[3]], tuple(extent))
        out = np.ones(self.crop_dims, dtype=np.float32) * self.crop_mean
        out[pad[0]:pad[0] + extent[0], pad[1]:pad[1] + extent[1]] = context
        return out

    def configure_crop(self, context_pad) -> None:
        """Set the crop size (the input blob's, in image layout) and the context padding;
        with padding, the mean in image space fills the part of the frame off the image."""
        in_ = self.inputs[0]
        to_image = np.argsort(self.transformer.transpose[in_])
        self.crop_dims = np.array(self.blobs[in_].data.shape[1:])[to_image]
        self.context_pad = context_pad
        if not context_pad:
            return
        mean = self.transformer.mean.get(in_)
        if mean is None:
            self.crop_mean = np.zeros(self.crop_dims, dtype=np.float32)
            return
        crop_mean = np.array(mean, dtype=np.float32).transpose(to_image)
        swap = self.transformer.channel_swap.get(in_)
        if swap is not None:
            crop_mean = crop_mean[:, :, np.argsort(swap)]
        raw_scale = self.transformer.raw_scale.get(in_)
        if raw_scale is not None:
            crop_mean /= raw_scale
        self.crop_mean = crop_mean
