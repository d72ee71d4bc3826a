"""Caffe's parameter update rules, one class each, written against the array module.

The rules work on the net's parameter arena (``owlnet.arena``): all learnable parameters'
data and diffs are two flat buffers, grouped by (lr_mult, decay_mult), and the history is
buffers of the same layout. :meth:`UpdateRule.apply` follows Caffe's ``ApplyUpdate`` with a
few whole-buffer operations per group instead of a loop over parameters:

1. clip: when ``clip_gradients >= 0`` and the global L2 norm ``||g||`` of all parameter diffs
   exceeds it, every diff is scaled by ``clip_gradients / ||g||``;
2. per group of multipliers ``lr_mult``, ``decay_mult`` (groups with lr_mult 0 are skipped:
   their step is 0): normalize ``g /= iter_size`` (when ``iter_size > 1``);
3. regularize with ``d = weight_decay * decay_mult`` (skipped when 0):
   L2 ``g += d * w``, L1 ``g += d * sign(w)``;
4. compute the update value into the diff, with the group's rate ``r`` (``rate * lr_mult``,
   for Adam times its bias correction: :meth:`UpdateRule.group_rates`; see each class);
5. ``w -= diff``.

Steps 3-5 of SGD with L2 (or no) decay on host arrays run as one compiled pass
(``kernels.cpu.updates``) with the same roundings, so the same bits.

The group rates are float64 numbers computed on the host. A captured GPU step
(``owlnet.parallel.captured``) hands them to :meth:`UpdateRule.apply` as 0-d float64 device
arrays that it refills before each replay, so the graph sees each iteration's rates; either
way a rate is rounded to the parameters' type where it scales them (:func:`factor`), so the
results are bit-identical.

History arrays live beside the parameters (same device and dtype). ``history`` lists them in
Caffe's SolverState order, views into the history buffers: one per parameter, and for
AdaDelta and Adam a second set of N after the first N.
"""
from __future__ import annotations

import numpy as np

from .. import backend, kernels
from ..blob import device_current
from .. import logging as owl_logging
from ..errors import ConfigError


def factor(value, dtype):
    """``value`` as a multiplier of a ``dtype`` array, rounded as NumPy and CuPy round a Python
    float there (to ``dtype``, then one multiply in ``dtype``): a Python number is kept, a 0-d
    float64 array is cast to ``dtype``."""
    return value if type(value) in (int, float) else value.astype(dtype)


