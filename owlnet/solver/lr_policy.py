"""Caffe's learning-rate policies (``lr_policy`` in the solver), as a function of the iteration.

With ``base_lr``, ``gamma``, ``power``, ``stepsize``, ``stepvalue`` and ``max_iter`` from the
SolverParameter and ``it`` the number of updates done so far:

* ``fixed``:     ``base_lr``
* ``step``:      ``base_lr * gamma ^ floor(it / stepsize)``
* ``exp``:       ``base_lr * gamma ^ it``
* ``inv``:       ``base_lr * (1 + gamma * it) ^ (-power)``
* ``multistep``: ``base_lr * gamma ^ current_step``, where ``current_step`` (saved in the
  snapshot) advances by one on a call where ``it >= stepvalue[current_step]``, at most one
  step per call, as Caffe does
* ``poly``:      ``base_lr * (1 - it / max_iter) ^ power`` (0 past ``max_iter``)
* ``sigmoid``:   ``base_lr / (1 + exp(-gamma * (it - stepsize)))``
"""
from __future__ import annotations

import math

from .. import logging as owl_logging
from ..errors import ConfigError

POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


class LearningRate:
    """The rate of one solver; ``current_step`` is its saved position (step and multistep)."""

    def __init__(self, solver_param):
        self.param = solver_param
        self.policy = solver_param.lr_policy
        self.current_step = 0
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown learning rate policy lr_policy: {self.policy!r} "
                              f"(known policies: {', '.join(POLICIES)})")
        if self.policy in ("step", "sigmoid") and solver_param.stepsize <= 0:
            raise ConfigError(f"lr_policy {self.policy!r} needs stepsize > 0, "
                              f"got {solver_param.stepsize}")
        if self.policy in ("step", "exp", "inv", "multistep", "sigmoid") and solver_param.gamma < 0:
            raise ConfigError(f"lr_policy {self.policy!r} needs gamma >= 0, "
                              f"got {solver_param.gamma:g}")
        if self.policy == "poly" and solver_param.max_iter <= 0:
            raise ConfigError(f"lr_policy 'poly' needs max_iter > 0, got {solver_param.max_iter}")

    def rate(self, iteration: int) -> float:
        """The rate for the update made at ``iteration`` (advances ``current_step``)."""
        p = self.param
        if self.policy == "fixed":
            return p.base_lr
        if self.policy == "step":
            self.current_step = iteration // p.stepsize
            return p.base_lr * p.gamma ** self.current_step
        if self.policy == "exp":
            return p.base_lr * p.gamma ** iteration
        if self.policy == "inv":
            return p.base_lr * (1.0 + p.gamma * iteration) ** (-p.power)
        if self.policy == "multistep":
            if (self.current_step < len(p.stepvalue)
                    and iteration >= p.stepvalue[self.current_step]):
                self.current_step += 1
                owl_logging.info(f"MultiStep Status: Iteration {iteration}, "
                                 f"step = {self.current_step}")
            return p.base_lr * p.gamma ** self.current_step
        if self.policy == "poly":
            # Past max_iter the base would go negative (NaN in Caffe): the rate stays 0.
            return p.base_lr * max(0.0, 1.0 - iteration / p.max_iter) ** p.power
        try:
            return p.base_lr / (1.0 + math.exp(-p.gamma * (iteration - p.stepsize)))
        except OverflowError:  # exp(-gamma * (it - stepsize)) beyond float range: rate 0
            return 0.0
