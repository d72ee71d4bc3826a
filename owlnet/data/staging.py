"""Host batches to the device through page-locked (pinned) buffers on a side stream (GPU only).

:meth:`PinnedUpload.upload` copies a prepared host batch (uint8 crops) into a pinned buffer,
starts its copy into a device array on a side stream and makes the compute stream wait for
that copy with an event, not a host synchronisation: the host goes on queueing the step while
the copy runs beside what the device is still doing (the previous step's backward and
update). Buffers are used round robin over ``slots``; before a slot is used again the host
waits for its previous copy (long done by then) and the side stream waits until the compute
stream has passed the work queued after that slot's batch (its consumer).

Unverified on a device: written against CuPy 14's ``cuda.Stream``, ``Stream.record``,
``Stream.wait_event``, ``cuda.alloc_pinned_memory`` and ``ndarray.set(..., stream=)``; the
tests run it on a stand-in that checks the order of these calls and the values, not the
overlap itself.
"""
from __future__ import annotations

import numpy as np

from .. import backend


class _Slot:
    __slots__ = ("pinned", "device", "copied", "consumed")

    def __init__(self, pinned, device):
        self.pinned, self.device = pinned, device
        self.copied = self.consumed = None


class PinnedUpload:
    """Uploads of host arrays through ``slots`` pinned buffers on one side stream."""

    def __init__(self, slots: int = 2):
        cupy = backend.import_cupy()
        self._cupy = cupy
        self._stream = cupy.cuda.Stream(non_blocking=True)
        self._slots: list = [None] * max(2, slots)
        self._next = 0
        self._last = None

    def _slot(self, host) -> _Slot:
        index = self._next
        self._next = (index + 1) % len(self._slots)
        slot = self._slots[index]
        if slot is None or slot.pinned.shape != host.shape or slot.pinned.dtype != host.dtype:
            memory = self._cupy.cuda.alloc_pinned_memory(max(1, host.nbytes))
            pinned = np.frombuffer(memory, host.dtype, host.size).reshape(host.shape)
            slot = _Slot(pinned, self._cupy.empty(host.shape, dtype=host.dtype))
            self._slots[index] = slot
        return slot

    def upload(self, host: np.ndarray):
        """A device array holding ``host``'s values for work queued on the current stream
        from now on (valid until ``slots`` further uploads)."""
        compute = self._cupy.cuda.get_current_stream()
        if self._last is not None:          # its consumer is queued by now
            self._last.consumed = compute.record()
        slot = self._slot(host)
        if slot.copied is not None:
            slot.copied.synchronize()       # the pinned buffer's previous copy has finished
        np.copyto(slot.pinned, host)
        if slot.consumed is not None:
            self._stream.wait_event(slot.consumed)
        slot.device.set(slot.pinned, stream=self._stream)
        slot.copied = self._stream.record()
        compute.wait_event(slot.copied)
        self._last = slot
        return slot.device
