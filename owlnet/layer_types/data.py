"""Data input layers: Data (LMDB of Datums), ImageData (image list file) and MemoryData.

Data and ImageData read examples as one endless stream. Example ``k`` of a shard's stream is
global stream position ``s = rank + world * k`` (Caffe's multi-GPU rule: rank r of P keeps the
records whose position is r modulo P), and batch ``b`` holds the shard's examples
``b * batch_size ... (b + 1) * batch_size - 1``. So the union of the P shards' batch ``b`` is
exactly the single-process batch ``b`` with P times the batch size. Crops and mirrors depend on
(layer seed, s) only; a batch is therefore a pure function of (seed, batch index, shard), which
makes prefetching reproducible and lets ``restore_state`` resume at the same batch.

A record that cannot be decoded stops training with a DataError naming its key or file, unless
the environment variable OWLNET_SKIP_BAD_RECORDS=1 is set (``net_trainer --skip-bad-records``):
then its slot takes the next good record of the stream (so batches stay a pure function of
their index), and each skip is counted in ``records_skipped`` and logged with the running count.
"""
from __future__ import annotations

import os
import weakref
from typing import NamedTuple

import numpy as np

from .. import backend
from .. import logging as owl_logging
from ..data.datum import (describe_key, datum_to_array, image_to_chw, load_image, parse_datum,
                          read_image_list, resolve_list_path)
from ..data.db import LMDBReader
from ..data.prefetch import DEFAULT_DEPTH, Prefetcher
from ..data.staging import PinnedUpload
from ..data.transform import DataTransformer
from ..errors import ConfigError, DataError, SnapshotError
from ..proto import caffe_pb2
from .base import DataSource, Layer, SeededSource, register


class Batch(NamedTuple):
    """One prepared batch on the host: cropped examples plus what stage 2 needs."""
    data: np.ndarray       # N x C x h x w, uint8 (or float32 for float Datums)
    labels: np.ndarray     # N
    h_offs: np.ndarray     # N, crop row offsets
    w_offs: np.ndarray     # N, crop column offsets
    mirrored: np.ndarray   # N, bool


def _release(resources: dict) -> None:
    prefetcher = resources.pop("prefetcher", None)
    if prefetcher is not None:
        prefetcher.close()
    reader = resources.pop("reader", None)
    if reader is not None:
        reader.close()


