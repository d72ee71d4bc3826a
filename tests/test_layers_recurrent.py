"""RNN, LSTM, LSTMUnit: forward against step-by-step float64 loops written here, backward
(through time, static input, exposed hidden state) by central differences."""
import numpy as np
import pytest

import owlnet.layer_types  # noqa: F401  (registers the layer types)
from gradcheck import check_gradient, forward, make_layer
from owlnet.errors import ConfigError

rs = np.random.default_rng(17)

REC = """name: "r" type: "{kind}" recurrent_param {{ num_output: 3 expose_hidden: {expose}
  weight_filler {{ type: "gaussian" std: 0.5 }} bias_filler {{ type: "gaussian" std: 0.3 }} }}"""


def sig(a):
    return 1 / (1 + np.exp(-a))


def lstm_reference(x, cont, weights, static=None, h0=None, c0=None):
    """Per stream, per step: the LSTM of Caffe's lstm_layer.cpp written as plain vectors."""
    w_xc, b_c = weights[0], weights[1]
    w_static = weights[2] if static is not None else None
    w_hc = weights[-1]
    steps, num = cont.shape
    hidden = w_hc.shape[1]
    out = np.zeros((steps, num, hidden))
    finals = []
    for n in range(num):
        h = np.zeros(hidden) if h0 is None else h0[0, n]
        c = np.zeros(hidden) if c0 is None else c0[0, n]
        for t in range(steps):
            a = w_xc @ x[t, n].ravel() + b_c + w_hc @ (cont[t, n] * h)
            if static is not None:
                a = a + w_static @ static[n].ravel()
            i, f, o = sig(a[:hidden]), sig(a[hidden:2 * hidden]), sig(a[2 * hidden:3 * hidden])
            g = np.tanh(a[3 * hidden:])
            c = (cont[t, n] != 0) * f * c + i * g     # Caffe's LSTMUnit: f = 0 where cont is 0
            h = o * np.tanh(c)
            out[t, n] = h
        finals.append((h, c))
    return out, finals


def rnn_reference(x, cont, weights, static=None, h0=None):
    w_xh, b_h = weights[0], weights[1]
    w_static = weights[2] if static is not None else None
    w_hh, w_ho, b_o = weights[-3], weights[-2], weights[-1]
    steps, num = cont.shape
    out = np.zeros((steps, num, w_hh.shape[0]))
    finals = []
    for n in range(num):
        h = np.zeros(w_hh.shape[0]) if h0 is None else h0[0, n]
        for t in range(steps):
            a = w_xh @ x[t, n].ravel() + b_h + w_hh @ (cont[t, n] * h)
            if static is not None:
                a = a + w_static @ static[n].ravel()
            h = np.tanh(a)
            out[t, n] = np.tanh(w_ho @ h + b_o)
        finals.append(h)
    return out, finals


