"""Loss layers and Accuracy: forward against explicit float64 loops, backward by central
differences (w.r.t. the prediction bottoms only), with loss weight 2 set through the top diff."""
import math

import numpy as np
import pytest

import owlnet.layer_types.loss  # noqa: F401  (registers the layer types)
from gradcheck import check_gradient, forward, make_layer
from owlnet.errors import ConfigError, DataError, ShapeError
from owlnet.proto import caffe_pb2

rs = np.random.default_rng(5)


def randn(*shape):
    return rs.standard_normal(shape)


def check_weighted(layer, bottom, top, check_bottoms, weight=2.0, **kw):
    """Backward with loss weight ``weight`` equals ``weight`` times central differences."""
    forward(layer, bottom, top)
    top[0].diff[...] = weight
    layer.backward(top, [i in check_bottoms for i in range(len(bottom))], bottom)
    for i in check_bottoms:
        analytic = bottom[i].diff.copy()
        flat = bottom[i].data.reshape(-1)
        numeric = np.empty(flat.size)
        for j in range(flat.size):
            keep = flat[j]
            flat[j] = keep + 1e-6
            plus = forward(layer, bottom, top)[0]
            flat[j] = keep - 1e-6
            minus = forward(layer, bottom, top)[0]
            flat[j] = keep
            numeric[j] = weight * (plus - minus) / 2e-6
        np.testing.assert_allclose(analytic.ravel(), numeric, atol=1e-6, **kw)


# -- SoftmaxWithLoss ------------------------------------------------------------------------
def softmax_loss_reference(x, labels, axis, ignore, mode):
    """Explicit loops: x moved to (outer, C, inner); returns (loss, probabilities)."""
    outer = int(np.prod(x.shape[:axis]))
    classes = x.shape[axis]
    scores = x.reshape(outer, classes, -1)
    inner = scores.shape[2]
    lab = labels.reshape(outer, inner)
    prob = np.empty_like(scores)
    total, valid = 0.0, 0
    for n in range(outer):
        for i in range(inner):
            e = [math.exp(v) for v in scores[n, :, i]]
            prob[n, :, i] = [v / sum(e) for v in e]
            k = int(lab[n, i])
            if ignore is not None and k == ignore:
                continue
            total -= math.log(max(prob[n, k, i], np.finfo(np.float32).tiny))
            valid += 1
    divisor = {"FULL": outer * inner, "VALID": valid if ignore is not None else outer * inner,
               "BATCH_SIZE": outer, "NONE": 1}[mode]
    return total / max(divisor, 1), prob.reshape(x.shape)


@pytest.mark.parametrize("shape,axis,ignore,mode", [
    ((3, 4), 1, None, "VALID"),
    ((1, 3), 1, None, "FULL"),
    ((2, 3, 2, 2), 1, 1, "VALID"),
    ((2, 3, 2, 2), 1, 0, "FULL"),
    ((2, 3, 2, 2), 1, 2, "BATCH_SIZE"),
    ((2, 3, 2, 2), 1, None, "NONE"),
    ((2, 2, 3), 2, None, "VALID"),
])
def test_softmax_with_loss(shape, axis, ignore, mode):
    x = randn(*shape) * 2
    outer, inner = int(np.prod(shape[:axis])), int(np.prod(shape[axis + 1:]))
    label_shape = (outer, inner) if axis == 2 else (shape[0], 1) + shape[2:]
    labels = rs.integers(0, shape[axis], size=label_shape).astype(float)
    loss_param = f"normalization: {mode}"
    if ignore is not None:
        loss_param += f" ignore_label: {ignore}"
    text = (f'name: "loss" type: "SoftmaxWithLoss" softmax_param {{ axis: {axis} }} '
            f'loss_param {{ {loss_param} }}')
    layer, bottom, top = make_layer(text, [x, labels], n_tops=2)
    loss, prob = forward(layer, bottom, top)
    expect_loss, expect_prob = softmax_loss_reference(x, labels, axis, ignore, mode)
    assert top[0].shape == ()
    np.testing.assert_allclose(loss, expect_loss, rtol=1e-12)
    np.testing.assert_allclose(prob, expect_prob, rtol=1e-12)
    check_gradient(layer, bottom, top, check_bottoms=[0], top_ids=[0])
    check_weighted(layer, bottom, top, [0])


