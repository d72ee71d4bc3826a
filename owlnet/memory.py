"""Activation memory reuse: blobs whose lifetimes in a training step do not overlap share storage.

A training step runs forward over layers ``0 .. L-1`` then backward over ``L-1 .. 0``; step
time ``t`` is ``i`` for the forward of layer ``i`` and ``2L-1-i`` for its backward. For each
blob, ``T`` is the set of layers that take it as a bottom or a top (a chain of in-place layers
all touch the one blob) and ``B`` the part of ``T`` that runs backward:

* its data is live from the forward of ``min(T)`` (the producer) to the forward of ``max(T)``
  (the last reader), or, when ``B`` is not empty, to the backward of ``min(B)`` (a backward
  reads the bottoms and tops it saw in forward);
* its diff is live from the first backward given it as a bottom (a layer of ``B``) to the
  last backward that reads it (a layer of ``B`` with it as a top); a diff no backward reads
  needs no storage, and one read but never written (no layer of ``B`` propagates into it: a
  Split top whose consumer runs no backward, as Accuracy) keeps its own zeros.

Never reused (they keep their own arrays): the tops of data layers and of any layer without
bottoms, loss outputs, net outputs, blobs the user keeps (``Net.keep_blobs``, names given to
``forward(blobs=)`` or ``backward(diffs=)``), every diff of a ``force_backward`` net, arrays
shared with another blob or a parameter (Reshape, Flatten, Reduction share data). A Split's
tops take its bottom's data in forward: that data is planned once, live over the layers of
the bottom and of every top, and the tops are bound to it too.

The live arrays are then placed in one flat buffer per dtype, largest first, each at the lowest
offset (a multiple of 256 bytes) where it overlaps no placed array of an overlapping lifetime,
and the blobs are bound to their views (``Blob.bind``). Values left in a reused blob after a
step are whatever the last owner of that storage wrote there: read only kept blobs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import backend

ALIGN = 256     # bytes: cudaMalloc's alignment, above the 16 bytes the cuDNN frontend needs


@dataclass
class Interval:
    """One array to place: (blob, "data" | "diff"), its size, and its live step times."""
    blob: object
    which: str
    nbytes: int
    start: int
    end: int
    offset: int = 0
    aliases: list = field(default_factory=list)    # Split tops that take this data in forward

    def keys(self) -> list:
        """(blob id, which) of every blob this array serves."""
        return [(id(b), self.which) for b in [self.blob] + self.aliases]


@dataclass
class MemoryPlan:
    """What a plan placed and what it saved, in bytes."""
    intervals: list = field(default_factory=list)
    buffers: dict = field(default_factory=dict)     # dtype name -> flat buffer
    activation_bytes: int = 0    # every non-parameter blob's data and diff, each on its own
                                 # (a Split top's data is its bottom's)
    shared_bytes: int = 0        # the flat buffers
    private_bytes: int = 0       # the arrays left out of the plan

    @property
    def planned_bytes(self) -> int:
        return self.shared_bytes + self.private_bytes

    def summary(self) -> str:
        return (f"activations {self.activation_bytes / 2**20:.2f} MiB without reuse, "
                f"{self.planned_bytes / 2**20:.2f} MiB planned ({self.shared_bytes / 2**20:.2f} "
                f"MiB in {len(self.buffers)} shared buffer(s) for {len(self.intervals)} arrays, "
                f"{self.private_bytes / 2**20:.2f} MiB kept apart)")


def _nbytes(blob) -> int:
    return blob.count * blob._data.dtype.itemsize


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _split_tops(net) -> dict:
    """id(blob) -> the Split tops that take that blob's data in forward."""
    split_tops: dict = {}
    for layer, bottoms, tops in zip(net.layers, net._bottoms, net._tops):
        if layer.type == "Split":
            split_tops.setdefault(id(bottoms[0]), []).extend(tops)
    return split_tops


def _activation_arrays(net) -> dict:
    """(blob id, "data" | "diff") -> blob, for every array of the non-parameter blobs that
    holds values of its own (a Split top's data is its bottom's)."""
    aliases = {id(t) for tops in _split_tops(net).values() for t in tops}
    arrays = {}
    for blobs in list(net._bottoms) + list(net._tops):
        for blob in blobs:
            arrays[(id(blob), "diff")] = blob
            if id(blob) not in aliases:
                arrays[(id(blob), "data")] = blob
    return arrays


def _activation_bytes(net) -> int:
    return sum(_nbytes(blob) for blob in _activation_arrays(net).values())


