"""HDF5 layers: HDF5Data (rows of HDF5 files named in a list file) and HDF5Output (writes its
bottoms to an HDF5 file). Both need the h5py package (``pip install 'owlnet[hdf5]'``).
"""
from __future__ import annotations

import os
import tempfile
import weakref
from collections import OrderedDict

import numpy as np

from .. import backend
from .. import logging as owl_logging
from ..errors import ConfigError, DataError, ShapeError
from ..fileio import import_h5py, read_hdf5_array
from .base import Layer, SeededSource, register

#: How many files HDF5Data keeps in memory (the one being read and the one before it).
FILES_KEPT = 2
#: How many row permutations HDF5Data keeps (one per file visit, with shuffle).
ORDERS_KEPT = 4


def read_file_list(source: str, where: str) -> list[tuple[str, int]]:
    """The HDF5 paths a list file names, with their line numbers: whitespace-separated names
    (Caffe reads ``source_file >> name``), relative to the current directory as in Caffe."""
    try:
        with open(source, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise DataError(f"{where}: HDF5 file list '{source}' cannot be read: "
                        f"{exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: HDF5 file list '{source}' is not UTF-8 text "
                        f"({exc.reason})") from None
    entries = [(name, number) for number, line in enumerate(lines, start=1)
               for name in line.split()]
    if not entries:
        raise DataError(f"{where}: HDF5 file list '{source}' names no files")
    return entries


@register("HDF5Data")
class HDF5Data(Layer, SeededSource):
    """Rows of HDF5 datasets, one top per dataset of the same name: top[j][i] = float(D_j[row]).

    ``hdf5_data_param.source`` lists the files; every file holds a dataset per top, all with
    one row count (axis 0), of float or integer type (converted to float, gzip or not); each
    file is read whole when its rows are due. Rows form one endless stream: file after file
    in list order, row after row, wrapping around. With ``shuffle`` each pass over the files
    visits them in a new random order and each file's rows in a new random order (Caffe
    reshuffles its file list at every wrap and a file's rows at every load). No transform.

    Stream position s (shard rank r of P keeps s = r + P k, the rows Caffe's HDF5Data keeps
    for solver rank r of P) is pass e = s div T, offset s mod T into that pass (T rows in all),
    and the permutations of pass e are drawn from (layer seed, e): a batch is a pure function
    of (seed, batch index, shard), so ``state``/``restore_state`` resume at the same rows.
    """

    exact_bottoms = 0
    min_tops = 1
    is_data = True

    def layer_setup(self, bottom, top):
        self.where = f"layer '{self.name}' (HDF5Data)"
        if self.param.HasField("transform_param"):
            self.fail("does not transform data; remove transform_param", ConfigError)
        param = self.param.hdf5_data_param
        self.batch_size = int(param.batch_size)
        if self.batch_size <= 0:
            self.fail("hdf5_data_param.batch_size must be positive", ConfigError)
        if not param.source:
            self.fail("hdf5_data_param.source is not set", ConfigError)
        self.h5py = import_h5py(self.where)
        self.shuffle = bool(param.shuffle)
        self.files, rows, self.row_shapes = [], [], None
        for path, number in read_file_list(param.source, self.where):
            listed = f"{param.source}:{number}"
            count, shapes = self._inspect(path, listed)
            if self.row_shapes is None:
                self.row_shapes = shapes
            for name, have, want in zip(self.param.top, shapes, self.row_shapes):
                if have != want:
                    raise DataError(f"{self.where}: {listed}: dataset '{name}' of {path} has "
                                    f"rows of shape {have}, the first file's {want}")
            self.files.append((path, listed))
            rows.append(count)
        self.rows = np.array(rows, dtype=np.int64)
        self.total = int(self.rows.sum())
        self.seed = int(backend.rng().integers(1 << 63))
        self.rank, self.world = 0, 1
        self.batches_consumed = 0
        self._loaded: OrderedDict = OrderedDict()     # file index -> its datasets as float32
        self._orders: OrderedDict = OrderedDict()     # (pass, file) -> row permutation
        for blob, shape in zip(top, self.row_shapes):
            blob.reshape(self.batch_size, *shape)

    def _open(self, path, listed):
        try:
            return self.h5py.File(path, "r")
        except OSError as exc:
            raise DataError(f"{self.where}: {listed}: cannot read HDF5 file '{path}' "
                            f"({exc})") from None

    def _inspect(self, path, listed):
        """A file's row count and per-top row shapes, checked (metadata only)."""
        if not os.path.isfile(path):
            raise DataError(f"{self.where}: {listed}: HDF5 file '{path}' not found (paths are "
                            f"relative to the current directory {os.getcwd()})")
        with self._open(path, listed) as handle:
            shapes = []
            for name in self.param.top:
                dataset = handle.get(name)
                if not isinstance(dataset, self.h5py.Dataset):
                    raise DataError(f"{self.where}: {listed}: HDF5 file '{path}' has no dataset "
                                    f"'{name}' for top '{name}' (datasets: "
                                    f"{', '.join(handle) or 'none'})")
                if dataset.dtype.kind not in "fiu" or dataset.ndim < 1:
                    raise DataError(f"{self.where}: {listed}: dataset '{name}' of '{path}' has "
                                    f"type {dataset.dtype} and shape {dataset.shape}; a top "
                                    "needs numbers with at least one axis")
                shapes.append(dataset.shape)
        count = shapes[0][0]
        for name, shape in zip(self.param.top, shapes):
            if shape[0] != count:
                raise DataError(f"{self.where}: {listed}: in '{path}' dataset '{name}' has "
                                f"{shape[0]} rows, dataset '{self.param.top[0]}' {count}; all "
                                "of a file's datasets need the same number of rows")
        if count == 0:
            raise DataError(f"{self.where}: {listed}: HDF5 file '{path}' has no rows")
        return count, [tuple(shape[1:]) for shape in shapes]

    # -- life cycle -----------------------------------------------------------------------
    def reshape(self, bottom, top):
        pass  # forward shapes the tops to each batch

    def forward(self, bottom, top):
        files, rows = self.locate(self.stream_positions(self.batches_consumed))
        for j, (blob, shape) in enumerate(zip(top, self.row_shapes)):
            values = np.empty((len(files), *shape), dtype=np.float32)
            for index in np.unique(files).tolist():
                chosen = files == index
                values[chosen] = self._file_arrays(index)[j][rows[chosen]]
            blob.reshape(values.shape)
            blob.data[...] = backend.to_device(values)
        self.batches_consumed += 1

    def backward(self, top, propagate_down, bottom):
        pass

    # -- the stream -----------------------------------------------------------------------
    def stream_positions(self, batch_index: int) -> np.ndarray:
        """Global stream positions of the rows of this shard's batch ``batch_index``."""
        local = batch_index * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        return self.rank + self.world * local

    def locate(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """The (file index, row) each stream position reads."""
        passes, offsets = np.divmod(np.asarray(positions, dtype=np.int64), self.total)
        files = np.empty_like(offsets)
        rows = np.empty_like(offsets)
        for pass_index in np.unique(passes).tolist():
            here = passes == pass_index
            order = self._file_order(pass_index)
            ends = np.cumsum(self.rows[order])
            slots = np.searchsorted(ends, offsets[here], side="right")
            files[here] = order[slots]
            rows[here] = offsets[here] - (ends[slots] - self.rows[order][slots])
            if self.shuffle:
                for index in np.unique(files[here]).tolist():
                    chosen = here & (files == index)
                    rows[chosen] = self._row_order(pass_index, index)[rows[chosen]]
        return files, rows

    def _file_order(self, pass_index: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.files))
        return np.random.default_rng([self.seed, 1, pass_index]).permutation(len(self.files))

    def _row_order(self, pass_index: int, index: int) -> np.ndarray:
        key = (pass_index, index)
        order = self._orders.pop(key, None)
        if order is None:
            generator = np.random.default_rng([self.seed, 2, pass_index, index])
            order = generator.permutation(int(self.rows[index]))
        self._orders[key] = order
        while len(self._orders) > ORDERS_KEPT:
            self._orders.popitem(last=False)
        return order

    def _file_arrays(self, index: int) -> list:
        """File ``index``'s datasets (one per top), read whole as float32 and kept a while."""
        arrays = self._loaded.pop(index, None)
        if arrays is None:
            path, listed = self.files[index]
            with self._open(path, listed) as handle:
                arrays = []
                for name, shape in zip(self.param.top, self.row_shapes):
                    dataset = handle.get(name)
                    where = f"{self.where}: {listed}: dataset '{name}' of '{path}'"
                    expected = (int(self.rows[index]), *shape)
                    if not isinstance(dataset, self.h5py.Dataset) or dataset.shape != expected:
                        raise DataError(f"{where} changed since the layer was set up (expected "
                                        f"shape {expected})")
                    arrays.append(read_hdf5_array(dataset, where, DataError))
        self._loaded[index] = arrays
        while len(self._loaded) > FILES_KEPT:
            self._loaded.popitem(last=False)
        return arrays

    # -- resume and sharding (as the Data layers) -------------------------------------------
    def resume(self, batches: int, seed: int) -> None:
        """Serve batch ``batches`` next with ``seed``: the same rows in the same order."""
        self.batches_consumed = batches
        if seed != self.seed:
            self.seed = seed
            self._orders.clear()

    def shard(self, index: int, count: int) -> None:
        """Read stream positions ``index, index + count, ...``, ``batch_size / count`` of them
        per batch (the net's batch_size is the global batch), as the Data layers do."""
        if not 0 <= index < count:
            self.fail(f"shard index {index} is not in [0, {count})", ConfigError)
        batch_size = int(self.param.hdf5_data_param.batch_size)
        if batch_size % count:
            self.fail(f"batch_size {batch_size} is not divisible by the {count} slices; the "
                      "batch_size in the net is the global batch", ConfigError)
        self.batch_size = batch_size // count
        self.rank, self.world = int(index), int(count)

    def close(self) -> None:
        """Drop the files held in memory (no file stays open between batches)."""
        self._loaded.clear()


def _legacy_4d(array, name: str, where: str) -> np.ndarray:
    """``array`` as Caffe's num x channels x height x width (missing axes are 1)."""
    if array.ndim > 4:
        raise ShapeError(f"{where}: bottom '{name}' has shape {array.shape}; HDF5Output writes "
                         "blobs of at most 4 axes (num, channels, height, width)")
    return array.reshape(array.shape + (1,) * (4 - array.ndim))


def _publish(output: dict) -> None:
    """Close the temporary file and rename it to the output name (fsync'ed), once."""
    handle = output.pop("handle", None)
    if handle is None:
        return
    handle.close()
    tmp, path = output["tmp"], output["path"]
    try:
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise DataError(f"{output['where']}: cannot write HDF5 output file {path}: "
                        f"{exc.strerror or exc}") from None
    owl_logging.info(f"Saved {output['rows']} rows to HDF5 file {path}")


@register("HDF5Output")
class HDF5Output(Layer):
    """Writes its bottoms to ``hdf5_output_param.file_name``: datasets "data" = bottom[0] and
    "label" = bottom[1], float32, each as num x channels x height x width, as Caffe writes them.

    Every forward appends its rows (Caffe's layer writes one batch; a second forward fails
    there). The rows go to a temporary file beside ``file_name``, flushed at each forward,
    which replaces ``file_name`` whole (fsync and rename) when the layer is closed: by
    ``Net.close()``, ``close()``, or when the net is garbage-collected (Caffe writes the file
    when the layer is destroyed). A run that dies first leaves ``file_name`` as it was.
    """

    exact_bottoms = 2
    exact_tops = 0

    def layer_setup(self, bottom, top):
        self.where = f"layer '{self.name}' (HDF5Output)"
        path = self.param.hdf5_output_param.file_name
        if not path:
            self.fail("hdf5_output_param.file_name is not set", ConfigError)
        h5py = import_h5py(self.where)
        folder = os.path.dirname(os.path.abspath(path))
        try:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".",
                                       suffix=".tmp")
            os.close(fd)
            handle = h5py.File(tmp, "w")
        except OSError as exc:
            raise DataError(f"{self.where}: cannot write HDF5 output file {path}: "
                            f"{exc.strerror or exc}") from None
        self._output = {"handle": handle, "tmp": tmp, "path": path, "where": self.where,
                        "rows": 0}
        self._finalizer = weakref.finalize(self, _publish, self._output)

    def reshape(self, bottom, top):
        if bottom[0].shape[:1] != bottom[1].shape[:1]:
            self.fail(f"data blob '{bottom[0].name}' {bottom[0].shape} and label blob "
                      f"'{bottom[1].name}' {bottom[1].shape} must have the same batch size")

    def forward(self, bottom, top):
        handle = self._output.get("handle")
        if handle is None:
            raise DataError(f"{self.where}: forward after close (the file is written)")
        rows = {}
        for dataset_name, blob in zip(("data", "label"), bottom):
            values = _legacy_4d(np.asarray(backend.to_host(blob.data), dtype=np.float32),
                                blob.name, self.where)
            dataset = handle.get(dataset_name)
            if dataset is not None and dataset.shape[1:] != values.shape[1:]:
                self.fail(f"bottom '{blob.name}' rows of shape {values.shape[1:]} cannot be "
                          f"appended to dataset '{dataset_name}' of rows {dataset.shape[1:]}")
            rows[dataset_name] = values
        for dataset_name, values in rows.items():
            dataset = handle.get(dataset_name)
            if dataset is None:
                handle.create_dataset(dataset_name, data=values, chunks=True,
                                      maxshape=(None, *values.shape[1:]))
            else:
                start = dataset.shape[0]
                dataset.resize(start + values.shape[0], axis=0)
                dataset[start:] = values
        handle.flush()
        self._output["rows"] += rows["data"].shape[0]

    def backward(self, top, propagate_down, bottom):
        pass

    def close(self) -> None:
        """Write ``file_name`` now (the rows so far); later forwards are an error."""
        self._finalizer()
