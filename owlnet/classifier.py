"""Classifier: a deploy net that classifies images (pycaffe's ``caffe.Classifier``).

``predict(images)`` resizes each H x W x C image (``owlnet.io.load_image``'s layout) to
``image_dims``, takes the ten oversampled crops of the net's input size (corners, centre and
their mirrors) or the centre crop alone, preprocesses them with the net's Transformer (to
C x H x W, channel swap, raw scale, mean, input scale), runs the net in batches and returns
the first output per image, averaged over the ten crops when oversampling.
"""
from __future__ import annotations

import numpy as np

from . import io
from .net import TEST, Net


def set_up_transformer(net, mean=None, input_scale=None, raw_scale=None, channel_swap=None):
    """A Transformer for ``net``'s first input, taking H x W x C images, with the settings
    given (those left None are not applied)."""
    in_ = net.inputs[0]
    transformer = io.Transformer({in_: net.blobs[in_].data.shape})
    transformer.set_transpose(in_, (2, 0, 1))
    if mean is not None:
        transformer.set_mean(in_, mean)
    if input_scale is not None:
        transformer.set_input_scale(in_, input_scale)
    if raw_scale is not None:
        transformer.set_raw_scale(in_, raw_scale)
    if channel_swap is not None:
        transformer.set_channel_swap(in_, channel_swap)
    return transformer


class Classifier(Net):
    """``Classifier(model_file, pretrained_file, image_dims=None, mean=None,
    input_scale=None, raw_scale=None, channel_swap=None)``: a TEST-phase net with its
    Transformer; ``image_dims`` (height, width) defaults to the input blob's."""

    def __init__(self, model_file, pretrained_file, image_dims=None, mean=None,
                 input_scale=None, raw_scale=None, channel_swap=None):
        super().__init__(model_file, pretrained_file, TEST)
        self.transformer = set_up_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.crop_dims = np.array(self.blobs[self.inputs[0]].data.shape[2:])
        self.image_dims = tuple(image_dims) if image_dims else tuple(self.crop_dims)

    def predict(self, inputs, oversample: bool = True) -> np.ndarray:
        """Class scores (N x classes) of N H x W x C images."""
        height, width = self.image_dims
        resized = np.zeros((len(inputs), height, width, inputs[0].shape[2]), dtype=np.float32)
        for i, image in enumerate(inputs):
            resized[i] = io.resize_image(image, self.image_dims)
        if oversample:
            crops = io.oversample(resized, self.crop_dims)
        else:
            centre = np.array(self.image_dims) / 2.0
            top, left = (centre - self.crop_dims / 2.0).astype(int)
            bottom, right = (centre + self.crop_dims / 2.0).astype(int)
            crops = resized[:, top:bottom, left:right, :]
        in_ = self.inputs[0]
        caffe_in = np.stack([self.transformer.preprocess(in_, crop) for crop in crops])
        predictions = self.forward_all(**{in_: caffe_in})[self.outputs[0]]
        if oversample:
            predictions = predictions.reshape(len(predictions) // 10, 10, -1).mean(axis=1)
        return predictions
