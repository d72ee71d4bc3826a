"""Loss layers and Accuracy.

A loss layer's first top is a scalar blob (shape ``()``); backward scales every gradient by
that top's diff, which the net sets to the layer's loss weight. Labels arrive as float
values and are truncated to integers, as Caffe's ``static_cast<int>`` does.
"""
from __future__ import annotations

import numpy as np

from .. import backend, device_checks, fileio
from ..errors import ConfigError, DataError
from ..proto import caffe_pb2
from .base import Layer, register
from .common import softmax

_FULL, _VALID, _BATCH_SIZE, _NONE = 0, 1, 2, 3
# Caffe clamps probabilities at FLT_MIN before the log, in every precision.
_FLT_MIN = float(np.finfo(np.float32).tiny)
# MultinomialLogisticLoss and InfogainLoss clamp at this instead.
_LOG_THRESHOLD = 1e-20


class LossLayer(Layer):
    """Shared loss plumbing: scalar top 0, no gradient to the labels (bottom 1)."""

    is_loss = True
    exact_tops = 1
    ignore_label = None

    def allow_force_backward(self, bottom_index):
        return bottom_index != 1

    def check_no_label_gradient(self, propagate_down, label_index=1):
        if len(propagate_down) > label_index and propagate_down[label_index]:
            self.fail(f"cannot backpropagate to the labels (bottom {label_index})", ConfigError)

    def read_ignore_label(self, message=None):
        """``ignore_label`` of ``message`` (default: loss_param), None when unset."""
        message = self.param.loss_param if message is None else message
        self.ignore_label = message.ignore_label if message.HasField("ignore_label") else None

    def read_normalization(self, default):
        loss = self.param.loss_param
        if loss.HasField("normalization"):
            self.normalization = loss.normalization
        elif loss.HasField("normalize"):
            self.normalization = _VALID if loss.normalize else _BATCH_SIZE
        else:
            self.normalization = default

    def normalizer(self, xp, outer, inner, valid_count):
        """Caffe's divisor for the summed loss, at least 1 (``valid_count`` may be an array)."""
        if self.normalization == _FULL:
            value = outer * inner
        elif self.normalization == _VALID:
            if self.ignore_label is None:
                value = outer * inner
            else:
                return xp.maximum(valid_count, 1.0)
        elif self.normalization == _BATCH_SIZE:
            value = outer
        else:
            value = 1
        return float(max(value, 1))

    def integer_labels(self, label_data, num_classes):
        """(labels as int64, mask of positions not ignored); out-of-range labels raise."""
        xp = backend.array_module(label_data)
        labels = label_data.astype(np.int64)
        valid = (labels != self.ignore_label) if self.ignore_label is not None else None
        bad = (labels < 0) | (labels >= num_classes)
        if valid is not None:
            bad &= valid
        if device_checks.deferring():       # a captured step: no host sync
            device_checks.defer(f"{self.name}: labels", bad.any(), lambda: DataError(
                f"layer '{self.name}' ({self.type}): a label outside [0, {num_classes}) "
                "classes (found by the captured step since the last display)"))
        elif bool(bad.any()):
            value = float(label_data.reshape(-1)[int(xp.argmax(bad.reshape(-1)))])
            raise DataError(f"layer '{self.name}' ({self.type}): label {value:g} is outside "
                            f"[0, {num_classes}) classes")
        if valid is None:
            return labels, None
        return xp.where(valid, labels, 0), valid


class _PerItemLossLayer(LossLayer):
    """Bottom 0 viewed as (N, classes) with N its first dimension; one label per item."""

    exact_bottoms = 2

    def reshape(self, bottom, top):
        self.num = bottom[0].num
        self.classes = bottom[0].count // max(self.num, 1)
        if bottom[1].count != self.num:
            self.fail(f"label blob '{bottom[1].name}' of shape {bottom[1].shape} needs one label "
                      f"per item of bottom '{bottom[0].name}' of shape {bottom[0].shape}")
        top[0].reshape(())

    def item_labels(self, bottom):
        """The labels as int64, shape (N,); out-of-range labels raise a DataError."""
        return self.integer_labels(bottom[1].data.reshape(self.num), self.classes)[0]


