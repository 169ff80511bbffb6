"""Durability machinery: the GroupCommitter and the BackgroundFlusher, one thread each.

Both only ever call `PartitionLog.flush()`, which is the one partition method safe off the owner
thread, and which serialises concurrent callers with its own lock; they never append or read.

* `GroupCommitter` serves the "always" flush policy: the server appends on the event loop, then
  `request(partition, last_offset, callback)`; the committer waits up to `max_wait_ms` after the
  first pending request for others to join, then runs ONE flush per partition for all of them and
  calls every callback on its own thread once `partition.durable_offset > offset` (after the
  fsync returned), or with the exception if the flush failed. Requests that arrive while a flush
  runs are grouped into the next one. The server bridges callbacks with
  `loop.call_soon_threadsafe`.
* `BackgroundFlusher` serves the "interval" and "bytes" policies and, for every policy, flushes
  segments as soon as they are sealed (so the recovery point advances and an unclean start only
  scans the active segment). `rustmq.storage.log.Log` starts one for all its partitions; users
  of a bare PartitionLog call `flush()` themselves or start their own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from rustmq.storage import errors

if TYPE_CHECKING:
    from rustmq.storage.partition import PartitionLog

logger = logging.getLogger("rustmq.storage")

Callback = Callable[[BaseException | None], None]


class FlushTarget(Protocol):
    """What the GroupCommitter flushes: a PartitionLog, or a wrapper that adds work to its flush
    (a coordination journal's generation awaiting its commit marker)."""

    @property
    def durable_offset(self) -> int: ...

    @property
    def directory(self) -> Path: ...

    def flush(self) -> int: ...


class GroupCommitter:
    """Shares one flush per partition among durable appends arriving within `max_wait_ms`."""

    def __init__(self, max_wait_ms: float = 0.5) -> None:
        if max_wait_ms < 0:
            raise errors.InvalidConfigError("max_wait_ms must be >= 0")
        self.max_wait_s = max_wait_ms / 1000
        self.flush_count = 0  # flushes issued; with request_count shows the grouping achieved
        self.request_count = 0
        self._pending: list[tuple[FlushTarget, int, Callback]] = []
        self._condition = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="rustmq-group-commit", daemon=True)
        self._thread.start()

    def request(self, partition: FlushTarget, offset: int, callback: Callback) -> None:
        """Call `callback(None)` on the committer thread once `offset` is durable, or
        `callback(error)` if flushing failed. `offset` must already be appended.
        Raises LogClosedError after close()."""
        with self._condition:
            if self._closed:
                raise errors.LogClosedError("the group committer is closed")
            self._pending.append((partition, offset, callback))
            self.request_count += 1
            if len(self._pending) == 1:
                self._condition.notify()

    def close(self) -> None:
        """Serve the requests already made, then stop the thread."""
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._pending and not self._closed:
                    self._condition.wait()
                if not self._pending:
                    return
                if self.max_wait_s and not self._closed:
                    deadline = time.monotonic() + self.max_wait_s
                    while not self._closed and (left := deadline - time.monotonic()) > 0:
                        self._condition.wait(left)
                requests, self._pending = self._pending, []
            self._commit(requests)

    def _commit(self, requests: list[tuple[FlushTarget, int, Callback]]) -> None:
        by_partition: dict[int, tuple[FlushTarget, list[tuple[int, Callback]]]] = {}
        for partition, offset, callback in requests:
            by_partition.setdefault(id(partition), (partition, []))[1].append((offset, callback))
        for partition, waiting in by_partition.values():
            error: BaseException | None = None
            if partition.durable_offset <= max(offset for offset, _ in waiting):
                try:
                    partition.flush()
                    self.flush_count += 1
                except BaseException as failure:  # reported to every waiter, never raised here
                    error = failure
            durable = partition.durable_offset
            for offset, callback in waiting:
                outcome = error
                if outcome is None and durable <= offset:
                    outcome = errors.StorageError(
                        f"offset {offset} was not appended to {partition.directory} before the "
                        "durability request"
                    )
                _invoke(callback, outcome)


class BackgroundFlusher:
    """Flushes registered partitions whose policy (or a fresh seal) asks for it."""

    def __init__(self, poll_interval_s: float = 0.05) -> None:
        self._poll_interval_s = poll_interval_s
        self._partitions: list[PartitionLog] = []
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="rustmq-flusher", daemon=True)
        self._thread.start()

    def register(self, partition: PartitionLog) -> None:
        partition.flush_wakeup = self._wakeup.set
        with self._lock:
            self._partitions.append(partition)
        self._wakeup.set()

    def unregister(self, partition: PartitionLog) -> None:
        partition.flush_wakeup = None
        with self._lock:
            if partition in self._partitions:
                self._partitions.remove(partition)

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()
        self._thread.join()

    def _run(self) -> None:
        timeout = self._poll_interval_s
        while not self._closed:
            self._wakeup.wait(timeout)
            self._wakeup.clear()
            with self._lock:
                partitions = list(self._partitions)
            timeout = min(
                [p.config.flush.interval_ms / 1000 for p in partitions
                 if p.config.flush.mode == "interval"] + [self._poll_interval_s]
            )
            now = time.monotonic()
            for partition in partitions:
                if self._closed:
                    return
                if partition.flush_due(now):
                    try:
                        partition.flush()
                    except errors.LogClosedError:
                        self.unregister(partition)
                    except errors.StorageError as error:
                        logger.error("background flush of %s failed: %s", partition.directory, error)


def _invoke(callback: Callback, error: BaseException | None) -> None:
    try:
        callback(error)
    except Exception:
        logger.exception("a durability callback raised")
