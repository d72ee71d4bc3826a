"""Fused steps: a convolution and the per-channel layers that follow it in place (inference);
BatchNorm, Scale and ReLU (training).

A deploy net's Convolution is usually followed, in place on its top, by BatchNorm (global
statistics), Scale, Bias and ReLU. Where none of these layers runs backward, ``Net.forward_range``
runs such a chain as one step:

    y = conv(x);   y = y * a + b  (per channel c);   y = relu(y)  (the chain's ReLU, if any)

where the affine layers, taken in order, compose into a and b from the parameter blobs' values
at that forward (so edits to ``net.params`` between forwards count; on the host the composed
values are kept while those values keep their bytes): the convolution's bias
gives b = bias; BatchNorm (mu, s = 1 / sqrt(var + eps), its moving-average factor applied)
maps (a, b) to (a s, (b - mu) s); Scale (gamma, beta) to (a gamma, b gamma + beta); Bias (beta)
to (a, b + beta). A Convolution applies a, b and a plain ReLU as it writes its output
(``conv_forward``'s scale, shift and relu: the CPU's direct kernel on each tile before
storing it, else one pass after); a Deconvolution's output gets one pass after. The top blob
ends with the values the layer-by-layer run gives, up to float32 rounding (the intermediate
values of the chain are not kept: the chain is in place).

The net's layers, blobs, parameters and files are unchanged; a chain is run layer by layer
whenever its intermediate values can be observed: forward callbacks registered, or a
``forward_range`` that starts or ends inside it.

Fused training steps: in a net that learns, a BatchNorm with batch statistics followed in
place on its top by a Scale (one learned value per channel) and/or a ReLU (no slope) runs as
one pass over memory each way (``NormalizationStep``):

    forward:  xhat = (x - mean) * inv_std;  y = relu(xhat * gamma + beta)
    backward: g = dy * (y > 0);  dgamma += sum g * xhat;  dbeta += sum g;
              dx = (g - mean(g) - xhat * mean(g * xhat)) * inv_std * gamma

(means over each channel's batch values), which is the layers' backward composed. The
layers keep the state their own backward reads (BatchNorm's xhat, lent to the Scale as its
input), so either direction may run fused and the other layer by layer: backward runs layer
by layer when backward callbacks are registered or the range starts or ends inside the chain.

In a net that learns, a convolution followed in place by a ReLU with no slope also runs its
forward as one step (``plan_learning_convolutions``; its backward layer by layer).

``net.fuse = False`` (or $OWLNET_FUSE=0 when the net is built) turns every kind off for a net.
"""
from __future__ import annotations

import os

import numpy as np

from . import backend, kernels
from .layer_types.normalization import BatchNormLayer, BiasLayer, ScaleLayer
from .layer_types.neuron import ReLULayer
from .layer_types.vision import ConvolutionLayer, DeconvolutionLayer


def enabled_by_environment() -> bool:
    """False when $OWLNET_FUSE is "0"."""
    return os.environ.get("OWLNET_FUSE", "1") != "0"


