"""pycaffe's NCCL for one process per GPU (Caffe's python/train.py), on CuPy's NCCL.

::

    owlnet.set_mode_gpu(); owlnet.set_device(gpus[rank])
    owlnet.set_solver_count(len(gpus)); owlnet.set_solver_rank(rank)
    solver = owlnet.SGDSolver(path)
    nccl = owlnet.NCCL(solver, uid)      # uid = owlnet.NCCL.new_uid() made once, sent to all
    nccl.bcast()                         # every rank starts from rank 0's weights
    solver.add_callback(nccl)            # gradients summed over ranks and divided by their count

:func:`has_nccl` is False where CuPy or its NCCL library is missing; NCCL then refuses to be
built. owlnet's own multi-GPU training (``-n N``, mpiexec: ``owlnet.parallel``) needs none of
this; it is here so pycaffe scripts run unchanged. So are the helpers python/train.py uses
beside it: :func:`init_log`, :func:`log` and :class:`Timer` (with ``Net.before_forward`` and
its siblings, in net.py).
"""
from __future__ import annotations

import logging
import time
import warnings

from . import backend
from . import logging as owl_logging
from .errors import OwlnetError

_solvers = {"count": 1, "rank": 0}


def has_nccl() -> bool:
    """Whether CuPy with NCCL is installed here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # CuPy warns when it finds no NCCL library
        try:
            from cupy.cuda import nccl  # noqa: PLC0415
        except ImportError:
            return False
    return bool(getattr(nccl, "available", False))


def set_solver_count(count: int) -> None:
    _solvers["count"] = int(count)


def set_solver_rank(rank: int) -> None:
    _solvers["rank"] = int(rank)


def solver_count() -> int:
    return _solvers["count"]


def solver_rank() -> int:
    return _solvers["rank"]


def set_multiprocess(multiprocess: bool) -> None:
    """Accepted for pycaffe scripts; each process is one rank whatever this says."""


_GLOG_LEVELS = (logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)


def init_log(level: int = 0, stderr: bool = True) -> None:
    """pycaffe's ``init_log``: owlnet's glog-style log on stderr, from glog level ``level``
    (0 INFO, 1 WARNING, 2 ERROR, 3 FATAL) up. ``stderr`` is accepted as pycaffe's; the log
    always goes to stderr (``owlnet.logging.configure`` sends it elsewhere)."""
    owl_logging.configure(level=_GLOG_LEVELS[min(max(int(level), 0), 3)])


def log(message) -> None:
    """pycaffe's ``log``: one INFO line in owlnet's log."""
    owl_logging.info(str(message))


class Timer:
    """pycaffe's ``Timer``: ``start()``, ``stop()`` and ``ms``, the milliseconds between the
    last start and stop (reading it while running stops the timer first; 0 before any run).
    In GPU mode start and stop wait for the device's queued work, so the span covers it."""

    def __init__(self):
        self._started = None
        self._ms = None

    @staticmethod
    def _now() -> float:
        if backend.mode() == "gpu":
            backend.import_cupy().cuda.get_current_stream().synchronize()
        return time.perf_counter()

    def start(self) -> None:
        self._started = self._now()

    def stop(self) -> None:
        if self._started is not None:
            self._ms = (self._now() - self._started) * 1000.0
            self._started = None

    @property
    def ms(self) -> float:
        if self._started is not None:
            self.stop()
        return 0.0 if self._ms is None else self._ms


def _nccl():
    if not has_nccl():
        raise OwlnetError("NCCL is not available: install owlnet[gpu] and CuPy's NCCL "
                          "library (nvidia-nccl wheel)")
    from cupy.cuda import nccl  # noqa: PLC0415
    return nccl


class NCCL:
    """One rank's NCCL communicator over its solver's train net (see the module docstring)."""

    def __init__(self, solver, uid: bytes):
        nccl = _nccl()
        self.nccl = nccl
        self.solver = solver
        self.comm = nccl.NcclCommunicator(solver_count(), bytes(uid), solver_rank())

    @staticmethod
    def new_uid() -> bytes:
        """A fresh communicator id, to be shared by every rank."""
        return bytes(_nccl().get_unique_id())          # CuPy 14: 128 bytes

    def _each_param(self, call) -> None:
        """``call(blob, stream)`` for every learnable blob, then wait for the stream. NCCL
        works on the device arrays (``device_data``/``device_diff``, current on the device
        whether or not this runs inside the solver's step), so the host copies are stale
        afterwards and read back what NCCL wrote."""
        cupy = backend.import_cupy()
        stream = cupy.cuda.get_current_stream().ptr
        for blob in self.solver.net.learnable_params:
            call(blob, stream)
        cupy.cuda.get_current_stream().synchronize()

    def bcast(self) -> None:
        """Give every rank rank 0's parameters."""
        nccl = self.nccl
        self._each_param(lambda blob, stream: self.comm.bcast(
            blob.device_data.data.ptr, blob.count, nccl.NCCL_FLOAT32, 0, stream))

    def on_start(self) -> None:
        pass

    def __call__(self, layer_index: int) -> None:
        """A per-layer callback (``net.after_backward(nccl)``, Caffe's layer-wise reduce):
        nothing to do per layer, :meth:`on_gradients_ready` reduces every gradient at once."""

    def on_gradients_ready(self) -> None:
        """Sum the parameter gradients over the ranks and divide by their number."""
        nccl = self.nccl

        def reduce(blob, stream):
            diff = blob.device_diff
            self.comm.allReduce(diff.data.ptr, diff.data.ptr, blob.count,
                                nccl.NCCL_FLOAT32, nccl.NCCL_SUM, stream)
            diff /= solver_count()
        self._each_param(reduce)