class UpdateRule:
    """Clip, normalize, regularize; subclasses compute the update value (``compute``)."""

    type = ""
    #: How many history buffers the rule keeps (Caffe's history is sets of N, in order).
    history_sets = 1

    def __init__(self, solver_param, net):
        self.param = solver_param
        self.momentum = solver_param.momentum
        self.delta = solver_param.delta
        self.clip_gradients = solver_param.clip_gradients
        self.iter_size = solver_param.iter_size
        self.weight_decay = solver_param.weight_decay
        self.regularization = solver_param.regularization_type
        if self.iter_size < 1:
            raise ConfigError(f"iter_size must be at least 1, got {self.iter_size}")
        if self.weight_decay and self.regularization not in ("L1", "L2"):
            raise ConfigError(f"unknown regularization_type {self.regularization!r} "
                              "(known types: L1, L2)")
        self.check_param()
        arena = net.arena
        self.history_buffers = [backend.array_module(arena.data).zeros_like(arena.data)
                                for _ in range(self.history_sets)]
        self.history = [view for buffer in self.history_buffers for view in arena.views(buffer)]

    def check_param(self) -> None:
        """Raise ConfigError for settings this rule cannot use (Caffe's constructor checks)."""

    # -- the update ----------------------------------------------------------------------
    def group_rates(self, arena, rate: float, iteration: int) -> list:
        """The rate ``r`` of each learning group of ``arena`` at ``iteration`` (host floats):
        ``rate * lr_mult``."""
        return [rate * group.lr_mult for group in arena.learned]

    def apply(self, net, rate: float, iteration: int, group_rates=None) -> None:
        """One update of every learnable parameter of ``net`` (the net this rule was made
        for) at learning rate ``rate``; ``group_rates`` (0-d float64 device arrays holding
        :meth:`group_rates`) replace ``rate`` and ``iteration`` when given."""
        arena = net.arena
        device_current(net.learnable_params)       # the arena's device buffers hold the values
        self.clip(arena.diff)
        xp = backend.array_module(arena.data)
        if group_rates is None:
            group_rates = self.group_rates(arena, rate, iteration)
        for group, local_rate in zip(arena.learned, group_rates):
            lo, hi = group.lo, group.hi
            diff, data = arena.diff[lo:hi], arena.data[lo:hi]
            if self.iter_size != 1:
                diff *= 1.0 / self.iter_size
            history = [h[lo:hi] for h in self.history_buffers]
            decay = self.weight_decay * group.decay_mult
            if self.step_in_one_pass(history, diff, data, local_rate, decay):
                continue
            self.regularize(diff, data, decay)
            self.compute(history, diff, local_rate)
            xp.subtract(data, diff, out=data)

    def clip(self, diff) -> None:
        """Scale ``diff`` (all the parameters' diffs) down to the L2 norm ``clip_gradients``."""
        if self.clip_gradients < 0 or not diff.size:
            return
        xp = backend.array_module(diff)
        norm = float(xp.sqrt(xp.vdot(diff, diff)))
        if norm > self.clip_gradients:
            scale = self.clip_gradients / norm
            owl_logging.info(f"Gradient clipping: scaling down gradients (L2 norm "
                             f"{owl_logging.num(norm)} > {owl_logging.num(self.clip_gradients)}) "
                             f"by scale factor {owl_logging.num(scale)}")
            diff *= scale

    def regularize(self, diff, data, local_decay: float) -> None:
        if not local_decay:
            return
        if self.regularization == "L2":
            diff += local_decay * data
        else:
            diff += local_decay * backend.array_module(data).sign(data)

    def step_in_one_pass(self, history, diff, data, local_rate, local_decay) -> bool:
        """Regularize, compute and step one group in one compiled pass where the rule has
        one for these arrays (then True), with the results of the separate passes."""
        return False

    def compute(self, history, diff, local_rate) -> None:
        """Turn the gradient ``diff`` of one group into the step to subtract (in place);
        ``history``: the group's range of each history buffer; ``local_rate``: the group's
        rate (a float, or a 0-d float64 device array)."""
        raise NotImplementedError

    # -- history <-> SolverState -----------------------------------------------------------
    def set_history(self, arrays) -> None:
        """Take history arrays (host arrays in SolverState order, shapes already checked)."""
        for view, array in zip(self.history, arrays):
            view[...] = backend.array_module(view).asarray(array, dtype=view.dtype)

    def copy_history(self, other: "UpdateRule") -> None:
        """Take ``other``'s history (a rule of the same net, on any device)."""
        for mine, theirs in zip(self.history_buffers, other.history_buffers):
            mine[...] = backend.to_device(backend.to_host(theirs))


class SGD(UpdateRule):
    """``h = momentum * h + r * g``; step ``h``."""

    type = "SGD"

    def step_in_one_pass(self, history, diff, data, local_rate, local_decay):
        if type(diff) is not np.ndarray or type(local_rate) not in (int, float) \
                or (local_decay and self.regularization != "L2"):
            return False
        kernels.cpu.updates.sgd_step(history[0], diff, data, local_rate, self.momentum,
                                     local_decay)
        return True

    def compute(self, history, diff, local_rate):
        h, = history
        diff *= factor(local_rate, diff.dtype)
        h *= self.momentum
        h += diff
        diff[...] = h


