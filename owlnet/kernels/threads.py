"""Worker threads for the CPU kernels: independent pieces of one operation run side by side.

OpenBLAS parallelises one matrix product well when it is large and the machine is quiet; the
products of a convolution cut into cache-sized pieces (an image, a band of output rows) are
small, and it serves them with one thread as fast as with two. Worse, on a busy machine its
threads wait for each other at every product: a 0.2 ms product was measured taking 8 ms with
two BLAS threads while other processes ran, against 0.2 ms with one. So the kernels hand their
pieces to :func:`run_pieces`, which runs them on ``workers()`` Python threads, or in turn on
the calling thread, with the BLAS held to one thread where the pieces call it (NumPy releases
the GIL in its copies and BLAS calls), then gives the BLAS its threads back. Lanes take
pieces as they free up, so a thread that the machine holds up simply runs fewer of them. Pieces must write
disjoint outputs: a piece's result then does not depend on which thread ran it or when, so
results are the same with one worker or many.

The number of workers is the BLAS's own thread count when a kernel first asks (as set by
$OPENBLAS_NUM_THREADS / $OMP_NUM_THREADS, else one per core), overridden by
$OWLNET_CPU_THREADS. Where the BLAS cannot be told its thread count (threadpoolctl finds no
controllable library), pieces run one after another.
"""
from __future__ import annotations

import itertools
import os
import threading


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
        self.hold_lock = threading.Lock()      # guards holders / saved (the BLAS is global)
        self.holders = 0
        self.saved = []
        self.local = threading.local()
        self.blas = _blas_controllers()
        blas_threads = max([c.num_threads for c in self.blas] or [1])
        wanted = os.environ.get("OWLNET_CPU_THREADS", "")
        self.size = int(wanted) if wanted.isdigit() and int(wanted) > 0 else blas_threads
        if not self.blas:
            self.size = 1
        self.helpers = [_Helper(self.local, k) for k in range(self.size - 1)]

    def _in_turn(self, function, pieces, blas):
        """The pieces one after another on this thread, the BLAS held to one thread when they
        call it."""
        if not blas or getattr(self.local, "worker", False):
            for piece in pieces:
                function(piece)
            return
        self._hold_blas()
        try:
            for piece in pieces:
                function(piece)
        finally:
            self._release_blas()

    def _hold_blas(self):
        """One BLAS thread until the matching release; calls from several threads nest (the
        first saves the BLAS's thread counts, the last gives them back)."""
        with self.hold_lock:
            if self.holders == 0:
                self.saved = [c.num_threads for c in self.blas]
                self._set_blas_threads([1] * len(self.blas))
            self.holders += 1

    def _release_blas(self):
        with self.hold_lock:
            self.holders -= 1
            if self.holders == 0:
                self._set_blas_threads(self.saved)

    def _set_blas_threads(self, counts):
        for controller, count in zip(self.blas, counts):
            controller.set_num_threads(count)

    def run(self, function, pieces, parallel, blas):
        if (not parallel or not self.helpers or len(pieces) < 2
                or getattr(self.local, "worker", False)
                or not self.lock.acquire(blocking=False)):
            self._in_turn(function, pieces, blas)
            return
        for hook in before_parallel:
            hook()
        claimed = itertools.count()       # next() on it is atomic: each piece runs once

        def lane():
            for index in iter(claimed.__next__, None):
                if index >= len(pieces):
                    return
                function(pieces[index])

        if blas:
            self._hold_blas()
        try:
            helpers = self.helpers[:min(self.size, len(pieces)) - 1]
            for helper in helpers:
                helper.start(lane)
            try:
                lane()                        # the calling thread is a lane too
            finally:
                errors = [helper.finish() for helper in helpers]
            for error in errors:
                if error is not None:
                    raise error
        finally:
            if blas:
                self._release_blas()
            self.lock.release()


class _Helper:
    """A worker thread that runs one lane per hand-off. Two locks, each held while the other
    side has nothing to do, are the whole hand-off: ``run_pieces`` of two empty pieces
    measured 24-32 us at best and 71-79 us median on the 2-core machine, against 60 and 280 us
    through concurrent.futures (its futures and waiters cost more than a small piece)."""

    def __init__(self, local, index):
        self.local = local
        self.go, self.done = threading.Lock(), threading.Lock()
        self.go.acquire()
        self.done.acquire()
        self.lane, self.error = None, None
        threading.Thread(target=self._serve, name=f"owlnet-cpu_{index}", daemon=True).start()

    def _serve(self):
        self.local.worker = True
        while True:
            self.go.acquire()
            try:
                self.lane()
            except BaseException as exc:  # noqa: BLE001  (raised by the caller, in finish)
                self.error = exc
            finally:
                self.done.release()

    def start(self, lane):
        """Run ``lane`` on this thread."""
        self.lane = lane
        self.go.release()

    def finish(self):
        """Wait for the lane to return; the exception it raised, or None."""
        self.done.acquire()
        error, self.lane, self.error = self.error, None, None
        return error


_pool = None
_pool_lock = threading.Lock()
#: Called before the worker threads run pieces: the compiled kernels' own threads stop
#: spinning (``native.c``'s ``pieces_park``), so as not to take the cores from these.
before_parallel: list = []


def _forget_pool_in_child():
    """A forked child has none of the parent's threads: it makes its own pool when it needs
    one."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_in_child)


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


def run_pieces(function, pieces, parallel=True, blas=True) -> None:
    """Call ``function(piece)`` for every piece, with the BLAS held to one thread unless the
    pieces do not call it (``blas`` False: compiled loops, whose calls then skip the switch):
    on the worker threads when ``parallel`` and there are several pieces and no other call
    holds them (nested or concurrent calls run their pieces in turn), else in turn on this
    thread. The first exception a piece raises is raised here: on the threads, once every
    piece has finished or failed; in turn, at once (the pieces after it do not run)."""
    _get_pool().run(function, list(pieces), parallel, blas)
