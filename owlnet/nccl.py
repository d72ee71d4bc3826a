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
this; it is here so pycaffe scripts run unchanged.
"""
from __future__ import annotations

import warnings

import numpy as np

from . import backend
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
        unique_id = tuple(np.frombuffer(uid, dtype=np.int8).tolist())
        self.comm = nccl.NcclCommunicator(solver_count(), unique_id, solver_rank())

    @staticmethod
    def new_uid() -> bytes:
        """A fresh communicator id, to be shared by every rank."""
        return np.asarray(_nccl().get_unique_id(), dtype=np.int8).tobytes()

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

    def on_gradients_ready(self) -> None:
        """Sum the parameter gradients over the ranks and divide by their number."""
        nccl = self.nccl

        def reduce(blob, stream):
            diff = blob.device_diff
            self.comm.allReduce(diff.data.ptr, diff.data.ptr, blob.count,
                                nccl.NCCL_FLOAT32, nccl.NCCL_SUM, stream)
            diff /= solver_count()
        self._each_param(reduce)
