"""Step executors: who runs the device work of a training iteration, on one device or many.

The solver calls one interface, :class:`StepExecutor`, whatever runs the step; layers never
know which does. Three implementations:

* :class:`SingleDevice`: the train net on one device (the default);
* :class:`Slices`: ``len(devices)`` slices of every batch in this process, on the CPU, on one
  GPU (slices share the parameters; a local sum reduces them) or on several GPUs (one
  parameter copy per GPU, NCCL);
* :class:`RankSlices`: the same on each of the P ranks of an MPI job (MPI on CPUs, NCCL
  between GPUs: one GPU per rank, or several).

Data parallelism: the batch size written in the net (of its data sources) is the GLOBAL
batch. With ``S = ranks x local slices`` slices, slice ``s`` reads ``batch_size / S`` examples
through ``DataSource.shard(s, S)``: the S slices' batch ``b`` together are exactly the
one-process batch ``b``, so no example is used twice in an iteration and snapshots resume with
any S that divides the batch. Every slice runs forward/backward on its share; the parameter
gradients are summed over all slices and divided by S. Caffe's losses normalise by their own
(slice) batch, so this mean equals the gradient one device computes on the whole batch, and so
does the logged loss (the mean of the slices' losses). The exceptions, which are not equal: a
loss with ``normalization: NONE`` (its whole-batch gradient is the sum, not the mean) or
``VALID`` with ``ignore_label`` (slices hold different numbers of valid labels), and anything
random drawn from the global generator at training time (Dropout masks are drawn per slice).

BatchNorm statistics (parameters with lr_mult 0) are per slice, as in Caffe's multi-GPU
training: each slice normalises with the mean and variance of its own ``batch_size / S``
examples and keeps its own running averages; snapshots and tests use slice 0's.

Gradients are reduced in buckets, one per point of the backward pass where some parameters
are complete (the layer owning them has run backward). Backward runs layer by layer over all
local slices, and a bucket's reduction starts as soon as it is complete, so on GPUs (NCCL on a
side stream) it overlaps with the backward of the layers below.
"""
from __future__ import annotations

import abc
import contextlib

import numpy as np

from .. import backend, kernels
from ..errors import ConfigError
from .reducers import (DEFAULT_TIMEOUT, LocalReducer, MPIReducer, NCCLReducer, StagedMPIReducer,
                       device_scope, gpus_shared_between_ranks)


