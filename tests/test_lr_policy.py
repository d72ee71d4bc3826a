"""Learning-rate policies against their formulas, written out independently here."""
from __future__ import annotations

import math

import pytest
from google.protobuf import text_format

from owlnet.errors import ConfigError
from owlnet.proto import caffe_pb2
from owlnet.solver.lr_policy import LearningRate

ITERS = [0, 1, 7, 99, 100, 101, 1234, 5000]


def solver_param(text):
    return text_format.Parse(text, caffe_pb2.SolverParameter())


def rates(text, iterations=ITERS):
    policy = LearningRate(solver_param(text))
    return [policy.rate(it) for it in iterations]


def test_fixed():
    assert rates('lr_policy: "fixed" base_lr: 0.01') == pytest.approx([0.01] * len(ITERS))


def test_step():
    p = solver_param('lr_policy: "step" base_lr: 0.1 gamma: 0.5 stepsize: 100')
    policy = LearningRate(p)
    for it in ITERS:
        assert policy.rate(it) == pytest.approx(p.base_lr * p.gamma ** math.floor(it / 100))
        assert policy.current_step == it // 100


def test_exp():
    p = solver_param('lr_policy: "exp" base_lr: 0.1 gamma: 0.999')
    expected = [p.base_lr * math.exp(it * math.log(p.gamma)) for it in ITERS]
    assert rates('lr_policy: "exp" base_lr: 0.1 gamma: 0.999') == pytest.approx(expected)


def test_inv():
    text = 'lr_policy: "inv" base_lr: 0.01 gamma: 0.0001 power: 0.75'
    p = solver_param(text)
    expected = [p.base_lr / (1 + p.gamma * it) ** p.power for it in ITERS]
    assert rates(text) == pytest.approx(expected)


def test_poly_and_past_max_iter():
    text = 'lr_policy: "poly" base_lr: 0.02 power: 2 max_iter: 1000'
    p = solver_param(text)
    iters = [0, 10, 500, 999, 1000, 1500]
    expected = [p.base_lr * (1 - min(it, 1000) / 1000) ** 2 for it in iters]
    assert rates(text, iters) == pytest.approx(expected)


def test_sigmoid():
    text = 'lr_policy: "sigmoid" base_lr: 0.1 gamma: 0.05 stepsize: 100'
    p = solver_param(text)
    expected = [p.base_lr * (1 / (1 + math.exp(-p.gamma * (it - 100)))) for it in ITERS]
    assert rates(text) == pytest.approx(expected)
    # far below stepsize with a large gamma: exp overflows, the rate is 0
    huge = LearningRate(solver_param('lr_policy: "sigmoid" base_lr: 1 gamma: 1000 stepsize: 10'))
    assert huge.rate(0) == 0.0


def test_multistep_boundaries():
    p = solver_param('lr_policy: "multistep" base_lr: 1 gamma: 0.1 '
                     'stepvalue: 3 stepvalue: 5 stepvalue: 9')
    policy = LearningRate(p)
    steps = []
    for it in range(12):
        rate = policy.rate(it)
        steps.append(policy.current_step)
        assert rate == pytest.approx(p.gamma ** policy.current_step)
    assert steps == [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3]


def test_multistep_advances_one_step_per_call_as_caffe():
    p = solver_param('lr_policy: "multistep" base_lr: 1 gamma: 0.5 '
                     'stepvalue: 2 stepvalue: 4 stepvalue: 6')
    policy = LearningRate(p)
    assert policy.rate(10) == pytest.approx(0.5)      # one step, though three are passed
    assert policy.rate(11) == pytest.approx(0.25)
    assert policy.rate(12) == pytest.approx(0.125)
    assert policy.rate(13) == pytest.approx(0.125)    # no step left


def test_multistep_current_step_is_restorable():
    p = solver_param('lr_policy: "multistep" base_lr: 1 gamma: 0.1 stepvalue: 3 stepvalue: 5')
    policy = LearningRate(p)
    policy.current_step = 1           # as restored from a snapshot taken at iteration 4
    assert policy.rate(4) == pytest.approx(0.1)
    assert policy.rate(5) == pytest.approx(0.01)


@pytest.mark.parametrize("text, words", [
    ('lr_policy: "cosine" base_lr: 1', "cosine"),
    ('base_lr: 1', "lr_policy"),
    ('lr_policy: "step" base_lr: 1 gamma: 0.1', "stepsize"),
    ('lr_policy: "sigmoid" base_lr: 1 gamma: 0.1 stepsize: 0', "stepsize"),
    ('lr_policy: "exp" base_lr: 1 gamma: -0.5', "gamma"),
    ('lr_policy: "poly" base_lr: 1 power: 1', "max_iter"),
])
def test_bad_policies(text, words):
    with pytest.raises(ConfigError, match=words):
        LearningRate(solver_param(text))
