"""Export a TEST-phase net with its weights to ONNX, for today's runtimes.

    owlnet.export_onnx(net, "model.onnx", opset=17, batch="dynamic")

Each layer becomes the ONNX operators that compute its forward (float32, the weights as
initializers); a layer with no exact ONNX form is refused with a ConfigError naming the layer
and its file:line. Where Caffe and ONNX differ, the graph does Caffe's arithmetic:

* Pooling: the output size is the net's own (Caffe's ceil rounding, the last window dropped
  when it would start in the pad), met by floor rounding over explicit end pads chosen so
  every window lies inside the padded frame. MAX ignores pads in both. AVE divides by the
  window clipped to the image plus pad: AveragePool counting pad pixels gives each window's
  sum / (kh*kw), times a constant map (kh*kw) / Caffe's divisor where that differs from 1.
* LRN ACROSS_CHANNELS is ONNX's LRN with bias = k (ONNX also divides alpha by the size);
  WITHIN_CHANNEL is x * (1 + alpha * mean of x^2 over the n x n window, zero-padded)^-beta.
* BatchNorm: mean = blob0 / s and var = blob1 / s with s = blob2, the moving-average factor
  (both 0 when s = 0), folded into y = x * a + b with a = 1 / sqrt(var + eps), b = -mean * a
  (with use_global_stats: false, the batch's own mean and variance, as Caffe).
* Pooling's MAX mask top (h * W + w of each maximum) is ONNX's MaxPool index mod H * W.
* Caffe reuses a blob name for in-place layers; ONNX values are written once, so each layer
  makes new values, and each graph output carries its blob's name.
* batch="dynamic": every input's first axis is the symbolic "N"; reshapes keep axis 0 (0)
  or infer it (-1), and a layer that would mix the batch with other axes is refused.
* Forks' layers, where the tree has them: PriorBox becomes a constant (its boxes depend only
  on the shapes, which the export fixes); SPP is its levels' Pooling layers, joined.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import backend
from .errors import ConfigError
from .fileio import atomic_write
from .proto import caffe_pb2

DEFAULT_OPSET = 17
MIN_OPSET = 13          # Softmax along one given axis; Unsqueeze takes its axes as an input

_POOL = caffe_pb2.PoolingParameter
_LRN = caffe_pb2.LRNParameter
_ELTWISE = caffe_pb2.EltwiseParameter


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ConfigError("exporting to ONNX needs the onnx package: "
                          "pip install 'owlnet[onnx]'") from None
    return onnx


def _pair(message, field, h_field, w_field, default):
    """A 2-d setting as Caffe reads it: ``h_field``/``w_field`` when either is set, else
    ``field`` (one value for both axes or one per axis; ``default`` when absent)."""
    if h_field and (message.HasField(h_field) or message.HasField(w_field)):
        return (getattr(message, h_field), getattr(message, w_field))
    value = getattr(message, field)
    if message.DESCRIPTOR.fields_by_name[field].is_repeated:
        values = tuple(value) or (default,)
    else:
        values = (value,)
    return values * 2 if len(values) == 1 else values


class _Graph:
    """An ONNX model under construction: nodes, initializers (written straight into the
    model, the weights copied once) and unique value and node names."""

    def __init__(self, onnx, opset, reserved):
        self.onnx = onnx
        self.opset = opset
        self.model = onnx.ModelProto()
        self.nodes = []
        self._values = set(reserved)
        self._node_names = set()

    @staticmethod
    def _unique(hint, taken):
        name, k = hint, 1
        while name in taken:
            name, k = f"{hint}_{k}", k + 1
        taken.add(name)
        return name

    def constant(self, hint, array, dtype=np.float32):
        name = self._unique(hint, self._values)
        array = np.asarray(array, dtype=np.dtype(dtype).newbyteorder("<"))   # tobytes: C order
        self.model.graph.initializer.add(
            name=name, dims=array.shape, raw_data=array.tobytes(),
            data_type=self.onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
        return name

    def op(self, op_type, inputs, hint, n_outputs=1, **attrs):
        """Add one node; returns the name of its output (a list when it has several)."""
        outputs = [self._unique(hint if i == 0 else f"{hint}_{i}", self._values)
                   for i in range(n_outputs)]
        self.nodes.append(self.onnx.helper.make_node(
            op_type, list(inputs), outputs, name=self._unique(hint, self._node_names), **attrs))
        return outputs[0] if n_outputs == 1 else outputs

    def rename(self, renames):
        for node in self.nodes:
            for field in (node.input, node.output):
                for i, name in enumerate(field):
                    field[i] = renames.get(name, name)


class _LayerExport:
    """One layer being exported: its proto, weights, bottoms as graph values, blob shapes."""

    def __init__(self, graph, layer, where, inputs, bottoms, tops, dynamic):
        self.graph, self.layer, self.where = graph, layer, where
        self.param = layer.param
        self.inputs = inputs
        self.bottoms, self.tops = bottoms, tops          # the net's Blobs
        self.bottom_shapes = [b.shape for b in bottoms]
        self.top_shapes = [t.shape for t in tops]
        self.dynamic = dynamic

    def fail(self, reason):
        raise ConfigError(f"{self.where}: layer '{self.param.name}' ({self.param.type}) cannot "
                          f"be exported to ONNX: {reason}")

    def op(self, op_type, inputs, n_outputs=1, **attrs):
        return self.graph.op(op_type, inputs, f"{self.param.name}/{op_type}", n_outputs, **attrs)

    def constant(self, array, what, dtype=np.float32):
        return self.graph.constant(f"{self.param.name}/{what}", array, dtype)

    def weight(self, k, shape=None):
        """Parameter blob ``k`` as a float32 initializer, optionally reshaped."""
        array = backend.to_host(self.layer.blobs[k].data)
        return self.constant(array if shape is None else array.reshape(shape), f"blob{k}")

    def axis(self, axis):
        """``axis`` of the first bottom counted from 0."""
        n = len(self.bottom_shapes[0])
        if not -n <= axis < n:
            self.fail(f"axis {axis} out of range for shape {self.bottom_shapes[0]}")
        return axis % n

    def not_on_batch(self, axis, what):
        if self.dynamic and axis == 0:
            self.fail(f"{what} on axis 0 depends on the batch size; export with a fixed "
                      "--batch N")

    def reshape(self, value, shape, keeps_batch):
        """``value`` reshaped to the top ``shape``; with a dynamic batch axis 0 is copied
        (``keeps_batch``) or inferred, the other axes fixed."""
        target = list(shape)
        if self.dynamic:
            target[0] = 0 if keeps_batch else -1
        return self.op("Reshape", [value, self.constant(target, "shape", np.int64)])

    def reduce(self, op_type, value, axes, keepdims=1):
        """A Reduce* node over ``axes`` (an input from opset 18, from 13 for ReduceSum)."""
        if self.graph.opset >= (13 if op_type == "ReduceSum" else 18):
            return self.op(op_type, [value, self.constant(axes, "axes", np.int64)],
                           keepdims=keepdims)
        return self.op(op_type, [value], axes=list(axes), keepdims=keepdims)


# -- vision ---------------------------------------------------------------------------------

def _convolution(e):
    p = e.param.convolution_param
    if e.axis(p.axis) != 1 or len(e.bottom_shapes[0]) != 4:
        e.fail("only (N, C, H, W) bottoms with the channel axis 1 are exported")
    pad = _pair(p, "pad", "pad_h", "pad_w", 0)
    attrs = dict(kernel_shape=list(e.layer.blobs[0].shape[2:]), pads=list(pad) * 2,
                 strides=list(_pair(p, "stride", "stride_h", "stride_w", 1)),
                 dilations=list(_pair(p, "dilation", None, None, 1)), group=p.group)
    op_type = "Conv" if e.param.type == "Convolution" else "ConvTranspose"
    weights = [e.weight(k) for k in range(len(e.layer.blobs))]     # W (and b)
    return [e.op(op_type, [x] + weights, **attrs) for x in e.inputs]


def _pooling(e):
    p = e.param.pooling_param
    x, in_size, out_size = e.inputs[0], e.bottom_shapes[0][2:], e.top_shapes[0][2:]
    if p.pool not in (_POOL.MAX, _POOL.AVE):
        e.fail(f"{_POOL.PoolMethod.Name(p.pool)} pooling has no ONNX form")
    average = p.pool == _POOL.AVE
    if p.global_pooling:
        return [e.op("GlobalAveragePool" if average else "GlobalMaxPool", [x])]
    kernel = _pair(p, "kernel_size", "kernel_h", "kernel_w", None)
    pad = _pair(p, "pad", "pad_h", "pad_w", 0)
    stride = _pair(p, "stride", "stride_h", "stride_w", 1)
    starts = [(out_size[a] - 1) * stride[a] - pad[a] for a in range(2)]
    for a in range(2):
        if starts[a] >= in_size[a]:
            e.fail(f"its last window on spatial axis {a} starts at {starts[a]}, past the "
                   f"image's {in_size[a]} pixels (kernel {kernel}, stride {stride}, pad {pad}): "
                   "Caffe pools an empty window there")
    end_pad = [max(0, starts[a] + kernel[a] - in_size[a]) for a in range(2)]
    attrs = dict(kernel_shape=list(kernel), strides=list(stride), pads=list(pad) + end_pad)
    if not average and len(e.top_shapes) == 1:
        return [e.op("MaxPool", [x], **attrs)]
    if not average:       # the mask: ONNX's index over (N, C, H, W) less the image's start
        pooled, index = e.op("MaxPool", [x], n_outputs=2, **attrs)
        area = e.constant(in_size[0] * in_size[1], "image_area", np.int64)
        mask = e.op("Cast", [e.op("Mod", [index, area])], to=e.graph.onnx.TensorProto.FLOAT)
        return [pooled, mask]
    mean = e.op("AveragePool", [x], count_include_pad=1, **attrs)
    sides = []
    for a in range(2):
        start = np.arange(out_size[a]) * stride[a] - pad[a]
        sides.append(np.minimum(start + kernel[a], in_size[a] + pad[a]) - start)
    correction = kernel[0] * kernel[1] / np.outer(sides[0], sides[1]).astype(np.float64)
    if np.all(correction == 1):
        return [mean]
    return [e.op("Mul", [mean, e.constant(correction, "window_correction")])]


def _lrn(e):
    p = e.param.lrn_param
    x = e.inputs[0]
    if p.norm_region == _LRN.ACROSS_CHANNELS:
        return [e.op("LRN", [x], size=p.local_size, alpha=p.alpha, beta=p.beta, bias=p.k)]
    half = (p.local_size - 1) // 2
    mean = e.op("AveragePool", [e.op("Mul", [x, x])], kernel_shape=[p.local_size] * 2,
                pads=[half] * 4, strides=[1, 1], count_include_pad=1)
    scale = e.op("Add", [e.op("Mul", [mean, e.constant(p.alpha, "alpha")]),
                         e.constant(1.0, "one")])
    return [e.op("Mul", [x, e.op("Pow", [scale, e.constant(-p.beta, "minus_beta")])])]


# -- common ---------------------------------------------------------------------------------

def _inner_product(e):
    p = e.param.inner_product_param
    shape = e.bottom_shapes[0]
    axis = e.axis(p.axis)
    e.not_on_batch(axis, "a product over every axis")
    weights = backend.to_host(e.layer.blobs[0].data)
    bias = [e.weight(1)] if p.bias_term else []
    if axis == 1:
        flat = e.inputs[0] if len(shape) == 2 else e.op("Flatten", [e.inputs[0]], axis=1)
        return [e.op("Gemm", [flat, e.weight(0)] + bias, transB=0 if p.transpose else 1)]
    rows = e.op("Reshape", [e.inputs[0], e.constant([0] * axis + [-1], "shape", np.int64)])
    matrix = e.constant(weights if p.transpose else weights.T, "weight_matrix")
    y = e.op("MatMul", [rows, matrix])
    return [e.op("Add", [y] + bias) if bias else y]


def _eltwise(e):
    p = e.param.eltwise_param
    if p.operation == _ELTWISE.SUM:
        coeffs = list(p.coeff) or [1.0] * len(e.inputs)
        terms = [x if c == 1 else e.op("Mul", [x, e.constant(c, "coeff")])
                 for x, c in zip(e.inputs, coeffs)]
        return [e.op("Sum", terms)]
    if p.operation == _ELTWISE.MAX:
        return [e.op("Max", e.inputs)]
    product = e.inputs[0]
    for x in e.inputs[1:]:
        product = e.op("Mul", [product, x])
    return [product]


def _legacy_axis(e, message, legacy_field):
    if message.HasField(legacy_field):
        return getattr(message, legacy_field)
    return e.axis(message.axis)


def _concat(e):
    if len(e.inputs) == 1:
        return [e.op("Identity", e.inputs)]
    return [e.op("Concat", e.inputs, axis=_legacy_axis(e, e.param.concat_param, "concat_dim"))]


def _slice(e):
    axis = _legacy_axis(e, e.param.slice_param, "slice_dim")
    e.not_on_batch(axis, "slicing")
    tops, start = [], 0
    for shape in e.top_shapes:
        end = start + shape[axis]
        tops.append(e.op("Slice", [e.inputs[0], e.constant([start], "starts", np.int64),
                                   e.constant([end], "ends", np.int64),
                                   e.constant([axis], "axes", np.int64)]))
        start = end
    return tops


def _crop(e):
    p = e.param.crop_param
    axis = e.axis(p.axis)
    e.not_on_batch(axis, "cropping")
    big, ref = e.bottom_shapes
    offsets = list(p.offset)
    if len(offsets) <= 1:
        offsets = (offsets or [0]) * (len(big) - axis)
    ends = [off + ref[axis + i] for i, off in enumerate(offsets)]
    return [e.op("Slice", [e.inputs[0], e.constant(offsets, "starts", np.int64),
                           e.constant(ends, "ends", np.int64),
                           e.constant(list(range(axis, len(big))), "axes", np.int64)])]


def _flatten(e):
    start = e.axis(e.param.flatten_param.axis)
    return [e.reshape(e.inputs[0], e.top_shapes[0], keeps_batch=start > 0)]


def _reshape(e):
    p = e.param.reshape_param
    start = p.axis if p.axis >= 0 else len(e.bottom_shapes[0]) + p.axis + 1
    dims = list(p.shape.dim)
    moves_batch = start == 0 and (p.num_axes == 0 or dims[:1] not in ([0], [-1]))
    if e.dynamic and moves_batch:
        e.fail(f"shape {dims} from axis {start} moves the batch axis; export with a fixed "
               "--batch N")
    return [e.reshape(e.inputs[0], e.top_shapes[0], keeps_batch=start > 0 or dims[:1] == [0])]


def _softmax(e):
    return [e.op("Softmax", e.inputs, axis=e.axis(e.param.softmax_param.axis))]


def _argmax(e):
    p = e.param.argmax_param
    if p.top_k != 1:
        e.fail("top_k > 1: ONNX TopK orders equal values differently from Caffe")
    if p.HasField("axis"):
        axis = e.axis(p.axis)
        if p.out_max_val:
            return [e.reduce("ReduceMax", e.inputs[0], [axis])]
        index = e.op("ArgMax", e.inputs, axis=axis, keepdims=1, select_last_index=1)
        return [e.op("Cast", [index], to=e.graph.onnx.TensorProto.FLOAT)]
    flat = e.op("Flatten", e.inputs, axis=1)
    index = e.op("ArgMax", [flat], axis=1, keepdims=1, select_last_index=1)
    result = e.op("Cast", [index], to=e.graph.onnx.TensorProto.FLOAT)
    if p.out_max_val:
        result = e.op("Concat", [result, e.reduce("ReduceMax", flat, [1])], axis=1)
    return [e.reshape(result, e.top_shapes[0], keeps_batch=True)]


def _alias(e):
    """Split, and Dropout at TEST: every top is the bottom's value."""
    return [e.inputs[0]] * len(e.top_shapes)