class Nesterov(UpdateRule):
    """``h' = momentum * h + r * g``; step ``(1 + momentum) * h' - momentum * h``."""

    type = "Nesterov"

    def compute(self, history, diff, local_rate):
        h, = history
        previous = h * self.momentum
        diff *= factor(local_rate, diff.dtype)
        h *= self.momentum
        h += diff
        backend.array_module(h).multiply(h, 1.0 + self.momentum, out=diff)
        diff -= previous


class AdaGrad(UpdateRule):
    """``h += g^2``; step ``r * g / (sqrt(h) + delta)``."""

    type = "AdaGrad"

    def check_param(self):
        if self.momentum != 0:
            raise ConfigError("momentum cannot be used with AdaGrad (set momentum: 0)")

    def compute(self, history, diff, local_rate):
        h, = history
        h += diff * diff
        denominator = backend.array_module(h).sqrt(h)
        denominator += self.delta
        diff /= denominator
        diff *= factor(local_rate, diff.dtype)


class RMSProp(UpdateRule):
    """``h = rms_decay * h + (1 - rms_decay) * g^2``; step ``r * g / (sqrt(h) + delta)``."""

    type = "RMSProp"

    def check_param(self):
        if self.momentum != 0:
            raise ConfigError("momentum cannot be used with RMSProp (set momentum: 0)")
        if not 0 <= self.param.rms_decay < 1:
            raise ConfigError(f"rms_decay must lie in [0, 1), got {self.param.rms_decay:g}")

    def compute(self, history, diff, local_rate):
        h, = history
        decay = self.param.rms_decay
        h *= decay
        h += (1.0 - decay) * (diff * diff)
        denominator = backend.array_module(h).sqrt(h)
        denominator += self.delta
        diff /= denominator
        diff *= factor(local_rate, diff.dtype)


class AdaDelta(UpdateRule):
    """With ``m = momentum``: ``h = m * h + (1 - m) * g^2``;
    ``u = g * sqrt((hu + delta) / (h + delta))``; ``hu = m * hu + (1 - m) * u^2``; step ``r * u``.

    History: the N gradient histories ``h``, then the N update histories ``hu``.
    """

    type = "AdaDelta"
    history_sets = 2

    def compute(self, history, diff, local_rate):
        xp = backend.array_module(diff)
        m = self.momentum
        h, h_update = history
        h *= m
        h += (1.0 - m) * (diff * diff)
        ratio = h_update + self.delta
        ratio /= h + self.delta
        diff *= xp.sqrt(ratio)
        h_update *= m
        h_update += (1.0 - m) * (diff * diff)
        diff *= factor(local_rate, diff.dtype)


class Adam(UpdateRule):
    """With ``b1 = momentum``, ``b2 = momentum2``, ``t = iter + 1``:
    ``m = b1 * m + (1 - b1) * g``; ``v = b2 * v + (1 - b2) * g^2``;
    step ``r * m / (sqrt(v) + delta)`` with the group rate ``r = rate * lr_mult * sqrt(1 - b2^t)
    / (1 - b1^t)`` (the bias correction computed on the host).

    History: the N first moments ``m``, then the N second moments ``v``.
    """

    type = "Adam"
    history_sets = 2

    def group_rates(self, arena, rate, iteration):
        b1, b2 = self.momentum, self.param.momentum2
        t = iteration + 1
        correction = (1.0 - b2 ** t) ** 0.5 / (1.0 - b1 ** t)
        return [local_rate * correction for local_rate in super().group_rates(arena, rate,
                                                                               iteration)]

    def compute(self, history, diff, local_rate):
        xp = backend.array_module(diff)
        b1, b2 = self.momentum, self.param.momentum2
        m, v = history
        m *= b1
        m += (1.0 - b1) * diff
        v *= b2
        v += (1.0 - b2) * (diff * diff)
        denominator = xp.sqrt(v)
        denominator += self.delta
        xp.divide(m, denominator, out=diff)
        diff *= factor(local_rate, diff.dtype)


RULES = {rule.type: rule for rule in (SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam)}
