"""`owlnet train` / net_trainer.py: train a solver, with owl.net's and Caffe's command lines.

    net_trainer.py SOLVER [--snapshot N] [-n N] [--weights W] [--device cpu|gpu] [--gpu IDS]
    owlnet train --solver=S [--weights=W | --snapshot=X.solverstate] [--gpu 0,1|all]
                 [--sigint_effect=stop] [--sighup_effect=snapshot] [--stage=a,b] [--level=N]

Trains the solver's net as Caffe's ``caffe train`` does. ``--snapshot`` takes owl.net's N
(resume from the N-th snapshot, i.e. iteration N x ``snapshot`` under ``snapshot_prefix``) or
Caffe's .solverstate path. SIGINT and SIGTERM write a snapshot and stop; SIGHUP writes one and
goes on (Caffe's sigint_effect / sighup_effect, which the flags change). ``--stage`` and
``--level`` go into the solver's ``train_state`` as in Caffe (``--level`` only when given: Caffe
always writes its default 0). Caffe's ``--iterations`` is accepted and, as in Caffe, unused by
train. On a terminal a progress bar shows iter/s and the time left.

The devices follow owlnet.tools.device: ``--gpu`` and the solver file's ``solver_mode: GPU`` /
``device_id`` as in Caffe, ``--device cpu`` to override a solver file. ``-n N`` slices every
batch over N devices (CPU slices, N GPUs, or N slices on the one GPU of ``--gpu I``); ``--gpu
0,1`` gives one slice per GPU. Under ``mpiexec -n P`` each of the P ranks takes its own GPU(s)
by its rank on the node, and the net's batch_size is the global batch over all slices (see
``owlnet.parallel``). Only rank 0 logs, tests and snapshots; a rank that stops answering for
``--collective-timeout`` seconds ends the whole job with an error naming it.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time

from .. import parallel
from .. import logging as owl_logging
from ..errors import ConfigError, OwlnetError
from ..snapshot import find_snapshot
from ..solver import get_solver
from ..solver.solver import SolverFiles, read_solver_param
from . import add_python_layers_flag, apply_common_flags, device
from .flags import FlagParser

EFFECTS = ("stop", "snapshot", "none")


def build_parser() -> FlagParser:
    p = FlagParser(prog="net_trainer.py", description=__doc__.splitlines()[0])
    p.add_argument("solver_file", nargs="?", metavar="SOLVER", help="solver prototxt")
    p.add_argument("--solver", metavar="SOLVER", help="solver prototxt (Caffe's spelling)")
    p.add_argument("--snapshot", metavar="N|X.solverstate",
                   help="resume from the N-th snapshot (iteration N x solver.snapshot) or "
                        "from this .solverstate")
    p.add_argument("--resume", metavar="SOLVERSTATE", help="resume from this .solverstate")
    p.add_argument("-n", "--num-devices", type=int, metavar="N",
                   help="slices to divide each batch across (default 1, or one per --gpu)")
    p.add_argument("--weights", metavar="A.caffemodel[,B.caffemodel]",
                   help="initialise from these weights (fine-tuning)")
    p.add_argument("--reinit-mismatched", action="store_true",
                   help="with --weights: keep fresh fillers for layers whose shapes differ")
    device.add_device_flags(p)
    p.add_argument("--stage", metavar="A[,B...]", help="net stages added to the train state")
    p.add_argument("--level", type=int, metavar="N", help="net level of the train state")
    p.add_argument("--iterations", type=int, metavar="N",
                   help="accepted for Caffe's command lines; train does not use it")
    p.add_argument("--sigint-effect", choices=EFFECTS, default="stop")
    p.add_argument("--sighup-effect", choices=EFFECTS, default="snapshot")
    p.add_argument("--collective-timeout", type=float, default=parallel.DEFAULT_TIMEOUT,
                   metavar="SECONDS",
                   help="with several ranks: fail when another rank does not reach a gradient "
                        "all-reduce within this time (default %(default)g; must exceed the "
                        "longest test or snapshot pause of rank 0)")
    p.add_argument("--log", metavar="FILE", help="also write the log to FILE")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--continue-on-snapshot-error", action="store_true",
                   help="log a failed snapshot and keep training (default: stop with the error)")
    p.add_argument("--skip-bad-records", action="store_true",
                   help="skip (count and log) data records that cannot be decoded; the same as "
                        "OWLNET_SKIP_BAD_RECORDS=1 (default: stop with an error naming the record)")
    add_python_layers_flag(p)
    return p


class SignalActions:
    """Turns SIGINT/SIGTERM/SIGHUP into the solver's "stop" / "snapshot" requests."""

    def __init__(self, sigint_effect: str, sighup_effect: str):
        self.effects = {signal.SIGINT: sigint_effect, signal.SIGTERM: sigint_effect}
        if hasattr(signal, "SIGHUP"):
            self.effects[signal.SIGHUP] = sighup_effect
        self.pending = "none"
        self.previous = {}

    def __enter__(self):
        for sig in self.effects:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        effect = self.effects[signum]
        if effect != "none" and self.pending != "stop":
            self.pending = effect

    def __call__(self) -> str:
        action, self.pending = self.pending, "none"
        return action