def _silence(e):
    return []


# -- normalization --------------------------------------------------------------------------

def _channel_shape(shape, count):
    """Shape broadcasting ``count`` values along axis 1 of a blob of ``shape``."""
    return (count,) + (1,) * (len(shape) - 2) if len(shape) > 1 else (count,)


def _centred(e, x, axes):
    """x minus its mean over ``axes``, and the (biased) variance over them."""
    centred = e.op("Sub", [x, e.reduce("ReduceMean", x, axes)])
    return centred, e.reduce("ReduceMean", e.op("Mul", [centred, centred]), axes)


def _batch_norm(e):
    p = e.param.batch_norm_param
    if p.HasField("use_global_stats") and not p.use_global_stats:   # this batch's statistics
        axes = [0] + list(range(2, len(e.bottom_shapes[0])))
        centred, var = _centred(e, e.inputs[0], axes)
        std = e.op("Sqrt", [e.op("Add", [var, e.constant(p.eps, "eps")])])
        return [e.op("Div", [centred, std])]
    mean, var, factor = (backend.to_host(b.data).astype(np.float64) for b in e.layer.blobs)
    inv_factor = 0.0 if factor[0] == 0 else 1.0 / factor[0]
    scale = 1.0 / np.sqrt(var * inv_factor + p.eps)
    shape = _channel_shape(e.bottom_shapes[0], scale.size)
    y = e.op("Mul", [e.inputs[0], e.constant(scale.reshape(shape), "scale")])
    return [e.op("Add", [y, e.constant((-mean * inv_factor * scale).reshape(shape), "shift")])]


