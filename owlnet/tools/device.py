"""Which device each tool runs on, decided once for every tool as Caffe's tools decide it.

Flags (``add_device_flags``): ``--gpu 0``, ``--gpu 0,1`` or ``--gpu all`` name GPUs (Caffe's
``-gpu``); ``--device cpu|gpu`` is owl.net's switch; ``--math fp32|tf32`` the GPU math mode.
The rules (``choose_devices``):

* ``--gpu`` wins; else ``--device gpu`` (first GPU: the solver's ``device_id``, else 0); else a
  solver file that sets ``solver_mode: GPU`` (Caffe's rule: only when the file sets it,
  ``device_id`` or 0); else the CPU.
* ``--device cpu`` runs on the CPU even when the solver file asks for a GPU, and says so in
  the log; with ``--gpu`` it is a contradiction and an error.
* A GPU that is asked for but not usable (no CuPy, no driver, an index past the last device)
  is an error naming why: never a silent CPU run.
* Slices in one process (``-n N``): with one GPU listed (``--gpu 0 -n 2``) the N slices share
  it; with several (``--gpu 0,1``) there is one slice per GPU and -n, if given, must match;
  without a list (``--device gpu -n 2``) the N GPUs from the first one on.
* Under MPI each rank takes its own GPUs by its rank on the node (``local_rank``): rank r of
  s takes GPUs r*N .. r*N+N-1 of the list when it is long enough, else GPU r with its N
  slices, else (fewer GPUs than ranks) GPU r mod len and the ranks share, with a warning.

``setup_device`` applies the choice to the backend (the one place that does) and logs it.
"""
from __future__ import annotations

import os
import sys
from typing import NamedTuple

from .. import backend
from .. import logging as owl_logging
from ..errors import ConfigError
from . import run_command
from .flags import FlagParser

