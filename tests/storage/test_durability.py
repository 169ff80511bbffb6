"""GroupCommitter and BackgroundFlusher with real partitions, real threads and real fsyncs."""

from __future__ import annotations

import os
import threading
import time

import pytest

from rustmq.storage import durability, errors
from rustmq.storage.log import Log
from rustmq.storage.partition import PartitionLog
from storage_testlib import make_batch, small_config


def wait_until(predicate, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def test_concurrent_requests_share_flushes_and_are_durable_before_the_callback(tmp_path) -> None:
    partitions = [PartitionLog.open(tmp_path / str(i), small_config()) for i in range(2)]
    committer = durability.GroupCommitter(max_wait_ms=20)
    seen: list[tuple[int, int, BaseException | None]] = []
    done = threading.Event()

    def callback_for(partition: PartitionLog, offset: int):  # type: ignore[no-untyped-def]
        def callback(error: BaseException | None) -> None:
            # Honesty: when we hear of it, the offset IS durable (flush returned).
            seen.append((offset, partition.durable_offset, error))
            if len(seen) == 40:
                done.set()
        return callback

    for i in range(20):
        for partition in partitions:
            result = partition.append(make_batch(i))
            committer.request(partition, result.last_offset, callback_for(partition, result.last_offset))
    assert done.wait(10)
    committer.close()
    assert all(error is None and durable > offset for offset, durable, error in seen)
    assert committer.request_count == 40
    assert committer.flush_count < committer.request_count  # grouped (2 partitions, 20 ms window)
    for partition in partitions:
        partition.close()


def test_a_failed_flush_is_reported_to_every_waiter(tmp_path, monkeypatch) -> None:
    """The fsync failure is simulated: EIO cannot be provoked on this machine's disk."""
    partition = PartitionLog.open(tmp_path, small_config())
    committer = durability.GroupCommitter(max_wait_ms=5)
    results: list[BaseException | None] = []
    done = threading.Event()

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    for i in range(3):
        result = partition.append(make_batch(i))
        committer.request(partition, result.last_offset,
                          lambda error: (results.append(error), len(results) == 3 and done.set()))
    assert done.wait(10)
    committer.close()
    monkeypatch.undo()
    assert all(isinstance(error, errors.StorageIOError) for error in results)
    assert partition.durable_offset == 0
    partition.close()


def test_a_callback_that_raises_does_not_stop_the_committer(tmp_path) -> None:
    partition = PartitionLog.open(tmp_path, small_config())
    committer = durability.GroupCommitter(max_wait_ms=0)
    ok = threading.Event()

    def bad(error: BaseException | None) -> None:
        raise RuntimeError("callback bug")

    committer.request(partition, partition.append(make_batch(0)).last_offset, bad)
    committer.request(partition, partition.append(make_batch(1)).last_offset,
                      lambda error: ok.set())
    assert ok.wait(10)
    committer.close()
    with pytest.raises(errors.LogClosedError):
        committer.request(partition, 0, lambda error: None)
    partition.close()


def test_interval_and_bytes_policies_are_served_by_the_logs_flusher(tmp_path) -> None:
    log = Log.open(tmp_path, small_config(segment_bytes=1 << 20))
    interval = log.create_topic("interval", 1, {"flush": {"mode": "interval", "interval_ms": 20}})
    by_bytes = log.create_topic("bytes", 1, {"flush": {"mode": "bytes", "bytes": 2000}})
    lazy = log.create_topic("lazy", 1, {"flush": {"mode": "none"}})
    p_interval, p_bytes, p_lazy = (t.partitions[0] for t in (interval, by_bytes, lazy))
    p_interval.append(make_batch(0))
    assert wait_until(lambda: p_interval.durable_offset == p_interval.end_offset)
    p_bytes.append(make_batch(0))  # 157 bytes: below the threshold
    p_lazy.append(make_batch(0))
    time.sleep(0.3)
    assert p_bytes.durable_offset == 0 and p_lazy.durable_offset == 0
    for i in range(15):
        p_bytes.append(make_batch(i))
    assert wait_until(lambda: p_bytes.durable_offset > 0)
    log.close()


def test_sealed_segments_are_flushed_in_every_mode(tmp_path) -> None:
    log = Log.open(tmp_path, small_config())
    partition = log.create_topic("lazy", 1, {"flush": {"mode": "none"}}).partitions[0]
    for i in range(60):
        partition.append(make_batch(i))
    assert partition.segment_count > 2
    assert wait_until(lambda: partition.durable_offset > 0)
    recovery_point = tmp_path / "topics" / "lazy" / "0" / "recovery-point"
    assert wait_until(recovery_point.exists)
    log.close()
