"""Data-parallel training: each iteration's batch sliced over devices and processes.

The batch size written in the net (``batch_size`` of its Data/ImageData layers) is the GLOBAL
batch. With ``S = ranks x local slices`` slices, slice ``s`` reads ``batch_size / S`` examples
through ``set_shard(s, S)``: the S slices' batch ``b`` together are exactly the one-process
batch ``b``, so no example is used twice in an iteration and snapshots resume with any S that
divides the batch.

Every slice runs forward/backward on its share; the parameter gradients are summed over all
slices and divided by S. Caffe's losses normalise by their own (slice) batch, so this mean
equals the gradient one device computes on the whole batch, and so does the logged loss (the
mean of the slices' losses). The exceptions, which are not equal: a loss with
``normalization: NONE`` (its whole-batch gradient is the sum, not the mean) or ``VALID`` with
``ignore_label`` (slices hold different numbers of valid labels), and anything random drawn
from the global generator at training time (Dropout masks are drawn per slice).

BatchNorm statistics are per slice, as in Caffe's multi-GPU training: each slice normalises
with the mean and variance of its own ``batch_size / S`` examples, and keeps its own running
averages; snapshots and tests use slice 0's.

Gradients are reduced in buckets, one per point of the backward pass where some parameters are
complete (the lowest layer using them has run backward). Backward runs layer by layer over all
local slices, and a bucket's reduction starts as soon as it is complete, so on GPUs (NCCL on a
side stream) it overlaps with the backward of the layers below. :class:`Reducer` has three
implementations: :class:`LocalReducer` (slices sharing one device: a sum in memory),
:class:`MPIReducer` (CPU ranks: mpi4py ``Iallreduce`` on the flat float32 buffer) and
:class:`NCCLReducer` (one device per slice: one NCCL communicator over every device of every
rank, its unique id broadcast through MPI). Collective waits poll with a deadline, so a rank
that stops answering makes the others fail with TrainingError naming it instead of hanging.
"""
from __future__ import annotations

import contextlib
import os
import time

import numpy as np

from . import backend
from .errors import ConfigError, TrainingError

#: Environment variables by which MPI launchers (MPICH/Hydra, Open MPI, MVAPICH, PMIx) tell a
#: process the job's size.
_WORLD_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE",
                         "PMIX_SIZE")
DEFAULT_TIMEOUT = 300.0
_ARRIVAL_TAG = 7301
_NCCL_UNIQUE_ID_BYTES = 128


def launched_by_mpi() -> bool:
    """Whether this process is one rank of an MPI job of more than one process."""
    for name in _WORLD_SIZE_VARIABLES:
        value = os.environ.get(name)
        if value and value.isdigit() and int(value) > 1:
            return True
    return False


def mpi_comm():
    """MPI.COMM_WORLD when launched by mpiexec with several ranks, else None."""
    if not launched_by_mpi():
        return None
    try:
        from mpi4py import MPI  # noqa: PLC0415
    except ImportError:
        raise ConfigError("launched by mpiexec with several ranks, but mpi4py is not "
                          "installed: pip install 'owlnet[mpi]'") from None
    return MPI.COMM_WORLD


def _root(array):
    while array.base is not None:
        array = array.base
    return array


def _wait_polling(test, deadline, on_timeout) -> None:
    """Call ``test()`` until it is true; ``on_timeout()`` (which raises) past ``deadline``."""
    pause = 0.0
    while not test():
        if time.monotonic() > deadline:
            on_timeout()
        time.sleep(pause)
        pause = min(pause * 2 + 1e-5, 1e-3)


# -- reducers ---------------------------------------------------------------------------------
class Reducer:
    """Sums segments ``[lo, hi)`` of the slices' flat gradient buffers over every slice.

    ``begin(iteration)``, then ``start(buffers, lo, hi)`` for each bucket once it is complete,
    then ``wait()``: afterwards ``buffers[d][lo:hi]`` holds the sum for every local slice ``d``
    that :attr:`result_everywhere` says (all of them, or slice 0 only). ``sum_scalar(x)`` sums
    one float over the ranks (the loss); ``agree(flags)`` sums small integer flags.
    """

    result_everywhere = False
    iteration = 0

    def begin(self, iteration: int) -> None:
        self.iteration = iteration

    def start(self, buffers, lo: int, hi: int) -> None:
        raise NotImplementedError

    def wait(self) -> None:
        pass

    def sum_scalar(self, value: float) -> float:
        return value

    def agree(self, flags: np.ndarray) -> np.ndarray:
        return flags

    def broadcast(self, array) -> None:
        """Make ``array`` (host) rank 0's values on every rank."""

    def close(self) -> None:
        pass