ALL = "all"
MODES = ("cpu", "gpu")
#: (local rank, ranks on this node) variables of Open MPI, MPICH/Hydra, PMI, PMIx, Cray PALS
#: and MVAPICH, the first present wins.
LOCAL_RANK_VARIABLES = (
    ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("PMI_LOCAL_RANK", "PMI_LOCAL_SIZE"),
    ("PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
    ("PALS_LOCAL_RANKID", "PALS_LOCAL_SIZE"),
    ("MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
)


def add_device_flags(parser, math: bool = True) -> None:
    """``--gpu``, ``--device`` and (with ``math``) ``--math``."""
    parser.add_argument("--gpu", metavar="IDS",
                        help="GPUs to run on: an index, a comma-separated list or 'all' "
                             "(Caffe's -gpu)")
    parser.add_argument("--device", choices=MODES,
                        help="cpu or gpu (default: as --gpu and the solver file say, else cpu; "
                             "--device cpu overrides a solver file's solver_mode: GPU)")
    if math:
        parser.add_argument("--math", choices=("fp32", "tf32"),
                            help="GPU math mode (default fp32, or $OWLNET_MATH)")


def gpu_count() -> tuple[int, str]:
    """How many GPUs CuPy can use here and, when none, why not."""
    try:
        cupy = backend.import_cupy()
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # noqa: BLE001  (any failure to load CUDA means: no GPU)
        return 0, str(exc).strip() or type(exc).__name__
    return count, "" if count else "CUDA reports no device"


def parse_gpu_flag(text: str | None):
    """``--gpu``'s value: None (not given), ``ALL``, or a list of indices."""
    if text is None or text == "":
        return None
    if text.strip().lower() == ALL:
        return ALL
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        ids = []
    if not ids or min(ids) < 0:
        raise ConfigError(f"--gpu takes GPU indices (0, 0,1, ...) or 'all', got '{text}'")
    return ids


def local_rank(comm) -> tuple[int, int]:
    """(rank on this node, ranks on this node) of an MPI job: from the launcher's variables,
    else from a communicator split by shared memory (a collective: every rank calls it)."""
    for rank_name, size_name in LOCAL_RANK_VARIABLES:
        rank, size = os.environ.get(rank_name), os.environ.get(size_name)
        if rank is not None and rank.isdigit() and size is not None and size.isdigit():
            return int(rank), int(size)
    from mpi4py import MPI  # noqa: PLC0415  (only under mpiexec)
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_rank(), node.Get_size()
    finally:
        node.Free()


class Choice(NamedTuple):
    """Where a tool runs: one entry per local slice, None for the CPU or a GPU index."""
    devices: list
    note: str = ""          # a line for the log (an override, shared GPUs), or ""


def choose_devices(gpu=None, device=None, solver_param=None, slices=None, local=None,
                   probe=None) -> Choice:
    """Apply the module's rules. ``gpu``: ``--gpu``'s text; ``device``: ``--device``;
    ``slices``: ``-n`` (None when not given); ``local``: ``(rank, ranks)`` on this node under
    MPI; ``probe``: returns (usable GPUs, why none), by default ``gpu_count``."""
    if slices is not None and slices < 1:
        raise ConfigError(f"-n must be at least 1, got {slices}")
    listed = parse_gpu_flag(gpu)
    solver_gpu = (solver_param is not None and solver_param.HasField("solver_mode")
                  and solver_param.solver_mode == solver_param.GPU)
    if device == "cpu":
        if listed is not None:
            raise ConfigError(f"--device cpu and --gpu {gpu} contradict each other; give one")
        note = ("the solver file's solver_mode: GPU is overridden by --device cpu"
                if solver_gpu else "")
        return Choice([None] * (slices or 1), note)
    if listed is None and device != "gpu" and not solver_gpu:
        return Choice([None] * (slices or 1))
    if listed is None:
        first = solver_param.device_id if solver_param is not None else 0
        why = "--device gpu" if device == "gpu" else "the solver file's solver_mode: GPU"
    else:
        why = f"--gpu {gpu}"
    count, reason = (probe or gpu_count)()
    if count == 0:
        raise ConfigError(f"{why} asks for a GPU, but no GPU is usable here ({reason}); "
                          "give --device cpu to run on the CPU")
    if listed == ALL:
        listed = list(range(count))
    if listed is None and first >= count:
        raise ConfigError(f"{why}: GPU {first} (device_id) does not exist; {count} GPU(s) "
                          f"usable here (0..{count - 1})")
    if local is None:
        devices = _one_process(listed, first if listed is None else None, slices, count)
        note = ""
    else:
        pool = listed if listed is not None else list(range(first, count))
        devices, note = _per_rank(pool, slices or 1, *local)
    past = sorted({d for d in devices if d >= count})
    if past:
        raise ConfigError(f"{why}: GPU {', '.join(map(str, past))} does not exist; "
                          f"{count} GPU(s) usable here (0..{count - 1})")
    return Choice(devices, note)


def _one_process(listed, first, slices, count) -> list:
    if listed is None:
        n = slices or 1
        if first + n > count:
            raise ConfigError(f"-n {n} from GPU {first} needs GPUs {first}..{first + n - 1}; "
                              f"{count} usable here; write --gpu {first} -n {n} for {n} "
                              "slices on one GPU")
        return list(range(first, first + n))
    if len(listed) == 1:
        return listed * (slices or 1)
    if slices not in (None, len(listed)):
        raise ConfigError(f"--gpu lists {len(listed)} GPUs but -n asks for {slices} slices: "
                          "one slice per listed GPU, or list one GPU for several slices on it")
    return list(listed)


def _per_rank(pool, slices, rank, ranks) -> tuple[list, str]:
    if len(pool) >= ranks * slices:
        return pool[rank * slices:(rank + 1) * slices], ""
    if len(pool) >= ranks:
        return [pool[rank]] * slices, ""
    gpu = pool[rank % len(pool)]
    return [gpu] * slices, (f"{ranks} ranks on this node share {len(pool)} GPU(s): local "
                            f"rank {rank} runs on GPU {gpu}")


def describe(devices) -> str:
    """Caffe's log line for the choice: ``Use CPU.`` or ``Using GPUs 0, 1``."""
    if devices[0] is None:
        return "Use CPU."
    return f"Using GPUs {', '.join(str(d) for d in dict.fromkeys(devices))}"


def setup_device(devices, math: str | None = None, note: str = "",
                 log_cpu: bool = True) -> None:
    """Put the backend on ``devices[0]`` (the CPU or a GPU) and set the math mode; log the
    choice (a CPU run only with ``log_cpu``: Caffe's train, test and time say "Use CPU.")."""
    if math:
        backend.set_math_mode(math)
    if note:
        owl_logging.warning(note)
    if devices[0] is not None or log_cpu:
        owl_logging.info(describe(devices))
    if devices[0] is None:
        backend.set_mode_cpu()
        return
    backend.set_device(devices[0])
    backend.set_mode_gpu()
    properties = backend.import_cupy().cuda.runtime.getDeviceProperties
    for index in dict.fromkeys(devices):
        name = properties(index)["name"]
        owl_logging.info(f"GPU {index}: {name.decode() if isinstance(name, bytes) else name}, "
                         f"math mode {backend.math_mode()}")


def single_device(choice: Choice) -> Choice:
    """The first device of ``choice``, for tools that run one net (Caffe's test and time
    drop the others with a log line)."""
    for extra in dict.fromkeys(choice.devices[1:]):
        if extra != choice.devices[0]:
            owl_logging.info(f"Not using GPU #{extra} for single-GPU function")
    return Choice(choice.devices[:1], choice.note)


def devices_from_args(args, solver_param=None, slices=None, local=None) -> Choice:
    """``choose_devices`` for a parsed command line with ``add_device_flags``."""
    return choose_devices(args.gpu, args.device, solver_param, slices, local)


def setup_from_args(args, solver_param=None, log_cpu: bool = False) -> list:
    """Choose one device from the parsed flags (and the solver file) and set it up (see
    ``setup_device``); the device list (one entry)."""
    choice = single_device(devices_from_args(args, solver_param))
    setup_device(choice.devices, getattr(args, "math", None), choice.note, log_cpu)
    return choice.devices


# -- `owlnet device_query` (Caffe's `caffe device_query`) --------------------------------------
#: Caffe's DeviceQuery labels and the CUDA device property each shows.
QUERY_FIELDS = (
    ("Major revision number", "major"), ("Minor revision number", "minor"), ("Name", "name"),
    ("Total global memory", "totalGlobalMem"),
    ("Total shared memory per block", "sharedMemPerBlock"),
    ("Total registers per block", "regsPerBlock"), ("Warp size", "warpSize"),
    ("Maximum memory pitch", "memPitch"), ("Maximum threads per block", "maxThreadsPerBlock"),
    ("Maximum dimension of block", "maxThreadsDim"), ("Maximum dimension of grid", "maxGridSize"),
    ("Clock rate", "clockRate"), ("Total constant memory", "totalConstMem"),
    ("Texture alignment", "textureAlignment"),
    ("Concurrent copy and execution", "deviceOverlap"),
    ("Number of multiprocessors", "multiProcessorCount"),
    ("Kernel execution timeout", "kernelExecTimeoutEnabled"),
)


def _shown(value) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, (tuple, list)):
        return ", ".join(str(v) for v in value)
    return str(value)


def query(args, out=None, probe=None, properties=None) -> list:
    """Print each listed GPU's properties as Caffe's DeviceQuery; the indices queried.
    ``probe``/``properties`` stand in for CUDA in tests."""
    out = out or sys.stdout
    count, reason = (probe or gpu_count)()
    if count == 0:
        raise ConfigError(f"device_query: no GPU is usable here ({reason})")
    listed = parse_gpu_flag(args.gpu)
    ids = list(range(count)) if listed in (None, ALL) else listed
    past = [i for i in ids if i >= count]
    if past:
        raise ConfigError(f"device_query: GPU {', '.join(map(str, past))} does not exist; "
                          f"{count} GPU(s) here (0..{count - 1})")
    properties = properties or backend.import_cupy().cuda.runtime.getDeviceProperties
    print(f"Querying GPUs {', '.join(map(str, ids))}", file=out)
    for index in ids:
        values = properties(index)
        print(f"{'Device id:':<31}{index}", file=out)
        for label, key in QUERY_FIELDS:
            print(f"{label + ':':<31}{_shown(values.get(key, 'n/a'))}", file=out)
    return ids


def query_main(argv=None) -> int:
    parser = FlagParser(prog="owlnet device_query",
                        description="GPU diagnostic information, as Caffe's device_query")
    parser.add_argument("--gpu", metavar="IDS", help="GPUs to query: indices or 'all' (default)")
    return run_command("device_query", parser, query, argv)