@pytest.mark.parametrize("normalize,expect_mode", [("false", "BATCH_SIZE"), ("true", "VALID")])
def test_softmax_with_loss_legacy_normalize(normalize, expect_mode):
    x = randn(2, 3, 2)
    labels = np.array([[0.0, 2.0], [1.0, 1.0]])
    text = (f'name: "loss" type: "SoftmaxWithLoss" '
            f'loss_param {{ normalize: {normalize} ignore_label: 2 }}')
    layer, bottom, top = make_layer(text, [x, labels])
    loss = forward(layer, bottom, top)[0]
    np.testing.assert_allclose(loss, softmax_loss_reference(x, labels, 1, 2, expect_mode)[0])


def test_softmax_with_loss_bad_input():
    with pytest.raises(DataError, match=r"label 3\b.*|.*'loss'.*label 3"):
        layer, bottom, top = make_layer('name: "loss" type: "SoftmaxWithLoss"',
                                        [randn(2, 3), np.array([0.0, 3.0])])
        layer.forward(bottom, top)
    with pytest.raises(ShapeError, match=r"\(2, 3\).*\(3,\)|\(3,\).*\(2, 3\)"):
        make_layer('name: "loss" type: "SoftmaxWithLoss"', [randn(2, 3), np.zeros(3)])
    layer, bottom, top = make_layer('name: "loss" type: "SoftmaxWithLoss"',
                                    [randn(2, 3), np.zeros(2)])
    forward(layer, bottom, top)
    with pytest.raises(ConfigError, match="labels"):
        layer.backward(top, [True, True], bottom)


def test_softmax_with_loss_ignored_label_may_be_out_of_range():
    layer, bottom, top = make_layer(
        'name: "loss" type: "SoftmaxWithLoss" loss_param { ignore_label: 255 }',
        [randn(2, 3), np.array([255.0, 1.0])])
    assert np.isfinite(forward(layer, bottom, top)[0])


# -- Accuracy ------------------------------------------------------------------------------
def accuracy_reference(x, labels, axis, top_k, ignore):
    outer = int(np.prod(x.shape[:axis]))
    classes = x.shape[axis]
    scores = x.reshape(outer, classes, -1)
    lab = labels.reshape(outer, -1)
    hits, count = 0, 0
    class_hits, class_count = [0] * classes, [0] * classes
    for n in range(outer):
        for i in range(scores.shape[2]):
            k = int(lab[n, i])
            if ignore is not None and k == ignore:
                continue
            others_at_least = sum(1 for c in range(classes)
                                  if c != k and scores[n, c, i] >= scores[n, k, i])
            ok = others_at_least < top_k
            hits += ok
            count += 1
            class_hits[k] += ok
            class_count[k] += 1
    per_class = [h / c if c else 0.0 for h, c in zip(class_hits, class_count)]
    return (hits / count if count else 0.0), per_class


