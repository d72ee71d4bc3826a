"""Gradient reducers: sums of flat buffers over the slices of a data-parallel run.

A reducer sums segments ``[lo, hi)`` of flat gradient buffers over every slice of every rank.
It sees the slices in groups, one group per device (the slices sharing that device's
parameters), the group's first buffer being its holder: :meth:`Reducer.start` first adds
each group's buffers into its holder, then all-reduces the holders over the devices and
ranks. Four implementations: :class:`LocalReducer` (one device, one process: the local sum
alone), :class:`MPIReducer` (CPU ranks: mpi4py ``Iallreduce`` of the holder),
:class:`NCCLReducer` (GPUs: one NCCL communicator over every device of every rank, its unique
id broadcast through MPI; one GPU per rank is the usual MPI set-up) and
:class:`StagedMPIReducer` (GPU ranks sharing a GPU, which NCCL refuses: MPI on host copies).
Collective waits poll with a deadline, so a rank that stops answering makes the others fail
with TrainingError naming it instead of hanging.

Reducers know buffers, devices and ranks only; which slices exist and what their buffers hold
is the executors' business (``owlnet.parallel.executors``).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time

import numpy as np

from .. import backend
from ..errors import ConfigError, TrainingError

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


def device_scope(device):
    """The context that computes on ``device`` (None: the CPU; else a GPU index)."""
    if device is None:
        return contextlib.nullcontext()
    return backend.import_cupy().cuda.Device(device)


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

    ``begin(iteration)``, then ``start(groups, lo, hi)`` for each bucket once it is complete,
    then ``wait()``: afterwards ``group[0][lo:hi]`` (the holder of each group) holds the sum
    over all slices. ``groups[g]`` lists the buffers of the local slices on device
    ``devices[g]``. ``sum_scalar(x)`` sums one float over the ranks (the loss);
    ``agree(flags)`` sums small integer flags; ``broadcast(array)`` copies rank 0's host array.
    """

    iteration = 0

    def __init__(self, devices=(None,)):
        self.devices = list(devices)

    def begin(self, iteration: int) -> None:
        self.iteration = iteration

    def start(self, groups, lo: int, hi: int) -> None:
        for g, group in enumerate(groups):
            with device_scope(self.devices[g]):
                total = group[0][lo:hi]
                for other in group[1:]:
                    total += other[lo:hi]
        self.all_reduce([group[0] for group in groups], lo, hi)

    def all_reduce(self, holders, lo: int, hi: int) -> None:
        """Start summing ``holders[g][lo:hi]`` over the devices and ranks, in place."""

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
    """Slices on one device (CPU, or logical slices on one GPU) in one process: the sum into
    the holder is all there is."""


class MPIReducer(Reducer):
    """CPU ranks: the local sum, then a non-blocking MPI all-reduce of slice 0's buffer.

    Before each collective a rank tells every other rank that it has reached it (a tiny
    message to each), so a timeout names the ranks that never arrived.
    """

    def __init__(self, comm, timeout: float):
        super().__init__()
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

    def all_reduce(self, holders, lo, hi):
        self._pending.append(self.comm.Iallreduce(self.MPI.IN_PLACE, holders[0][lo:hi],
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


class StagedMPIReducer(MPIReducer):
    """GPU ranks that share a GPU (NCCL refuses two ranks of one communicator on one device):
    each bucket is copied to the host, all-reduced there by MPI, and copied back to the device
    in :meth:`wait`, before the update is queued. One GPU per rank."""

    def __init__(self, comm, timeout: float):
        super().__init__(comm, timeout)
        self._staged: list = []             # (device segment, host copy)

    def all_reduce(self, holders, lo, hi):
        segment = holders[0][lo:hi]
        host = segment.get()                # waits for the bucket's gradients
        self._staged.append((segment, host))
        super().all_reduce([host], 0, host.size)

    def wait(self):
        super().wait()
        for segment, host in self._staged:
            segment.set(host)
        self._staged = []


def gpus_shared_between_ranks(comm, devices) -> bool:
    """Whether a GPU of this rank is also another rank's (same host name and PCI bus id);
    every rank gets the same answer. Each rank must list as many GPUs."""
    cupy = backend.import_cupy()
    host = socket.gethostname()
    keys = np.array([int.from_bytes(hashlib.sha256(
        f"{host}/{cupy.cuda.Device(d).pci_bus_id}".encode()).digest()[:8], "little",
        signed=True) for d in devices], dtype=np.int64)
    everyone = np.empty(keys.size * comm.Get_size(), dtype=np.int64)
    comm.Allgather(keys, everyone)
    return len(set(everyone.tolist())) < everyone.size


class NCCLReducer(Reducer):
    """GPUs: NCCL all-reduce (sum) over every device of every rank (``devices``: this rank's
    distinct GPUs, the same number on every rank; one per rank is MPI's usual set-up).

    Each bucket's all-reduce runs on a side stream of each device, after an event recorded on
    the compute stream, and the compute stream goes on with the backward of lower layers (other
    ranges of the gradient buffer) meanwhile; ``wait()`` returns once every all-reduce is done,
    before the update is queued. ``mpi`` (an :class:`MPIReducer`, or None in one process) carries
    the unique id, the loss, the action flags and the arrival check.
    """

    def __init__(self, devices, mpi: MPIReducer | None, timeout: float):
        super().__init__(devices)
        cupy = backend.import_cupy()
        from cupy.cuda import nccl  # noqa: PLC0415
        self.cupy, self.nccl, self.mpi = cupy, nccl, mpi
        self.timeout = float(timeout)
        ranks = mpi.size if mpi else 1
        first = (mpi.rank if mpi else 0) * len(devices)
        if mpi is None:
            self.comms = nccl.NcclCommunicator.initAll(self.devices)
        else:
            uid = np.zeros(_NCCL_UNIQUE_ID_BYTES, dtype=np.uint8)
            if mpi.rank == 0:                   # CuPy 14: the id is 128 bytes
                uid[:] = np.frombuffer(nccl.get_unique_id(), dtype=np.uint8)
            mpi.broadcast(uid)
            unique_id = uid.tobytes()
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

    def all_reduce(self, holders, lo, hi):
        nccl = self.nccl
        kinds = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}
        nccl.groupStart()
        for device, comm, stream, buffer in zip(self.devices, self.comms, self.streams, holders):
            with self.cupy.cuda.Device(device):
                stream.wait_event(self.cupy.cuda.get_current_stream().record())
                segment = buffer[lo:hi]
                comm.allReduce(segment.data.ptr, segment.data.ptr, segment.size,
                               kinds[segment.dtype], nccl.NCCL_SUM, stream.ptr)
        nccl.groupEnd()
        for device, stream in zip(self.devices, self.streams):
            with self.cupy.cuda.Device(device):
                self._done.append(stream.record())

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
