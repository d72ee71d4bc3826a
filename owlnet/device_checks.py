"""Checks of device values that a captured step must not wait for.

Layer code that refuses bad input found on the device (a label outside the classes) reads
the device value at once and raises, except inside :func:`deferred` (a captured GPU step,
``owlnet.parallel.captured``): there it calls :func:`defer`, which ORs the condition into a
flag kept on the device, one per call site, with no host sync; the solver's
loss check calls :func:`raise_pending` where it reads the device anyway (display, test,
snapshot, the end of ``step``), which raises the first error whose flag is set.
"""
from __future__ import annotations

import contextlib

from . import backend

_flags: dict = {}          # (call site, array module, device id) -> [0-d bool flag, error]
_state = {"deferring": False}


@contextlib.contextmanager
def deferred():
    """Inside: layers :func:`defer` their checks to the device."""
    previous, _state["deferring"] = _state["deferring"], True
    try:
        yield
    finally:
        _state["deferring"] = previous


def deferring() -> bool:
    """Whether checks are kept on the device now (inside :func:`deferred`)."""
    return _state["deferring"]


def defer(site: str, bad, error) -> None:
    """OR the 0-d bool device array ``bad`` into the flag of ``site`` (the call site: layer
    and check); :func:`raise_pending` raises ``error()`` (an OwlnetError made without reading
    device values) once the flag is set. The flag is allocated at a site's first call (in the
    eager warm-up iteration of a captured step; one per device, as each slice's layer of that
    name runs on its own GPU), then only written."""
    xp = backend.array_module(bad)
    key = (site, xp, getattr(getattr(bad, "device", None), "id", None))  # a flag per GPU
    entry = _flags.get(key)
    if entry is None:
        entry = _flags[key] = [xp.zeros((), dtype=bool), error]
    xp.logical_or(entry[0], bad, out=entry[0])


def raise_pending() -> None:
    """Read the deferred flags (a host sync per flag); raise the first error found set."""
    for flag, error in _flags.values():
        if bool(flag):
            flag[...] = False
            raise error()