@pytest.mark.parametrize("shape,axis,top_k,ignore", [
    ((6, 4), 1, 1, None), ((6, 4), 1, 2, None), ((1, 3, 2, 2), 1, 1, 0),
    ((2, 2, 5), 2, 3, None), ((3, 4), 1, 1, 9),
])
def test_accuracy(shape, axis, top_k, ignore):
    x = np.round(randn(*shape), 0)  # rounding creates ties
    outer, inner = int(np.prod(shape[:axis])), int(np.prod(shape[axis + 1:]))
    labels = rs.integers(0, shape[axis], size=(outer, inner)).astype(float)
    param = f"axis: {axis} top_k: {top_k}"
    if ignore is not None:
        param += f" ignore_label: {ignore}"
    layer, bottom, top = make_layer(f'name: "acc" type: "Accuracy" accuracy_param {{ {param} }}',
                                    [x, labels], n_tops=2)
    acc, per_class = forward(layer, bottom, top)
    expect_acc, expect_per_class = accuracy_reference(x, labels, axis, top_k, ignore)
    assert top[0].shape == () and per_class.shape == (shape[axis],)
    np.testing.assert_allclose(acc, expect_acc)
    np.testing.assert_allclose(per_class, expect_per_class)


def test_accuracy_ties_count_against_the_label():
    layer, bottom, top = make_layer('name: "acc" type: "Accuracy"',
                                    [np.array([[1.0, 1.0, 0.0]]), np.array([0.0])])
    assert forward(layer, bottom, top)[0] == 0.0
    layer, bottom, top = make_layer('name: "acc" type: "Accuracy" accuracy_param { top_k: 2 }',
                                    [np.array([[1.0, 1.0, 0.0]]), np.array([0.0])])
    assert forward(layer, bottom, top)[0] == 1.0


def test_accuracy_ignore_label_comes_from_accuracy_param():
    x = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    labels = np.array([0.0, 0.0, 2.0])  # wrong, right, right
    text = 'name: "acc" type: "Accuracy" '
    layer, bottom, top = make_layer(text + "accuracy_param { ignore_label: 0 }", [x, labels])
    assert forward(layer, bottom, top)[0] == 1.0
    # As in Caffe, Accuracy does not read loss_param.
    layer, bottom, top = make_layer(text + "loss_param { ignore_label: 0 }", [x, labels])
    np.testing.assert_allclose(forward(layer, bottom, top)[0], 2 / 3)


def test_accuracy_bad_input():
    with pytest.raises(ConfigError, match="top_k"):
        make_layer('name: "acc" type: "Accuracy" accuracy_param { top_k: 4 }',
                   [randn(2, 3), np.zeros(2)])
    layer, bottom, top = make_layer('name: "acc" type: "Accuracy"', [randn(2, 3), np.zeros(2)])
    bottom[1].data[...] = [0.0, -1.0]
    with pytest.raises(DataError, match="label -1.*acc|acc.*label -1"):
        layer.forward(bottom, top)


# -- EuclideanLoss -------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 3), (3, 2, 2)])
def test_euclidean_loss(shape):
    a, b = randn(*shape), randn(*shape)
    layer, bottom, top = make_layer('name: "l2" type: "EuclideanLoss"', [a, b])
    loss = forward(layer, bottom, top)[0]
    expect = sum((p - q) ** 2 for p, q in zip(a.ravel(), b.ravel())) / (2 * shape[0])
    np.testing.assert_allclose(loss, expect, rtol=1e-12)
    check_gradient(layer, bottom, top)
    check_weighted(layer, bottom, top, [0, 1])


def test_euclidean_loss_bad_input():
    with pytest.raises(ShapeError, match=r"\(2, 3\).*\(2, 4\)"):
        make_layer('name: "l2" type: "EuclideanLoss"', [randn(2, 3), randn(2, 4)])


