"""LMDB access: a read-only reader positioned by record index, and a writer for the tools.

Records are read in key order, as Caffe's cursor does; record ``i`` is the i-th key. The reader
wraps around at the end. One LMDB environment is opened per path per process (LMDB must not be
opened twice in one process) and shared by the readers of that path.
"""
from __future__ import annotations

import os
import threading

import lmdb

from ..errors import DataError

#: Puts buffered before a write transaction is committed (Caffe's convert_imageset uses 1000).
COMMIT_EVERY = 1000

_envs: dict[str, list] = {}     # real path -> [environment, number of open readers]
_envs_lock = threading.Lock()


def _open_shared(path: str):
    key = os.path.realpath(path)
    with _envs_lock:
        entry = _envs.get(key)
        if entry is None:
            try:
                env = lmdb.open(path, readonly=True, lock=False, readahead=True,
                                max_readers=1024, subdir=os.path.isdir(path))
            except lmdb.Error as exc:
                raise DataError(f"LMDB '{path}' cannot be opened: {exc}") from None
            entry = _envs[key] = [env, 0]
        entry[1] += 1
        return entry[0]


def _close_shared(path: str) -> None:
    key = os.path.realpath(path)
    with _envs_lock:
        entry = _envs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            entry[0].close()
            del _envs[key]


class LMDBReader:
    """Read-only access to an LMDB of records in key order.

    ``get(i)`` returns ``(key, value)`` of record ``i % len(self)``. The cursor steps from its
    current record or from the first key, whichever is nearer, so reading consecutive (or
    strided) indices, and the small look-backs of skipped bad records, cost a few steps each.
    Use one reader per thread.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise DataError(f"LMDB '{self.path}' does not exist")
        self._env = _open_shared(self.path)
        try:
            self._length = self._env.stat()["entries"]
            if self._length == 0:
                raise DataError(f"LMDB '{self.path}' holds no records")
            self._txn = self._env.begin(buffers=False)
            self._cursor = self._txn.cursor()
            self._cursor.first()
            self._position = 0
        except BaseException:
            _close_shared(self.path)
            raise

    def __len__(self) -> int:
        return self._length

    def get(self, index: int):
        """``(key, value)`` of record ``index`` (taken modulo the record count)."""
        index %= self._length
        if index < self._position - index:      # nearer the first key than the cursor
            self._cursor.first()
            self._position = 0
        while self._position > index:
            self._cursor.prev()
            self._position -= 1
        while self._position < index:
            self._cursor.next()
            self._position += 1
        return self._cursor.key(), self._cursor.value()

    def __iter__(self):
        """All records once, in key order, through a cursor of its own."""
        with self._env.begin(buffers=False) as txn:
            yield from txn.cursor()

    def close(self) -> None:
        if self._env is None:
            return
        self._cursor.close()
        self._txn.abort()
        _close_shared(self.path)
        self._env = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LMDBWriter:
    """Create a new LMDB and add records; the map grows as needed, commits every 1000 puts.

    The folder must not exist yet (Caffe refuses to overwrite a database too).
    """

    def __init__(self, path, map_size: int = 1 << 28):
        self.path = os.fspath(path)
        if os.path.exists(self.path):
            raise DataError(f"LMDB '{self.path}' already exists; remove it or choose another path")
        try:
            self._env = lmdb.open(self.path, map_size=map_size, subdir=True, meminit=False)
        except lmdb.Error as exc:
            raise DataError(f"cannot create LMDB '{self.path}': {exc}") from None
        self._map_size = map_size
        self._pending: list[tuple[bytes, bytes]] = []

    def put(self, key: bytes, value: bytes) -> None:
        self._pending.append((key, value))
        if len(self._pending) >= COMMIT_EVERY:
            self.commit()

    def commit(self) -> None:
        """Write the buffered records in one transaction, doubling the map when it is full."""
        while self._pending:
            try:
                with self._env.begin(write=True) as txn:
                    for key, value in self._pending:
                        txn.put(key, value)
            except lmdb.MapFullError:
                self._map_size *= 2
                self._env.set_mapsize(self._map_size)
                continue
            except lmdb.Error as exc:
                raise DataError(f"cannot write to LMDB '{self.path}': {exc}") from None
            self._pending.clear()

    def close(self) -> None:
        if self._env is None:
            return
        try:
            self.commit()
        finally:
            self._env.close()
            self._env = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