class LocalReducer(Reducer):
    """Slices on one device (CPU, or logical slices on one GPU): add into slice 0's buffer."""

    def start(self, buffers, lo, hi):
        total = buffers[0][lo:hi]
        for other in buffers[1:]:
            total += other[lo:hi]


class MPIReducer(LocalReducer):
    """CPU ranks: the local sum, then a non-blocking MPI all-reduce of slice 0's buffer.

    Before each collective a rank tells every other rank that it has reached it (a tiny
    message to each), so a timeout names the ranks that never arrived.
    """

    def __init__(self, comm, timeout: float):
        from mpi4py import MPI  # noqa: PLC0415
        self.MPI, self.comm, self.timeout = MPI, comm, float(timeout)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.peers = [p for p in range(self.size) if p != self.rank]
        self._pending: list = []
        self._arrivals: dict = {}
        self._sent: list = []
        self._stamp = np.zeros(1, dtype=np.int64)
        self._heard = {p: np.zeros(1, dtype=np.int64) for p in self.peers}

    def begin(self, iteration):
        super().begin(iteration)
        self._announce()

    def _announce(self):
        self._stamp[0] = self.iteration
        self._sent = [self.comm.Isend(self._stamp, dest=p, tag=_ARRIVAL_TAG) for p in self.peers]
        self._arrivals = {p: self.comm.Irecv(self._heard[p], source=p, tag=_ARRIVAL_TAG)
                          for p in self.peers}

    def start(self, buffers, lo, hi):
        super().start(buffers, lo, hi)
        self._pending.append(self.comm.Iallreduce(self.MPI.IN_PLACE, buffers[0][lo:hi],
                                                  op=self.MPI.SUM))
        self.MPI.Request.Testall(self._pending)      # lets MPI progress the earlier buckets

    def wait(self):
        self._wait(self._pending, "gradient all-reduce")
        self._pending = []

    def _wait(self, requests, what):
        """Wait for ``requests`` and the arrival messages; TrainingError past the timeout."""
        requests = requests + self._sent + list(self._arrivals.values())
        _wait_polling(lambda: self.MPI.Request.Testall(requests),
                      time.monotonic() + self.timeout, lambda: self._fail(what))
        self._sent, self._arrivals = [], {}

    def _fail(self, what):
        missing = [p for p, request in self._arrivals.items() if not request.Test()]
        if missing:
            names = ", ".join(str(p) for p in missing)
            raise TrainingError(f"rank {names} did not reach the {what} of iteration "
                                f"{self.iteration} within {self.timeout:g} s (rank {self.rank} "
                                "waited for it; a rank died or hangs)")
        raise TrainingError(f"the {what} of iteration {self.iteration} did not complete "
                            f"within {self.timeout:g} s on rank {self.rank} (a rank died or "
                            "hangs)")

    def _allreduce_now(self, array, what):
        self._announce()
        request = self.comm.Iallreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM)
        self._wait([request], what)

    def sum_scalar(self, value):
        buffer = np.array([value], dtype=np.float64)
        self._allreduce_now(buffer, "loss all-reduce")
        return float(buffer[0])

    def agree(self, flags):
        flags = np.ascontiguousarray(flags, dtype=np.int64)
        self._allreduce_now(flags, "action all-reduce")
        return flags

    def broadcast(self, array):
        self._announce()
        request = self.comm.Ibcast(array, root=0)
        self._wait([request], "broadcast")