class _ClassLossLayer(LossLayer):
    """Predictions with a class axis and one label per (outer, inner) position."""

    def class_layout(self, bottom, axis):
        self.axis = self.canonical_axis(bottom[0], axis)
        self.outer = bottom[0].count_from(0, self.axis)
        self.inner = bottom[0].count_from(self.axis + 1)
        self.classes = bottom[0].shape[self.axis]
        if bottom[1].count != self.outer * self.inner:
            self.fail(f"label blob '{bottom[1].name}' of shape {bottom[1].shape} has "
                      f"{bottom[1].count} labels, but predictions of shape {bottom[0].shape} "
                      f"with class axis {self.axis} need {self.outer * self.inner}")

    def as_classes(self, array):
        return array.reshape(self.outer, self.classes, self.inner)

    def gather(self, scores, labels):
        """``scores[n, labels[n, i], i]`` for (outer, classes, inner) ``scores``."""
        xp = backend.array_module(scores)
        return xp.take_along_axis(scores, labels[:, None, :], axis=1)[:, 0, :]


@register("SoftmaxWithLoss")
class SoftmaxWithLossLayer(_ClassLossLayer):
    """``p = softmax(x)`` along the class axis; loss ``-sum log(max(p[label], FLT_MIN)) / n``
    over positions whose label is not ``ignore_label``, n per ``normalization`` (FULL: all
    positions, VALID: counted positions, BATCH_SIZE: outer count, NONE: 1; at least 1).
    Gradient ``(p - onehot(label)) / n`` times the loss weight. Optional top 1: p."""

    exact_bottoms = 2
    exact_tops = None
    min_tops = 1
    max_tops = 2

    def layer_setup(self, bottom, top):
        self.read_ignore_label()
        self.read_normalization(_VALID)

    def reshape(self, bottom, top):
        self.class_layout(bottom, self.param.softmax_param.axis)
        top[0].reshape(())
        if len(top) == 2:
            top[1].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        xp = backend.array_module(bottom[0].data)
        prob = softmax(self.as_classes(bottom[0].data), 1)
        labels, valid = self.integer_labels(bottom[1].data.reshape(self.outer, self.inner),
                                            self.classes)
        log_p = xp.log(xp.maximum(self.gather(prob, labels), _FLT_MIN))
        valid_count = None
        if valid is not None:
            log_p = log_p * valid
            valid_count = valid.sum(dtype=prob.dtype)
        self.scale_by = self.normalizer(xp, self.outer, self.inner, valid_count)
        top[0].data[...] = -log_p.sum() / self.scale_by
        self.prob, self.labels, self.valid = prob, labels, valid
        if len(top) == 2:
            top[1].data[...] = prob.reshape(bottom[0].shape)

    def backward(self, top, propagate_down, bottom):
        self.check_no_label_gradient(propagate_down)
        if not propagate_down[0]:
            return
        xp = backend.array_module(self.prob)
        hit = xp.arange(self.classes)[None, :, None] == self.labels[:, None, :]
        grad = self.prob - hit
        if self.valid is not None:
            grad *= self.valid[:, None, :]
        grad *= top[0].diff / self.scale_by
        bottom[0].diff[...] = grad.reshape(bottom[0].shape)