@pytest.mark.parametrize("cont", [[1.0, 0.0, 1.0], [0.5, 0.0, 2.0]])
def test_lstm_unit(cont):
    # Caffe's LSTMUnit reads cont as a flag (f = sigmoid(.) where cont != 0, else 0): a
    # value like 0.5 keeps the whole previous cell, it does not scale it
    c_prev, gates = rs.standard_normal((1, 3, 2)), rs.standard_normal((1, 3, 8))
    cont = np.array([cont])
    layer, bottom, top = make_layer('name: "u" type: "LSTMUnit"', [c_prev, gates, cont], n_tops=2)
    c, h = forward(layer, bottom, top)
    for n in range(3):
        a = gates[0, n]
        i, f, o, g = sig(a[0:2]), sig(a[2:4]), sig(a[4:6]), np.tanh(a[6:8])
        expect_c = (f if cont[0, n] else 0) * c_prev[0, n] + i * g
        np.testing.assert_allclose(c[0, n], expect_c, rtol=1e-12)
        np.testing.assert_allclose(h[0, n], o * np.tanh(expect_c), rtol=1e-12)
    check_gradient(layer, bottom, top, check_bottoms=[0, 1])
    with pytest.raises(ConfigError, match="continuation"):
        layer.backward(top, [False, False, True], bottom)


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_recurrent_forward_and_gradient(kind):
    x = rs.standard_normal((3, 2, 2, 2))
    cont = np.array([[0, 0], [1, 1], [1, 0]], dtype=float)
    layer, bottom, top = make_layer(REC.format(kind=kind, expose="false"), [x, cont])
    shapes = [b.shape for b in layer.blobs]
    if kind == "LSTM":   # W_xc, b_c, W_hc
        assert shapes == [(12, 4), (12,), (12, 3)]
    else:                # W_xh, b_h, W_hh, W_ho, b_o
        assert shapes == [(3, 4), (3,), (3, 3), (3, 3), (3,)]
    y = forward(layer, bottom, top)[0]
    weights = [b.data for b in layer.blobs]
    ref = lstm_reference if kind == "LSTM" else rnn_reference
    np.testing.assert_allclose(y, ref(x, cont, weights)[0], rtol=1e-10, atol=1e-12)
    check_gradient(layer, bottom, top, check_bottoms=[0])


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_recurrent_static_input_and_exposed_hidden(kind):
    states = 2 if kind == "LSTM" else 1
    x, static = rs.standard_normal((2, 2, 3)), rs.standard_normal((2, 2))
    cont = np.array([[1, 1], [1, 0]], dtype=float)
    hidden0 = [rs.standard_normal((1, 2, 3)) for _ in range(states)]
    layer, bottom, top = make_layer(REC.format(kind=kind, expose="true"),
                                    [x, cont, static, *hidden0], n_tops=1 + states)
    rows = 12 if kind == "LSTM" else 3
    assert layer.blobs[2].shape == (rows, 2)       # W_*_static after the bias
    outs = forward(layer, bottom, top)
    weights = [b.data for b in layer.blobs]
    if kind == "LSTM":
        expect, finals = lstm_reference(x, cont, weights, static, *hidden0)
        np.testing.assert_allclose(outs[2][0], [c for _, c in finals], rtol=1e-10)
        np.testing.assert_allclose(outs[1][0], [h for h, _ in finals], rtol=1e-10)
    else:
        expect, finals = rnn_reference(x, cont, weights, static, *hidden0)
        np.testing.assert_allclose(outs[1][0], finals, rtol=1e-10)
    np.testing.assert_allclose(outs[0], expect, rtol=1e-10, atol=1e-12)
    check_gradient(layer, bottom, top, check_bottoms=[0, 2, *range(3, 3 + states)])


def test_lstm_state_carries_between_forwards():
    """As Caffe's TestForward: a whole sequence at once equals feeding it one step at a time
    (the last state of one forward starts the next); cont 0 at every step differs."""
    x = rs.standard_normal((3, 2, 4))
    cont = np.array([[0, 0], [1, 1], [1, 1]], dtype=float)
    text = REC.format(kind="LSTM", expose="false")
    layer, bottom, top = make_layer(text, [x, cont], seed=5)
    whole = forward(layer, bottom, top)[0]
    step, sb, st = make_layer(text, [x[:1], cont[:1]], seed=5)
    for t in range(3):
        sb[0].data[...] = x[t:t + 1]
        sb[1].data[...] = cont[t:t + 1]
        np.testing.assert_allclose(forward(step, sb, st)[0][0], whole[t], rtol=1e-12)
    sb[1].data[...] = 0
    sb[0].data[...] = x[2:3]
    assert not np.allclose(forward(step, sb, st)[0][0], whole[2])


def test_recurrent_bad_layout():
    x, cont = rs.standard_normal((2, 1, 3)), np.ones((2, 1))
    with pytest.raises(ConfigError, match="h_0, c_0"):
        make_layer(REC.format(kind="LSTM", expose="true"), [x, cont])
    with pytest.raises(Exception, match="cont"):
        make_layer(REC.format(kind="RNN", expose="false"), [x, np.ones((2, 2))])
