"""Recurrent layers with Caffe's semantics: RNN, LSTM and LSTMUnit.

RNN and LSTM take ``x`` (T, N, ...) (T time steps of N independent streams; the axes after the
second are flattened to I inputs), ``cont`` (T, N) (0 where a sequence starts: the hidden state
is multiplied by cont_t before it is used at step t, and LSTM's cell is kept only where cont_t
is nonzero, as Caffe's LSTMUnit reads it), optionally ``x_static`` (N, ...) (S
values per stream, added to every step), and with ``expose_hidden`` the initial states as extra
bottoms ((1, N, H) each: h_0, then c_0 for LSTM) and the final states as extra tops (h_T, then
c_T). Without expose_hidden the final state of one forward is the initial state of the next,
as in Caffe (zeros at first and whenever N changes).

Parameter blobs are in Caffe's order and shapes, so .caffemodel files interchange:
RNN: W_xh (H, I), b_h (H), [W_xh_static (H, S)], W_hh (H, H), W_ho (H, H), b_o (H);
LSTM: W_xc (4H, I), b_c (4H), [W_xc_static (4H, S)], W_hc (4H, H), gate rows ordered
(input, forget, output, candidate).

Gradients flow back in time within one forward. With expose_hidden, owlnet also passes the
gradient from the final-state tops and to the initial-state bottoms; Caffe shares only their
data, so it drops both (identical results when no loss reaches h_T/c_T and the h_0/c_0
producers take no gradient). No gradient reaches ``cont``.
"""
from __future__ import annotations

from .. import backend
from ..errors import ConfigError
from .base import Layer, register


def _sigmoid(xp, a):
    return 0.5 * xp.tanh(0.5 * a) + 0.5


def lstm_unit_forward(xp, c_prev, gates, cont):
    """One LSTM step: with (i, f, o, g) = (sigmoid, sigmoid, sigmoid, tanh) of the four
    H-wide gate blocks, c = [cont != 0] f c_prev + i g and h = o tanh(c). cont is a flag here,
    as in Caffe's LSTMUnit (f is 0 where cont is 0; any other value keeps f whole). Returns
    (c, h, saved values for :func:`lstm_unit_backward`)."""
    hidden = c_prev.shape[-1]
    ifo = _sigmoid(xp, gates[..., :3 * hidden])
    i, f, o = ifo[..., :hidden], ifo[..., hidden:2 * hidden], ifo[..., 2 * hidden:]
    g = xp.tanh(gates[..., 3 * hidden:])
    cont = (cont != 0).astype(c_prev.dtype)
    c = cont * f * c_prev + i * g
    tanh_c = xp.tanh(c)
    return c, o * tanh_c, (c_prev, cont, i, f, o, g, tanh_c)


def lstm_unit_backward(xp, dc, dh, saved):
    """Gradients of one step: with dc' = dc + dh * o * (1 - tanh(c)^2) and cont the 0/1 flag
    saved by :func:`lstm_unit_forward`, returns dc_prev = dc' * cont * f and the gate-input gradient (di i(1-i), df f(1-f), do o(1-o),
    dg (1-g^2)) for di = dc' g, df = dc' cont c_prev, do = dh tanh(c), dg = dc' i."""
    c_prev, cont, i, f, o, g, tanh_c = saved
    dc_total = dc + dh * o * (1 - tanh_c * tanh_c)
    dgates = xp.concatenate([
        dc_total * g * i * (1 - i),
        dc_total * cont * c_prev * f * (1 - f),
        dh * tanh_c * o * (1 - o),
        dc_total * i * (1 - g * g)], axis=-1)
    return dc_total * cont * f, dgates


