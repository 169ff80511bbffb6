"""Defects found in review (issue 11), each reproduced on the real Coordinator and storage.

* A journal compaction must not make the request that triggered it fail: the durability
  position handed to the GroupCommitter is the one of the generation that holds the entry.
* A dead letter whose write fails is not lost: the record stays unsettled (redelivered or
  dead-lettered later), never journaled as done without being in the DLQ.
"""

from __future__ import annotations

import threading
from pathlib import Path

from rustmq.coordination import queue
from rustmq.coordination.offsets import OffsetStore
from rustmq.coordination.producers import ProducerIds
from rustmq.coordination.service import Coordinator
from rustmq.protocol import batch, records
from rustmq.storage import durability, errors
from rustmq.storage.config import LogConfig
from rustmq.storage.log import Log

CONFIG = LogConfig(segment_bytes=1 << 16)


def _coordinator(data: Path, log: Log, compact_bytes: int) -> Coordinator:
    root = data / "coordination"
    return Coordinator(log, OffsetStore.open(root / "consumer_offsets", compact_bytes=compact_bytes),
                       queue.QueueStore.open(root / "queue_state", compact_bytes=compact_bytes),
                       ProducerIds.open(root / "producer_ids"), "t")


def _wait(committer: durability.GroupCommitter, durable) -> BaseException | None:
    done = threading.Event()
    outcome: list[BaseException | None] = []

    def callback(error: BaseException | None) -> None:
        outcome.append(error)
        done.set()

    committer.request(durable.partition, durable.offset, callback)
    assert done.wait(10)
    return outcome[0]


def test_a_commit_that_triggers_journal_compaction_is_answered_as_durable(tmp_path: Path) -> None:
    log = Log.open(tmp_path, CONFIG, background_flusher=False)
    for t in range(7):
        log.create_topic(f"t{t}", 3)
    coord = _coordinator(tmp_path, log, compact_bytes=4096)
    committer = durability.GroupCommitter(max_wait_ms=0)
    try:
        failures = []
        for i in range(400):
            durable = coord.commit_offsets(i, "g", None, -1, {(f"t{i % 7}", i % 3): i})
            error = _wait(committer, durable)
            if error is not None:
                failures.append((i, str(error)))
        assert coord.offsets.journal.compactions > 0
        assert failures == []
    finally:
        committer.close()
        coord.close()
        log.close()


def test_a_queue_ack_that_triggers_journal_compaction_is_answered_as_durable(tmp_path: Path) -> None:
    log = Log.open(tmp_path, CONFIG, background_flusher=False)
    log.create_topic("jobs", 1)
    body = records.encode_body([[0, None, b"x", None]] * 500)
    log.topic("jobs").partitions[0].append(batch.build_batch(body, record_count=500, first_timestamp_ms=1,
                                                              max_timestamp_ms=1))
    coord = _coordinator(tmp_path, log, compact_bytes=1024)
    committer = durability.GroupCommitter(max_wait_ms=0)
    try:
        fetched = coord.queue_fetch(0, "w", "jobs", 0, "c", 500)
        assert fetched is not None
        for view in fetched.views:
            view.release()
        failures = []
        for offset in range(0, 500, 2):  # sparse acks: every persist writes a delta
            _, durable = coord.queue_ack(1, "w", "jobs", 0, [offset])
            error = _wait(committer, durable)
            if error is not None:
                failures.append((offset, str(error)))
        assert coord.queues.journal.compactions > 0
        assert failures == []
    finally:
        committer.close()
        coord.close()
        log.close()


def _open(data: Path) -> tuple[Log, Coordinator]:
    log = Log.open(data, CONFIG, background_flusher=False)
    return log, Coordinator.open(data, log, incarnation="t")


def _fetch_offsets(coord: Coordinator, now_ms: int, consumer: str) -> list[int]:
    fetched = coord.queue_fetch(now_ms, "w", "jobs", 0, consumer, 10)
    if fetched is None:
        return []
    for view in fetched.views:
        view.release()
    return [o for start, end in fetched.delivery.ranges for o in range(start, end)]


def _settle(coord: Coordinator, durable) -> None:
    """What the server does after a coordinator call: dead letters durable, then the state."""
    coord.flush_dead_letters()
    durable = coord.persist(0) or durable
    if durable is not None:
        durable.partition.flush()


