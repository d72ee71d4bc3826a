"""SSD's layers (weiliu89/caffe): Normalize, PriorBox and DetectionOutput.

Boxes are (xmin, ymin, xmax, ymax) in image-normalised coordinates. PriorBox and
DetectionOutput have no gradient (as in SSD); DetectionOutput is meant for TEST nets.
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..errors import ConfigError
from ..proto import caffe_pb2
from .base import Layer, register

_CODE = caffe_pb2.PriorBoxParameter


@register("Normalize")
class NormalizeLayer(Layer):
    """L2 normalisation with a learned scale s (one value, or one per channel when not
    ``channel_shared``): y = s_c * x / sqrt(sum x^2 + eps), the sum over each item's C*H*W
    values when ``across_spatial``, else over the channels at each (n, h, w). Backward, with
    z = x / norm and dz = s dy: dx = (dz - z * sum(dz * z)) / norm over the same group;
    ds_c += sum dy * z."""

    exact_bottoms = 1
    exact_tops = 1

    def layer_setup(self, bottom, top):
        p = self.param.norm_param
        if bottom[0].num_axes < 2:
            self.fail(f"bottom '{bottom[0].name}' must have a channel axis, got shape "
                      f"{bottom[0].shape}")
        self.across_spatial = p.across_spatial
        self.eps = float(p.eps)
        filler = p.scale_filler if p.HasField("scale_filler") else \
            caffe_pb2.FillerParameter(type="constant", value=1.0)
        self.add_param((1,) if p.channel_shared else (bottom[0].shape[1],), filler)

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) < 2 or (self.blobs[0].count > 1 and shape[1] != self.blobs[0].count):
            self.fail(f"bottom shape {shape} does not have the {self.blobs[0].count} channels "
                      "of the scale")
        top[0].reshape(shape)

    def _grouped(self, array):
        """(N, C, S) view of a blob array."""
        return array.reshape(array.shape[0], array.shape[1], -1)

    @property
    def _axes(self):
        """The axes of the (N, C, S) view that one norm sums over."""
        return (1, 2) if self.across_spatial else (1,)

    def _scale(self):
        return self.blobs[0].data.reshape(1, -1, 1)

    def forward(self, bottom, top):
        xp = backend.array_module(bottom[0].data)
        x = self._grouped(bottom[0].data)
        self.norm = xp.sqrt((x * x).sum(axis=self._axes, keepdims=True) + self.eps)
        self.normalized = x / self.norm
        self._grouped(top[0].data)[...] = self.normalized * self._scale()

    def backward(self, top, propagate_down, bottom):
        dy = self._grouped(top[0].diff)
        z = self.normalized
        if self.param_propagate_down[0]:
            grad = (dy * z).sum(axis=(0, 2))
            self.blobs[0].diff += grad.sum(keepdims=True) if self.blobs[0].count == 1 else grad
        if propagate_down[0]:
            dz = dy * self._scale()
            along = (dz * z).sum(axis=self._axes, keepdims=True)
            self._grouped(bottom[0].diff)[...] = (dz - z * along) / self.norm


def _aspect_ratios(p):
    """1, then every given ratio r not yet listed (within 1e-6), followed by 1/r when flip."""
    ratios = [1.0]
    for r in p.aspect_ratio:
        if any(abs(r - known) < 1e-6 for known in ratios):
            continue
        ratios.append(float(r))
        if p.flip:
            ratios.append(1.0 / r)
    return ratios


@register("PriorBox")
class PriorBoxLayer(Layer):
    """Default boxes for each cell (h, w) of the feature map (bottom 0), centred at
    ((w + offset) * step_w, (h + offset) * step_h) in image pixels (image size from img_size /
    img_h, img_w or bottom 1; step from step / step_h, step_w or image size / map size). Per
    min_size m (in order): a box m x m; when max_size M is given, sqrt(mM) x sqrt(mM); then for
    every aspect ratio r != 1, m sqrt(r) wide by m / sqrt(r) high; m and M are truncated to
    integers first, as SSD's Caffe does (``int min_size_``). Coordinates are divided by
    the image size (clipped to [0, 1] with ``clip``). Top (1, 2, 4 * boxes): channel 0 the
    boxes, channel 1 the variance (one value, or four, default 0.1) for every box."""

    exact_bottoms = 2
    exact_tops = 1

    def layer_setup(self, bottom, top):
        p = self.param.prior_box_param
        self.min_sizes = [float(m) for m in p.min_size]
        self.max_sizes = [float(m) for m in p.max_size]
        if not self.min_sizes or min(self.min_sizes) <= 0:
            self.fail("prior_box_param needs positive min_size values", ConfigError)
        if self.max_sizes and (len(self.max_sizes) != len(self.min_sizes) or any(
                big <= small for big, small in zip(self.max_sizes, self.min_sizes))):
            self.fail("prior_box_param needs one max_size, larger than it, per min_size",
                      ConfigError)
        self.ratios = _aspect_ratios(p)
        self.num_priors = len(self.ratios) * len(self.min_sizes) + len(self.max_sizes)
        variance = list(p.variance) or [0.1]
        if len(variance) not in (1, 4) or min(variance) <= 0:
            self.fail(f"prior_box_param.variance must be 1 or 4 positive values, got {variance}",
                      ConfigError)
        self.variance = variance * 4 if len(variance) == 1 else variance
        for single, pair in (("img_size", ("img_h", "img_w")), ("step", ("step_h", "step_w"))):
            if p.HasField(pair[0]) or p.HasField(pair[1]):
                if p.HasField(single):
                    self.fail(f"give {single} or {pair[0]}/{pair[1]}, not both", ConfigError)
                given = pair
            else:
                given = (single,) if p.HasField(single) else ()
            for name in given:
                if getattr(p, name) <= 0:
                    self.fail(f"prior_box_param.{name} must be positive (SSD needs both of "
                              f"{pair[0]}/{pair[1]} once either is given), got "
                              f"{getattr(p, name):g}", ConfigError)

    def reshape(self, bottom, top):
        for b in bottom:
            if b.num_axes != 4:
                self.fail(f"bottom '{b.name}' must be 4-d (N, C, H, W), got {b.shape}")
        h, w = bottom[0].shape[2:]
        top[0].reshape((1, 2, h * w * self.num_priors * 4))

    def _image_and_step(self, bottom):
        p = self.param.prior_box_param
        if p.HasField("img_size"):
            img_h = img_w = p.img_size
        elif p.HasField("img_h") or p.HasField("img_w"):
            img_h, img_w = p.img_h, p.img_w
        else:
            img_h, img_w = bottom[1].shape[2:]
        h, w = bottom[0].shape[2:]
        if p.HasField("step"):
            step_h = step_w = p.step
        elif p.HasField("step_h") or p.HasField("step_w"):
            step_h, step_w = p.step_h, p.step_w
        else:
            step_h, step_w = img_h / h, img_w / w
        return img_h, img_w, step_h, step_w

    def _sizes(self):
        """(width, height) of every box of one cell, in order."""
        sizes = []
        for k, m in enumerate(int(m) for m in self.min_sizes):
            sizes.append((m, m))
            if self.max_sizes:
                side = math.sqrt(m * int(self.max_sizes[k]))
                sizes.append((side, side))
            for r in self.ratios[1:]:
                sizes.append((m * math.sqrt(r), m / math.sqrt(r)))
        return np.array(sizes)

    def forward(self, bottom, top):
        p = self.param.prior_box_param
        img_h, img_w, step_h, step_w = self._image_and_step(bottom)
        h, w = bottom[0].shape[2:]
        cy = (np.arange(h) + p.offset) * step_h
        cx = (np.arange(w) + p.offset) * step_w
        sizes = self._sizes()
        boxes = np.empty((h, w, len(sizes), 4))
        boxes[..., 0] = (cx[None, :, None] - sizes[:, 0] / 2) / img_w
        boxes[..., 1] = (cy[:, None, None] - sizes[:, 1] / 2) / img_h
        boxes[..., 2] = (cx[None, :, None] + sizes[:, 0] / 2) / img_w
        boxes[..., 3] = (cy[:, None, None] + sizes[:, 1] / 2) / img_h
        if p.clip:
            np.clip(boxes, 0.0, 1.0, out=boxes)
        out = np.stack([boxes.reshape(-1), np.tile(self.variance, boxes.size // 4)])
        top[0].data[...] = backend.to_device(out[None].astype(top[0].data.dtype))

    def allow_force_backward(self, bottom_index):
        return False

    def backward(self, top, propagate_down, bottom):
        self.zero_bottom_diffs(propagate_down, bottom)


def decode_boxes(prior, variance, loc, code_type, variance_in_target):
    """Boxes from prior boxes (P, 4) and predicted offsets (..., P, 4) (SSD's DecodeBBox).

    CORNER: prior + v * loc; CORNER_SIZE: prior + v * loc * (pw, ph, pw, ph); CENTER_SIZE:
    centre (pcx + v0 lx pw, pcy + v1 ly ph), size (pw exp(v2 lw), ph exp(v3 lh)); v = 1 when
    the variance is encoded in the target.
    """
    v = np.ones(4) if variance_in_target else variance
    pw, ph = prior[:, 2] - prior[:, 0], prior[:, 3] - prior[:, 1]
    if code_type == _CODE.CORNER:
        return prior + v * loc
    if code_type == _CODE.CORNER_SIZE:
        return prior + v * loc * np.stack([pw, ph, pw, ph], axis=-1)
    pcx, pcy = (prior[:, 0] + prior[:, 2]) / 2, (prior[:, 1] + prior[:, 3]) / 2
    cx = v[..., 0] * loc[..., 0] * pw + pcx
    cy = v[..., 1] * loc[..., 1] * ph + pcy
    half_w = np.exp(v[..., 2] * loc[..., 2]) * pw / 2
    half_h = np.exp(v[..., 3] * loc[..., 3]) * ph / 2
    return np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)


def _area(box):
    """Area of (..., 4) boxes; 0 where a box is inverted (SSD's normalised BBoxSize)."""
    w, h = box[..., 2] - box[..., 0], box[..., 3] - box[..., 1]
    return np.where((w < 0) | (h < 0), 0.0, w * h)


def jaccard(box, others):
    """Intersection over union of one box with each of ``others`` (no +1: normalised)."""
    lo = np.maximum(box[:2], others[:, :2])
    hi = np.minimum(box[2:], others[:, 2:])
    inter = np.where(np.all(hi >= lo, axis=1), np.prod(np.maximum(hi - lo, 0), axis=1), 0.0)
    union = _area(box) + _area(others) - inter
    return np.where(inter > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes, scores, score_threshold, nms_threshold, eta, top_k):
    """SSD's ApplyNMSFast: candidates scoring above ``score_threshold`` by descending score
    (stable; the first ``top_k`` when top_k >= 0); a candidate is kept when its overlap with
    every kept box is <= the threshold, which is multiplied by eta after each keep while
    eta < 1 and it is above 0.5. Returns the kept indices in order."""
    order = [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] > score_threshold]
    if top_k >= 0:
        order = order[:top_k]
    kept, threshold = [], nms_threshold
    for i in order:
        if not kept or np.all(jaccard(boxes[i], boxes[kept]) <= threshold):
            kept.append(i)
            if eta < 1 and threshold > 0.5:
                threshold *= eta
    return kept


@register("DetectionOutput")
class DetectionOutputLayer(Layer):
    """Bottoms: loc (N, P * L * 4), conf (N, P * classes), priors (1, 2, P * 4), with L = 1
    when share_location else classes, conf already a probability (SSD puts a Softmax before
    it). Per image: decode the boxes against the priors (code_type, variance), run NMS per
    class except background_label_id over scores > confidence_threshold (all scores when it
    is unset), then keep the keep_top_k highest-scoring detections over all classes (ties in
    input order). Top (1, 1, D, 7), rows [image, label, score, xmin, ymin, xmax, ymax] by
    image, then label, then NMS order; when nothing is detected, one row per image
    [image, -1, ..., -1]. No backward."""

    exact_bottoms = 3
    exact_tops = 1

    def layer_setup(self, bottom, top):
        p = self.param.detection_output_param
        if not p.HasField("num_classes") or p.num_classes < 1:
            self.fail("detection_output_param.num_classes must be set and positive",
                      ConfigError)
        self.num_classes = p.num_classes
        self.loc_classes = 1 if p.share_location else self.num_classes
        nms_param = p.nms_param
        if nms_param.nms_threshold < 0 or not 0 < nms_param.eta <= 1:
            self.fail("nms_param needs nms_threshold >= 0 and 0 < eta <= 1", ConfigError)
        self.top_k = nms_param.top_k if nms_param.HasField("top_k") else -1
        self.score_threshold = (p.confidence_threshold if p.HasField("confidence_threshold")
                                else -math.inf)

    def reshape(self, bottom, top):
        loc, conf, prior = bottom
        if prior.num_axes != 3 or prior.shape[:2] != (1, 2) or prior.shape[2] % 4:
            self.fail(f"bottom 2 '{prior.name}' (priors) must have shape (1, 2, 4 * P), got "
                      f"{prior.shape}")
        num_priors = prior.shape[2] // 4
        if loc.shape[0] != conf.shape[0] or loc.count_from(1) != num_priors * self.loc_classes * 4:
            self.fail(f"loc '{loc.name}' of shape {loc.shape} does not hold {num_priors} priors x "
                      f"{self.loc_classes} x 4 values per image")
        if conf.count_from(1) != num_priors * self.num_classes:
            self.fail(f"conf '{conf.name}' of shape {conf.shape} does not hold {num_priors} "
                      f"priors x {self.num_classes} classes per image")
        self.num_priors = num_priors
        top[0].reshape((1, 1, 1, 7))

    def allow_force_backward(self, bottom_index):
        return False

    def _detect(self, boxes, scores):
        """{label: kept prior indices} for one image; boxes (L, P, 4), scores (P, classes)."""
        p = self.param.detection_output_param
        found = {}
        for label in range(self.num_classes):
            if label == p.background_label_id:
                continue
            class_boxes = boxes[0 if self.loc_classes == 1 else label]
            kept = nms(class_boxes, scores[:, label], self.score_threshold,
                       p.nms_param.nms_threshold, p.nms_param.eta, self.top_k)
            if kept:
                found[label] = kept
        total = sum(len(v) for v in found.values())
        if 0 <= p.keep_top_k < total:
            pairs = [(scores[i, label], label, i) for label, kept in found.items() for i in kept]
            order = sorted(range(len(pairs)), key=lambda k: -pairs[k][0])[:p.keep_top_k]
            found = {}
            for k in order:
                found.setdefault(pairs[k][1], []).append(pairs[k][2])
        return found

    def forward(self, bottom, top):
        p = self.param.detection_output_param
        num = bottom[0].shape[0]
        loc = backend.to_host(bottom[0].data).astype(np.float64).reshape(
            num, self.num_priors, self.loc_classes, 4).transpose(0, 2, 1, 3)
        conf = backend.to_host(bottom[1].data).astype(np.float64).reshape(
            num, self.num_priors, self.num_classes)
        prior_data = backend.to_host(bottom[2].data).astype(np.float64)[0]
        priors = prior_data[0].reshape(-1, 4)
        variance = prior_data[1].reshape(-1, 4)
        rows = []
        for n in range(num):
            boxes = decode_boxes(priors, variance, loc[n], p.code_type,
                                 p.variance_encoded_in_target)
            for label, kept in sorted(self._detect(boxes, conf[n]).items()):
                class_boxes = boxes[0 if self.loc_classes == 1 else label]
                for i in kept:
                    rows.append([n, label, conf[n, i, label], *class_boxes[i]])
        if not rows:
            rows = [[n] + [-1] * 6 for n in range(num)]
        out = np.array(rows, dtype=np.float64)
        top[0].reshape((1, 1, len(rows), 7))
        top[0].data[...] = backend.to_device(out.reshape(top[0].shape).astype(top[0].data.dtype))

    def backward(self, top, propagate_down, bottom):
        if any(propagate_down):
            self.fail("has no backward", ConfigError)