def live_intervals(net, keep=()) -> list:
    """The arrays a step may share, as Intervals."""
    n = len(net.layers)
    touch: dict = {}
    for li, (bottoms, tops) in enumerate(zip(net._bottoms, net._tops)):
        for blob in list(bottoms) + list(tops):
            touch.setdefault(id(blob), (blob, []))[1].append(li)
    excluded = set(keep) | set(net.outputs)
    excluded |= {name for name, weight in net.blob_loss_weights.items() if weight}
    for layer, tops in zip(net.layers, net._tops):
        if layer.is_data or not layer.param.bottom:     # sources may fill tops once, at set-up
            excluded |= {t.name for t in tops}
    split_tops = _split_tops(net)
    aliases = {id(t) for tops in split_tops.values() for t in tops}
    params = [b for blobs in net.params.values() for b in blobs]
    data_owners: dict = {}
    diff_owners: dict = {}
    for blob in [b for b, _ in touch.values()] + params:
        if id(blob) not in aliases:
            data_owners.setdefault(id(blob._data), set()).add(id(blob))
        diff_owners.setdefault(id(blob._diff), set()).add(id(blob))
    intervals = []
    for blob, layers in touch.values():
        if blob.name in excluded:
            continue
        backward = [li for li in layers if net._layer_need_backward[li]]
        group = split_tops.get(id(blob), [])
        if (id(blob) not in aliases and len(data_owners[id(blob._data)]) == 1
                and not any(t.name in excluded for t in group)):
            reach = layers + [li for t in group for li in touch[id(t)][1]]
            users = [li for li in reach if net._layer_need_backward[li]]
            end = 2 * n - 1 - min(users) if users else max(reach)
            intervals.append(Interval(blob, "data", _nbytes(blob), min(reach), end,
                                      aliases=group))
        if net.force_backward or len(diff_owners[id(blob._diff)]) > 1:
            continue
        writers = [li for li in backward if any(
            b is blob and need for b, need in zip(net._bottoms[li], net._bottom_need_backward[li]))]
        readers = [li for li in backward if any(t is blob for t in net._tops[li])]
        consumers = [li for li in backward if any(b is blob for b in net._bottoms[li])]
        if readers and writers:        # from the first backward given it as a bottom
            intervals.append(Interval(blob, "diff", _nbytes(blob), 2 * n - 1 - max(consumers),
                                      2 * n - 1 - min(readers)))
        elif not readers:
            intervals.append(Interval(blob, "diff", _nbytes(blob), -1, -2))   # never read
    return intervals


def place(intervals) -> int:
    """Set each interval's offset (largest first, lowest free offset among those it overlaps
    in time); returns the buffer size in bytes."""
    placed, size = [], 0
    for item in sorted(intervals, key=lambda i: (-i.nbytes, i.start)):
        busy = sorted((p.offset, p.offset + _aligned(p.nbytes)) for p in placed
                      if p.start <= item.end and item.start <= p.end)
        offset = 0
        for lo, hi in busy:
            if offset + item.nbytes <= lo:
                break
            offset = max(offset, hi)
        item.offset = offset
        placed.append(item)
        size = max(size, offset + _aligned(item.nbytes))
    return size


def plan(net, keep=()) -> MemoryPlan:
    """Compute a plan for ``net`` at its current shapes and bind its blobs to it."""
    intervals = live_intervals(net, keep)
    result = MemoryPlan(activation_bytes=_activation_bytes(net))
    xp = backend.xp()
    by_dtype: dict = {}
    for item in intervals:
        by_dtype.setdefault(item.blob._data.dtype, []).append(item)
    for dtype, items in by_dtype.items():
        size = place(items)
        buffer = xp.zeros(size // dtype.itemsize, dtype=dtype)
        result.buffers[dtype.name] = buffer
        result.shared_bytes += size
        for item in items:
            lo = item.offset // dtype.itemsize
            view = buffer[lo:lo + item.blob.count].reshape(item.blob.shape)
            for blob in [item.blob] + item.aliases:
                blob.bind(**{item.which: view})
    result.intervals = intervals
    if backend.mode() == "gpu":     # the arrays the blobs had go back to the device, not
        xp.get_default_memory_pool().free_all_blocks()      # into the pool's cache
    planned = {key for i in intervals for key in i.keys()}
    result.private_bytes = sum(_nbytes(blob) for key, blob in _activation_arrays(net).items()
                               if key not in planned)
    return result


def unplan(previous: MemoryPlan, keep_planned=frozenset()) -> None:
    """Give the arrays of ``previous`` that are not in ``keep_planned`` ((blob id, which)
    pairs) fresh zeroed arrays of their own, so no stale buffer is shared any more."""
    xp = backend.xp()
    for item in previous.intervals:
        for blob in [item.blob] + item.aliases:
            if (id(blob), item.which) not in keep_planned:
                blob.bind(**{item.which: xp.zeros(blob.shape, dtype=blob._data.dtype)})


def net_bytes(net) -> dict:
    """Bytes the net's blobs hold: ``activations`` (planned, or every data and diff when
    memory is not reused) and ``parameters`` (the arena's data and diff)."""
    if net.memory_plan is not None:
        activations = net.memory_plan.planned_bytes
    else:
        activations = _activation_bytes(net)
    return {"activations": activations,
            "parameters": int(net.arena.data.nbytes + net.arena.diff.nbytes)}


def memory_line(net) -> str:
    """`owlnet time`'s memory line: on the GPU the high-water mark of CuPy's memory pool
    (which keeps every block it ever allocated until freed explicitly, so what it holds after
    the run is its peak), on the CPU the bytes the blobs hold."""
    held = net_bytes(net)
    blobs = (f"activations {held['activations'] / 2**20:.2f} MiB"
             f"{' (memory reused)' if net.memory_plan is not None else ''}, parameters and "
             f"their diffs {held['parameters'] / 2**20:.2f} MiB")
    if backend.mode() == "gpu":
        pool = backend.import_cupy().get_default_memory_pool()
        return (f"Peak device memory: {pool.total_bytes() / 2**20:.1f} MiB (CuPy memory pool "
                f"high-water mark; blobs: {blobs})")
    return f"Blob memory: {(held['activations'] + held['parameters']) / 2**20:.1f} MiB ({blobs})"
