"""The test net of a solver file, with chosen weights: shared by `owlnet test` and `owlnet extract`.

Both tools take a solver prototxt, build its first TEST net as the solver would (paths found
beside the solver, its NetState, its ``weights``), load ``--weights`` or the ``--snapshot N``
caffemodel, and run ``--iters`` batches (by default the solver's ``test_iter``).
"""
from __future__ import annotations

import argparse
import os

from .. import backend
from .. import logging as owl_logging
from ..errors import ConfigError, SnapshotError
from ..snapshot import snapshot_paths
from ..solver.solver import Solver, read_solver_param
from .train import setup_device


def add_test_net_arguments(parser: argparse.ArgumentParser, runs: str) -> None:
    """--snapshot N | --weights W, --iters K and --gpu IDX; ``runs`` says what a batch is
    for in the --iters help ("score", "run")."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--snapshot", type=int, metavar="N",
                       help="weights of the N-th snapshot (iteration N x solver.snapshot)")
    group.add_argument("--weights", metavar="A.caffemodel[,B.caffemodel]",
                       help="weights to load (later files override earlier ones)")
    parser.add_argument("--iters", type=int, metavar="K",
                        help=f"batches to {runs} (default test_iter)")
    parser.add_argument("--gpu", type=int, metavar="IDX", help="run on GPU IDX (default: the CPU)")


class _TestNets(Solver):
    """Only the test nets of a solver file, built as the solver builds them (paths, NetState,
    the solver's ``weights``), without the train net and update rule.

    It reuses Solver's building steps (``_init_test_nets``, ``_snapshot_prefix``) without
    running ``Solver.__init__``, which would build the train net and open its data.
    """

    def __init__(self, path):
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: solver prototxt file not found")
        self.source_dir = os.path.dirname(os.path.abspath(path))
        self.param = read_solver_param(path)
        if self.param.random_seed >= 0:
            backend.set_random_seed(self.param.random_seed)
        owl_logging.ensure_configured()
        self.test_nets = self._init_test_nets()
        if not self.test_nets:
            raise ConfigError(f"{path}: the solver defines no test net (set test_iter, "
                              "test_interval and a net or test_net)")

    def snapshot_weights(self, index: int) -> str:
        """The caffemodel of snapshot number ``index`` (iteration ``index * snapshot``)."""
        every = self.param.snapshot
        if every <= 0:
            raise ConfigError(f"snapshot number {index} needs a solver with snapshot > 0 "
                              f"(it has snapshot: {every})")
        path = snapshot_paths(self._snapshot_prefix(), index * every)[0]
        if not os.path.isfile(path):
            raise SnapshotError(f"no snapshot weights {path} (snapshot number {index} x "
                                f"interval {every} = iteration {index * every})")
        return path


def load_test_net(solver_path, snapshot: int | None = None, weights: str | None = None):
    """The solver's first test net with the requested weights, and its ``test_iter``."""
    nets = _TestNets(solver_path)
    net = nets.test_nets[0]
    paths = weights.split(",") if weights else []
    if snapshot is not None:
        paths = [nets.snapshot_weights(snapshot)]
    for path in paths:
        owl_logging.info(f"Loading weights from {path}")
        net.copy_from(path)
    if not paths and not nets.param.weights:
        owl_logging.warning("no --weights or --snapshot given: the net keeps its initial "
                            "(untrained) weights")
    return net, int(nets.param.test_iter[0])


def open_test_net(args) -> tuple:
    """``(net, batches)`` for the parsed arguments of ``add_test_net_arguments`` and
    ``args.solver``, on the device ``--gpu`` names."""
    owl_logging.ensure_configured()
    if args.gpu is not None:
        setup_device("gpu", args.gpu, None)
    net, test_iter = load_test_net(args.solver, args.snapshot, args.weights)
    return net, (args.iters if args.iters is not None else test_iter)


def find_blob(net, name: str) -> str:
    """The blob ``name``, or the first top of the layer ``name``; ConfigError listing the
    blobs otherwise."""
    if name in net.blobs:
        return name
    tops = net.top_names.get(name)
    if tops:
        return tops[0]
    raise ConfigError(f"net '{net.name}' has no blob or layer '{name}' (blobs: "
                      f"{', '.join(net.blobs)})")
