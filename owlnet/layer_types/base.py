"""The layer life cycle and the registry that maps Caffe type strings to layer classes.

A layer reads its settings from its ``LayerParameter`` (the proto is the schema) and lives
through Caffe's cycle:

* ``setup(bottom, top)`` once: read parameters, check bottom/top counts, create ``self.blobs``
  (the learnable parameters, filled by their fillers);
* ``reshape(bottom, top)`` whenever input shapes may have changed: shape the tops;
* ``forward(bottom, top)``: compute ``top[i].data`` from ``bottom[j].data``;
* ``backward(top, propagate_down, bottom)``: from ``top[i].diff`` write ``bottom[j].diff``
  where ``propagate_down[j]`` is true (overwriting), and ADD the parameter gradients into
  ``self.blobs[k].diff`` where ``self.param_propagate_down[k]`` is true (accumulating, so
  shared parameters and ``iter_size`` sum their gradients; the solver clears them).

A layer that reads its batches from a source (an LMDB, an image list, arrays) is also a
:class:`DataSource`: the net saves and restores its position (``state``/``restore_state``)
for exact resume, and data-parallel training reads each batch in shares (``shard``).
"""
from __future__ import annotations

import abc
import difflib

from .. import backend, fillers
from ..blob import Blob
from ..errors import ConfigError, ShapeError, SnapshotError

_REGISTRY: dict[str, type] = {}


def register(*type_names: str):
    """Class decorator: register a layer class under one or more Caffe type strings."""
    def wrap(cls):
        for name in type_names:
            if name in _REGISTRY:
                raise RuntimeError(f"layer type {name!r} registered twice")
            _REGISTRY[name] = cls
        if getattr(cls, "type", None) is None:
            cls.type = type_names[0]
        return cls
    return wrap


def known_types() -> list[str]:
    return sorted(_REGISTRY)


def layer_class(type_name: str, layer_name: str = "?"):
    try:
        return _REGISTRY[type_name]
    except KeyError:
        close = difflib.get_close_matches(type_name, _REGISTRY, n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"layer '{layer_name}': unknown layer type '{type_name}'{hint} "
                          f"(known types: {', '.join(known_types())})") from None


def create_layer(layer_param, phase):
    """Instantiate the registered class for ``layer_param.type``."""
    return layer_class(layer_param.type, layer_param.name)(layer_param, phase)


class Layer:
    """Base class: bottom/top count checks, parameter blobs and the default loss weight."""

    type: str | None = None
    # Bottom/top count rules (None: no rule), checked by setup().
    exact_bottoms: int | None = None
    min_bottoms: int | None = None
    max_bottoms: int | None = None
    exact_tops: int | None = None
    min_tops: int | None = None
    max_tops: int | None = None
    equal_bottom_top = False
    # Loss layers get loss_weight 1 on their first top unless the prototxt says otherwise.
    is_loss = False
    # Data/input layers: their tops need no backward.
    is_data = False
    # The Net sets this False on a layer that never runs backward (no loss depends on it and
    # no force_backward): its forward may then skip keeping what only backward reads.
    runs_backward = True

    def __init__(self, layer_param, phase):
        self.param = layer_param
        self.name = layer_param.name
        self.phase = phase
        self.blobs: list[Blob] = []
        self.param_propagate_down: list[bool] = []

    # -- life cycle -----------------------------------------------------------------------
    def setup(self, bottom, top):
        """Check counts, then do the layer's one-time set-up (``layer_setup``)."""
        self.check_counts(bottom, top)
        self.layer_setup(bottom, top)
        if len(self.param_propagate_down) != len(self.blobs):
            self.param_propagate_down = [True] * len(self.blobs)

    def layer_setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        raise NotImplementedError

    def forward(self, bottom, top):
        raise NotImplementedError

    def backward(self, top, propagate_down, bottom):
        raise NotImplementedError

    def allow_force_backward(self, bottom_index: int) -> bool:
        return True

    # -- helpers --------------------------------------------------------------------------
    def check_counts(self, bottom, top):
        def check(kind, n, exact, lo, hi):
            if exact is not None and n != exact:
                self.fail(f"takes exactly {exact} {kind} blob(s), got {n}", ConfigError)
            if lo is not None and n < lo:
                self.fail(f"takes at least {lo} {kind} blob(s), got {n}", ConfigError)
            if hi is not None and n > hi:
                self.fail(f"takes at most {hi} {kind} blob(s), got {n}", ConfigError)
        check("bottom", len(bottom), self.exact_bottoms, self.min_bottoms, self.max_bottoms)
        check("top", len(top), self.exact_tops, self.min_tops, self.max_tops)
        if self.equal_bottom_top and len(bottom) != len(top):
            self.fail(f"needs as many tops as bottoms, got {len(bottom)} bottoms and "
                      f"{len(top)} tops", ConfigError)

    def zero_bottom_diffs(self, propagate_down, bottom):
        """The backward of an output that is constant in the bottoms (or piecewise constant,
        as Accuracy): dx = 0 for every bottom that asks for a gradient."""
        for b, down in zip(bottom, propagate_down):
            if down:
                b.diff[...] = 0

    def fail(self, message: str, kind=ShapeError):
        """Raise ``kind`` with a message that names this layer and its type."""
        raise kind(f"layer '{self.name}' ({self.type}): {message}")

    def canonical_axis(self, blob, axis: int) -> int:
        """``axis`` of ``blob`` counted from 0 (negative counts from the end); a ShapeError
        naming this layer when the blob has no such axis."""
        n = blob.num_axes
        if not -n <= axis < n:
            self.fail(f"axis {axis} out of range for blob '{blob.name}' of shape {blob.shape}")
        return axis % n

    def add_param(self, shape, filler_param) -> Blob:
        """Create a learnable parameter blob filled by ``filler_param``."""
        blob = Blob(shape, name=f"{self.name}.{len(self.blobs)}")
        blob.data[...] = backend.to_device(fillers.fill(filler_param, blob.shape, blob.data.dtype,
                                                        where=f"layer '{self.name}'"))
        self.blobs.append(blob)
        return blob

    def __repr__(self):
        return f"<{type(self).__name__} '{self.name}'>"


