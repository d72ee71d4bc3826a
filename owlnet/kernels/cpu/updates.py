"""The solver's SGD update as one compiled pass over the parameters (``native.c``), where
NumPy's separate passes (decay, rate, momentum, step) read and write every parameter array
some ten times: on AlexNet's 61 M parameters that is most of a training step's time.

The compiled loop rounds as those passes do, so the two give the same bits.
"""
from __future__ import annotations

from .. import threads
from . import native, shared

# Bands of about this many bytes of each array run on the worker threads.
_BAND_BYTES = 1 << 22


def sgd_step(history, diff, data, rate, momentum, decay):
    """One SGD step of C-contiguous arrays of one element type, in place: ``g = diff + decay
    * data`` (no decay term when ``decay`` is 0), ``h = momentum * h + rate * g``, then
    ``diff = h`` and ``data -= h``; ``rate``, ``momentum``, ``decay`` Python numbers, rounded
    to the element type as NumPy rounds them."""
    for array in (history, diff, data):
        if not array.flags.c_contiguous or array.dtype != diff.dtype:
            raise ValueError("sgd_step updates C-contiguous arrays of one element type")
    compiled = native.function("sgd_step", diff.dtype)

    def band(part):
        compiled(*(native.address(array, part.start) for array in (diff, data, history)),
                 part.stop - part.start, int(decay != 0), decay, rate, momentum)

    threads.run_pieces(band, shared.bands(diff.size, diff.itemsize, _BAND_BYTES), blas=False)
