"""Data-parallel training: the step executors (``executors``; ``captured``: one GPU's step as
replayed CUDA graphs) and gradient reducers (``reducers``).

``DataParallel(solver, devices, comm, timeout)`` builds the executor the tools attach to a
solver (``solver.parallel = ...``): :class:`Slices` in one process, :class:`RankSlices` under
``mpiexec``. See ``executors`` for how a batch is sliced and ``reducers`` for the collectives.
"""
from .captured import CapturedStep
from .executors import RankSlices, SingleDevice, Slices, StepExecutor, device_list
from .reducers import (DEFAULT_TIMEOUT, LocalReducer, MPIReducer, NCCLReducer, Reducer,
                       StagedMPIReducer, launched_by_mpi, mpi_comm)


def DataParallel(solver, devices, comm=None,  # noqa: N802 (the name the tools call)
                 timeout: float = DEFAULT_TIMEOUT) -> Slices:
    """The executor running ``solver``'s train net on ``devices`` (one entry per local slice:
    None for the CPU, or a GPU index) in this process and on every rank of ``comm`` (an MPI
    communicator, or None); attach it with ``solver.parallel = ...`` before ``solve``."""
    parts = (devices, solver.net, solver.rule, solver.build_train_net, solver.build_rule)
    if comm is None:
        return Slices(*parts, timeout=timeout)
    return RankSlices(*parts, comm=comm, timeout=timeout)


__all__ = ["CapturedStep", "DEFAULT_TIMEOUT", "DataParallel", "LocalReducer", "MPIReducer",
           "NCCLReducer", "RankSlices", "Reducer", "SingleDevice", "Slices", "StagedMPIReducer",
           "StepExecutor", "device_list", "launched_by_mpi", "mpi_comm"]