def _trailing_axes(e, axis_field, shape):
    """Unit axes to append to an operand of ``shape`` so it broadcasts over bottom 0 from
    ``axis_field`` on (a scalar operand starts at axis 0)."""
    axis = 0 if not shape else e.axis(axis_field)
    return len(e.bottom_shapes[0]) - axis - len(shape)


def _learned_operand(e, axis_field, index):
    shape = e.layer.blobs[index].shape
    return e.weight(index, tuple(shape) + (1,) * _trailing_axes(e, axis_field, shape))


def _operand(e, axis_field):
    """Scale's or Bias's operand shaped to broadcast over bottom 0: a learned blob, or
    bottom 1 with trailing unit axes added."""
    if len(e.inputs) == 1:
        return _learned_operand(e, axis_field, 0)
    shape = e.bottom_shapes[1]
    trailing = _trailing_axes(e, axis_field, shape)
    if not trailing:
        return e.inputs[1]
    axes = list(range(len(shape), len(shape) + trailing))
    return e.op("Unsqueeze", [e.inputs[1], e.constant(axes, "axes", np.int64)])


def _scale(e):
    p = e.param.scale_param
    y = e.op("Mul", [e.inputs[0], _operand(e, p.axis)])
    if not p.bias_term:
        return [y]
    return [e.op("Add", [y, _learned_operand(e, p.axis, len(e.layer.blobs) - 1)])]


