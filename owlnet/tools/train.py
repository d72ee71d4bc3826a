"""`net_trainer.py SOLVER [--snapshot N] [-n N] [--weights W] [--device cpu|gpu]` (`owlnet train`).

Trains the solver's net as Caffe's ``caffe train`` does, with owl.net's ``--snapshot N``:
resume from the N-th snapshot, i.e. iteration N x ``snapshot`` under ``snapshot_prefix``.
SIGINT and SIGTERM write a snapshot and stop; SIGHUP writes one and goes on (Caffe's
sigint_effect / sighup_effect, which the flags change). On a terminal a progress bar shows
iter/s and the time left.

``-n N`` slices every batch over N devices (CPU slices, or GPUs ``--gpu .. --gpu+N-1``); under
``mpiexec -n P`` each of the P ranks does so too, and the net's batch_size is the global batch
over all P x N slices (see ``owlnet.parallel``). Only rank 0 logs, tests and snapshots; a rank
that stops answering for ``--collective-timeout`` seconds ends the whole job with an error
naming it.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from .. import backend, parallel
from .. import logging as owl_logging
from ..errors import ConfigError, OwlnetError
from ..snapshot import find_snapshot
from ..solver import get_solver

EFFECTS = ("stop", "snapshot", "none")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="net_trainer.py", description=__doc__.splitlines()[0])
    p.add_argument("solver", help="solver prototxt")
    p.add_argument("--snapshot", type=int, metavar="N",
                   help="resume from the N-th snapshot (iteration N x solver.snapshot)")
    p.add_argument("--resume", metavar="SOLVERSTATE", help="resume from this .solverstate")
    p.add_argument("-n", "--num-devices", type=int, default=1, metavar="N",
                   help="devices to slice each batch across (default 1)")
    p.add_argument("--weights", metavar="A.caffemodel[,B.caffemodel]",
                   help="initialise from these weights (fine-tuning)")
    p.add_argument("--reinit-mismatched", action="store_true",
                   help="with --weights: keep fresh fillers for layers whose shapes differ")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--gpu", type=int, default=0, metavar="IDX", help="first GPU to use")
    p.add_argument("--math", choices=("fp32", "tf32"), default=None,
                   help="GPU math mode (default fp32, or $OWLNET_MATH)")
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


def setup_device(device: str, gpu: int, math: str | None) -> None:
    if math:
        backend.set_math_mode(math)
    if device == "gpu":
        backend.set_device(gpu)
        backend.set_mode_gpu()
        owl_logging.info(f"Using GPU {gpu}, math mode {backend.math_mode()}")
    else:
        backend.set_mode_cpu()
        owl_logging.info("Using CPU")


def train(args, comm=None) -> int:
    primary = comm is None or comm.Get_rank() == 0
    if primary:
        owl_logging.configure(log_file=args.log) if args.log else owl_logging.ensure_configured()
    else:
        owl_logging.ensure_configured()
        owl_logging.logger.setLevel(logging.WARNING)     # rank 0 alone logs progress
    devices = parallel.device_list(args.num_devices, args.device, args.gpu)
    if args.snapshot is not None and args.resume:
        raise ConfigError("give --snapshot N or --resume FILE, not both")
    if args.weights and (args.snapshot is not None or args.resume):
        raise ConfigError("give --weights (fine-tune) or a snapshot to resume, not both")
    setup_device(args.device, args.gpu, args.math)

    if args.skip_bad_records:
        os.environ["OWLNET_SKIP_BAD_RECORDS"] = "1"   # read by the data layers as they are built
    actions = SignalActions(args.sigint_effect, args.sighup_effect)
    solver = get_solver(args.solver, action_callback=actions)
    solver.continue_on_snapshot_error = args.continue_on_snapshot_error
    resume = args.resume
    if args.snapshot is not None:
        resume = find_snapshot(solver.snapshot_prefix, args.snapshot, solver.param.snapshot)
    if args.weights:
        for path in args.weights.split(","):
            owl_logging.info(f"Finetuning from {path}")
            skipped = solver.net.copy_from(path, reinit_mismatched=args.reinit_mismatched)
            for name in skipped:
                owl_logging.warning(f"layer '{name}': shapes differ from {path}; "
                                    "keeping its fresh initialisation")
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
