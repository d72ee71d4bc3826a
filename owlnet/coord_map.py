"""Coordinate maps between the tops of a NetSpec graph, and Crop layers that align them
(pycaffe's ``caffe.coord_map``, used by fully convolutional nets).

A map ``(axis, a, b)`` says that spatial coordinate ``x`` of one top (from ``axis`` on) is at
``a * x + b`` in another; ``a`` and ``b`` are arrays with one entry per spatial axis (or
scalars for layers that map every axis alike). Per layer, from its top back to its bottom:

* Convolution, Pooling, Im2col (kernel extent ``k = (kernel - 1) * dilation + 1``, stride
  ``s``, pad ``p``): ``a = 1 / s``, ``b = (p - (k - 1) / 2) / s``;
* Deconvolution: ``a = s``, ``b = (k - 1) / 2 - p``;
* element-wise layers (ReLU, BatchNorm, Eltwise, ...): the identity;
* Crop (``axis``, ``offset``): ``a = 1``, ``b = -offset``, on axes from ``axis - 1``.

:func:`coord_map_from_to` composes these back to a top both graphs share; :func:`crop` adds
the Crop layer that cuts one top to another's size and position.
"""
from __future__ import annotations

import numpy as np

from .errors import ConfigError
from .net_spec import layers as L

PASS_THROUGH_LAYERS = {"AbsVal", "BatchNorm", "Bias", "BNLL", "Dropout", "Eltwise", "ELU",
                       "Log", "LRN", "Exp", "MVN", "Power", "ReLU", "PReLU", "Scale",
                       "Sigmoid", "Split", "TanH", "Threshold"}


class UnmappedError(ConfigError, RuntimeError):
    """Two tops with no spatial path between them (also a RuntimeError, as pycaffe raises)."""


class CropError(ConfigError, AssertionError):
    """A crop that cannot be made (also an AssertionError, as pycaffe raises)."""


class _NoMap(Exception):
    """A layer whose top coordinates do not map to its bottom's (InnerProduct, say)."""


def conv_params(fn):
    """(axis, stride, kernel extent, pad) of a Convolution-like layer's settings."""
    settings = fn.params.get("convolution_param", fn.params)
    legacy = {"pad_h", "pad_w", "kernel_h", "kernel_w", "stride_h", "stride_w"} & set(settings)
    if legacy:
        raise ConfigError(f"coord_map: layer {fn.type_name} uses {', '.join(sorted(legacy))}; "
                          "give kernel_size/stride/pad lists instead")
    kernel = np.array(settings["kernel_size"], ndmin=1)
    dilation = np.array(settings.get("dilation", 1), ndmin=1)
    return (settings.get("axis", 1), np.array(settings.get("stride", 1), ndmin=1),
            (kernel - 1) * dilation + 1, np.array(settings.get("pad", 0), ndmin=1))


def crop_params(fn):
    settings = fn.params.get("crop_param", fn.params)
    return settings.get("axis", 2), np.array(settings.get("offset", 0), ndmin=1)


def coord_map(fn):
    """The map from ``fn``'s top coordinates to its bottom's (see the module docstring)."""
    if fn.type_name in ("Convolution", "Pooling", "Im2col"):
        axis, stride, extent, pad = conv_params(fn)
        return axis, 1 / stride, (pad - (extent - 1) / 2) / stride
    if fn.type_name == "Deconvolution":
        axis, stride, extent, pad = conv_params(fn)
        return axis, stride, (extent - 1) / 2 - pad
    if fn.type_name in PASS_THROUGH_LAYERS:
        return None, 1, 0
    if fn.type_name == "Crop":
        axis, offset = crop_params(fn)
        return axis - 1, 1, -offset
    raise _NoMap(fn.type_name)


def compose(first, then):
    """The map ``then`` applied after ``first``."""
    axis1, a1, b1 = first
    axis2, a2, b2 = then
    if axis1 is not None and axis2 is not None and axis1 != axis2:
        raise UnmappedError(f"coord_map: axes {axis1} and {axis2} do not line up")
    axis = axis2 if axis1 is None else axis1
    return axis, a1 * a2, a1 * b2 + b1


def inverse(mapping):
    axis, a, b = mapping
    return axis, 1 / a, -b / a


def _ancestor_maps(top, stop=None):
    """Maps from ``top`` to every top it is computed from (through mappable layers); when
    ``stop`` (a dict) holds a top reached, return (that top, map) at once."""
    maps = {top: (None, 1, 0)}
    frontier = [top]
    while frontier:
        current = frontier.pop()
        if stop is not None and current in stop:
            return current, maps[current]
        try:
            step = coord_map(current.fn)
        except _NoMap:
            continue
        bottoms = current.fn.inputs[:1] if current.fn.type_name == "Crop" else current.fn.inputs
        for bottom in bottoms:
            maps[bottom] = compose(maps[current], step)
            frontier.append(bottom)
    return None if stop is not None else maps


def coord_map_from_to(top_from, top_to):
    """The map from ``top_from``'s coordinates to ``top_to``'s: (axis, a, b)."""
    from_maps = _ancestor_maps(top_from)
    found = _ancestor_maps(top_to, stop=from_maps)
    if found is None:
        raise UnmappedError("coord_map: could not compute a map between the tops; are they "
                            "connected by spatial layers?")
    common, to_map = found
    return compose(to_map, inverse(from_maps[common]))


def crop(top_from, top_to):
    """A Crop layer cutting ``top_from`` to the size and position of ``top_to``."""
    axis, a, b = coord_map_from_to(top_from, top_to)
    if not np.all(a == 1):
        raise CropError(f"crop: scale mismatch (a = {a})")
    if not np.all(b <= 0):
        raise CropError(f"crop: cannot crop a negative offset (b = {b})")
    if not np.all(np.round(b) == b):
        raise CropError(f"crop: cannot crop a fractional offset (b = {b})")
    return L.Crop(top_from, top_to,
                  crop_param=dict(axis=axis + 1, offset=[int(v) for v in -np.round(b)]))
