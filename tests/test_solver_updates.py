"""Update rules over several iterations against Caffe's formulas, recomputed here in float64.

A tiny fake net holds four parameters in a parameter arena: two sharing (lr_mult, decay_mult),
one with other multipliers and one with lr_mult 0; a real net adds parameter sharing (STRICT
and PERMISSIVE). Each iteration puts a known gradient into the diffs and calls the rule's
``apply`` (clip, normalize, regularize, compute, w -= step, per arena group). The reference
below is written from the formulas, per parameter, element-wise math on fresh arrays, not from
the rule's in-place code.
"""
from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

import owlnet
from owlnet import backend
from owlnet.arena import ParamArena
from owlnet.blob import Blob
from owlnet.errors import ConfigError
from owlnet.proto import caffe_pb2
from owlnet.solver import updates

SHAPES = [(3, 4), (5,), (2, 3), (4,)]
LR_MULT = [1.0, 2.0, 1.0, 0.0]
DECAY_MULT = [1.0, 0.5, 1.0, 1.0]
OWNER_LAYERS = [0, 1, 2, 1]          # the arena orders by layer: not the parameters' order
RATES = [0.1, 0.05, 0.02, 0.08]


class FakeNet:
    """Just what an update rule uses: parameters in an arena, with their multipliers."""

    def __init__(self, weights):
        with backend.dtype_scope(np.float64):
            self.learnable_params = [Blob(w.shape, name=f"p{i}") for i, w in enumerate(weights)]
        for blob, w in zip(self.learnable_params, weights):
            blob.data[...] = w
        self.params_lr = list(LR_MULT)
        self.params_weight_decay = list(DECAY_MULT)
        self.arena = ParamArena(self.learnable_params, LR_MULT, DECAY_MULT, OWNER_LAYERS)

    def clear_param_diffs(self):
        for blob in self.learnable_params:
            blob.diff[...] = 0


def solver_param(text):
    return text_format.Parse(text, caffe_pb2.SolverParameter())


def problem(seed=0):
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal(s) for s in SHAPES]
    weights[0][0, 0] = 0.0                       # sign(0) = 0 for L1
    grads = [[rng.standard_normal(s) for s in SHAPES] for _ in RATES]
    return weights, grads


def run_rule(rule_class, p, weights, grads):
    net = FakeNet(weights)
    rule = rule_class(p, net)
    for it, (g, rate) in enumerate(zip(grads, RATES)):
        net.clear_param_diffs()
        for blob, gi in zip(net.learnable_params, g):
            blob.diff[...] += gi
        rule.apply(net, rate, it)
    return [b.data.copy() for b in net.learnable_params], rule.history


def reference(kind, p, weights, grads, lr_mults=LR_MULT, decay_mults=DECAY_MULT):
    """Caffe's update, from the formulas; returns weights and the history sets. A parameter
    with lr_mult 0 is left alone, history included (its step is 0 in any rule)."""
    w = [x.copy() for x in weights]
    n = len(w)
    h1 = [np.zeros_like(x) for x in w]
    h2 = [np.zeros_like(x) for x in w]
    m, delta = p.momentum, p.delta
    for it, (g_raw, rate) in enumerate(zip(grads, RATES)):
        g = [x.copy() for x in g_raw]
        if p.clip_gradients >= 0:
            norm = np.sqrt(sum(np.sum(x * x) for x in g))
            if norm > p.clip_gradients:
                g = [x * (p.clip_gradients / norm) for x in g]
        for i in range(n):
            if lr_mults[i] == 0:
                continue
            gi = g[i] / p.iter_size
            decay = p.weight_decay * decay_mults[i]
            if p.regularization_type == "L1":
                gi = gi + decay * np.sign(w[i])
            else:
                gi = gi + decay * w[i]
            r = rate * lr_mults[i]
            if kind == "SGD":
                h1[i] = m * h1[i] + r * gi
                step = h1[i]
            elif kind == "Nesterov":
                old = h1[i]
                h1[i] = m * old + r * gi
                step = (1 + m) * h1[i] - m * old
            elif kind == "AdaGrad":
                h1[i] = h1[i] + gi ** 2
                step = r * gi / (np.sqrt(h1[i]) + delta)
            elif kind == "RMSProp":
                h1[i] = p.rms_decay * h1[i] + (1 - p.rms_decay) * gi ** 2
                step = r * gi / (np.sqrt(h1[i]) + delta)
            elif kind == "AdaDelta":
                h1[i] = m * h1[i] + (1 - m) * gi ** 2
                u = gi * np.sqrt((h2[i] + delta) / (h1[i] + delta))
                h2[i] = m * h2[i] + (1 - m) * u ** 2
                step = r * u
            elif kind == "Adam":
                b1, b2, t = m, p.momentum2, it + 1
                h1[i] = b1 * h1[i] + (1 - b1) * gi
                h2[i] = b2 * h2[i] + (1 - b2) * gi ** 2
                m_hat = h1[i] / (1 - b1 ** t)
                # Caffe's form: delta is added to sqrt(v), not to sqrt(v / (1 - b2^t))
                step = r * m_hat * np.sqrt(1 - b2 ** t) / (np.sqrt(h2[i]) + delta)
            w[i] = w[i] - step
    return w, h1, h2


