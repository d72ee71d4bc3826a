"""Worker threads for the CPU kernels: independent pieces of one operation run side by side.

OpenBLAS parallelises one matrix product well when it is large; the products of a convolution
cut into cache-sized pieces (an image, a band of output rows) are small, and it serves them
with one thread as fast as with two. So a kernel that has such pieces hands them to
:func:`run_pieces`, which runs them on ``workers()`` Python threads while the BLAS is held to
one thread each (NumPy releases the GIL in its copies and BLAS calls), then gives the BLAS its
threads back. Pieces must write disjoint outputs: a piece's result then does not depend on
which thread ran it or when, so results are the same with one worker or many.

The number of workers is the BLAS's own thread count when owlnet was imported (as set by
$OPENBLAS_NUM_THREADS / $OMP_NUM_THREADS, else one per core), overridden by
$OWLNET_CPU_THREADS. Where the BLAS cannot be told its thread count (threadpoolctl finds no
controllable library), pieces run one after another.
"""
from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait


def _blas_controllers():
    try:
        from threadpoolctl import ThreadpoolController  # noqa: PLC0415
    except ImportError:
        return []
    return list(ThreadpoolController().select(user_api="blas").lib_controllers)


class _Pool:
    """The threads and the BLAS thread switch, made on first use."""

    def __init__(self):
        self.lock = threading.Lock()
        self.local = threading.local()
        self.blas = _blas_controllers()
        blas_threads = max([c.num_threads for c in self.blas] or [1])
        wanted = os.environ.get("OWLNET_CPU_THREADS", "")
        self.size = int(wanted) if wanted.isdigit() and int(wanted) > 0 else blas_threads
        if not self.blas:
            self.size = 1
        self.executor = ThreadPoolExecutor(self.size - 1, thread_name_prefix="owlnet-cpu",
                                           initializer=self._mark_worker) \
            if self.size > 1 else None

    def _mark_worker(self):
        self.local.worker = True

    def _set_blas_threads(self, counts):
        for controller, count in zip(self.blas, counts):
            controller.set_num_threads(count)

    def run(self, function, pieces):
        if (self.executor is None or len(pieces) < 2 or getattr(self.local, "worker", False)
                or not self.lock.acquire(blocking=False)):
            for piece in pieces:
                function(piece)
            return
        blas_threads = [c.num_threads for c in self.blas]
        claimed = itertools.count()       # next() on it is atomic: each piece runs once

        def lane():
            for index in iter(claimed.__next__, None):
                if index >= len(pieces):
                    return
                function(pieces[index])

        try:
            self._set_blas_threads([1] * len(self.blas))
            helpers = [self.executor.submit(lane)
                       for _ in range(min(self.size, len(pieces)) - 1)]
            try:
                lane()                        # the calling thread is a lane too
            finally:
                wait(helpers)
            for helper in helpers:
                helper.result()
        finally:
            self._set_blas_threads(blas_threads)
            self.lock.release()


_pool = None
_pool_lock = threading.Lock()


def _get_pool() -> _Pool:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = _Pool()
    return _pool


def workers() -> int:
    """How many pieces run at once."""
    return _get_pool().size


def run_pieces(function, pieces) -> None:
    """Call ``function(piece)`` for every piece, on the worker threads when there are several
    pieces and no other call holds them (nested or concurrent calls run their pieces in turn);
    the first exception a piece raises is raised here once all have finished or failed."""
    _get_pool().run(function, list(pieces))