class DataSource(abc.ABC):
    """Mixin of the layers that read batches from a source (Caffe's data layers).

    ``state()`` is where the layer stands (JSON-serialisable; written in owlnet's snapshots)
    and ``restore_state(state)`` continues from it. ``shard(index, count)`` makes the layer
    read share ``index`` of ``count`` of every batch: the ``batch_size`` written in the net is
    the global batch, each share holds ``batch_size / count`` of its examples, and the
    ``count`` shares of batch ``b`` together are the unsharded batch ``b``. ``close()`` stops
    background readers.
    """

    name: str
    type: str | None

    @abc.abstractmethod
    def state(self) -> dict:
        """Where the layer stands in its source."""

    @abc.abstractmethod
    def restore_state(self, state: dict) -> None:
        """Continue from ``state()`` of an earlier run (SnapshotError when malformed)."""

    def shard(self, index: int, count: int) -> None:
        """Read share ``index`` of ``count`` of every batch (ConfigError when impossible);
        a source that cannot be split refuses any ``count`` above 1."""
        if count != 1:
            raise ConfigError(f"layer '{self.name}' ({self.type}) cannot be read in shares "
                              f"over {count} slices")

    def close(self) -> None:
        """Stop background readers and close the source (nothing by default)."""


class SeededSource(DataSource):
    """A DataSource whose place is (batches consumed, seed): the batch ``b`` it serves is a
    function of ``b``, the seed and the shard alone, so those two numbers are its whole
    state. Subclasses set ``batches_consumed`` and ``seed`` and implement ``resume``."""

    batches_consumed: int
    seed: int

    def state(self) -> dict:
        """Where the consumer is: batches used so far and the layer's seed (JSON-serialisable)."""
        return {"batches": self.batches_consumed, "seed": self.seed}

    def restore_state(self, state: dict) -> None:
        """Continue from ``state()`` of an earlier run: the same batches in the same order."""
        try:
            batches, seed = int(state["batches"]), int(state["seed"])
        except (KeyError, TypeError, ValueError):
            raise SnapshotError(f"layer '{self.name}' ({self.type}): data state {state!r} needs "
                                "integer 'batches' and 'seed'") from None
        if batches < 0:
            raise SnapshotError(f"layer '{self.name}' ({self.type}): data state has negative "
                                f"'batches' {batches}")
        self.resume(batches, seed)

    @abc.abstractmethod
    def resume(self, batches: int, seed: int) -> None:
        """Serve batch ``batches`` next, drawing with ``seed`` (both already checked)."""
