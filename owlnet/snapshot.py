"""Snapshots: ``{prefix}_iter_{N}.caffemodel`` and ``{prefix}_iter_{N}.solverstate``, as Caffe.

The caffemodel is the train net's NetParameter; the solverstate a SolverState with ``iter``,
``learned_net`` (the caffemodel's path, as Caffe writes it), the update rule's ``history`` and
``current_step``. Caffe reads both. owlnet adds what an exact resume also needs and Caffe does
not keep, as JSON bytes in SolverState field 1000 ``owlnet_resume`` (Caffe skips the unknown
field): the global RNG state, the data layers' positions of the train and test nets, and the
caffemodel's size (a truncated or replaced caffemodel is caught). Both files are written
atomically (temporary file, fsync, rename), caffemodel first; nothing is ever pickled.
"""
from __future__ import annotations

import json
import os

import numpy as np

from . import backend
from . import logging as owl_logging
from .errors import ConfigError, SnapshotError
from .fileio import array_to_blobproto, atomic_write, blobproto_to_array, parse_binary
from .proto import caffe_pb2

#: Bit generators whose state a snapshot may restore (numpy's, by class name).
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "Philox", "SFC64", "MT19937")


def snapshot_paths(prefix: str, iteration: int) -> tuple[str, str]:
    """The caffemodel and solverstate paths Caffe uses for ``prefix`` at ``iteration``."""
    stem = f"{prefix}_iter_{int(iteration)}"
    return stem + ".caffemodel", stem + ".solverstate"


def find_snapshot(prefix: str, index: int, every: int) -> str:
    """The solverstate of snapshot number ``index`` (iteration ``index * every``)."""
    if every <= 0:
        raise ConfigError(f"snapshot number {index} needs a solver with snapshot > 0 "
                          f"(it has snapshot: {every})")
    path = snapshot_paths(prefix, index * every)[1]
    if not os.path.isfile(path):
        raise SnapshotError(f"no snapshot {path} (snapshot number {index} x interval {every} "
                            f"= iteration {index * every})")
    return path


def write_snapshot(prefix, iteration, net_param, history, current_step, resume) -> tuple:
    """Write the caffemodel and solverstate for ``iteration``; returns both paths.

    ``history`` is the update rule's arrays in SolverState order; ``resume`` a JSON-able dict
    of owlnet's extra state.
    """
    model_path, state_path = snapshot_paths(prefix, iteration)
    owl_logging.info(f"Snapshotting to binary proto file {model_path}")
    model_bytes = net_param.SerializeToString()
    atomic_write(model_path, model_bytes)

    state = caffe_pb2.SolverState(iter=int(iteration), learned_net=model_path,
                                  current_step=int(current_step))
    for array in history:
        array_to_blobproto(backend.to_host(array), proto=state.history.add())
    extra = dict(resume, learned_net_bytes=len(model_bytes))
    state.owlnet_resume = json.dumps(extra).encode("utf-8")
    owl_logging.info(f"Snapshotting solver state to binary proto file {state_path}")
    atomic_write(state_path, state.SerializeToString())
    return model_path, state_path


def read_solver_state(path) -> caffe_pb2.SolverState:
    """Parse a .solverstate; a corrupt or truncated file raises SnapshotError naming it."""
    if os.fspath(path).endswith(".h5"):
        raise SnapshotError(f"{path}: HDF5 solver states are not supported "
                            "(snapshot_format BINARYPROTO only)")
    return parse_binary(caffe_pb2.SolverState(), path, "solver state")


def learned_net_path(state, state_path) -> str | None:
    """The caffemodel a solver state names: as written (relative to the current directory,
    as Caffe), else the same file name beside the solverstate; None when it names none."""
    if not state.learned_net:
        return None
    if not isinstance(state.learned_net, str):      # protobuf hands back bytes that are not UTF-8
        raise SnapshotError(f"{state_path}: corrupt weights file name {state.learned_net!r}")
    if os.path.isfile(state.learned_net):
        return state.learned_net
    beside = os.path.join(os.path.dirname(os.fspath(state_path)),
                          os.path.basename(state.learned_net))
    if os.path.isfile(beside):
        return beside
    raise SnapshotError(f"{state_path}: its weights file {state.learned_net} is missing "
                        f"(also looked for {beside})")


def read_history(state, state_path, shapes, names, rule_type) -> list:
    """The history arrays of ``state``, checked against the expected ``shapes``.

    ``names[k]`` names the parameter history ``k`` belongs to. A legacy 4-d history blob
    (no ``shape`` field) is accepted when its element count matches.
    """
    if len(state.history) != len(shapes):
        raise SnapshotError(f"{state_path}: holds {len(state.history)} history blobs; the "
                            f"{rule_type} solver of this net needs {len(shapes)}")
    arrays = []
    for k, (proto, shape) in enumerate(zip(state.history, shapes)):
        where = f"{state_path}: history blob #{k} (parameter {names[k]})"
        array = blobproto_to_array(proto, where=where)
        if array.shape != tuple(shape):
            if proto.HasField("shape") or array.size != int(np.prod(shape, dtype=np.int64)):
                raise SnapshotError(f"{where} has shape {array.shape}; the net's parameter "
                                    f"has shape {tuple(shape)}")
            array = array.reshape(shape)
        arrays.append(array)
    return arrays


def read_resume(state, state_path, model_path) -> dict | None:
    """owlnet's extra resume state, or None for a solver state Caffe wrote."""
    if not state.HasField("owlnet_resume"):
        return None
    try:
        extra = json.loads(state.owlnet_resume.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SnapshotError(f"{state_path}: corrupt owlnet resume state ({exc})") from None
    if not isinstance(extra, dict):
        raise SnapshotError(f"{state_path}: corrupt owlnet resume state (not an object)")
    for name, kind in (("rng", dict), ("train_data", dict), ("test_data", list),
                       ("learned_net_bytes", int)):
        if name in extra and not isinstance(extra[name], kind):
            raise SnapshotError(f"{state_path}: corrupt owlnet resume state ('{name}' is not "
                                f"a {kind.__name__})")
    if not all(isinstance(net_state, dict) for net_state in extra.get("test_data", [])):
        raise SnapshotError(f"{state_path}: corrupt owlnet resume state ('test_data' holds "
                            "a value that is not an object)")
    expected = extra.get("learned_net_bytes")
    if model_path is not None and expected is not None:
        size = os.path.getsize(model_path)
        if size != expected:
            raise SnapshotError(f"{model_path}: {size} bytes, but {state_path} was written "
                                f"with a {expected}-byte weights file (truncated or replaced)")
    return extra


def rng_state():
    """The global generator's state, JSON-serialisable."""
    return backend.rng().bit_generator.state


def restore_rng(saved, state_path) -> None:
    """Make the global generator continue from ``saved`` (from :func:`rng_state`)."""
    name = saved.get("bit_generator") if isinstance(saved, dict) else None
    if name not in _BIT_GENERATORS:
        raise SnapshotError(f"{state_path}: unknown random generator {name!r} in resume state")
    generator = np.random.Generator(getattr(np.random, name)())
    try:
        generator.bit_generator.state = saved
    except (TypeError, ValueError, KeyError) as exc:
        raise SnapshotError(f"{state_path}: corrupt random generator state ({exc})") from None
    backend.set_rng(generator)