def _bias(e):
    return [e.op("Add", [e.inputs[0], _operand(e, e.param.bias_param.axis)])]


def _mvn(e):
    p = e.param.mvn_param
    ndim = len(e.bottom_shapes[0])
    axes = list(range(1 if p.across_channels else 2, ndim))
    if ndim < 2 or not axes:
        e.fail(f"a bottom of shape {e.bottom_shapes[0]} leaves nothing to normalise over")
    centred, var = _centred(e, e.inputs[0], axes)
    if not p.normalize_variance:
        return [centred]
    std = e.op("Add", [e.op("Sqrt", [var]), e.constant(p.eps, "eps")])
    return [e.op("Div", [centred, std])]


# -- neuron ---------------------------------------------------------------------------------

def _simple(op_type):
    def convert(e):
        return [e.op(op_type, e.inputs)]
    return convert


def _relu(e):
    slope = e.param.relu_param.negative_slope
    if slope == 0:
        return [e.op("Relu", e.inputs)]
    return [e.op("LeakyRelu", e.inputs, alpha=slope)]


def _elu(e):
    return [e.op("Elu", e.inputs, alpha=e.param.elu_param.alpha)]


def _prelu(e):
    slopes = e.layer.blobs[0]
    shape = (1,) if e.param.prelu_param.channel_shared else \
        _channel_shape(e.bottom_shapes[0], slopes.count)
    return [e.op("PRelu", [e.inputs[0], e.weight(0, shape)])]