class FusedStep:
    """Layers ``first..last`` of a net: a convolution, then in place on its top the per-channel
    affine layers ``affine`` (BatchNorm, Scale, Bias) and at most one ReLU, ``relu``, last."""

    def __init__(self, first, conv, bottom, top, affine, relu):
        self.first, self.last = first, first + len(affine) + (relu is not None)
        self.conv, self.bottom, self.top = conv, bottom, top
        self.affine, self.relu = affine, relu
        self._affine_key, self._affine = None, None
        self._shapes = None         # (bottom, top) shapes when the convolution last reshaped

    def forward(self):
        """Run the chain on the current parameter values (see the module docstring)."""
        # The other layers work in place on the top, whose shape only the convolution sets
        # (again only when a shape changed: a ResNet-56 forward has 57 of these steps).
        if self._shapes != (self.bottom.shape, self.top.shape):
            self.conv.reshape([self.bottom], [self.top])
            self._shapes = (self.bottom.shape, self.top.shape)
        scale, shift = self._current_affine()
        relu = self.relu
        plain_relu = relu is not None and relu.negative_slope == 0
        if not self.conv.transposed:
            self.conv.forward_without_bias(self.bottom, self.top, scale=scale, shift=shift,
                                           relu=plain_relu)
            relu = None if plain_relu else relu
        else:
            y = self.conv.forward_without_bias(self.bottom, self.top)
            if scale is not None or shift is not None:
                # One pass: the affine, and the ReLU when it has no slope.
                y3 = y.reshape(y.shape[0], y.shape[1], -1)
                kernels.get(backend.array_module(y)).scale_forward(y3, scale, shift, y3, None,
                                                                   plain_relu)
                relu = None if plain_relu else relu
        if relu is not None:
            relu.forward([self.top], [self.top])

    def _current_affine(self):
        """:meth:`per_channel_affine`, computed again on the host only when the values it is
        made of changed since the last forward (their bytes are the key: a few hundred, where
        the composition is a dozen small NumPy calls)."""
        blobs = ([self.conv.blobs[1]] if self.conv.bias_term else []) + [
            blob for layer in self.affine for blob in layer.blobs]   # all that it reads
        sources = [blob.data for blob in blobs]
        if any(type(array) is not np.ndarray for array in sources):
            return self.per_channel_affine()        # device arrays: no host reads
        key = b"".join(array.tobytes() for array in sources)
        if key != self._affine_key:
            self._affine_key, self._affine = key, self.per_channel_affine()
        return self._affine

    def per_channel_affine(self):
        """``(a, b)``, each of length C or None (1, 0), with y -> y * a + b equal to the
        convolution's bias followed by the affine layers."""
        scale = None
        shift = self.conv.blobs[1].data if self.conv.bias_term else None
        for layer in self.affine:
            if isinstance(layer, BatchNormLayer):
                mean, inv_std = layer.global_statistics()
                factor, offset = inv_std, None
                shift = -mean if shift is None else shift - mean
            elif isinstance(layer, ScaleLayer):
                factor = layer.blobs[0].data
                offset = None if layer.bias_index is None else layer.blobs[layer.bias_index].data
            else:
                factor, offset = None, layer.blobs[0].data
            if factor is not None:
                scale = factor if scale is None else scale * factor
                shift = None if shift is None else shift * factor
            if offset is not None:
                shift = offset if shift is None else shift + offset
        return scale, shift


def plan(net) -> dict:
    """{first layer index: FusedStep} for every chain of ``net`` that can be fused: a
    Convolution or Deconvolution (one bottom, one top, channels on axis 1, 2 spatial axes)
    followed in place by at least one of BatchNorm with global statistics, Scale or Bias
    with a learned operand of one value per channel, ReLU (ending the chain); no layer of it
    runs backward or has a loss weight."""
    steps = {}
    for first, conv in enumerate(net.layers):
        if not _fusable_convolution(net, first, conv):
            continue
        top, channels = net._tops[first][0], conv.num_output
        affine, relu = [], None
        for li in range(first + 1, len(net.layers)):
            layer = net.layers[li]
            bottoms, tops = net._bottoms[li], net._tops[li]
            in_place = len(bottoms) == len(tops) == 1 and bottoms[0] is top and tops[0] is top
            if not (in_place and _runs_forward_only(net, li)):
                break
            if isinstance(layer, ReLULayer):
                relu = layer
                break
            if not _per_channel_affine(layer, top, channels):
                break
            affine.append(layer)
        if affine or relu is not None:
            steps[first] = FusedStep(first, conv, net._bottoms[first][0], top, affine, relu)
    return steps


def plan_learning_convolutions(net) -> dict:
    """{first layer index: FusedStep} for every Convolution or Deconvolution of ``net`` that
    learns (one bottom, channels on axis 1, 2 spatial axes, no loss weight) followed in place
    by a ReLU with no negative slope and no loss weight: their forward as one step (the
    convolution applies the ReLU as it writes its output, so the top is written once, not
    written and then read and written again). Their backward runs layer by layer: the ReLU's
    reads the top, which holds what the layers give."""
    steps = {}
    for first, conv in enumerate(net.layers[:-1]):
        if not (type(conv) in (ConvolutionLayer, DeconvolutionLayer) and conv.axis == 1
                and len(net._bottoms[first]) == 1 and conv.runs_backward
                and not net._loss_weights[first]):
            continue
        top, relu = net._tops[first][0], net.layers[first + 1]
        if isinstance(relu, ReLULayer) and relu.negative_slope == 0 \
                and _in_place(net, first + 1, top) and not net._loss_weights[first + 1]:
            steps[first] = FusedStep(first, conv, net._bottoms[first][0], top, [], relu)
    return steps