@register("Accuracy")
class AccuracyLayer(_ClassLossLayer):
    """Fraction of counted positions (label not ``accuracy_param.ignore_label``; Accuracy does
    not read loss_param) where fewer than ``top_k``
    other classes score at least the true class (ties count against the label); 0 when no
    position counts. Optional top 1: the same per true class, shape (classes,)."""

    is_loss = False
    exact_bottoms = 2
    exact_tops = None
    min_tops = 1
    max_tops = 2

    def layer_setup(self, bottom, top):
        self.read_ignore_label(self.param.accuracy_param)
        self.top_k = self.param.accuracy_param.top_k

    def reshape(self, bottom, top):
        self.class_layout(bottom, self.param.accuracy_param.axis)
        if not 1 <= self.top_k <= self.classes:
            self.fail(f"top_k {self.top_k} must be between 1 and the {self.classes} classes of "
                      f"bottom shape {bottom[0].shape}", ConfigError)
        top[0].reshape(())
        if len(top) == 2:
            top[1].reshape((self.classes,))

    def forward(self, bottom, top):
        xp = backend.array_module(bottom[0].data)
        scores = self.as_classes(bottom[0].data)
        labels, valid = self.integer_labels(bottom[1].data.reshape(self.outer, self.inner),
                                            self.classes)
        true_score = self.gather(scores, labels)
        at_least = (scores >= true_score[:, None, :]).sum(axis=1)
        correct = at_least - 1 < self.top_k
        dtype = top[0].data.dtype
        counted = xp.ones(correct.shape, dtype) if valid is None else valid.astype(dtype)
        hits = correct * counted
        total = counted.sum()
        top[0].data[...] = xp.where(total > 0, hits.sum() / xp.maximum(total, 1), 0)
        if len(top) == 2:
            flat_labels = labels.reshape(-1)
            per_class = xp.bincount(flat_labels, weights=counted.reshape(-1),
                                    minlength=self.classes)
            per_class_hits = xp.bincount(flat_labels, weights=hits.reshape(-1),
                                         minlength=self.classes)
            top[1].data[...] = xp.where(per_class > 0,
                                        per_class_hits / xp.maximum(per_class, 1), 0)

    def allow_force_backward(self, bottom_index):
        return False

    def backward(self, top, propagate_down, bottom):
        # Accuracy is piecewise constant: its derivative is zero wherever it exists.
        self.zero_bottom_diffs(propagate_down, bottom)


@register("EuclideanLoss")
class EuclideanLossLayer(LossLayer):
    """``sum((a - b)^2) / (2 N)`` with N the first dimension; gradients ``±(a - b) / N``
    times the loss weight to both bottoms."""

    exact_bottoms = 2

    def allow_force_backward(self, bottom_index):
        return True

    def reshape(self, bottom, top):
        a, b = bottom
        if a.count_from(1) != b.count_from(1) or a.num != b.num:
            self.fail(f"bottoms '{a.name}' of shape {a.shape} and '{b.name}' of shape {b.shape} "
                      "must have the same size per item")
        top[0].reshape(())

    def forward(self, bottom, top):
        self.difference = bottom[0].data - bottom[1].data.reshape(bottom[0].shape)
        flat = self.difference.reshape(-1)
        top[0].data[...] = (flat @ flat) / (2.0 * bottom[0].num)

    def backward(self, top, propagate_down, bottom):
        scale = top[0].diff / bottom[0].num
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                bottom[i].diff[...] = (sign * scale * self.difference).reshape(bottom[i].shape)