@register("LSTMUnit")
class LSTMUnitLayer(Layer):
    """One LSTM step (Caffe's LSTMUnit). Bottoms c_prev (1, N, H), gate inputs (1, N, 4H),
    cont (1, N); tops c (1, N, H) and h (1, N, H): see :func:`lstm_unit_forward`. No
    gradient to cont."""

    exact_bottoms = 3
    exact_tops = 2

    def reshape(self, bottom, top):
        c_prev, gates, cont = bottom
        shape = c_prev.shape
        if (len(shape) != 3 or gates.shape != shape[:2] + (4 * shape[2],)
                or cont.shape != shape[:2]):
            self.fail(f"bottoms must be c_prev (1, N, H), gates (1, N, 4H), cont (1, N); got "
                      f"{shape}, {gates.shape}, {cont.shape}")
        for t in top:
            t.reshape(shape)

    def allow_force_backward(self, bottom_index):
        return bottom_index != 2

    def forward(self, bottom, top):
        xp = backend.array_module(bottom[0].data)
        cont = bottom[2].data[..., None]
        c, h, self.saved = lstm_unit_forward(xp, bottom[0].data, bottom[1].data, cont)
        top[0].data[...] = c
        top[1].data[...] = h

    def backward(self, top, propagate_down, bottom):
        if propagate_down[2]:
            self.fail("cannot back-propagate to the sequence continuation bottom", ConfigError)
        xp = backend.array_module(top[0].diff)
        dc_prev, dgates = lstm_unit_backward(xp, top[0].diff, top[1].diff, self.saved)
        if propagate_down[0]:
            bottom[0].diff[...] = dc_prev
        if propagate_down[1]:
            bottom[1].diff[...] = dgates