def _affine(e, x, scale, shift):
    """shift + scale * x, leaving out the identity steps."""
    if scale != 1:
        x = e.op("Mul", [x, e.constant(scale, "scale")])
    if shift != 0:
        x = e.op("Add", [x, e.constant(shift, "shift")])
    return x


def _power(e):
    p = e.param.power_param
    if p.power * p.scale == 0:
        value = 1.0 if p.power == 0 else p.shift ** p.power
        onnx = e.graph.onnx
        return [e.op("ConstantOfShape", [e.op("Shape", e.inputs)],
                     value=onnx.helper.make_tensor("value", onnx.TensorProto.FLOAT, [1],
                                                   [value]))]
    base = _affine(e, e.inputs[0], p.scale, p.shift)
    return [base if p.power == 1 else e.op("Pow", [base, e.constant(p.power, "power")])]


def _exp(e):
    p = e.param.exp_param
    log_base = 1.0 if p.base == -1 else math.log(p.base)
    return [e.op("Exp", [_affine(e, e.inputs[0], log_base * p.scale, log_base * p.shift)])]


def _log(e):
    p = e.param.log_param
    y = e.op("Log", [_affine(e, e.inputs[0], p.scale, p.shift)])
    return [y if p.base == -1 else _affine(e, y, 1.0 / math.log(p.base), 0.0)]