@register("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLossLayer(LossLayer):
    """With targets t (``ignore_label`` positions skipped), loss
    ``sum(max(x, 0) - x t + log(1 + exp(-|x|))) / n``, n per ``normalization``
    (default BATCH_SIZE = first dimension, as Caffe); gradient ``(sigmoid(x) - t) / n``."""

    exact_bottoms = 2

    def layer_setup(self, bottom, top):
        self.read_ignore_label()
        self.read_normalization(_BATCH_SIZE)

    def reshape(self, bottom, top):
        if bottom[0].count != bottom[1].count:
            self.fail(f"prediction shape {bottom[0].shape} and target shape {bottom[1].shape} "
                      "must have the same count")
        top[0].reshape(())

    def forward(self, bottom, top):
        xp = backend.array_module(bottom[0].data)
        x = bottom[0].data
        t = bottom[1].data.reshape(x.shape)
        per_element = xp.maximum(x, 0) - x * t + xp.log1p(xp.exp(-xp.abs(x)))
        valid_count = None
        self.valid = None
        if self.ignore_label is not None:
            self.valid = t.astype(np.int64) != self.ignore_label
            per_element = per_element * self.valid
            valid_count = self.valid.sum(dtype=x.dtype)
        outer = x.shape[0] if x.ndim else 1
        self.scale_by = self.normalizer(xp, outer, bottom[0].count // max(outer, 1), valid_count)
        top[0].data[...] = per_element.sum() / self.scale_by

    def backward(self, top, propagate_down, bottom):
        self.check_no_label_gradient(propagate_down)
        if not propagate_down[0]:
            return
        xp = backend.array_module(bottom[0].data)
        x = bottom[0].data
        grad = 0.5 * xp.tanh(0.5 * x) + 0.5 - bottom[1].data.reshape(x.shape)  # sigmoid(x) - t
        if self.valid is not None:
            grad *= self.valid
        bottom[0].diff[...] = grad * (top[0].diff / self.scale_by)


@register("HingeLoss")
class HingeLossLayer(_PerItemLossLayer):
    """With ``v_nk = max(0, 1 - s x_nk)`` (s = +1 for the true class, -1 otherwise), loss
    ``sum(v) / N`` (L1) or ``sum(v^2) / N`` (L2); x is the bottom as (N, classes).
    Gradient ``-s [v > 0] / N`` (L1) or ``-2 s v / N`` (L2)."""

    def layer_setup(self, bottom, top):
        self.squared = self.param.hinge_loss_param.norm == caffe_pb2.HingeLossParameter.L2

    def forward(self, bottom, top):
        xp = backend.array_module(bottom[0].data)
        x = bottom[0].data.reshape(self.num, self.classes)
        labels = self.item_labels(bottom)
        is_true = xp.arange(self.classes)[None, :] == labels[:, None]
        self.sign = 1.0 - 2.0 * is_true.astype(x.dtype)
        self.margin = xp.maximum(1.0 + self.sign * x, 0)
        total = (self.margin * self.margin).sum() if self.squared else self.margin.sum()
        top[0].data[...] = total / self.num

    def backward(self, top, propagate_down, bottom):
        self.check_no_label_gradient(propagate_down)
        if not propagate_down[0]:
            return
        if self.squared:
            grad = 2.0 * self.margin * self.sign
        else:
            grad = (self.margin > 0) * self.sign
        bottom[0].diff[...] = (grad * (top[0].diff / self.num)).reshape(bottom[0].shape)


@register("ContrastiveLoss")
class ContrastiveLossLayer(LossLayer):
    """With d the Euclidean distance between the two feature rows and y the pair label,
    loss ``sum(y d^2 + (1 - y) max(margin - d, 0)^2) / (2N)`` (``legacy_version``:
    ``max(margin - d^2, 0)``); the dissimilar gradient divides by ``d + 1e-4`` as Caffe."""

    exact_bottoms = 3

    def layer_setup(self, bottom, top):
        p = self.param.contrastive_loss_param
        self.margin = p.margin
        self.legacy = p.legacy_version

    def allow_force_backward(self, bottom_index):
        return bottom_index != 2

    def reshape(self, bottom, top):
        a, b, y = bottom
        if a.shape != b.shape:
            self.fail(f"feature bottoms '{a.name}' of shape {a.shape} and '{b.name}' of shape "
                      f"{b.shape} must match")
        if y.count != a.num:
            self.fail(f"pair label blob '{y.name}' of shape {y.shape} needs one label per item "
                      f"of features of shape {a.shape}")
        top[0].reshape(())

    def forward(self, bottom, top):
        xp = backend.array_module(bottom[0].data)
        num = bottom[0].num
        self.difference = (bottom[0].data - bottom[1].data).reshape(num, -1)
        self.dist_sq = (self.difference * self.difference).sum(axis=1)
        self.similar = bottom[2].data.reshape(num).astype(np.int64) != 0
        if self.legacy:
            apart = xp.maximum(self.margin - self.dist_sq, 0)
        else:
            apart = xp.maximum(self.margin - xp.sqrt(self.dist_sq), 0) ** 2
        per_pair = xp.where(self.similar, self.dist_sq, apart)
        top[0].data[...] = per_pair.sum() / (2.0 * num)

    def backward(self, top, propagate_down, bottom):
        self.check_no_label_gradient(propagate_down, label_index=2)
        xp = backend.array_module(self.difference)
        num = bottom[0].num
        if self.legacy:
            push = -(self.margin - self.dist_sq > 0).astype(self.difference.dtype)
        else:
            dist = xp.sqrt(self.dist_sq)
            shortfall = self.margin - dist
            push = -xp.where(shortfall > 0, shortfall, 0) / (dist + 1e-4)
        factor = xp.where(self.similar, 1.0, push)[:, None] * self.difference
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                grad = factor * (sign * top[0].diff / num)
                bottom[i].diff[...] = grad.reshape(bottom[i].shape)


@register("MultinomialLogisticLoss")
class MultinomialLogisticLossLayer(_PerItemLossLayer):
    """On probabilities p of shape (N, classes): ``-sum log(max(p[label], 1e-20)) / N``;
    gradient ``-1 / max(p[label], 1e-20) / N`` at the label, 0 elsewhere."""

    def forward(self, bottom, top):
        xp = backend.array_module(bottom[0].data)
        prob = bottom[0].data.reshape(self.num, self.classes)
        self.labels = labels = self.item_labels(bottom)
        self.picked = xp.maximum(xp.take_along_axis(prob, labels[:, None], axis=1)[:, 0],
                                 _LOG_THRESHOLD)
        top[0].data[...] = -xp.log(self.picked).sum() / self.num

    def backward(self, top, propagate_down, bottom):
        self.check_no_label_gradient(propagate_down)
        if not propagate_down[0]:
            return
        xp = backend.array_module(self.picked)
        hit = xp.arange(self.classes)[None, :] == self.labels[:, None]
        grad = hit * (-1.0 / self.picked)[:, None] * (top[0].diff / self.num)
        bottom[0].diff[...] = grad.reshape(bottom[0].shape)


@register("InfogainLoss")
class InfogainLossLayer(_ClassLossLayer):
    """``p = softmax(x)`` along ``infogain_loss_param.axis``; loss
    ``-sum_k H[label, k] log(max(p_k, 1e-20)) / n`` over counted positions, n as in
    SoftmaxWithLoss; H (classes x classes) is bottom 2 or the binaryproto ``source``.
    Gradient ``(p sum_k H[label, k] - H[label, :]) / n``."""

    min_bottoms = 2
    max_bottoms = 3
    exact_tops = None
    min_tops = 1
    max_tops = 2

    def layer_setup(self, bottom, top):
        self.read_ignore_label()
        self.read_normalization(_VALID)
        self.fixed_h = None
        if len(bottom) < 3:
            source = self.param.infogain_loss_param.source
            if not source:
                self.fail("needs the infogain matrix as bottom 2 or infogain_loss_param.source",
                          ConfigError)
            proto = fileio.parse_binary(caffe_pb2.BlobProto(), source, "infogain matrix")
            matrix = fileio.blobproto_to_array(proto, where=f"layer '{self.name}': {source}")
            self.fixed_h = backend.to_device(matrix.astype(backend.dtype()))

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0

    def reshape(self, bottom, top):
        self.class_layout(bottom, self.param.infogain_loss_param.axis)
        h_shape = bottom[2].shape if len(bottom) == 3 else self.fixed_h.shape
        if int(np.prod(h_shape)) != self.classes * self.classes:
            self.fail(f"infogain matrix of shape {tuple(h_shape)} must hold "
                      f"{self.classes} x {self.classes} values for predictions of shape "
                      f"{bottom[0].shape}")
        top[0].reshape(())
        if len(top) == 2:
            top[1].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        xp = backend.array_module(bottom[0].data)
        h = (bottom[2].data if len(bottom) == 3 else self.fixed_h)
        h = h.reshape(self.classes, self.classes)
        prob = softmax(self.as_classes(bottom[0].data), 1)
        labels, valid = self.integer_labels(bottom[1].data.reshape(self.outer, self.inner),
                                            self.classes)
        rows = xp.moveaxis(h[labels], 2, 1)  # (outer, classes, inner): H[label, k]
        per_position = (rows * xp.log(xp.maximum(prob, _LOG_THRESHOLD))).sum(axis=1)
        valid_count = None
        if valid is not None:
            rows = rows * valid[:, None, :]
            per_position = per_position * valid
            valid_count = valid.sum(dtype=prob.dtype)
        self.scale_by = self.normalizer(xp, self.outer, self.inner, valid_count)
        top[0].data[...] = -per_position.sum() / self.scale_by
        self.prob, self.rows = prob, rows
        if len(top) == 2:
            top[1].data[...] = prob.reshape(bottom[0].shape)

    def backward(self, top, propagate_down, bottom):
        self.check_no_label_gradient(propagate_down)
        if len(propagate_down) == 3 and propagate_down[2]:
            self.fail("cannot backpropagate to the infogain matrix (bottom 2)", ConfigError)
        if not propagate_down[0]:
            return
        grad = self.prob * self.rows.sum(axis=1, keepdims=True) - self.rows
        grad *= top[0].diff / self.scale_by
        bottom[0].diff[...] = grad.reshape(bottom[0].shape)