CASES = [
    ("SGD", "momentum: 0.9 weight_decay: 0.01"),
    ("SGD", "momentum: 0.9 weight_decay: 0.03 regularization_type: 'L1'"),
    ("SGD", "momentum: 0.5 weight_decay: 0.01 iter_size: 3"),
    ("SGD", "momentum: 0.9 clip_gradients: 1.5"),                    # clipping applies
    ("SGD", "momentum: 0.9 clip_gradients: 1000"),                   # norm below: no clipping
    ("SGD", "momentum: 0 weight_decay: 0.01 iter_size: 2 clip_gradients: 2"),
    ("Nesterov", "momentum: 0.9 weight_decay: 0.01"),
    ("Nesterov", "momentum: 0.8 weight_decay: 0.02 regularization_type: 'L1' iter_size: 2"),
    ("AdaGrad", "weight_decay: 0.01 delta: 1e-6"),
    ("AdaGrad", "weight_decay: 0.01 iter_size: 2 clip_gradients: 1"),
    ("RMSProp", "weight_decay: 0.01 rms_decay: 0.95 delta: 1e-6"),
    ("RMSProp", "regularization_type: 'L1' weight_decay: 0.02 rms_decay: 0.9 iter_size: 4"),
    ("AdaDelta", "momentum: 0.95 weight_decay: 0.01 delta: 1e-6"),
    ("AdaDelta", "momentum: 0.9 delta: 1e-4 iter_size: 2 clip_gradients: 1"),
    ("Adam", "momentum: 0.9 momentum2: 0.999 delta: 1e-8 weight_decay: 0.01"),
    ("Adam", "momentum: 0.8 momentum2: 0.99 delta: 1e-6 regularization_type: 'L1' "
             "weight_decay: 0.01 iter_size: 2"),
]


@pytest.mark.parametrize("kind, settings", CASES)
def test_rule_matches_formula(kind, settings):
    p = solver_param(f'type: "{kind}" {settings}')
    weights, grads = problem()
    got_w, got_history = run_rule(updates.RULES[kind], p, weights, grads)
    want_w, h1, h2 = reference(kind, p, weights, grads)
    for got, want in zip(got_w, want_w):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # History in Caffe's SolverState order: N arrays, then N more for AdaDelta and Adam.
    want_history = h1 + (h2 if kind in ("AdaDelta", "Adam") else [])
    assert len(got_history) == len(want_history)
    for got, want in zip(got_history, want_history):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_clipping_really_scales():
    p = solver_param("momentum: 0 clip_gradients: 0.5")
    weights, grads = problem()
    got_w, _ = run_rule(updates.SGD, p, weights, grads[:1] * len(RATES))
    unclipped_w, _, _ = reference("SGD", solver_param("momentum: 0"), weights,
                                  grads[:1] * len(RATES))
    assert not np.allclose(got_w[0], unclipped_w[0])


def test_history_lives_with_params_and_has_their_shapes():
    weights, _ = problem()
    rule = updates.Adam(solver_param("momentum: 0.9"), FakeNet(weights))
    assert [h.shape for h in rule.history] == SHAPES + SHAPES
    assert all(h.dtype == np.float64 for h in rule.history)


@pytest.mark.parametrize("kind, settings, words", [
    ("AdaGrad", "momentum: 0.9", "momentum"),
    ("RMSProp", "momentum: 0.9", "momentum"),
    ("RMSProp", "rms_decay: 1", "rms_decay"),
    ("SGD", "weight_decay: 0.1 regularization_type: 'L3'", "L3"),
    ("SGD", "iter_size: 0", "iter_size"),
])
def test_bad_settings(kind, settings, words):
    weights, _ = problem()
    with pytest.raises(ConfigError, match=words):
        updates.RULES[kind](solver_param(settings), FakeNet(weights))


SHARED_NET = """
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 9 } } }
layer { name: "a" type: "InnerProduct" bottom: "x" top: "a"
  param { name: "w" lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.5 }
                        bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "b" type: "InnerProduct" bottom: "a" top: "b"
  param { name: "w" share_mode: PERMISSIVE } param { lr_mult: 0 decay_mult: 1 }
  inner_product_param { num_output: 9 bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "d" type: "InnerProduct" bottom: "b" top: "d" param { name: "w" }
  inner_product_param { num_output: 4 bias_filler { type: "gaussian" std: 0.5 } } }
"""


