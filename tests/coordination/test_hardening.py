"""Defects found in review (issue 11), each reproduced on the real Coordinator and storage.

* A journal compaction must not make the request that triggered it fail: the durability
  position handed to the GroupCommitter is the one of the generation that holds the entry.
* A dead letter whose write fails is not lost: the record stays unsettled (redelivered or
  dead-lettered later), never journaled as done without being in the DLQ.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from rustmq.coordination import queue
from rustmq.coordination.offsets import OffsetStore
from rustmq.coordination.producers import ProducerIds
from rustmq.coordination.service import Coordinator
from rustmq.protocol import records
from rustmq.storage import batch, durability, errors
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
