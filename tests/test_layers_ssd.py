"""SSD layers: Normalize against float64 loops and finite differences; PriorBox and
DetectionOutput (forward only) against hand-worked boxes and an independent loop."""
import itertools
import math

import numpy as np
import pytest

import owlnet.layer_types  # noqa: F401  (registers the layer types)
from gradcheck import TEST, check_gradient, forward, make_layer
from owlnet.errors import ConfigError
from owlnet.layer_types.ssd import decode_boxes
from owlnet.proto import caffe_pb2

rs = np.random.default_rng(13)


# -- Normalize --------------------------------------------------------------------------------
@pytest.mark.parametrize("across,shared", list(itertools.product(["true", "false"], repeat=2)))
def test_normalize(across, shared):
    x = rs.standard_normal((2, 3, 2, 2))
    text = (f'name: "n" type: "Normalize" norm_param {{ across_spatial: {across} '
            f'channel_shared: {shared} scale_filler {{ type: "gaussian" std: 1 mean: 2 }} }}')
    layer, bottom, top = make_layer(text, [x])
    s = layer.blobs[0].data
    assert s.shape == ((1,) if shared == "true" else (3,))
    y = forward(layer, bottom, top)[0]
    expect = np.zeros_like(x)
    for n, c, h, w in itertools.product(*[range(d) for d in x.shape]):
        group = x[n] if across == "true" else x[n, :, h, w]
        norm = math.sqrt(sum(v * v for v in group.ravel()) + 1e-10)
        expect[n, c, h, w] = x[n, c, h, w] / norm * s[0 if shared == "true" else c]
    np.testing.assert_allclose(y, expect, rtol=1e-12)
    check_gradient(layer, bottom, top)


# -- PriorBox ---------------------------------------------------------------------------------
PRIOR = """name: "p" type: "PriorBox" prior_box_param {
  min_size: 2.9 max_size: 4.5 aspect_ratio: 2 aspect_ratio: 2 flip: true clip: false
  variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 }"""


def test_prior_box():
    feat, img = np.zeros((1, 1, 2, 3)), np.zeros((1, 3, 8, 12))
    layer, bottom, top = make_layer(PRIOR, [feat, img], phase=TEST)
    y = forward(layer, bottom, top)[0]
    # ratios 1, 2, 1/2 (the repeated 2 ignored) and one max box: 4 boxes per cell; sizes
    # 2.9 and 4.5 are truncated to 2 and 4 as SSD's Caffe does
    assert y.shape == (1, 2, 2 * 3 * 4 * 4)
    boxes = y[0, 0].reshape(2, 3, 4, 4)
    # cell (0, 0): centre (2, 2) with step 4 in a 12 x 8 image
    np.testing.assert_allclose(boxes[0, 0, 0], [1 / 12, 1 / 8, 3 / 12, 3 / 8])
    expect = []
    for h, w in itertools.product(range(2), range(3)):
        cx, cy = (w + 0.5) * 4, (h + 0.5) * 4
        for bw, bh in [(2, 2), (8 ** 0.5, 8 ** 0.5), (2 * 2 ** 0.5, 2 / 2 ** 0.5),
                       (2 / 2 ** 0.5, 2 * 2 ** 0.5)]:
            expect.append([(cx - bw / 2) / 12, (cy - bh / 2) / 8, (cx + bw / 2) / 12,
                           (cy + bh / 2) / 8])
    np.testing.assert_allclose(y[0, 0], np.ravel(expect), rtol=1e-12)
    np.testing.assert_allclose(y[0, 1], np.tile([0.1, 0.1, 0.2, 0.2], 24), rtol=1e-6)


def test_prior_box_clip_step_and_errors():
    text = ('name: "p" type: "PriorBox" prior_box_param { min_size: 6 clip: true step: 2 '
            'img_size: 10 offset: 0 }')
    layer, bottom, top = make_layer(text, [np.zeros((1, 1, 1, 2)), np.zeros((1, 1, 3, 3))])
    y = forward(layer, bottom, top)[0]
    # one box per cell, centres (0, 0) and (2, 0), clipped, single variance 0.1 by default
    np.testing.assert_allclose(y[0, 0], [0, 0, 0.3, 0.3, 0, 0, 0.5, 0.3])
    np.testing.assert_allclose(y[0, 1], 0.1, rtol=1e-6)
    with pytest.raises(ConfigError, match="max_size"):
        make_layer('name: "p" type: "PriorBox" prior_box_param { min_size: 4 max_size: 2 }',
                   [np.zeros((1, 1, 1, 1))] * 2)


