"""Snapshots: ``{prefix}_iter_{N}.caffemodel`` and ``{prefix}_iter_{N}.solverstate``, as Caffe.

The caffemodel is the train net's NetParameter; the solverstate a SolverState with ``iter``,
``learned_net`` (the caffemodel's path, as Caffe writes it), the update rule's ``history`` and
``current_step``. Caffe reads both. owlnet adds what an exact resume also needs and Caffe does
not keep, as JSON bytes in SolverState field 1000 ``owlnet_resume`` (Caffe skips the unknown
field): the global RNG state, the data layers' positions of the train and test nets, and the
caffemodel's size (a truncated or replaced caffemodel is caught). Both files are written
atomically (temporary file, fsync, rename), caffemodel first; nothing is ever pickled.

With ``snapshot_format: HDF5`` the files are ``.caffemodel.h5`` and ``.solverstate.h5`` in
Caffe's HDF5 layout. Weights: group ``data`` holds a group per layer (every layer of the net,
Split layers included, as Caffe's Net::ToHDF5) with float32 datasets ``0``, ``1``, ... of each
parameter blob's shape; a parameter shared from an earlier layer is written only under the
layer that owns it; with ``snapshot_diff`` a group ``diff`` holds every layer's diffs alike.
A layer name holding "/" becomes a group nested in the group of the name before the
slash (HDF5 paths; Caffe itself cannot write such names). Solver state: scalar int32 datasets ``iter`` and ``current_step``, the C string
``learned_net`` (the weights file's path) and group ``history`` with datasets ``0`` .. ``k``;
owlnet's resume JSON goes in one more string dataset, ``owlnet_resume``, which Caffe never
opens. A solver state is read as HDF5 when its name ends in ``.h5`` (Caffe's Solver::Restore);
weights when the file starts with the HDF5 signature (Caffe's H5Fis_hdf5 test).
"""
from __future__ import annotations

import io
import json
import os

import numpy as np

from . import backend
from . import logging as owl_logging
from .errors import ConfigError, ShapeError, SnapshotError
from .fileio import (array_to_blobproto, atomic_write, blobproto_to_array, import_h5py,
                     parse_binary, read_hdf5_array)
from .proto import caffe_pb2

#: Bit generators whose state a snapshot may restore (numpy's, by class name).
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "Philox", "SFC64", "MT19937")
#: The first bytes of an HDF5 file (its superblock signature).
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def snapshot_paths(prefix: str, iteration: int, hdf5: bool = False) -> tuple[str, str]:
    """The caffemodel and solverstate paths Caffe uses for ``prefix`` at ``iteration``
    (with ``hdf5``: ``.caffemodel.h5`` and ``.solverstate.h5``)."""
    stem = f"{prefix}_iter_{int(iteration)}"
    extension = ".h5" if hdf5 else ""
    return stem + ".caffemodel" + extension, stem + ".solverstate" + extension


def find_snapshot(prefix: str, index: int, every: int) -> str:
    """The solverstate of snapshot number ``index`` (iteration ``index * every``), binary
    proto or else HDF5."""
    if every <= 0:
        raise ConfigError(f"snapshot number {index} needs a solver with snapshot > 0 "
                          f"(it has snapshot: {every})")
    paths = [snapshot_paths(prefix, index * every, hdf5)[1] for hdf5 in (False, True)]
    for path in paths:
        if os.path.isfile(path):
            return path
    raise SnapshotError(f"no snapshot {' or '.join(paths)} (snapshot number {index} x interval "
                        f"{every} = iteration {index * every})")


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
    """Parse a .solverstate (a ``.h5`` name: an HDF5 solver state, returned as the same
    message); a corrupt or truncated file raises SnapshotError naming it."""
    if os.fspath(path).endswith(".h5"):
        return _read_solver_state_hdf5(path)
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