class _PrefetchingData(Layer, SeededSource):
    """Shared machinery: seed, shard, transformer, background prefetch, state for resume.

    A subclass provides ``open_source()``, ``read_records(stream_positions)`` (in order, on the
    prefetch thread) and ``decode(record) -> (C x H x W array, label, key)`` (on the decode pool).
    """

    exact_bottoms = 0
    min_tops = 1
    max_tops = 2
    is_data = True
    prefetch_depth = DEFAULT_DEPTH

    def layer_setup(self, bottom, top):
        source_param = self.source_param()
        self.where = f"layer '{self.name}' ({self.type})"
        self.batch_size = int(source_param.batch_size)
        if self.batch_size <= 0:
            self.fail("batch_size must be positive", ConfigError)
        # Legacy scale/mean_file/crop_size/mirror of data_param are moved here by
        # config.upgrade_net, as Caffe's UpgradeNetAsNeeded; the layer reads transform_param only.
        self.transformer = DataTransformer(self.param.transform_param, self.phase,
                                           where=self.where)
        self.seed = int(backend.rng().integers(1 << 63))
        self.rank, self.world = 0, 1
        self.batches_consumed = 0
        self.skip_bad_records = os.environ.get("OWLNET_SKIP_BAD_RECORDS", "") not in ("", "0")
        self.records_skipped = 0
        self._resources: dict = {}
        self._pinned = None                 # PinnedUpload, on the GPU
        self._finalizer = weakref.finalize(self, _release, self._resources)
        self.open_source()
        self.skip = self._draw_skip(int(source_param.rand_skip))
        first = self._prepare((0, self.read_records(np.zeros(1, dtype=np.int64))[0]))
        if isinstance(first, DataError):
            first = self._substitute(0, first)
        top[0].reshape(self.batch_size, *first[0].shape)
        if len(top) > 1:
            top[1].reshape(self.batch_size)

    def source_param(self):
        raise NotImplementedError

    def _draw_skip(self, rand_skip: int) -> int:
        """Caffe's rand_skip: start the stream at a random record below ``rand_skip``."""
        if rand_skip == 0:
            return 0
        return int(np.random.default_rng([self.seed, 1]).integers(rand_skip))

    # -- life cycle -----------------------------------------------------------------------
    def reshape(self, bottom, top):
        pass  # forward shapes the tops to each batch

    def forward(self, bottom, top):
        try:
            batch = self._prefetcher().next()
        except BaseException:
            # The failed prefetcher is closed; the next forward starts a new one at the same
            # batch, so a caught DataError is raised again rather than a closed-queue error.
            self._stop_prefetch()
            raise
        top[0].reshape(batch.data.shape)
        data = batch.data                   # uint8 crops: float, mean and scale on the device
        if backend.in_device_scope():
            self._pinned = self._pinned or PinnedUpload()
            data = self._pinned.upload(data)
        self.transformer.normalize(data, batch.h_offs, batch.w_offs, batch.mirrored, top[0].data)
        if len(top) > 1:
            top[1].reshape(len(batch.labels))
            top[1].data[...] = backend.to_device(batch.labels)
        self.batches_consumed += 1

    def backward(self, top, propagate_down, bottom):
        pass

    # -- resume and sharding ----------------------------------------------------------------
    def resume(self, batches: int, seed: int) -> None:
        """Serve batch ``batches`` next with ``seed``: the same batches, crops and mirrors."""
        self._stop_prefetch()
        self.batches_consumed = batches
        if seed != self.seed:
            self.seed = seed
            self.skip = self._draw_skip(int(self.source_param().rand_skip))

    def shard(self, index: int, count: int) -> None:
        """Read stream positions ``index, index + count, ...``, ``batch_size / count`` of them
        per batch (the net's batch_size is the global batch)."""
        if not 0 <= index < count:
            self.fail(f"shard index {index} is not in [0, {count})", ConfigError)
        batch_size = int(self.source_param().batch_size)
        if batch_size % count:
            self.fail(f"batch_size {batch_size} is not divisible by the {count} slices; the "
                      "batch_size in the net is the global batch", ConfigError)
        self._stop_prefetch()
        self.batch_size = batch_size // count
        self.rank, self.world = int(index), int(count)

    def close(self) -> None:
        """Stop the prefetch threads and close the source."""
        self._finalizer()

    # -- batches --------------------------------------------------------------------------
    def stream_positions(self, batch_index: int) -> np.ndarray:
        """Global stream positions of the examples of this shard's batch ``batch_index``."""
        local = batch_index * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        return self.rank + self.world * local

    def _prefetcher(self) -> Prefetcher:
        prefetcher = self._resources.get("prefetcher")
        if prefetcher is None:
            layer = weakref.ref(self)

            def produce(batch_index, parallel_map):
                owner = layer()
                if owner is None:
                    raise RuntimeError("data layer was released")
                return owner.make_batch(batch_index, parallel_map)

            prefetcher = Prefetcher(produce, start=self.batches_consumed,
                                    depth=self.prefetch_depth, name=f"prefetch-{self.name}")
            self._resources["prefetcher"] = prefetcher
        return prefetcher

    def _stop_prefetch(self) -> None:
        prefetcher = self._resources.pop("prefetcher", None)
        if prefetcher is not None:
            prefetcher.close()

    def make_batch(self, batch_index: int, parallel_map=None) -> Batch:
        """Batch ``batch_index`` of this shard, stage 1 only (decoded, cropped, mirrored)."""
        positions = self.stream_positions(batch_index)
        records = self.read_records(positions)
        jobs = list(zip(positions.tolist(), records))
        parallel_map = parallel_map or (lambda fn, items: [fn(item) for item in items])
        items = parallel_map(self._prepare, jobs)
        items = [self._substitute(position, item) if isinstance(item, DataError) else item
                 for position, item in zip(positions.tolist(), items)]
        shape = items[0][0].shape
        for example, _, key, *_ in items:
            if example.shape != shape:
                raise DataError(f"{self.where}: record '{describe_key(key)}' gives shape "
                                f"{example.shape}, the batch's first record {shape}; all records "
                                f"of a batch must have one size (set crop_size or resize)")
        return Batch(data=np.stack([item[0] for item in items]),
                     labels=np.array([item[1] for item in items], dtype=np.float64),
                     h_offs=np.array([item[3] for item in items], dtype=np.int64),
                     w_offs=np.array([item[4] for item in items], dtype=np.int64),
                     mirrored=np.array([item[5] for item in items], dtype=bool))

    def _prepare(self, job):
        """``(cropped, label, key, h_off, w_off, mirrored)``; with skip_bad_records, a bad
        record's DataError is returned instead of raised (``make_batch`` replaces it)."""
        position, record = job
        try:
            example, label, key = self.decode(record)
            cropped, h_off, w_off, mirrored = self.transformer.crop_mirror(example, self.seed,
                                                                            position, key)
        except DataError as exc:
            if not self.skip_bad_records:
                raise
            return exc
        return cropped, label, key, h_off, w_off, mirrored

    def _substitute(self, position: int, error: DataError):
        """The prepared next good record after stream ``position``, counting and logging each
        bad one (on the prefetch thread, which alone reads the source)."""
        for offset in range(1, self.record_count() + 1):
            self.records_skipped += 1
            owl_logging.warning(f"{self.where}: skipped a bad record ({self.records_skipped} "
                                f"skipped so far): {error}")
            record = self.read_records(np.array([position + offset], dtype=np.int64))[0]
            item = self._prepare((position, record))
            if not isinstance(item, DataError):
                return item
            error = item
        raise DataError(f"{self.where}: no record of the source can be decoded; last: {error}")