class NCCLReducer(Reducer):
    """One GPU per slice: NCCL all-reduce (sum) over every device of every rank.

    Each bucket's all-reduce runs on a side stream of each device, after an event recorded on
    the compute stream (so it overlaps the backward of lower layers); the compute stream waits
    for it before the update. ``mpi`` (an :class:`MPIReducer`, or None in one process) carries
    the unique id, the loss, the action flags and the arrival check.
    """

    result_everywhere = True

    def __init__(self, devices, mpi: MPIReducer | None, timeout: float):
        cupy = backend.import_cupy()
        from cupy.cuda import nccl  # noqa: PLC0415
        self.cupy, self.nccl, self.devices, self.mpi = cupy, nccl, list(devices), mpi
        self.timeout = float(timeout)
        ranks = mpi.size if mpi else 1
        first = (mpi.rank if mpi else 0) * len(devices)
        if mpi is None:
            self.comms = nccl.NcclCommunicator.initAll(self.devices)
        else:
            uid = np.zeros(_NCCL_UNIQUE_ID_BYTES, dtype=np.int8)
            if mpi.rank == 0:
                uid[:] = nccl.get_unique_id()
            mpi.broadcast(uid)
            unique_id = tuple(uid.tolist())
            nccl.groupStart()
            self.comms = []
            for d, device in enumerate(self.devices):
                with cupy.cuda.Device(device):
                    self.comms.append(nccl.NcclCommunicator(ranks * len(devices), unique_id,
                                                            first + d))
            nccl.groupEnd()
        self.streams, self._done = [], []
        for device in self.devices:
            with cupy.cuda.Device(device):
                self.streams.append(cupy.cuda.Stream(non_blocking=True))

    def begin(self, iteration):
        super().begin(iteration)
        if self.mpi:
            self.mpi.begin(iteration)

    def start(self, buffers, lo, hi):
        nccl = self.nccl
        kinds = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}
        nccl.groupStart()
        for device, comm, stream, buffer in zip(self.devices, self.comms, self.streams, buffers):
            with self.cupy.cuda.Device(device):
                stream.wait_event(self.cupy.cuda.get_current_stream().record())
                segment = buffer[lo:hi]
                comm.allReduce(segment.data.ptr, segment.data.ptr, segment.size,
                               kinds[segment.dtype], nccl.NCCL_SUM, stream.ptr)
        nccl.groupEnd()
        for device, stream in zip(self.devices, self.streams):
            with self.cupy.cuda.Device(device):
                event = stream.record()
                self.cupy.cuda.get_current_stream().wait_event(event)
                self._done.append(event)

    def wait(self):
        done = self._done
        _wait_polling(lambda: all(event.done for event in done),
                      time.monotonic() + self.timeout, self._fail)
        self._done = []
        if self.mpi:
            self.mpi.wait()

    def _fail(self):
        for comm in self.comms:
            comm.abort()
        self.comms = []
        if self.mpi:
            self.mpi._fail("NCCL gradient all-reduce")
        raise TrainingError(f"the NCCL all-reduce of iteration {self.iteration} did not "
                            f"complete within {self.timeout:g} s (a device or rank hangs)")

    def sum_scalar(self, value):
        return self.mpi.sum_scalar(value) if self.mpi else value

    def agree(self, flags):
        return self.mpi.agree(flags) if self.mpi else flags

    def broadcast(self, array):
        if self.mpi:
            self.mpi.broadcast(array)

    def close(self):
        for comm in self.comms:
            comm.destroy()
        self.comms = []


# -- the trainer side -------------------------------------------------------------------------
def _data_layers(net):
    return [layer for layer in net.layers if hasattr(layer, "set_shard")]