class NormalizationStep:
    """Layers ``first..last`` of a net that learns, all in place on ``blob``: BatchNorm
    ``batch_norm`` with batch statistics, then a Scale ``scale`` and/or a ReLU ``relu`` (each
    None when absent)."""

    def __init__(self, first, batch_norm, scale, relu, blob):
        self.first, self.last = first, first + (scale is not None) + (relu is not None)
        self.batch_norm, self.scale, self.relu = batch_norm, scale, relu
        self.blob = blob

    def _scale_and_bias(self):
        if self.scale is None:
            return None, None
        blobs, index = self.scale.blobs, self.scale.bias_index
        return (blobs[0].data.reshape(-1),
                None if index is None else blobs[index].data.reshape(-1))

    def forward(self):
        for layer in (self.batch_norm, self.scale, self.relu):
            if layer is not None:
                layer.reshape([self.blob], [self.blob])
        scale, bias = self._scale_and_bias()
        self.batch_norm.normalize_batch(self.blob, self.blob, scale, bias, self.relu is not None)
        if self.scale is not None:
            self.scale.borrow_input(self.batch_norm.normalized)

    def backward(self):
        scale, _ = self._scale_and_bias()
        relu_top = None if self.relu is None else self.blob.data
        scale_sums, bias_sums = self.batch_norm.normalized_backward(self.blob, self.blob, scale,
                                                                    relu_top)
        if self.scale is not None:
            self.scale.add_parameter_gradients(scale_sums, bias_sums)


def plan_training(net) -> dict:
    """{first layer index: NormalizationStep} for every BatchNorm of ``net`` with batch
    statistics, in place (the diffs a chain leaves are then those of the layers: one blob),
    whose backward runs into its bottom, followed in place on its top by a Scale
    with one bottom and a learned value per channel (axis 1), a ReLU with no negative slope,
    or both in that order; none of them with a loss weight, all running backward."""
    steps = {}
    for first, layer in enumerate(net.layers):
        if not isinstance(layer, BatchNormLayer) or layer.use_global_stats:
            continue
        top = net._tops[first][0]
        if not (_in_place(net, first, top) and _learns(net, first)
                and net._bottom_need_backward[first][0] and len(top.shape) > 1):
            continue
        found = {ScaleLayer: None, ReLULayer: None}
        li = first + 1
        for kind in (ScaleLayer, ReLULayer):
            if li < len(net.layers) and isinstance(net.layers[li], kind) \
                    and _in_place(net, li, top) and _learns(net, li) \
                    and _fusable_after_batch_norm(net.layers[li], top):
                found[kind] = net.layers[li]
                li += 1
        if found[ScaleLayer] is not None or found[ReLULayer] is not None:
            steps[first] = NormalizationStep(first, layer, found[ScaleLayer], found[ReLULayer],
                                             top)
    return steps


def _in_place(net, li, blob) -> bool:
    bottoms, tops = net._bottoms[li], net._tops[li]
    return len(bottoms) == len(tops) == 1 and bottoms[0] is blob and tops[0] is blob


def _learns(net, li) -> bool:
    return net._layer_need_backward[li] and not net._loss_weights[li]


def _fusable_after_batch_norm(layer, top) -> bool:
    if isinstance(layer, ReLULayer):
        return layer.negative_slope == 0
    return _per_channel_affine(layer, top, top.shape[1])


def _runs_forward_only(net, li) -> bool:
    return not net.layers[li].runs_backward and not net._loss_weights[li]


def _fusable_convolution(net, li, layer) -> bool:
    # The exact types: a Convolution set up for other than 2 spatial axes changes class.
    return (type(layer) in (ConvolutionLayer, DeconvolutionLayer) and layer.axis == 1
            and len(net._bottoms[li]) == 1 and _runs_forward_only(net, li))


def _per_channel_affine(layer, top, channels) -> bool:
    """Whether ``layer`` (in place on ``top``, channels on axis 1) maps each channel c by
    y -> y * s_c + t_c with values read from its own blobs."""
    if isinstance(layer, BatchNormLayer):
        return layer.use_global_stats
    if isinstance(layer, ScaleLayer):
        axis = layer.param.scale_param.axis
    elif isinstance(layer, BiasLayer):
        axis = layer.param.bias_param.axis
    else:
        return False
    return (len(layer.blobs) > 0 and layer.blobs[0].shape == (channels,)
            and top.canonical_axis(axis) == 1)
