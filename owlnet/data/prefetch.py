"""Background batch preparation: a producer thread, a decode pool and a bounded queue.

The producer builds batches ``start, start + 1, ...`` in order by calling
``produce(batch_index, parallel_map)``, where ``parallel_map(fn, items)`` runs ``fn`` over the
items on a small thread pool (OpenCV's decoders release the GIL), in runs of items, and
returns the results in order. At most ``depth`` finished batches wait in the queue, so
memory stays bounded when the consumer is slow. An exception in the producer is handed to the
consumer and raised there as the same exception object.
"""
from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

#: Caffe's default number of prefetched batches (data_param.prefetch).
DEFAULT_DEPTH = 4


def default_workers() -> int:
    """Decode threads: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


class _Failure:
    """The producer's exception, queued for the consumer."""
    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Batches ``start, start + 1, ...`` from ``produce``, prepared ahead in the background."""

    def __init__(self, produce, start: int = 0, depth: int = DEFAULT_DEPTH,
                 workers: int | None = None, name: str = "prefetch"):
        self._produce = produce
        self._next_index = start
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._workers = workers or default_workers()
        self._pool = ThreadPoolExecutor(max_workers=self._workers,
                                        thread_name_prefix=f"{name}-decode")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _parallel_map(self, fn, items):
        """``fn`` over ``items`` on the decode pool in runs of items, two per thread (a task
        per item cost more than decoding a raw MNIST Datum; two runs per thread still let a
        thread slowed by other work hand part of its share to the others), the results in
        order; the first failing item's exception is raised, as it would be in turn."""
        items = list(items)
        runs = min(2 * self._workers, len(items))
        if runs <= 1:
            return [fn(item) for item in items]
        edges = [len(items) * k // runs for k in range(runs + 1)]
        parts = self._pool.map(lambda part: [fn(item) for item in part],
                               [items[a:b] for a, b in zip(edges, edges[1:])])
        return [result for part in parts for result in part]

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        """The producer thread: batches in order until stopped or failed."""
        index = self._next_index
        while not self._stop.is_set():
            try:
                batch = self._produce(index, self._parallel_map)
            except BaseException as exc:  # handed to the consumer, raised there
                self._put(_Failure(exc))
                return
            if not self._put(batch):
                return
            index += 1

    def next(self):
        """The next batch, waiting for it; re-raises the producer's exception."""
        if self._stop.is_set():
            raise RuntimeError("Prefetcher used after close()")
        while True:
            try:
                item = self._queue.get(timeout=0.5)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("prefetch thread ended without a batch") from None
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        self._next_index += 1
        return item

    def close(self) -> None:
        """Stop the producer and the decode pool; safe to call more than once."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)