# -- HDF5 snapshots ---------------------------------------------------------------------------
def is_hdf5(path) -> bool:
    """Whether ``path`` holds an HDF5 file: the signature at byte 0, 512, 1024, 2048, ...
    (where HDF5 may place its superblock), as H5Fis_hdf5 looks for it."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            offset = 0
            while offset + len(HDF5_SIGNATURE) <= size:
                fh.seek(offset)
                if fh.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                    return True
                offset = offset * 2 if offset else 512
    except OSError:
        return False
    return False


def _hdf5_bytes(fill) -> bytes:
    """The bytes of a new HDF5 file that ``fill(h5py.File)`` populates (built in memory, so
    that ``atomic_write`` publishes it whole)."""
    h5py = import_h5py("writing HDF5 files")
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        fill(f)
    return buffer.getvalue()


def _write_c_string(group, name: str, text: str) -> None:
    """A scalar dataset holding ``text`` as a null-terminated C string of strlen + 1 bytes,
    as HDF5's H5LTmake_dataset_string writes it (Caffe's hdf5_save_string)."""
    h5py = import_h5py("writing HDF5 files")
    raw = text.encode("utf-8") + b"\0"
    string_type = h5py.h5t.C_S1.copy()
    string_type.set_size(len(raw))
    string_type.set_strpad(h5py.h5t.STR_NULLTERM)
    dataset = h5py.h5d.create(group.id, name.encode("utf-8"), string_type,
                              h5py.h5s.create(h5py.h5s.SCALAR))
    dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, np.array(raw, dtype=f"S{len(raw)}"),
                  mtype=string_type)


def _owned_params(net):
    """For each layer name, which of its parameter blobs it owns (a blob shared from an
    earlier layer, by ``param { name }``, is owned by that layer)."""
    learnable = {id(blob) for blob in net.learnable_params}
    seen, owned = set(), {}
    for name, layer in net.layer_dict.items():
        owned[name] = [id(blob) in learnable and id(blob) not in seen for blob in layer.blobs]
        seen.update(id(blob) for blob in layer.blobs)
    return owned


def weights_hdf5_bytes(net, write_diff: bool = False) -> bytes:
    """``net``'s parameters as Caffe's Net::ToHDF5 writes them (see the module docstring)."""
    owned = _owned_params(net)

    def fill(f):
        data = f.create_group("data")
        diff = f.create_group("diff") if write_diff else None
        for name, layer in net.layer_dict.items():
            layer_data = data.require_group(name)      # "a/b" nests in group "a" (which
            layer_diff = diff.require_group(name) if write_diff else None   # layer "a" may use)
            for k, blob in enumerate(layer.blobs):
                if owned[name][k]:
                    layer_data.create_dataset(str(k), data=_host_float32(blob.data))
                if write_diff:
                    layer_diff.create_dataset(str(k), data=_host_float32(blob.diff))
    return _hdf5_bytes(fill)


def _host_float32(array) -> np.ndarray:
    return np.asarray(backend.to_host(array), dtype=np.float32)


def save_weights_hdf5(net, path, write_diff: bool = False) -> int:
    """Write ``net``'s weights as a Caffe HDF5 weights file, atomically; returns its size."""
    payload = weights_hdf5_bytes(net, write_diff)
    atomic_write(path, payload)
    return len(payload)


def _open_hdf5(path, kind: str):
    h5py = import_h5py(f"reading the HDF5 {kind} {path}")
    try:
        return h5py, h5py.File(path, "r")
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot read the HDF5 {kind} ({exc})") from None


def load_weights_hdf5(net, path, reinit_mismatched: bool = False) -> list[str]:
    """Copy weights from a Caffe HDF5 weights file into ``net``, as Caffe's
    CopyTrainedLayersFromHDF5: layers matched by name (file layers absent from the net are
    ignored), a file layer may hold fewer blobs than the net's layer only where the missing
    ones are shared from another layer, and shapes must match exactly. With
    ``reinit_mismatched`` a layer whose shapes differ keeps its values instead (its name is
    returned, as ``Net.copy_from``)."""
    path = os.fspath(path)
    h5py, f = _open_hdf5(path, "weights file")
    owned = _owned_params(net)
    reinitialised = []
    with f:
        data = f.get("data")
        if not isinstance(data, h5py.Group):
            raise SnapshotError(f"{path}: no group 'data' (not a Caffe HDF5 weights file)")
        for name, layer in net.layer_dict.items():
            group = data.get(name)
            if group is None:
                continue
            if not isinstance(group, h5py.Group):
                raise SnapshotError(f"{path}: data/{name} is not a group of blobs")
            held = [key for key, item in group.items()
                    if key.isdigit() and isinstance(item, h5py.Dataset)]
            if len(held) > len(layer.blobs):
                raise SnapshotError(f"{path}: layer '{name}' has {len(held)} blobs in the file, "
                                    f"the net expects {len(layer.blobs)}")
            datasets = {}
            for k in range(len(layer.blobs)):
                dataset = group.get(str(k))
                if dataset is not None:
                    datasets[k] = dataset
                elif owned[name][k]:
                    raise SnapshotError(f"{path}: layer '{name}' lacks blob {k} (dataset "
                                        f"data/{name}/{k}); the net expects "
                                        f"{len(layer.blobs)} blobs")
                # else: shared from the layer that owns it, whose group holds it
            mismatch = [(k, getattr(d, "shape", "a group"), layer.blobs[k].shape)
                        for k, d in datasets.items()
                        if not isinstance(d, h5py.Dataset) or d.shape != layer.blobs[k].shape]
            if mismatch and reinit_mismatched:
                reinitialised.append(name)
                continue
            if mismatch:
                k, have, want = mismatch[0]
                raise ShapeError(f"{path}: cannot copy param {k} of layer '{name}': shape "
                                 f"{have} in the file, {want} in the net")
            for k, dataset in datasets.items():
                array = read_hdf5_array(dataset, f"{path}: data/{name}/{k}")
                layer.blobs[k].data[...] = backend.to_device(array)
    return reinitialised