class _Recurrent(Layer):
    """Bottom/top layout, parameters and the carried state shared by RNN and LSTM.

    A subclass sets ``states`` (hidden states carried between steps: 1 or 2) and
    ``gate_factor`` (rows of the input weights per output: 1 or 4), and implements
    ``run(xp, inputs, cont, initial) -> (top 0, final states)`` on the (T, N, rows) input
    projections (W x_t + b + static term) and ``run_backward(xp, d_top, d_final_states) ->
    (d_inputs, d_initial_states)``, accumulating the gradients of its own weights.
    """

    min_bottoms = 2

    def layer_setup(self, bottom, top):
        p = self.param.recurrent_param
        if p.num_output < 1:
            self.fail("recurrent_param.num_output must be positive", ConfigError)
        self.hidden = p.num_output
        if bottom[0].num_axes < 2:
            self.fail(f"bottom 0 '{bottom[0].name}' must be (T, N, ...), got {bottom[0].shape}")
        self.expose_hidden = p.expose_hidden
        exposed = self.states if self.expose_hidden else 0
        self.static_input = len(bottom) > 2 + exposed
        expected = 2 + self.static_input + exposed
        if len(bottom) != expected or len(top) != 1 + exposed:
            layout = ("bottoms x, cont, [x_static]" + self.exposed_names("0")
                      + f" and tops out{self.exposed_names('T')}")
            self.fail(f"takes {layout}; got {len(bottom)} bottoms, {len(top)} tops",
                      ConfigError)
        rows = self.gate_factor * self.hidden
        self.add_param((rows, bottom[0].count_from(2)), p.weight_filler)
        self.add_param((rows,), p.bias_filler)
        if self.static_input:
            self.add_param((rows, bottom[2].count_from(1)), p.weight_filler)
        self.add_param((rows, self.hidden), p.weight_filler)
        self.add_output_params(p)
        self.carried = None

    def add_output_params(self, p):
        pass

    def exposed_names(self, step):
        """', h_0, c_0'-style names of the exposed states (empty without expose_hidden)."""
        if not self.expose_hidden:
            return ""
        return "".join(f", {'hc'[k]}_{step}" for k in range(self.states))

    @property
    def recurrent_weight(self):
        return self.blobs[2 + self.static_input]

    def reshape(self, bottom, top):
        x, cont = bottom[0], bottom[1]
        if x.num_axes < 2 or cont.shape != x.shape[:2]:
            self.fail(f"x '{x.name}' {x.shape} must be (T, N, ...) and cont '{cont.name}' "
                      f"{cont.shape} must be (T, N)")
        if x.count_from(2) != self.blobs[0].shape[1]:
            self.fail(f"x '{x.name}' of shape {x.shape} has {x.count_from(2)} inputs per step, "
                      f"the weights take {self.blobs[0].shape[1]}")
        self.steps, self.num = x.shape[:2]
        if self.static_input:
            s = bottom[2]
            width = self.blobs[2].shape[1]
            if s.num_axes < 1 or s.shape[0] != self.num or s.count_from(1) != width:
                self.fail(f"x_static '{s.name}' of shape {s.shape} must be (N={self.num}, ...) "
                          f"with {self.blobs[2].shape[1]} values per stream")
        state_shape = (1, self.num, self.hidden)
        for b in bottom[2 + self.static_input:]:
            if b.shape != state_shape:
                self.fail(f"hidden-state bottom '{b.name}' must have shape {state_shape}, got "
                          f"{b.shape}")
        top[0].reshape((self.steps, self.num, self.hidden))
        for t in top[1:]:
            t.reshape(state_shape)

    def allow_force_backward(self, bottom_index):
        return bottom_index != 1

    def forward(self, bottom, top):
        xp = backend.array_module(bottom[0].data)
        x = bottom[0].data.reshape(self.steps, self.num, -1)
        cont = self.cont_values = bottom[1].data[..., None]
        static_term = 0.0
        if self.static_input:
            static_term = bottom[2].data.reshape(self.num, -1) @ self.blobs[2].data.T
        if self.expose_hidden:
            initial = [b.data[0] for b in bottom[2 + self.static_input:]]
        else:
            state_shape = (self.num, self.hidden)
            if self.carried is None or self.carried[0].shape != state_shape:
                self.carried = [xp.zeros(state_shape, dtype=x.dtype)] * self.states
            initial = self.carried
        inputs = x @ self.blobs[0].data.T + self.blobs[1].data + static_term
        outputs, final = self.run(xp, inputs, cont, initial)
        top[0].data[...] = outputs
        for t, state in zip(top[1:], final):
            t.data[...] = state[None]
        if not self.expose_hidden:
            self.carried = [state.copy() for state in final]

    def backward(self, top, propagate_down, bottom):
        xp = backend.array_module(top[0].diff)
        final_diffs = [t.diff[0] for t in top[1:]] or [0.0] * self.states
        d_inputs, initial_diffs = self.run_backward(xp, top[0].diff, final_diffs)
        x = bottom[0].data.reshape(self.steps, self.num, -1)
        flat = d_inputs.reshape(-1, d_inputs.shape[-1])
        if self.param_propagate_down[0]:
            self.blobs[0].diff += flat.T @ x.reshape(flat.shape[0], -1)
        if self.param_propagate_down[1]:
            self.blobs[1].diff += flat.sum(axis=0)
        if propagate_down[0]:
            bottom[0].diff.reshape(x.shape)[...] = d_inputs @ self.blobs[0].data
        if propagate_down[1]:
            bottom[1].diff[...] = 0
        if self.static_input:
            d_static = d_inputs.sum(axis=0)
            s = bottom[2].data.reshape(self.num, -1)
            if self.param_propagate_down[2]:
                self.blobs[2].diff += d_static.T @ s
            if propagate_down[2]:
                bottom[2].diff.reshape(s.shape)[...] = d_static @ self.blobs[2].data
        first = 2 + self.static_input
        for k, b in enumerate(bottom[first:]):
            if propagate_down[first + k]:
                b.diff[0] = initial_diffs[k]