@pytest.mark.parametrize("kind, settings", [case for case in CASES if "clip" not in case[1]])
def test_arena_update_of_a_net_with_shared_params_matches_formula(kind, settings):
    """Shared (STRICT and PERMISSIVE) parameters, lr_mult 0 and three multiplier groups."""
    p = solver_param(f'type: "{kind}" {settings}')
    with backend.dtype_scope(np.float64):
        net = owlnet.Net(SHARED_NET, owlnet.TRAIN)
    params = net.learnable_params
    assert [b.shape for b in params] == [(4, 9), (4,), (9,), (4,)]
    assert net.params_lr == [1.0, 2.0, 0.0, 1.0]
    assert [(g.lr_mult, g.decay_mult) for g in net.arena.groups] == [(1, 1), (2, 0), (0, 1)]
    rng = np.random.default_rng(3)
    weights = [b.data.copy() for b in params]
    grads = [[rng.standard_normal(b.shape) for b in params] for _ in RATES]
    rule = updates.RULES[kind](p, net)
    for it, (g, rate) in enumerate(zip(grads, RATES)):
        net.clear_param_diffs()
        for blob, gi in zip(params, g):
            blob.diff[...] += gi
        rule.apply(net, rate, it)
    want_w, h1, h2 = reference(kind, p, weights, grads, net.params_lr, net.params_weight_decay)
    for blob, want in zip(params, want_w):
        np.testing.assert_allclose(blob.data, want, rtol=1e-10, atol=1e-12)
    want_history = h1 + (h2 if kind in ("AdaDelta", "Adam") else [])
    for got, want in zip(rule.history, want_history):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # The sharers see the owner's values: the same blob (STRICT), a reshaped view (PERMISSIVE).
    owner = net.params["a"][0]
    assert net.params["d"][0] is owner
    np.testing.assert_array_equal(net.params["b"][0].data, owner.data.reshape(9, 4))
    assert np.shares_memory(net.params["b"][0].data, net.arena.data)


def test_arena_layout_groups_and_buckets():
    weights, _ = problem()
    net = FakeNet(weights)
    arena = net.arena
    # learning groups first, in order of appearance; within a group the last layer first
    assert [(g.lr_mult, g.decay_mult, g.lo, g.hi) for g in arena.groups] == [
        (1.0, 1.0, 0, 18), (2.0, 0.5, 18, 23), (0.0, 1.0, 23, 27)]
    assert arena.segments == [(6, 18), (18, 23), (0, 6), (23, 27)]
    assert arena.learned_size == 23
    assert arena.buckets() == {2: [(0, 6)], 0: [(6, 18)], 1: [(18, 23)]}
    for blob, (lo, hi) in zip(net.learnable_params, arena.segments):
        assert np.shares_memory(blob.data, arena.data[lo:hi])
        np.testing.assert_array_equal(blob.data.ravel(), arena.data[lo:hi])
    net.learnable_params[1].diff[...] = 7
    assert (arena.diff[18:23] == 7).all() and not arena.diff[:18].any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("decay", [0.0, 5e-4])
def test_sgd_in_one_pass_gives_the_bits_of_the_separate_passes(dtype, decay):
    """The compiled SGD step (bands of a long buffer on the worker threads) against the rule's
    own NumPy passes (regularize, compute, subtract), bit for bit; -0.0 gradients stay -0.0
    where there is no decay term."""
    from types import SimpleNamespace
    from owlnet.kernels.cpu.updates import sgd_step
    rng = np.random.default_rng(3)
    size = 300_001
    data, diff, history = (rng.standard_normal(size).astype(dtype) for _ in range(3))
    diff[:4] = [-0.0, 0.0, -0.0, 1e-30]
    history[:4] = 0.0
    rate, momentum = 0.01 * 3.3, 0.9
    want = [a.copy() for a in (history, diff, data)]
    rule = SimpleNamespace(momentum=momentum, regularization="L2")
    updates.UpdateRule.regularize(rule, want[1], want[2], decay)
    updates.SGD.compute(rule, [want[0]], want[1], rate)
    np.subtract(want[2], want[1], out=want[2])
    sgd_step(history, diff, data, rate, momentum, decay)
    for found, expected in zip((history, diff, data), want):
        np.testing.assert_array_equal(found, expected)
        assert np.array_equal(np.signbit(found), np.signbit(expected))
    with pytest.raises(ValueError, match="C-contiguous"):
        sgd_step(history[::2], diff[::2], data[::2], rate, momentum, decay)