class ProgressBar:
    """``[#####.....] 1200/2000 35.2 iter/s ETA 0:00:23`` on a terminal, under the log."""

    def __init__(self, stream, total: int):
        self.stream, self.total = stream, max(total, 1)
        self.start_time = self.start_iter = None

    def __call__(self, solver) -> None:
        now = time.perf_counter()
        if self.start_time is None:
            self.start_time, self.start_iter = now, solver.iter - 1
        done = solver.iter - self.start_iter
        rate = done / max(now - self.start_time, 1e-9)
        left = max(self.total - solver.iter, 0) / max(rate, 1e-9)
        filled = int(30 * min(solver.iter / self.total, 1.0))
        eta = time.strftime("%H:%M:%S", time.gmtime(left))
        self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {solver.iter}/{self.total} "
                          f"{rate:.1f} iter/s ETA {eta}\033[K")
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r\033[K")
        self.stream.flush()


class _ClearBarFirst(logging.Filter):
    """Clears the progress bar's line before a log line is written to the same terminal."""

    def __init__(self, bar: ProgressBar):
        super().__init__()
        self.bar = bar

    def filter(self, record) -> bool:
        self.bar.clear()
        return True


def solver_path(args) -> str:
    """The solver file, given as SOLVER or --solver (one of them)."""
    if args.solver and args.solver_file:
        raise ConfigError("give the solver as SOLVER or as --solver, not both")
    path = args.solver or args.solver_file
    if not path:
        raise ConfigError("need a solver definition to train: SOLVER or --solver=S")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: solver prototxt file not found")
    return path


def solver_with_state(path: str, stages: list, level: int | None):
    """The solver file's parameters with ``stages`` and ``level`` in its train_state, and
    its relative file names found as the solver would find them from its own folder."""
    param = read_solver_param(path)
    files = SolverFiles(param, os.path.dirname(os.path.abspath(path)))
    for field in ("net", "train_net"):
        if param.HasField(field):
            setattr(param, field, files.find(getattr(param, field), f"{field} file"))
    for i, name in enumerate(param.test_net):
        param.test_net[i] = files.find(name, "test_net file")
    for i, entry in enumerate(param.weights):
        param.weights[i] = ",".join(files.find(p, "weights file") for p in entry.split(","))
    if param.HasField("snapshot_prefix"):
        param.snapshot_prefix = files.snapshot_prefix(check_writable=False)
    if level is not None:
        param.train_state.level = level
    param.train_state.stage.extend(stages)
    return param


def resume_file(args, solver) -> str | None:
    """The .solverstate to resume from: --resume, --snapshot FILE, or --snapshot N's."""
    snapshot = args.snapshot
    if snapshot is not None and not snapshot.isdigit():
        return snapshot
    if snapshot is not None:
        return find_snapshot(solver.snapshot_prefix, int(snapshot), solver.param.snapshot)
    return args.resume


def fine_tune(solver, weights: str, reinit_mismatched: bool) -> None:
    """Caffe's ``--weights A[,B...]``: each file, in order, copied into the train net and into
    every test net (so layers of a test net alone start from the file too)."""
    for path in weights.split(","):
        owl_logging.info(f"Finetuning from {path}")
        skipped = {}
        for net in [solver.net] + list(solver.test_nets):
            for name in net.copy_from(path, reinit_mismatched=reinit_mismatched):
                skipped.setdefault(name)
        for name in skipped:
            owl_logging.warning(f"layer '{name}': shapes differ from {path}; "
                                "keeping its fresh initialisation")


def train(args, comm=None) -> int:
    primary = comm is None or comm.Get_rank() == 0
    if primary:
        owl_logging.configure(log_file=args.log) if args.log else owl_logging.ensure_configured()
    else:
        owl_logging.ensure_configured()
        owl_logging.logger.setLevel(logging.WARNING)     # rank 0 alone logs progress
    path = solver_path(args)
    if args.snapshot is not None and args.resume:
        raise ConfigError("give --snapshot or --resume FILE, not both")
    if args.weights and (args.snapshot is not None or args.resume):
        raise ConfigError("give --weights (fine-tune) or a snapshot to resume, not both")
    if args.iterations is not None:
        owl_logging.warning("--iterations is not used by train (as in Caffe): max_iter in the "
                            "solver file sets the length of training")
    stages = [s for s in (args.stage or "").split(",") if s]
    if stages or args.level is not None:
        source = param = solver_with_state(path, stages, args.level)
    else:
        source, param = path, read_solver_param(path)
    local = device.local_rank(comm) if comm is not None else None
    choice = device.choose_devices(args.gpu, args.device, param, args.num_devices, local)
    device.setup_device(choice.devices, args.math, choice.note)
    devices = choice.devices

    if args.skip_bad_records:
        os.environ["OWLNET_SKIP_BAD_RECORDS"] = "1"   # read by the data layers as they are built
    actions = SignalActions(args.sigint_effect, args.sighup_effect)
    solver = get_solver(source, action_callback=actions)
    solver.continue_on_snapshot_error = args.continue_on_snapshot_error
    resume = resume_file(args, solver)
    if args.weights:
        fine_tune(solver, args.weights, args.reinit_mismatched)
    if len(devices) > 1 or comm is not None:
        solver.parallel = parallel.DataParallel(solver, devices, comm, args.collective_timeout)
        owl_logging.info(f"Data-parallel training: {solver.parallel.ranks} rank(s) x "
                         f"{len(devices)} slice(s), {solver.parallel.slices} slices per batch")
    bar = None
    if not args.no_progress and sys.stderr.isatty() and primary:
        bar = ProgressBar(sys.stderr, solver.param.max_iter)
        solver.on_iteration.append(bar)
        for handler in owl_logging.logger.handlers:
            handler.addFilter(_ClearBarFirst(bar))
    try:
        with actions:
            solver.solve(resume_file=resume)
    finally:
        if solver.parallel is not None:
            solver.parallel.close()
    if bar is not None:
        bar.clear()
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    comm = None
    try:
        apply_common_flags(args)
        comm = parallel.mpi_comm()
        return train(args, comm)
    except OwlnetError as exc:
        where = f" (rank {comm.Get_rank()})" if comm is not None else ""
        print(f"net_trainer: error{where}: {exc}", file=sys.stderr, flush=True)
        if comm is not None:
            # The log file keeps the reason even if the launcher drops the rank's last
            # output when the job is aborted; the other ranks may wait in a collective, so
            # the whole job ends here.
            owl_logging.logger.error(f"error{where}: {exc}")
            comm.Abort(1)
        return 1


if __name__ == "__main__":
    sys.exit(main())