@register("RNN")
class RNNLayer(_Recurrent):
    """Elman RNN (Caffe): h_t = tanh(W_hh (cont_t h_{t-1}) + W_xh x_t + b_h
    [+ W_xh_static x_static]), output o_t = tanh(W_ho h_t + b_o); top 0 is o (T, N, H),
    H = num_output. Backward: back-propagation through time."""

    states = 1
    gate_factor = 1

    def add_output_params(self, p):
        self.add_param((self.hidden, self.hidden), p.weight_filler)
        self.add_param((self.hidden,), p.bias_filler)

    def run(self, xp, inputs, cont, initial):
        w_hh = self.recurrent_weight.data
        w_ho, b_o = self.blobs[-2].data, self.blobs[-1].data
        h = initial[0]
        self.conted, self.hiddens = [], []
        for t in range(self.steps):
            conted = cont[t] * h
            h = xp.tanh(inputs[t] + conted @ w_hh.T)
            self.conted.append(conted)
            self.hiddens.append(h)
        self.outputs = xp.tanh(xp.stack(self.hiddens) @ w_ho.T + b_o)
        return self.outputs, [h]

    def run_backward(self, xp, d_outputs, final_diffs):
        w_hh = self.recurrent_weight.data
        w_ho = self.blobs[-2].data
        d_pre = d_outputs * (1 - self.outputs * self.outputs)
        hiddens = xp.stack(self.hiddens)
        flat = d_pre.reshape(-1, self.hidden)
        if self.param_propagate_down[-2]:
            self.blobs[-2].diff += flat.T @ hiddens.reshape(-1, self.hidden)
        if self.param_propagate_down[-1]:
            self.blobs[-1].diff += flat.sum(axis=0)
        d_hiddens = d_pre @ w_ho
        d_inputs = xp.empty_like(d_hiddens)
        d_next = final_diffs[0]
        grad_hh = xp.zeros_like(w_hh)
        for t in reversed(range(self.steps)):
            h = self.hiddens[t]
            d_a = (d_hiddens[t] + d_next) * (1 - h * h)
            d_inputs[t] = d_a
            grad_hh += d_a.T @ self.conted[t]
            d_next = (d_a @ w_hh) * self.cont_values[t]
        if self.param_propagate_down[2 + self.static_input]:
            self.recurrent_weight.diff += grad_hh
        return d_inputs, [d_next]


@register("LSTM")
class LSTMLayer(_Recurrent):
    """LSTM (Caffe): gate input a_t = W_hc (cont_t h_{t-1}) + W_xc x_t + b_c
    [+ W_xc_static x_static], then the LSTMUnit step (c_t, h_t) from (c_{t-1}, a_t, cont_t):
    c_t = [cont_t != 0] f_t c_{t-1} + i_t g_t, h_t = o_t tanh(c_t); top 0 is h (T, N, H),
    H = num_output. Backward: back-propagation through time."""

    states = 2
    gate_factor = 4

    def run(self, xp, inputs, cont, initial):
        w_hc = self.recurrent_weight.data
        h, c = initial
        self.conted, self.saved = [], []
        outputs = xp.empty(inputs.shape[:2] + (self.hidden,), dtype=inputs.dtype)
        for t in range(self.steps):
            conted = cont[t] * h
            c, h, saved = lstm_unit_forward(xp, c, inputs[t] + conted @ w_hc.T, cont[t])
            self.conted.append(conted)
            self.saved.append(saved)
            outputs[t] = h
        return outputs, [h, c]

    def run_backward(self, xp, d_outputs, final_diffs):
        w_hc = self.recurrent_weight.data
        d_h, d_c = final_diffs
        d_inputs = xp.empty(d_outputs.shape[:2] + (4 * self.hidden,), dtype=d_outputs.dtype)
        grad_hc = xp.zeros_like(w_hc)
        for t in reversed(range(self.steps)):
            d_c, d_gates = lstm_unit_backward(xp, d_c, d_outputs[t] + d_h, self.saved[t])
            d_inputs[t] = d_gates
            grad_hc += d_gates.T @ self.conted[t]
            d_h = (d_gates @ w_hc) * self.cont_values[t]
        if self.param_propagate_down[2 + self.static_input]:
            self.recurrent_weight.diff += grad_hc
        return d_inputs, [d_h, d_c]