class DataParallel:
    """Runs a solver's iterations over ``len(devices)`` local slices and the ranks of ``comm``.

    ``devices``: one entry per local slice, None for the CPU or a GPU index. Slices on one
    device (all None, or one GPU index repeated) share their parameter arrays, so their update
    happens once; slices on distinct GPUs each hold a copy and apply the same update. Attach
    with ``solver.parallel = DataParallel(solver, ...)`` before ``solve``.
    """

    def __init__(self, solver, devices, comm=None, timeout: float = DEFAULT_TIMEOUT):
        self.solver = solver
        self.devices = list(devices)
        self.rank = comm.Get_rank() if comm is not None else 0
        self.ranks = comm.Get_size() if comm is not None else 1
        self.slices = self.ranks * len(self.devices)
        self.is_primary = self.rank == 0
        distinct = set(self.devices)
        if len(distinct) > 1 and None in distinct:
            raise ConfigError("slices cannot mix the CPU and GPUs")
        self.shared = len(distinct) == 1
        if self.shared and None not in distinct and comm is not None:
            raise ConfigError("several ranks on GPUs need one GPU per slice (NCCL)")
        self._check_batches(solver.net)
        self.nets = [solver.net] + self._build_replicas(len(self.devices) - 1)
        mpi = MPIReducer(comm, timeout) if comm is not None else None
        if self.shared:
            self.reducer = mpi or LocalReducer()
        else:
            self.reducer = NCCLReducer(self.devices, mpi, timeout)
        self.rules = [solver.rule] + ([] if self.shared else [
            solver.rule_class(solver.param, net) for net in self.nets[1:]])
        self._plan_buckets()
        for d, net in enumerate(self.nets):
            for layer in _data_layers(net):
                layer.batch_size //= self.slices
                layer.set_shard(self.rank * len(self.devices) + d, self.slices)

    # -- building ---------------------------------------------------------------------------
    def _check_batches(self, net):
        layers = _data_layers(net)
        if not layers:
            raise ConfigError(f"training on {self.slices} slices needs the train net's batches "
                              "to come from Data or ImageData layers (they are read in shards)")
        for layer in layers:
            if layer.batch_size % self.slices:
                where = (f"{self.ranks} ranks x {len(self.devices)} devices"
                         if self.ranks > 1 else f"-n {len(self.devices)}")
                raise ConfigError(f"layer '{layer.name}': batch_size {layer.batch_size} is not "
                                  f"divisible by the {self.slices} slices ({where}); the "
                                  "batch_size in the net is the global batch")

    def device_scope(self, d):
        device = self.devices[d]
        if device is None:
            return contextlib.nullcontext()
        return backend.import_cupy().cuda.Device(device)

    def _build_replicas(self, count):
        """More train nets, built without disturbing the global generator."""
        saved = backend.rng().bit_generator.state
        replicas = []
        for d in range(1, count + 1):
            with self.device_scope(d):
                replicas.append(self.solver.build_train_net())
        backend.rng().bit_generator.state = saved
        primary = self.solver.net
        if self.shared:
            for net in replicas:
                for mine, theirs in zip(net.layers, primary.layers):
                    for k, (blob, source) in enumerate(zip(mine.blobs, theirs.blobs)):
                        if mine.param_propagate_down[k]:
                            blob.share_data(source)
        return replicas

    def _plan_buckets(self):
        """Order the learnable parameters by when backward completes them; one bucket each."""
        net = self.nets[0]
        params = net.learnable_params
        roots = {id(_root(p.data)): i for i, p in enumerate(params)}
        ready = {}
        for li, layer in enumerate(net.layers):
            for blob in layer.blobs:
                i = roots.get(id(_root(blob.data)))
                if i is not None:
                    ready[i] = min(ready.get(i, li), li)
        order = sorted((i for i in ready if net.params_lr[i] != 0), key=lambda i: -ready[i])
        self.segments = []                         # (param index, lo, hi) in buffer order
        self.buckets = {}                          # layer index -> (lo, hi)
        offset = 0
        for i in order:
            count = params[i].count
            self.segments.append((i, offset, offset + count))
            lo, _ = self.buckets.get(ready[i], (offset, offset))
            self.buckets[ready[i]] = (lo, offset + count)
            offset += count
        dtype = params[0].data.dtype if params else np.float32
        self.buffers = []
        for d in range(len(self.nets)):
            with self.device_scope(d):
                self.buffers.append(backend.xp().zeros(offset, dtype=dtype))

    # -- running ----------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Make every slice of every rank start from rank 0's slice 0: parameters (weights
        loaded or restored there), update history, data layers' seed and position."""
        primary = self.nets[0]
        for layer in primary.layers:
            for blob in layer.blobs:
                host = np.ascontiguousarray(backend.to_host(blob.data))
                self.reducer.broadcast(host)
                blob.data[...] = backend.to_device(host)
        for history in self.rules[0].history:
            host = np.ascontiguousarray(backend.to_host(history))
            self.reducer.broadcast(host)
            history[...] = backend.to_device(host)
        states = [layer.state() for layer in _data_layers(primary)]
        numbers = np.array([[s["batches"], s["seed"]] for s in states], dtype=np.int64)
        self.reducer.broadcast(numbers)
        for d, net in enumerate(self.nets):
            with self.device_scope(d):
                if d:
                    for mine, theirs in zip(net.layers, primary.layers):
                        for blob, source in zip(mine.blobs, theirs.blobs):
                            if blob.data is not source.data:
                                blob.data[...] = backend.to_device(backend.to_host(source.data))
                if d and not self.shared:
                    self.rules[d].set_history([backend.to_host(h) for h in self.rules[0].history])
                for layer, (batches, seed) in zip(_data_layers(net), numbers.tolist()):
                    layer.restore_state({"batches": batches, "seed": seed})

    def forward_backward(self, reduce: bool) -> float:
        """Forward and backward on every local slice; with ``reduce``, start the gradient
        reductions bucket by bucket as backward completes them. Returns the sum of the
        local slices' losses."""
        losses = []
        for d, net in enumerate(self.nets):
            with self.device_scope(d):
                losses.append(net.forward_range(0, len(net.layers) - 1))
        if reduce:
            self.reducer.begin(self.solver.iter)
        for li in range(len(self.nets[0].layers) - 1, -1, -1):
            for d, net in enumerate(self.nets):
                with self.device_scope(d):
                    net.backward_range(li, li)
            if reduce and li in self.buckets:
                lo, hi = self.buckets[li]
                self._pack(lo, hi)
                self.reducer.start(self.buffers, lo, hi)
        return sum(float(loss) for loss in losses)

    def _pack(self, lo, hi):
        for d, net in enumerate(self.nets):
            params, buffer = net.learnable_params, self.buffers[d]
            with self.device_scope(d):
                for i, start, end in self.segments:
                    if lo <= start < hi:
                        buffer[start:end] = params[i].diff.ravel()

    def reduce(self, loss: float) -> float:
        """Wait for the reductions, set the parameter diffs to the mean gradient over all
        slices, and return the mean loss over all slices (``loss``: this rank's sum)."""
        self.reducer.wait()
        scale = 1.0 / self.slices
        receivers = range(len(self.nets)) if self.reducer.result_everywhere else [0]
        for d in receivers:
            params, buffer = self.nets[d].learnable_params, self.buffers[d]
            with self.device_scope(d):
                for i, start, end in self.segments:
                    diff = params[i].diff
                    diff[...] = buffer[start:end].reshape(diff.shape)
                    diff *= scale
        return self.reducer.sum_scalar(loss) * scale

    def apply_update(self, rate: float, iteration: int) -> None:
        """Slices holding their own parameter copies apply the same update as slice 0."""
        for d in range(1, len(self.rules)):
            with self.device_scope(d):
                self.rules[d].apply(self.nets[d], rate, iteration)

    def forward_loss(self) -> float:
        """The mean loss over all slices of one forward pass (no backward)."""
        total = 0.0
        for d, net in enumerate(self.nets):
            with self.device_scope(d):
                total += float(net.forward_range(0, len(net.layers) - 1))
        return self.reducer.sum_scalar(total) / self.slices

    def agree(self, action: str) -> str:
        """The action every rank takes: "stop" if any rank asks to stop, else "snapshot" if any
        asks for one."""
        flags = np.array([action == "stop", action == "snapshot"], dtype=np.int64)
        stop, snap = self.reducer.agree(flags).tolist()
        return "stop" if stop else "snapshot" if snap else "none"

    def clear_param_diffs(self) -> None:
        """Zero the other slices' parameter diffs (the solver clears slice 0's)."""
        for d, net in enumerate(self.nets[1:], start=1):
            with self.device_scope(d):
                net.clear_param_diffs()

    def close(self) -> None:
        self.reducer.close()
        for net in self.nets[1:]:
            for layer in _data_layers(net):
                layer.close()


def device_list(count: int, device: str, first_gpu: int = 0) -> list:
    """Slices for ``-n count``: CPU slices, or GPUs ``first_gpu ... first_gpu + count - 1``."""
    if count < 1:
        raise ConfigError(f"-n must be at least 1, got {count}")
    if device == "gpu":
        return [first_gpu + d for d in range(count)]
    return [None] * count