def _threshold(e):
    above = e.op("Greater", [e.inputs[0], e.constant(e.param.threshold_param.threshold,
                                                      "threshold")])
    return [e.op("Cast", [above], to=e.graph.onnx.TensorProto.FLOAT)]


def _clip(e):
    p = e.param.clip_param
    return [e.op("Clip", [e.inputs[0], e.constant(p.min, "min"), e.constant(p.max, "max")])]


def _swish(e):
    x = e.inputs[0]
    gate = e.op("Sigmoid", [_affine(e, x, e.param.swish_param.beta, 0.0)])
    return [e.op("Mul", [x, gate])]


# -- layer types beyond BVLC Caffe's (forks' layers that published nets use) --------------

def _relu6(e):
    return [e.op("Clip", [e.inputs[0], e.constant(0.0, "min"), e.constant(6.0, "max")])]


def _permute(e):
    n = len(e.bottom_shapes[0])
    order = list(e.param.permute_param.order)
    order += [a for a in range(n) if a not in order]
    if order[0] != 0:
        e.not_on_batch(0, "moving the batch axis")
    return [e.op("Transpose", e.inputs, perm=order)]


def _shuffle_channel(e):
    group = e.param.shuffle_channel_param.group
    grid_shape = [0, group, e.bottom_shapes[0][1] // group, -1]
    grid = e.op("Reshape", [e.inputs[0], e.constant(grid_shape, "grid", np.int64)])
    swapped = e.op("Transpose", [grid], perm=[0, 2, 1, 3])
    return [e.reshape(swapped, e.top_shapes[0], keeps_batch=True)]


def _upsample(e):
    scale = float(e.param.upsample_param.scale)       # source pixel: floor(o / scale)
    return [e.op("Resize", [e.inputs[0], "", e.constant([1, 1, scale, scale], "scales")],
                 mode="nearest", coordinate_transformation_mode="asymmetric",
                 nearest_mode="floor")]


def _interp(e):
    p = e.param.interp_param
    x, shape = e.inputs[0], e.bottom_shapes[0]
    size_in = [s + p.pad_beg + p.pad_end for s in shape[2:]]
    if p.pad_beg or p.pad_end:
        x = e.op("Slice", [x, e.constant([-p.pad_beg] * 2, "starts", np.int64),
                           e.constant([s + p.pad_end for s in shape[2:]], "ends", np.int64),
                           e.constant([2, 3], "axes", np.int64)])
    # With aligned corners the source row is o * (in - 1) / (out - 1), whatever the scale;
    # the scales only set the output size, floor(in * scale): half a pixel over keeps it exact.
    scales = [1, 1] + [(o + 0.5) / i for i, o in zip(size_in, e.top_shapes[0][2:])]
    return [e.op("Resize", [x, "", e.constant(scales, "scales")], mode="linear",
                 coordinate_transformation_mode="align_corners")]


_REDUCE_OPS = {"SUM": "ReduceSum", "ASUM": "ReduceL1", "SUMSQ": "ReduceSumSquare",
               "MEAN": "ReduceMean"}


def _reduction(e):
    p = e.param.reduction_param
    axis = e.axis(p.axis)
    rows = e.op("Reshape", [e.inputs[0], e.constant([0] * axis + [-1], "shape", np.int64)])
    operation = type(p).ReductionOp.Name(p.operation)
    total = e.reduce(_REDUCE_OPS[operation], rows, [axis], keepdims=0)
    return [_affine(e, total, p.coeff, 0.0)]


def _tile(e):
    p = e.param.tile_param
    repeats = [1] * len(e.bottom_shapes[0])
    repeats[e.axis(p.axis)] = p.tiles
    return [e.op("Tile", [e.inputs[0], e.constant(repeats, "repeats", np.int64)])]


def _parameter(e):
    return [e.weight(0)]


def _embed(e):
    indices = e.op("Cast", e.inputs, to=e.graph.onnx.TensorProto.INT64)
    rows = e.op("Gather", [e.weight(0), indices], axis=0)
    return [e.op("Add", [rows, e.weight(1)]) if e.param.embed_param.bias_term else rows]


def _normalize(e):
    p = e.param.norm_param
    ndim = len(e.bottom_shapes[0])
    x = e.inputs[0]
    sums = e.reduce("ReduceSumSquare", x, list(range(1, ndim)) if p.across_spatial else [1])
    norm = e.op("Sqrt", [e.op("Add", [sums, e.constant(p.eps, "eps")])])
    scale = e.layer.blobs[0]
    shape = (1,) if scale.count == 1 else _channel_shape(e.bottom_shapes[0], scale.count)
    return [e.op("Mul", [e.op("Div", [x, norm]), e.weight(0, shape)])]


def _spp(e):
    """Each pyramid level is the SPP layer's own Pooling layer, exported as Pooling is;
    the levels are flattened and joined (one level: its pooled blob as it is)."""
    pooled = [_pooling(_LayerExport(e.graph, layer, e.where, e.inputs, [level_bottom],
                                    [level_top], e.dynamic))[0]
              for level_bottom, layer, level_top in e.layer.levels]
    if len(pooled) == 1:
        return pooled
    return [e.op("Concat", [e.op("Flatten", [p], axis=1) for p in pooled], axis=1)]


def _prior_box(e):
    """The boxes depend only on the shapes, which the export fixes: a constant."""
    e.layer.forward(e.bottoms, e.tops)
    return [e.constant(backend.to_host(e.tops[0].data), "boxes")]


_CONVERTERS = {
    "Convolution": _convolution, "Deconvolution": _convolution, "Pooling": _pooling,
    "LRN": _lrn, "InnerProduct": _inner_product, "Eltwise": _eltwise, "Concat": _concat,
    "Slice": _slice, "Split": _alias, "Crop": _crop, "Flatten": _flatten,
    "Reshape": _reshape, "Softmax": _softmax, "ArgMax": _argmax, "Silence": _silence,
    "BatchNorm": _batch_norm, "Scale": _scale, "Bias": _bias, "MVN": _mvn,
    "ReLU": _relu, "PReLU": _prelu, "ELU": _elu, "Sigmoid": _simple("Sigmoid"),
    "TanH": _simple("Tanh"), "AbsVal": _simple("Abs"), "BNLL": _simple("Softplus"),
    "Power": _power, "Exp": _exp, "Log": _log, "Dropout": _alias, "Threshold": _threshold,
    "Clip": _clip, "Swish": _swish,
    "ReLU6": _relu6, "Permute": _permute, "ShuffleChannel": _shuffle_channel,
    "Upsample": _upsample, "Interp": _interp, "Reduction": _reduction, "Tile": _tile,
    "Parameter": _parameter, "Embed": _embed, "Normalize": _normalize,
    "PriorBox": _prior_box, "SPP": _spp,
}


def exportable_types() -> list[str]:
    """The layer types export_onnx converts (besides Input)."""
    return sorted(_CONVERTERS)


# -- the whole net --------------------------------------------------------------------------

def _batch_size(batch):
    if batch == "dynamic":
        return None
    if isinstance(batch, numbers.Integral) and not isinstance(batch, bool) and batch >= 1:
        return int(batch)
    raise ConfigError(f"batch must be 'dynamic' or a positive integer, got {batch!r}")


def export_onnx(net, path=None, opset: int = DEFAULT_OPSET, batch="dynamic", outputs=None):
    """Write ``net`` (TEST phase, with its current weights) to ``path`` as an ONNX model and
    return the ModelProto (``path`` None: return it only).

    ``batch``: "dynamic" (the first axis of every input is "N") or a fixed size, for which
    the net's inputs are reshaped for the export and back after it (blobs whose shape
    changes come back zeroed, as any reshape leaves them). ``outputs``:
    the blobs to make graph outputs (default the net's outputs); each holds the blob's value
    after a forward, as ``net.blobs[name].data`` does.
    """
    onnx = _onnx()
    if net.phase != caffe_pb2.TEST:
        raise ConfigError(f"net '{net.name}': export a TEST-phase net (Dropout and BatchNorm "
                          "compute differently in TRAIN)")
    latest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= latest:
        raise ConfigError(f"opset {opset} is outside the supported {MIN_OPSET}..{latest}")
    fixed = _batch_size(batch)
    outputs = list(net.outputs if outputs is None else outputs)
    for name in outputs:
        if name not in net.blobs:
            raise ConfigError(f"net '{net.name}' has no blob '{name}' to export as an output")
    saved = {name: net.blobs[name].shape for name in net.inputs}
    resized = fixed is not None and any(shape[:1] != (fixed,) for shape in saved.values())
    if resized:
        for name, shape in saved.items():
            net.blobs[name].reshape((fixed,) + shape[1:])
        net.reshape()
    try:
        model = _build_model(onnx, net, opset, fixed is None, outputs)
    finally:
        if resized:
            for name, shape in saved.items():
                net.blobs[name].reshape(shape)
            net.reshape()
    payload = model.SerializeToString()
    onnx.checker.check_model(payload, full_check=True)
    if path is not None:
        atomic_write(path, payload)
    return model


def _build_model(onnx, net, opset, dynamic, outputs):
    helper = onnx.helper
    graph = _Graph(onnx, opset, reserved=set(net.inputs) | set(outputs))
    values = {}                 # Caffe blob name -> its latest graph value
    graph_inputs = []
    for layer, where in zip(net.layers, net.layer_locations):
        lp = layer.param
        if lp.type == "Input":
            for name in lp.top:
                values[name] = name
                shape = list(net.blobs[name].shape)
                if dynamic and shape:
                    shape[0] = "N"
                graph_inputs.append(helper.make_tensor_value_info(
                    name, onnx.TensorProto.FLOAT, shape))
            continue
        export = _LayerExport(graph, layer, where, [values[b] for b in lp.bottom],
                              [net.blobs[b] for b in lp.bottom],
                              [net.blobs[t] for t in lp.top], dynamic)
        convert = _CONVERTERS.get(lp.type)
        if convert is None:
            export.fail(f"no ONNX form (exportable types: Input, "
                        f"{', '.join(exportable_types())})")
        for name, value in zip(lp.top, convert(export)):
            values[name] = value

    renames, graph_outputs = {}, []
    produced = {out for node in graph.nodes for out in node.output}
    for name in outputs:
        value = values[name]
        if value != name:
            if value in produced and value not in renames:
                renames[value] = name
            else:               # an input, or a value already named for another output
                graph.nodes.append(helper.make_node("Identity", [renames.get(value, value)],
                                                    [name], name=f"{name}/Identity"))
        shape = list(net.blobs[name].shape)
        if dynamic and shape:
            shape[0] = None
        graph_outputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))
    graph.rename(renames)

    model = graph.model
    model.graph.name = net.name or "owlnet"
    model.graph.node.extend(graph.nodes)
    model.graph.input.extend(graph_inputs)
    model.graph.output.extend(graph_outputs)
    model.opset_import.add(domain="", version=opset)
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    model.producer_name = "owlnet"
    return model