@register("Data")
class Data(_PrefetchingData):
    """Batches of Datums from an LMDB in key order, wrapping around: top[0] = transform(x), top[1] = label.

    Record of stream position s: (skip + s) mod count, skip drawn below rand_skip. transform is
    Caffe's: crop (random at TRAIN, centred at TEST), mirror, (x - mean) * scale.
    """

    def source_param(self):
        return self.param.data_param

    def open_source(self):
        param = self.param.data_param
        if param.HasField("backend") and param.backend != caffe_pb2.DataParameter.LMDB:
            self.fail("only the LMDB backend is supported (backend: LMDB); convert LEVELDB data "
                      "with convert_imageset --backend lmdb", ConfigError)
        if not param.source:
            self.fail("data_param.source is not set", ConfigError)
        self.prefetch_depth = int(param.prefetch) or DEFAULT_DEPTH
        self._resources["reader"] = LMDBReader(param.source)

    def record_count(self) -> int:
        return len(self._resources["reader"])

    def read_records(self, positions):
        reader = self._resources["reader"]
        return [reader.get(self.skip + int(position)) for position in positions]

    def decode(self, record):
        key, value = record
        datum = parse_datum(value, key)
        example = datum_to_array(datum, key, self.transformer.force_color,
                                 self.transformer.force_gray)
        return example, datum.label, key