# -- SigmoidCrossEntropyLoss ---------------------------------------------------------------
@pytest.mark.parametrize("norm,ignore", [
    ("", None), ("loss_param { normalization: VALID }", None),
    ("loss_param { ignore_label: -1 }", -1),
    ("loss_param { ignore_label: -1 normalization: VALID }", -1),
    ("loss_param { normalization: FULL }", None), ("loss_param { normalization: NONE }", None),
])
def test_sigmoid_cross_entropy(norm, ignore):
    x = randn(3, 2, 2) * 4
    t = rs.random((3, 2, 2))
    if ignore is not None:
        t[0, 0, 1] = t[2, 1, 0] = ignore
    layer, bottom, top = make_layer(f'name: "sce" type: "SigmoidCrossEntropyLoss" {norm}', [x, t])
    loss = forward(layer, bottom, top)[0]
    total, valid = 0.0, 0
    for xi, ti in zip(x.ravel(), t.ravel()):
        if ignore is not None and ti == ignore:
            continue
        p = 1 / (1 + math.exp(-xi))
        total -= ti * math.log(p) + (1 - ti) * math.log(1 - p)
        valid += 1
    divisor = {"": 3, "VALID": valid, "FULL": 12, "NONE": 1}[
        next((m for m in ("VALID", "FULL", "NONE") if m in norm), "")]
    np.testing.assert_allclose(loss, total / divisor, rtol=1e-10)
    check_gradient(layer, bottom, top, check_bottoms=[0])
    check_weighted(layer, bottom, top, [0])


def test_sigmoid_cross_entropy_large_logits_stay_finite():
    layer, bottom, top = make_layer('name: "sce" type: "SigmoidCrossEntropyLoss"',
                                    [np.array([[800.0, -800.0]]), np.array([[0.0, 1.0]])])
    np.testing.assert_allclose(forward(layer, bottom, top)[0], 1600.0)


def test_sigmoid_cross_entropy_bad_input():
    with pytest.raises(ShapeError, match=r"\(2, 3\).*\(2, 2\)"):
        make_layer('name: "sce" type: "SigmoidCrossEntropyLoss"', [randn(2, 3), randn(2, 2)])


# -- HingeLoss -----------------------------------------------------------------------------
@pytest.mark.parametrize("norm,shape", [("L1", (3, 4)), ("L2", (3, 4)), ("L1", (1, 2, 2))])
def test_hinge_loss(norm, shape):
    x = randn(*shape)
    labels = rs.integers(0, int(np.prod(shape[1:])), size=shape[0]).astype(float)
    layer, bottom, top = make_layer(
        f'name: "h" type: "HingeLoss" hinge_loss_param {{ norm: {norm} }}', [x, labels])
    loss = forward(layer, bottom, top)[0]
    rows = x.reshape(shape[0], -1)
    total = 0.0
    for n in range(shape[0]):
        for k in range(rows.shape[1]):
            y = 1.0 if k == labels[n] else -1.0
            v = max(0.0, 1.0 - y * rows[n, k])
            total += v if norm == "L1" else v * v
    np.testing.assert_allclose(loss, total / shape[0], rtol=1e-12)
    check_gradient(layer, bottom, top, check_bottoms=[0])
    check_weighted(layer, bottom, top, [0])


def test_hinge_loss_bad_label():
    layer, bottom, top = make_layer('name: "h" type: "HingeLoss"', [randn(2, 3), np.zeros(2)])
    bottom[1].data[...] = [1.0, 7.0]
    with pytest.raises(DataError, match="label 7"):
        layer.forward(bottom, top)


# -- ContrastiveLoss -----------------------------------------------------------------------
@pytest.mark.parametrize("legacy", ["false", "true"])
def test_contrastive_loss(legacy):
    a, b = randn(4, 3, 1, 1) * 0.6, randn(4, 3, 1, 1) * 0.6
    y = np.array([1.0, 0.0, 0.0, 1.0]).reshape(4, 1, 1, 1)
    margin = 2.0
    layer, bottom, top = make_layer(
        f'name: "c" type: "ContrastiveLoss" contrastive_loss_param {{ margin: {margin} '
        f'legacy_version: {legacy} }}', [a, b, y])
    loss = forward(layer, bottom, top)[0]
    total = 0.0
    for n in range(4):
        d2 = sum((p - q) ** 2 for p, q in zip(a[n].ravel(), b[n].ravel()))
        if y[n, 0, 0, 0]:
            total += d2
        elif legacy == "true":
            total += max(margin - d2, 0.0)
        else:
            total += max(margin - math.sqrt(d2), 0.0) ** 2
    np.testing.assert_allclose(loss, total / 8, rtol=1e-12)
    # Caffe divides the dissimilar gradient by (d + 1e-4), a relative change near 1e-4.
    rtol = 1e-4 if legacy == "true" else 1e-3
    check_gradient(layer, bottom, top, check_bottoms=[0, 1], rtol=rtol)
    check_weighted(layer, bottom, top, [0, 1], rtol=rtol)


