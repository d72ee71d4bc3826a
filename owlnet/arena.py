"""The parameter arena: every learnable blob's data and diff as views into two flat buffers.

A net's learnable parameters (``Net.learnable_params``, with their ``lr_mult`` and
``decay_mult``) are laid out in groups of equal (lr_mult, decay_mult): the groups that learn
(lr_mult != 0) first, in the order they first appear, then those that do not. Within a group,
parameters run in the order backward completes them (the owning layer, last layer first), so
the parameters one layer's backward completes form one contiguous range per group (a
reduction bucket). Each blob's ``data`` and ``diff`` are views of its range (``Blob.bind``),
and so are the views of parameters shared with a different shape (PERMISSIVE sharing).

So an update rule works on a group with a few whole-buffer operations, the update history is
buffers of the same layout, and a data-parallel reduction works on ranges of ``diff``.
Parameter blobs must keep their element count after set-up (``Blob.reshape`` to another count
would give the blob new arrays outside the arena).
"""
from __future__ import annotations

from typing import NamedTuple

from . import backend


class ParamGroup(NamedTuple):
    """Range ``[lo, hi)`` of the arena holding the parameters of one (lr_mult, decay_mult)."""
    lr_mult: float
    decay_mult: float
    lo: int
    hi: int


class ParamArena:
    """Flat ``data`` and ``diff`` buffers holding ``blobs`` (with their multipliers and the
    index of the layer owning each); ``views``: (blob, index, shape) of further blobs that
    show parameter ``index`` in another shape. The blobs' current values are copied in."""

    def __init__(self, blobs, lr_mults, decay_mults, layers, views=()):
        self.blobs = list(blobs)
        self.lr_mults = [float(m) for m in lr_mults]
        keys = list(dict.fromkeys(zip(self.lr_mults, (float(m) for m in decay_mults))))
        keys.sort(key=lambda key: key[0] == 0)           # learning groups first (stable)
        self.groups, self.segments = [], [None] * len(self.blobs)
        self._group_of = [0] * len(self.blobs)
        offset = 0
        for lr_mult, decay_mult in keys:
            members = [i for i in range(len(self.blobs))
                       if (self.lr_mults[i], float(decay_mults[i])) == (lr_mult, decay_mult)]
            members.sort(key=lambda i: -layers[i])
            lo = offset
            for i in members:
                self._group_of[i] = len(self.groups)
                self.segments[i] = (offset, offset + self.blobs[i].count)
                offset += self.blobs[i].count
            self.groups.append(ParamGroup(lr_mult, decay_mult, lo, offset))
        self.learned = [group for group in self.groups if group.lr_mult != 0]
        self.learned_size = self.learned[-1].hi if self.learned else 0
        self._layers = list(layers)
        self._entries = [(blob, i, blob.shape) for i, blob in enumerate(self.blobs)]
        self._entries += [(blob, i, tuple(shape)) for blob, i, shape in views]
        if self.blobs:
            xp, dtype = backend.array_module(self.blobs[0].data), self.blobs[0].data.dtype
        else:
            xp, dtype = backend.xp(), backend.dtype()
        self.data = xp.zeros(offset, dtype=dtype)
        self.diff = xp.zeros(offset, dtype=dtype)
        for blob, (lo, hi) in zip(self.blobs, self.segments):
            self.data[lo:hi] = blob.data.ravel()
            self.diff[lo:hi] = blob.diff.ravel()
        self._bind(self.data)

    @property
    def size(self) -> int:
        return int(self.data.size)

    def _bind(self, learned_data) -> None:
        """Point every blob at its range: data of learning groups in ``learned_data``."""
        for blob, i, shape in self._entries:
            lo, hi = self.segments[i]
            data = learned_data if self.lr_mults[i] != 0 else self.data
            blob.bind(data[lo:hi].reshape(shape), self.diff[lo:hi].reshape(shape))

    def share_learned_data(self, other: "ParamArena") -> None:
        """Use ``other``'s data for the parameters that learn (an arena of the same net on the
        same device: data-parallel slices); the others keep their own, as do the diffs."""
        self._bind(other.data)

    def views(self, buffer) -> list:
        """Views of a buffer of the arena's layout, one per parameter, in blob order."""
        return [buffer[lo:hi].reshape(blob.shape)
                for blob, (lo, hi) in zip(self.blobs, self.segments)]

    def buckets(self) -> dict:
        """Layer index -> the ranges (one per learning group) of the parameters that the
        backward of that layer completes."""
        buckets: dict = {}
        for i, (lo, hi) in enumerate(self.segments):
            g = self._group_of[i]
            if self.groups[g].lr_mult == 0 or lo == hi:
                continue
            spans = buckets.setdefault(self._layers[i], {})
            start, end = spans.get(g, (lo, hi))
            spans[g] = (min(start, lo), max(end, hi))
        return {layer: list(spans.values()) for layer, spans in buckets.items()}