def write_snapshot_hdf5(prefix, iteration, net, write_diff, history, current_step,
                        resume) -> tuple:
    """Write ``.caffemodel.h5`` and ``.solverstate.h5`` for ``iteration`` as Caffe's
    SnapshotToHDF5 and SnapshotSolverStateToHDF5; returns both paths."""
    model_path, state_path = snapshot_paths(prefix, iteration, hdf5=True)
    owl_logging.info(f"Snapshotting to HDF5 file {model_path}")
    model_bytes = save_weights_hdf5(net, model_path, write_diff)
    extra = json.dumps(dict(resume, learned_net_bytes=model_bytes))

    def fill(f):
        f.create_dataset("iter", data=np.int32(iteration))
        _write_c_string(f, "learned_net", model_path)
        f.create_dataset("current_step", data=np.int32(current_step))
        group = f.create_group("history")
        for i, array in enumerate(history):
            group.create_dataset(str(i), data=_host_float32(array))
        _write_c_string(f, "owlnet_resume", extra)
    owl_logging.info(f"Snapshotting solver state to HDF5 file {state_path}")
    atomic_write(state_path, _hdf5_bytes(fill))
    return model_path, state_path


def _read_solver_state_hdf5(path) -> caffe_pb2.SolverState:
    """An HDF5 solver state (Caffe's RestoreSolverStateFromHDF5 layout) as a SolverState."""
    path = os.fspath(path)
    h5py, f = _open_hdf5(path, "solver state")
    state = caffe_pb2.SolverState()
    with f:
        def dataset(name):
            item = f.get(name)
            if not isinstance(item, h5py.Dataset):
                raise SnapshotError(f"{path}: no dataset '{name}' (not a Caffe HDF5 solver "
                                    "state)")
            return item

        def number(name):
            item = dataset(name)
            if item.shape not in ((), (1,)) or item.dtype.kind not in "iu":
                raise SnapshotError(f"{path}: '{name}' is not one integer ({item.dtype}, shape "
                                    f"{item.shape})")
            return int(item[()].item() if item.shape == () else item[0])

        def text(name):
            item = dataset(name)
            value = item[()] if item.shape == () else None
            if not isinstance(value, bytes):
                raise SnapshotError(f"{path}: '{name}' is not a string ({item.dtype})")
            return value.split(b"\0", 1)[0]

        state.iter = number("iter")
        state.current_step = number("current_step")
        if "learned_net" in f:
            try:
                state.learned_net = text("learned_net").decode("utf-8")
            except UnicodeDecodeError:
                raise SnapshotError(f"{path}: corrupt weights file name in 'learned_net'") \
                    from None
        history = f.get("history")
        if not isinstance(history, h5py.Group):
            raise SnapshotError(f"{path}: no group 'history' (not a Caffe HDF5 solver state)")
        for i in range(len(history)):
            item = history.get(str(i))
            if not isinstance(item, h5py.Dataset):
                raise SnapshotError(f"{path}: history holds {len(history)} entries but no "
                                    f"dataset '{i}'")
            array_to_blobproto(read_hdf5_array(item, f"{path}: history blob #{i}"),
                               proto=state.history.add())
        if "owlnet_resume" in f:
            state.owlnet_resume = text("owlnet_resume")
    return state