class StepExecutor(abc.ABC):
    """The device work of one iteration, as the solver calls it.

    ``net`` is the solver's train net (slice 0) and ``rule`` its update rule; ``ranks`` the
    processes, ``slices`` the slices of every batch over all ranks; ``is_primary`` whether
    this process tests and snapshots. An iteration: ``clear_param_diffs()``;
    ``forward_backward(iteration, reduce)`` ``iter_size`` times (``reduce`` on the last);
    ``reduce(loss)``; ``update(rate, iteration)``; ``agree(action)``. ``synchronize()`` once
    before training, ``forward_loss()`` for the display after the last iteration, ``close()``
    at the end.
    """

    ranks = 1
    slices = 1
    is_primary = True

    def __init__(self, net, rule):
        self.net = net
        self.rule = rule

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Make every slice start from this state of rank 0's train net (weights loaded or
        restored there, update history, data positions)."""

    @abc.abstractmethod
    def clear_param_diffs(self) -> None:
        """Zero the parameter diffs of every slice."""

    @abc.abstractmethod
    def forward_backward(self, iteration: int, reduce: bool):
        """Forward and backward on this process's slices, adding into the parameter diffs;
        with ``reduce``, start reducing the gradients over all slices as backward completes
        them. Returns the sum of this process's slices' losses (a float, or a 0-d array on
        the device: reading it would wait for the device)."""

    @abc.abstractmethod
    def reduce(self, loss):
        """Wait for the reductions; the parameter diffs then hold the mean gradient over all
        slices. Returns the mean over all slices of ``loss`` (this process's sum)."""

    @abc.abstractmethod
    def update(self, rate: float, iteration: int) -> None:
        """Apply the update rule to every parameter copy."""

    @abc.abstractmethod
    def forward_loss(self) -> float:
        """The mean loss over all slices of one forward pass (no backward)."""

    @abc.abstractmethod
    def agree(self, action: str) -> str:
        """The action ("none", "stop", "snapshot") every rank takes: "stop" if any rank asks
        to stop, else "snapshot" if any asks for one."""

    def scope(self):
        """The context the solver runs its iterations in (a captured step: its stream)."""
        return contextlib.nullcontext()

    def close(self) -> None:
        """Release what the executor holds beyond the solver's net (replicas, communicators)."""


class SingleDevice(StepExecutor):
    """The train net alone on the current device."""

    def synchronize(self):
        pass

    def clear_param_diffs(self):
        self.net.clear_param_diffs()

    def forward_backward(self, iteration, reduce):
        if backend.mode() == "gpu":
            # counter-based random kernels draw this iteration's numbers (the GPU Dropout)
            with kernels.get(backend.xp()).iteration_draws(iteration):
                return self.net.forward_backward()
        return self.net.forward_backward()

    def reduce(self, loss):
        return loss

    def update(self, rate, iteration):
        self.rule.apply(self.net, rate, iteration)

    def forward_loss(self):
        return float(self.net.forward_range(0, len(self.net.layers) - 1))

    def agree(self, action):
        return action


class Slices(StepExecutor):
    """``len(devices)`` slices of every batch in this process.

    ``devices``: one entry per slice, None for the CPU or a GPU index. Slices on one device
    share that device's parameter arrays (the first slice there, its holder, keeps them and
    applies the update); each further GPU holds a copy with its own update rule and applies
    the same update. ``build_net()`` builds another train net in the current device scope and
    ``build_rule(net)`` an update rule for it.
    """

    def __init__(self, devices, net, rule, build_net, build_rule, rank: int = 0,
                 ranks: int = 1, timeout: float = DEFAULT_TIMEOUT):
        super().__init__(net, rule)
        self.devices = list(devices)
        self.rank, self.ranks = rank, ranks
        self.slices = ranks * len(self.devices)
        self.is_primary = rank == 0
        distinct = list(dict.fromkeys(self.devices))
        if len(distinct) > 1 and None in distinct:
            raise ConfigError("slices cannot mix the CPU and GPUs")
        self.groups = [[d for d, device in enumerate(self.devices) if device == holder]
                       for holder in distinct]
        self.holders = [group[0] for group in self.groups]
        if not net.data_sources():
            raise ConfigError(f"training on {self.slices} slices needs the train net's batches "
                              "to come from data layers read in shards (Data, ImageData)")
        self._shard(net, 0)
        self.nets = [net] + self._build_replicas(build_net)
        for d, replica in enumerate(self.nets[1:], start=1):
            self._shard(replica, d)
        self.rules = {0: rule}
        for d in self.holders[1:]:
            with self.device_scope(d):
                self.rules[d] = build_rule(self.nets[d])
        self.reducer = self.make_reducer(distinct, timeout)
        self._plan_buckets()

    def make_reducer(self, distinct, timeout):
        """The reducer over this process's devices (several GPUs: NCCL)."""
        if len(distinct) > 1:
            return NCCLReducer(distinct, None, timeout)
        return LocalReducer(distinct)

    # -- building ---------------------------------------------------------------------------
    def device_scope(self, d):
        """The context that computes on local slice ``d``'s device."""
        return device_scope(self.devices[d])

    def _holder(self, d):
        return next(group[0] for group in self.groups if d in group)

    def _build_replicas(self, build_net):
        """More train nets, built without disturbing the global generator; slices on a
        holder's device use the holder's learned parameters (lr_mult != 0)."""
        saved = backend.rng().bit_generator.state
        replicas = []
        for d in range(1, len(self.devices)):
            with self.device_scope(d):
                replicas.append(build_net())
        backend.rng().bit_generator.state = saved
        nets = [self.net] + replicas
        for d, net in enumerate(replicas, start=1):
            holder = nets[self._holder(d)]
            if holder is not net:
                net.arena.share_learned_data(holder.arena)
        return replicas

    def _shard(self, net, d):
        """Make local slice ``d``'s data sources read their share of every batch."""
        for source in net.data_sources().values():
            try:
                source.shard(self.rank * len(self.devices) + d, self.slices)
            except ConfigError as exc:
                where = (f"{self.ranks} ranks x {len(self.devices)} devices" if self.ranks > 1
                         else f"-n {len(self.devices)}")
                raise ConfigError(f"{exc} ({where})") from None

    def _plan_buckets(self):
        """Ranges of the parameter arena's diff to reduce after each layer's backward."""
        self.buckets = self.net.arena.buckets()
        self.diffs = [[self.nets[d].arena.diff for d in group] for group in self.groups]

    # -- running ----------------------------------------------------------------------------
    def synchronize(self) -> None:
        primary = self.net.arena
        for buffer in [primary.data] + self.rule.history_buffers:
            host = np.ascontiguousarray(backend.to_host(buffer))
            self.reducer.broadcast(host)
            buffer[...] = backend.to_device(host)
        states = [source.state() for source in self.net.data_sources().values()]
        numbers = np.array([[s["batches"], s["seed"]] for s in states], dtype=np.int64)
        self.reducer.broadcast(numbers)
        for d, net in enumerate(self.nets):
            with self.device_scope(d):
                if d:
                    net.arena.data[...] = backend.to_device(backend.to_host(primary.data))
                if d and d in self.rules:
                    self.rules[d].copy_history(self.rule)
                for source, (batches, seed) in zip(net.data_sources().values(),
                                                   numbers.tolist()):
                    source.restore_state({"batches": batches, "seed": seed})

    def clear_param_diffs(self) -> None:
        for d, net in enumerate(self.nets):
            with self.device_scope(d):
                net.clear_param_diffs()

    def forward_backward(self, iteration, reduce):
        losses = []
        for d, net in enumerate(self.nets):
            with self.device_scope(d):
                losses.append(net.forward_range(0, len(net.layers) - 1))
        if reduce:
            self.reducer.begin(iteration)
        # Layer by layer (a fused step at a time), each bucket's sum started once its
        # layers' gradients are done.
        for first, last, _ in self.net.segments(0, len(self.net.layers) - 1, backward=True):
            for d, net in enumerate(self.nets):
                with self.device_scope(d):
                    net.backward_range(last, first)
            if reduce:
                for li in range(last, first - 1, -1):
                    for lo, hi in self.buckets.get(li, ()):
                        self.reducer.start(self.diffs, lo, hi)
        return sum(float(loss) for loss in losses)

    def reduce(self, loss):
        self.reducer.wait()
        scale = 1.0 / self.slices
        for d in self.holders:
            with self.device_scope(d):
                self.nets[d].arena.diff[:self.net.arena.learned_size] *= scale
        return self.reducer.sum_scalar(loss) * scale

    def update(self, rate, iteration):
        for d, rule in self.rules.items():
            with self.device_scope(d):
                rule.apply(self.nets[d], rate, iteration)

    def forward_loss(self):
        total = 0.0
        for d, net in enumerate(self.nets):
            with self.device_scope(d):
                total += float(net.forward_range(0, len(net.layers) - 1))
        return self.reducer.sum_scalar(total) / self.slices

    def agree(self, action):
        flags = np.array([action == "stop", action == "snapshot"], dtype=np.int64)
        stop, snap = self.reducer.agree(flags).tolist()
        return "stop" if stop else "snapshot" if snap else "none"

    def close(self):
        self.reducer.close()
        for net in self.nets[1:]:
            for source in net.data_sources().values():
                source.close()


class RankSlices(Slices):
    """:class:`Slices` on each rank of the MPI communicator ``comm`` (rank r's slices are
    ``r x len(devices) ...``). CPU ranks reduce through MPI; GPU ranks through NCCL, with any
    number of GPUs per rank (the same on every rank; one per rank is the usual set-up), or,
    where ranks share a GPU (more ranks than GPUs on a node), through MPI on host copies."""

    def __init__(self, devices, net, rule, build_net, build_rule, comm,
                 timeout: float = DEFAULT_TIMEOUT):
        self.comm = comm
        super().__init__(devices, net, rule, build_net, build_rule, rank=comm.Get_rank(),
                         ranks=comm.Get_size(), timeout=timeout)

    def make_reducer(self, distinct, timeout):
        if distinct == [None]:
            return MPIReducer(self.comm, timeout)
        if gpus_shared_between_ranks(self.comm, distinct):
            if len(distinct) > 1:
                raise ConfigError("MPI ranks that share GPUs take one GPU each (NCCL refuses "
                                  f"two ranks on one GPU); this rank has {len(distinct)}")
            return StagedMPIReducer(self.comm, timeout)
        return NCCLReducer(distinct, MPIReducer(self.comm, timeout), timeout)


def device_list(count: int, device: str, first_gpu: int = 0) -> list:
    """Slices for ``-n count``: CPU slices, or GPUs ``first_gpu ... first_gpu + count - 1``."""
    if count < 1:
        raise ConfigError(f"-n must be at least 1, got {count}")
    if device == "gpu":
        return [first_gpu + d for d in range(count)]
    return [None] * count