# -- DetectionOutput --------------------------------------------------------------------------
def test_decode_boxes():
    prior = np.array([[0.2, 0.2, 0.6, 0.4]])
    var = np.array([[0.1, 0.1, 0.2, 0.2]])
    loc = np.array([[1.0, -1.0, 0.5, 0.0]])
    box = decode_boxes(prior, var, loc, caffe_pb2.PriorBoxParameter.CENTER_SIZE, False)
    half_w = 0.4 * math.exp(0.1) / 2
    np.testing.assert_allclose(box, [[0.44 - half_w, 0.18, 0.44 + half_w, 0.38]])
    box = decode_boxes(prior, var, loc, caffe_pb2.PriorBoxParameter.CORNER, False)
    np.testing.assert_allclose(box, [[0.3, 0.1, 0.7, 0.4]])
    box = decode_boxes(prior, var, loc, caffe_pb2.PriorBoxParameter.CORNER, True)
    np.testing.assert_allclose(box, [[1.2, -0.8, 1.1, 0.4]])


DETECT = """name: "d" type: "DetectionOutput" detection_output_param {{
  num_classes: 3 share_location: true background_label_id: 0 code_type: CENTER_SIZE
  nms_param {{ nms_threshold: 0.45 }} confidence_threshold: 0.1 keep_top_k: {keep} }}"""

PRIORS = np.array([[0, 0, .5, .5], [.05, .05, .55, .55], [.5, .5, 1, 1], [0, .5, .5, 1]])


def detection_inputs():
    loc = np.zeros((2, 4 * 4))
    conf = np.array([[[.1, .9, .1], [.0, .8, .2], [.0, .3, .7], [.35, .05, .6]],
                     [[1, 0, 0]] * 4]).reshape(2, 12)
    prior = np.stack([PRIORS.ravel(), np.full(16, 0.1)])[None]
    return [loc, conf, prior]


def test_detection_output_nms_and_keep_top_k():
    layer, bottom, top = make_layer(DETECT.format(keep=-1), detection_inputs(), phase=TEST)
    y = forward(layer, bottom, top)[0]
    # class 1: A (0.9) suppresses B (IoU 0.68 > 0.45), C kept; class 2: C, D, B kept (A's
    # 0.1 is not above the threshold); image 1 scores nothing.
    rows = [[0, 1, .9, *PRIORS[0]], [0, 1, .3, *PRIORS[2]],
            [0, 2, .7, *PRIORS[2]], [0, 2, .6, *PRIORS[3]], [0, 2, .2, *PRIORS[1]]]
    np.testing.assert_allclose(y, np.array(rows)[None, None], atol=1e-12)
    layer, bottom, top = make_layer(DETECT.format(keep=4), detection_inputs(), phase=TEST)
    y = forward(layer, bottom, top)[0]
    np.testing.assert_allclose(y, np.array(rows[:4])[None, None], atol=1e-12)


def test_detection_output_empty_and_errors():
    loc, conf, prior = detection_inputs()
    conf[0] = np.tile([1.0, 0, 0], 4)
    layer, bottom, top = make_layer(DETECT.format(keep=-1), [loc, conf, prior], phase=TEST)
    y = forward(layer, bottom, top)[0]
    np.testing.assert_array_equal(y[0, 0], [[0] + [-1] * 6, [1] + [-1] * 6])
    with pytest.raises(ConfigError, match="no backward"):
        layer.backward(top, [True, False, False], bottom)
    with pytest.raises(Exception, match="conf"):
        make_layer(DETECT.format(keep=-1), [loc, conf[:, :9], prior], phase=TEST)


def test_detection_output_per_class_boxes_without_threshold():
    """share_location false: each class decodes its own offsets; with no confidence_threshold
    every score (0 included) is a candidate, as SSD."""
    text = ('name: "d" type: "DetectionOutput" detection_output_param { num_classes: 2 '
            'share_location: false background_label_id: 0 code_type: CORNER '
            'variance_encoded_in_target: true nms_param { nms_threshold: 0.5 } }')
    priors = np.array([[0, 0, .4, .4], [.6, .6, 1, 1]])
    loc = np.zeros((1, 2, 2, 4))                   # (image, prior, class, coordinate)
    loc[0, 0, 1] = [.1, .1, .1, .1]                # class 1 shifts prior 0's box
    loc[0, 0, 0] = [.5, .5, .5, .5]                # background offsets are never used
    conf = np.array([[[.3, .7], [1.0, 0.0]]]).reshape(1, 4)
    prior = np.stack([priors.ravel(), np.full(8, 0.1)])[None]
    layer, bottom, top = make_layer(text, [loc.reshape(1, 16), conf, prior], phase=TEST)
    y = forward(layer, bottom, top)[0][0, 0]
    np.testing.assert_allclose(y, [[0, 1, .7, .1, .1, .5, .5], [0, 1, 0, .6, .6, 1, 1]])


@pytest.mark.parametrize("setting", ["img_h: 10", "img_w: 10", "img_size: 0", "img_h: 10 img_w: 0",
                                     "step_h: 2", "step: 0", "step_w: 2 step_h: -1"])
def test_prior_box_refuses_unset_or_zero_image_size_and_step(setting):
    # SSD checks img_h, img_w (and step_h, step_w) > 0 once either is given; a zero one would
    # divide by zero (boxes of inf) or put every centre at 0
    with pytest.raises(ConfigError, match="img_|step"):
        make_layer(f'name: "p" type: "PriorBox" prior_box_param {{ min_size: 4 {setting} }}',
                   [np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 8, 8))])
