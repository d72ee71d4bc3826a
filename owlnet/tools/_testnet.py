"""The test net of a solver file, with chosen weights: shared by `owlnet test` and `owlnet extract`.

Both tools take a solver prototxt, build its first TEST net as the solver would (paths found
beside the solver, its NetState, its ``weights``), load ``--weights`` or the ``--snapshot N``
caffemodel, and run ``--iters`` batches (by default the solver's ``test_iter``), on the device
that ``--gpu``/``--device`` and the solver file's ``solver_mode``/``device_id`` choose
(owlnet.tools.device).
"""
from __future__ import annotations

import os

from .. import backend
from .. import logging as owl_logging
from ..errors import ConfigError, SnapshotError
from ..snapshot import snapshot_paths
from ..solver.solver import SolverFiles, read_solver_param
from . import add_python_layers_flag, device


def add_test_net_arguments(parser, runs: str) -> None:
    """--snapshot N | --weights W, --iters K (or --iterations), the device flags and
    --no-python-layers; ``runs`` says what a batch is for in the --iters help ("score",
    "run")."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--snapshot", type=int, metavar="N",
                       help="weights of the N-th snapshot (iteration N x solver.snapshot)")
    group.add_argument("--weights", metavar="A.caffemodel[,B.caffemodel]",
                       help="weights to load (later files override earlier ones)")
    parser.add_argument("--iters", "--iterations", type=int, metavar="K",
                        help=f"batches to {runs} (default test_iter)")
    device.add_device_flags(parser)
    add_python_layers_flag(parser)


def _snapshot_weights(files: SolverFiles, index: int) -> str:
    """The caffemodel of snapshot number ``index`` (iteration ``index * snapshot``)."""
    every = files.param.snapshot
    if every <= 0:
        raise ConfigError(f"snapshot number {index} needs a solver with snapshot > 0 "
                          f"(it has snapshot: {every})")
    path = snapshot_paths(files.snapshot_prefix(check_writable=False), index * every)[0]
    if not os.path.isfile(path):
        raise SnapshotError(f"no snapshot weights {path} (snapshot number {index} x "
                            f"interval {every} = iteration {index * every})")
    return path


def read_solver(solver_path):
    """The solver file's parameters; ConfigError when there is no such file."""
    if not os.path.isfile(solver_path):
        raise ConfigError(f"{solver_path}: solver prototxt file not found")
    return read_solver_param(solver_path)


def load_test_net(solver_path, snapshot: int | None = None, weights: str | None = None,
                  param=None):
    """The solver's first test net (built as the solver builds it, without its train net)
    with the requested weights, and its ``test_iter``; ``param``: the solver file's
    parameters when they were read already."""
    param = param if param is not None else read_solver(solver_path)
    files = SolverFiles(param, os.path.dirname(os.path.abspath(solver_path)))
    if param.random_seed >= 0:
        backend.set_random_seed(param.random_seed)
    test_nets = files.build_test_nets()
    if not test_nets:
        raise ConfigError(f"{solver_path}: the solver defines no test net (set test_iter, "
                          "test_interval and a net or test_net)")
    net = test_nets[0]
    paths = weights.split(",") if weights else []
    if snapshot is not None:
        paths = [_snapshot_weights(files, snapshot)]
    for path in paths:
        owl_logging.info(f"Loading weights from {path}")
        net.copy_from(path)
    if not paths and not param.weights:
        owl_logging.warning("no --weights or --snapshot given: the net keeps its initial "
                            "(untrained) weights")
    return net, int(param.test_iter[0])


def open_test_net(args) -> tuple:
    """``(net, batches)`` for the parsed arguments of ``add_test_net_arguments`` and
    ``args.solver``, on the device the flags and the solver file choose."""
    owl_logging.ensure_configured()
    if not args.solver:
        raise ConfigError("need a solver prototxt (its first test net is run)")
    param = read_solver(args.solver)
    device.setup_from_args(args, param)
    net, test_iter = load_test_net(args.solver, args.snapshot, args.weights, param)
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