@register("ImageData")
class ImageData(_PrefetchingData):
    """Batches of images named in a list file ("path label" per line): top[0] = transform(image), top[1] = label.

    Images are read as BGR (or gray when is_color is false), resized bilinearly to
    new_height x new_width when both are set. With shuffle, epoch e visits the list in a
    permutation drawn from (seed, e), as Caffe reshuffles every epoch.
    """

    def source_param(self):
        return self.param.image_data_param

    def open_source(self):
        param = self.param.image_data_param
        if (param.new_height > 0) != (param.new_width > 0):
            self.fail("new_height and new_width must be set together", ConfigError)
        if not param.source:
            self.fail("image_data_param.source is not set", ConfigError)
        entries = read_image_list(param.source)
        if not entries:
            raise DataError(f"{self.where}: image list '{param.source}' names no images")
        root = param.root_folder
        self.images = [(resolve_list_path(root, name, param.source, number), label)
                       for name, label, number in entries]
        self._orders: dict[int, np.ndarray] = {}

    def _epoch_order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            order = np.random.default_rng([self.seed, 2, epoch]).permutation(len(self.images))
            if len(self._orders) >= 2:  # a cache: a batch mostly touches one or two epochs
                del self._orders[min(self._orders)]
            self._orders[epoch] = order
        return order

    def record_count(self) -> int:
        return len(self.images)

    def read_records(self, positions):
        count = len(self.images)
        shuffle = self.param.image_data_param.shuffle
        records = []
        for position in (self.skip + positions).tolist():
            index = position % count
            if shuffle:
                index = int(self._epoch_order(position // count)[index])
            records.append(self.images[index])
        return records

    def decode(self, record):
        path, label = record
        param = self.param.image_data_param
        image = load_image(path, param.is_color, param.new_height, param.new_width)
        return image_to_chw(image), label, path

    def restore_state(self, state: dict) -> None:
        super().restore_state(state)
        self._orders = {}


@register("MemoryData")
class MemoryData(Layer, DataSource):
    """Serves arrays given by ``set_input_arrays(data, labels)``: top[0] = data[p:p+N], top[1] = labels[p:p+N].

    p starts at 0 and advances by N = batch_size modulo the number of examples (a multiple of N).
    No transformation is applied, as with pycaffe's set_input_arrays.
    """

    exact_bottoms = 0
    exact_tops = 2
    is_data = True

    def layer_setup(self, bottom, top):
        param = self.param.memory_data_param
        self.shape = (int(param.batch_size), int(param.channels), int(param.height),
                      int(param.width))
        if min(self.shape) <= 0:
            self.fail(f"memory_data_param needs positive batch_size, channels, height and width, "
                      f"got {self.shape}", ConfigError)
        self.data = None
        self.labels = None
        self.batches_consumed = 0
        top[0].reshape(self.shape)
        top[1].reshape(self.shape[0])

    def set_input_arrays(self, data, labels) -> None:
        """Use ``data`` (n x C x H x W) and ``labels`` (n values); n must be a multiple of batch_size."""
        data = np.asarray(data)
        labels = np.asarray(labels).reshape(-1)
        if data.ndim != 4 or data.shape[1:] != self.shape[1:]:
            self.fail(f"data of shape {data.shape} does not match n x {self.shape[1:]}")
        if labels.shape[0] != data.shape[0]:
            self.fail(f"{labels.shape[0]} labels for {data.shape[0]} examples")
        if data.shape[0] == 0 or data.shape[0] % self.shape[0]:
            self.fail(f"the number of examples ({data.shape[0]}) must be a positive multiple of "
                      f"batch_size {self.shape[0]}")
        self.data = data
        self.labels = labels
        self.batches_consumed = 0

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        if self.data is None:
            raise DataError(f"layer '{self.name}' (MemoryData): call set_input_arrays before forward")
        n = self.shape[0]
        start = (self.batches_consumed * n) % self.data.shape[0]
        top[0].data[...] = backend.to_device(self.data[start:start + n])
        top[1].data[...] = backend.to_device(self.labels[start:start + n])
        self.batches_consumed += 1

    def backward(self, top, propagate_down, bottom):
        pass

    def state(self) -> dict:
        return {"batches": self.batches_consumed}

    def restore_state(self, state: dict) -> None:
        try:
            self.batches_consumed = int(state["batches"])
        except (KeyError, TypeError, ValueError):
            raise SnapshotError(f"layer '{self.name}' (MemoryData): data state {state!r} needs "
                                f"an integer 'batches'") from None