def test_a_dead_letter_whose_write_fails_is_not_lost(tmp_path: Path, monkeypatch) -> None:
    log, coord = _open(tmp_path)
    log.create_topic("jobs", 1)
    body = records.encode_body([[0, None, b"poison", None]])
    log.topic("jobs").partitions[0].append(batch.build_batch(body, record_count=1, first_timestamp_ms=1,
                                                              max_timestamp_ms=1))
    from rustmq.coordination import queue_log

    def disk_full(*args, **kwargs):
        raise errors.StorageFullError("no space left on device (simulated)")

    monkeypatch.setattr(queue_log, "write_dead_letters", disk_full)
    max_deliveries = queue.QueueSettings().max_deliveries
    for attempt in range(max_deliveries):
        assert _fetch_offsets(coord, 10 * attempt, "c") == [0]
        try:
            durable = coord.queue_nack(10 * attempt + 1, "w", "jobs", 0, [0], reason="bad")
        except errors.StorageFullError:
            durable = None  # the broker answered the nack with an error
        _settle(coord, durable)
    # Later requests persist the queue state again (the next ack of anything, a tick).
    _settle(coord, coord.persist(1000))
    coord.close()
    log.close()

    monkeypatch.undo()
    log, coord = _open(tmp_path)
    try:
        in_dlq = "jobs.w.dlq" in {t.name for t in log.topics()} and log.topic("jobs.w.dlq").partitions[0].end_offset
        assert in_dlq or _fetch_offsets(coord, 2000, "c2") == [0], "the record is neither redelivered nor dead-lettered"
    finally:
        coord.close()
        log.close()


def test_a_failed_dead_letter_write_is_retried_once_the_disk_is_back(tmp_path: Path, monkeypatch) -> None:
    log, coord = _open(tmp_path)
    log.create_topic("jobs", 1)
    body = records.encode_body([[0, None, b"poison", None]])
    log.topic("jobs").partitions[0].append(batch.build_batch(body, record_count=1, first_timestamp_ms=1,
                                                              max_timestamp_ms=1))
    from rustmq.coordination import queue_log

    real = queue_log.write_dead_letters
    full = [True]

    def maybe_full(*args, **kwargs):
        if full[0]:
            raise errors.StorageFullError("no space left on device (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(queue_log, "write_dead_letters", maybe_full)
    for attempt in range(queue.QueueSettings().max_deliveries):
        assert _fetch_offsets(coord, 10 * attempt, "c") == [0]
        _settle(coord, coord.queue_nack(10 * attempt + 1, "w", "jobs", 0, [0], reason="bad"))
    assert coord.queues.subscriptions[("w", "jobs", 0)].ack_floor == 0  # not settled: not in the DLQ
    full[0] = False
    due = coord.next_deadline_ms()
    assert due is not None
    _settle(coord, coord.tick(due))
    assert log.topic("jobs.w.dlq").partitions[0].end_offset == 1
    assert coord.queues.subscriptions[("w", "jobs", 0)].ack_floor == 1
    coord.close()
    log.close()
    log, coord = _open(tmp_path)
    try:
        assert _fetch_offsets(coord, 5000, "c2") == []
        assert log.topic("jobs.w.dlq").partitions[0].end_offset == 1
    finally:
        coord.close()
        log.close()


def test_producer_ids_are_allocated_without_an_fsync_and_survive_once_durable(tmp_path: Path, monkeypatch) -> None:
    from rustmq.storage.partition import PartitionLog

    log, coord = _open(tmp_path)
    real_flush = PartitionLog.flush
    flushes = []

    def counting_flush(self):
        flushes.append(self.directory)
        return real_flush(self)

    monkeypatch.setattr(PartitionLog, "flush", counting_flush)
    first, durable = coord.allocate_producer(0)
    assert flushes == []  # the caller (the server's committer thread) makes it durable
    assert durable.partition.durable_offset <= durable.offset
    durable.partition.flush()
    second, again = coord.allocate_producer(1)
    assert second == first + 1 and again.partition.durable_offset > again.offset  # same block: nothing to wait for
    monkeypatch.undo()
    coord.close(clean=False)  # a crash after the answer: the reservation was durable
    log.close(clean=False)
    log, coord = _open(tmp_path)
    try:
        assert coord.init_producer(2) > second
    finally:
        coord.close()
        log.close()
