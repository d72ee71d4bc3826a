"""Weight fillers, as Caffe's FillerParameter describes them.

With ``fan_in = count / shape[0]`` and ``fan_out = count / shape[1]``, ``n`` is fan_in,
fan_out or their mean according to ``variance_norm``:

* constant: ``value``;  uniform: U(min, max);  gaussian: N(mean, std), and with
  ``sparse = s >= 0`` each weight is kept with probability ``s / shape[0]`` (zero otherwise);
* positive_unitball: U(0, 1) per element, then each item along axis 0 scaled to sum 1;
* xavier: U(-sqrt(3/n), sqrt(3/n));  msra: N(0, sqrt(2/n));
* bilinear (for upsampling Deconvolution, square kernels of size k): with
  ``f = ceil(k/2)`` and ``c = (k - 1) / (2f)``, weight(y, x) =
  ``(1 - |x/f - c|) (1 - |y/f - c|)`` for every input/output channel pair.

All draws come from ``backend.rng()``, so a seed fixes them.
"""
from __future__ import annotations

import math

import numpy as np

from . import backend
from .errors import ConfigError


def _fans(shape):
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    fan_in = count // shape[0] if shape and shape[0] else count
    fan_out = count // shape[1] if len(shape) > 1 and shape[1] else count
    return fan_in, fan_out


def _norm(param, shape):
    fan_in, fan_out = _fans(shape)
    # VarianceNorm: FAN_IN = 0, FAN_OUT = 1, AVERAGE = 2.
    if param.variance_norm == 1:
        return fan_out
    if param.variance_norm == 2:
        return (fan_in + fan_out) / 2.0
    return fan_in


def fill(param, shape, dtype=np.float32, where: str = "") -> np.ndarray:
    """A host array of ``shape`` drawn as ``param`` (a FillerParameter) says."""
    shape = tuple(int(s) for s in shape)
    rng = backend.rng()
    kind = param.type
    if kind == "constant":
        return np.full(shape, param.value, dtype=dtype)
    elif kind == "uniform":
        out = rng.uniform(param.min, param.max, size=shape)
    elif kind == "gaussian":
        out = rng.normal(param.mean, param.std, size=shape)
        if param.sparse >= 0:
            if len(shape) < 1 or shape[0] == 0:
                raise ConfigError(f"{where}: sparse gaussian filler needs a non-empty blob")
            keep = rng.random(shape) < param.sparse / shape[0]
            out = out * keep
    elif kind == "positive_unitball":
        out = rng.uniform(0.0, 1.0, size=shape)
        if shape:
            flat = out.reshape(shape[0], -1)
            flat /= flat.sum(axis=1, keepdims=True)
    elif kind == "xavier":
        scale = math.sqrt(3.0 / max(_norm(param, shape), 1e-12))
        out = rng.uniform(-scale, scale, size=shape)
    elif kind == "msra":
        std = math.sqrt(2.0 / max(_norm(param, shape), 1e-12))
        out = rng.normal(0.0, std, size=shape)
    elif kind == "bilinear":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise ConfigError(f"{where}: bilinear filler needs a 4-d blob with square kernels, "
                              f"got shape {shape}")
        k = shape[3]
        f = math.ceil(k / 2.0)
        c = (k - 1) / (2.0 * f)
        ramp = 1.0 - np.abs(np.arange(k) / f - c)
        out = np.broadcast_to(np.outer(ramp, ramp), shape).copy()
    else:
        raise ConfigError(f"{where}: unknown filler type '{kind}' (known: constant, uniform, "
                          "gaussian, positive_unitball, xavier, msra, bilinear)")
    return np.asarray(out, dtype=dtype)