def test_contrastive_loss_bad_input():
    with pytest.raises(ShapeError, match=r"\(2, 3\).*\(2, 4\)"):
        make_layer('name: "c" type: "ContrastiveLoss"', [randn(2, 3), randn(2, 4), np.zeros(2)])


# -- MultinomialLogisticLoss / InfogainLoss --------------------------------------------------
def test_multinomial_logistic_loss():
    prob = rs.random((3, 4)) + 0.1
    labels = np.array([0.0, 3.0, 1.0])
    layer, bottom, top = make_layer('name: "m" type: "MultinomialLogisticLoss"', [prob, labels])
    loss = forward(layer, bottom, top)[0]
    expect = -sum(math.log(prob[n, int(labels[n])]) for n in range(3)) / 3
    np.testing.assert_allclose(loss, expect, rtol=1e-12)
    check_gradient(layer, bottom, top, check_bottoms=[0])
    check_weighted(layer, bottom, top, [0])


def infogain_reference(x, labels, h, ignore):
    total, valid = 0.0, 0
    for n in range(x.shape[0]):
        for i in range(x.shape[2]):
            k = int(labels[n, i])
            if ignore is not None and k == ignore:
                continue
            e = [math.exp(v) for v in x[n, :, i]]
            total -= sum(h[k, c] * math.log(e[c] / sum(e)) for c in range(x.shape[1]))
            valid += 1
    return total / valid


@pytest.mark.parametrize("ignore", [None, 1])
def test_infogain_loss_matrix_bottom(ignore):
    x = randn(2, 3, 2)
    labels = np.array([[0.0, 1.0], [2.0, 1.0]])
    h = rs.random((3, 3))
    text = 'name: "ig" type: "InfogainLoss"'
    if ignore is not None:
        text += f" loss_param {{ ignore_label: {ignore} }}"
    layer, bottom, top = make_layer(text, [x, labels, h])
    loss = forward(layer, bottom, top)[0]
    np.testing.assert_allclose(loss, infogain_reference(x, labels, h, ignore), rtol=1e-12)
    check_gradient(layer, bottom, top, check_bottoms=[0])
    check_weighted(layer, bottom, top, [0])


def test_infogain_loss_source(tmp_path):
    h = rs.random((3, 3))
    proto = caffe_pb2.BlobProto()
    proto.num, proto.channels, proto.height, proto.width = 1, 1, 3, 3
    proto.data[:] = h.ravel().tolist()
    path = tmp_path / "h.binaryproto"
    path.write_bytes(proto.SerializeToString())
    x, labels = randn(2, 3), np.array([2.0, 0.0])
    layer, bottom, top = make_layer(
        f'name: "ig" type: "InfogainLoss" infogain_loss_param {{ source: "{path}" }}', [x, labels])
    loss = forward(layer, bottom, top)[0]
    expect = infogain_reference(x[:, :, None], labels[:, None], h.astype(np.float32), None)
    np.testing.assert_allclose(loss, expect, rtol=1e-6)
    with pytest.raises(ConfigError, match="infogain"):
        make_layer('name: "ig" type: "InfogainLoss"', [x, labels])
    with pytest.raises(ShapeError, match="infogain"):
        make_layer('name: "ig" type: "InfogainLoss"', [x, labels, np.ones((2, 2))])
