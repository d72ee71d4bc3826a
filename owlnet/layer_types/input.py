"""Layers that bring blobs into a net without reading data files: Input and DummyData."""
from __future__ import annotations

from .. import backend, fillers
from ..errors import ConfigError
from ..proto import caffe_pb2
from .base import Layer, register


def _shapes_for_tops(layer, shapes, n_tops, what):
    """One shape for every top, or one shape per top."""
    if len(shapes) == 1:
        return shapes * n_tops
    if len(shapes) != n_tops:
        layer.fail(f"{n_tops} tops need 1 or {n_tops} {what}, got {len(shapes)}", ConfigError)
    return shapes


@register("Input")
class InputLayer(Layer):
    """Net inputs: each top gets its declared shape (``input_param.shape``); the caller fills
    ``net.blobs[name].data``. Forward and backward do nothing."""

    min_tops = 1
    is_data = True

    def layer_setup(self, bottom, top):
        shapes = [tuple(int(d) for d in s.dim) for s in self.param.input_param.shape]
        if not shapes:
            self.fail("input_param needs at least one shape", ConfigError)
        for blob, shape in zip(top, _shapes_for_tops(self, shapes, len(top), "shapes")):
            if any(d < 0 for d in shape):
                self.fail(f"negative dimension in input shape {shape}", ConfigError)
            blob.reshape(shape)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        pass


@register("DummyData")
class DummyDataLayer(Layer):
    """Tops of declared shapes filled by ``data_filler`` (constant 0 by default): filled once
    when every filler is constant, refilled on every forward otherwise."""

    min_tops = 1
    is_data = True

    def layer_setup(self, bottom, top):
        p = self.param.dummy_data_param
        if len(p.shape):
            shapes = [tuple(int(d) for d in s.dim) for s in p.shape]
        else:
            legacy = [p.num, p.channels, p.height, p.width]
            if len({len(v) for v in legacy}) != 1 or not len(p.num):
                self.fail("give 'shape', or num/channels/height/width with one value each per "
                          "top", ConfigError)
            shapes = [tuple(int(v[i]) for v in legacy) for i in range(len(p.num))]
        self.shapes = _shapes_for_tops(self, shapes, len(top), "shapes")
        filler_params = list(p.data_filler)
        if not filler_params:
            filler_params = [caffe_pb2.FillerParameter(type="constant")]
        self.filler_params = _shapes_for_tops(self, filler_params, len(top), "data_fillers")
        self.refill = any(f.type != "constant" for f in self.filler_params)
        for blob, shape in zip(top, self.shapes):
            blob.reshape(shape)
        self._fill(top)

    def _fill(self, top):
        for blob, fp in zip(top, self.filler_params):
            blob.data[...] = backend.to_device(fillers.fill(fp, blob.shape, blob.data.dtype,
                                                            where=f"layer '{self.name}'"))

    def reshape(self, bottom, top):
        for blob, shape in zip(top, self.shapes):
            blob.reshape(shape)

    def forward(self, bottom, top):
        if self.refill:
            self._fill(top)

    def backward(self, top, propagate_down, bottom):
        pass
