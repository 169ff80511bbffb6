"""The Coordinator facade on a real storage Log: groups with lag, queues with a DLQ topic,
idempotent produce decisions, and state that survives closing and reopening everything."""

from __future__ import annotations

from pathlib import Path

import pytest

from rustmq.coordination import group as group_mod
from rustmq.coordination import queue
from rustmq.coordination.producers import Verdict
from rustmq.coordination.service import Coordinator
from rustmq.protocol import records
from rustmq.storage import batch
from rustmq.storage.config import LogConfig
from rustmq.storage.log import Log

CONFIG = LogConfig(segment_bytes=1 << 16)


def open_all(data: Path, incarnation: str = "a") -> tuple[Log, Coordinator]:
    log = Log.open(data, CONFIG, background_flusher=False)
    return log, Coordinator.open(data, log, incarnation=incarnation)


def close_all(log: Log, coordinator: Coordinator) -> None:
    coordinator.close()
    log.close()


def produce(log: Log, topic: str, partition: int, n: int, *, pid: int = -1, seq: int = -1,
            headers=None) -> bytes:
    recs = [[0, None, b"v%d" % i, (headers or {}).get(i)] for i in range(n)]
    built = batch.build_batch(records.encode_body(recs), record_count=n, first_timestamp_ms=1,
                              max_timestamp_ms=1, producer_id=pid, producer_epoch=0,
                              base_sequence=seq)
    log.topic(topic).partitions[partition].append(built)
    return built


def wait_durable(durable) -> None:
    if durable is not None:
        durable.partition.flush()
        assert durable.partition.durable_offset > durable.offset


def test_group_commit_lag_and_restart(tmp_path: Path) -> None:
    log, coord = open_all(tmp_path)
    log.create_topic("orders", 3)
    for p in range(3):
        produce(log, "orders", p, 10)
    a = coord.join_group(0, "billing", ["orders"], client_id="a")
    b = coord.join_group(0, "billing", ["orders"], client_id="b")
    with pytest.raises(group_mod.IllegalGenerationError):
        coord.commit_offsets(1, "billing", a.member_id, a.generation, {a.assignment[0]: 1})
    view = coord.heartbeat(1, "billing", a.member_id, a.generation)
    wait_durable(coord.commit_offsets(2, "billing", view.member_id, view.generation,
                                      {tp: 4 for tp in view.assignment}))
    lag = coord.group_lag("billing")
    assert sum(lag.values()) == 30 - 4 * len(view.assignment)
    described = coord.describe_group("billing")
    assert len(described["members"]) == 2 and len(described["lag"]) == 3
    assert coord.next_deadline_ms() == 10_000
    coord.tick(10_001)
    assert coord.describe_group("billing")["state"] == "empty"
    close_all(log, coord)

    log, coord = open_all(tmp_path, incarnation="b")
    assert coord.list_groups() == ["billing"]
    assert coord.fetch_offsets("billing") == {tp: 4 for tp in view.assignment}
    with pytest.raises(group_mod.UnknownMemberError):
        coord.heartbeat(0, "billing", b.member_id, b.generation)
    close_all(log, coord)


def test_queue_acks_dead_letters_and_restart(tmp_path: Path) -> None:
    log, coord = open_all(tmp_path)
    log.create_topic("jobs", 2)
    produce(log, "jobs", 1, 6)
    got = coord.queue_fetch(0, "workers", "jobs", 1, "c1", 10)
    assert got is not None and got.delivery.count == 6
    for view in got.views:
        view.release()
    result, durable = coord.queue_ack(1, "workers", "jobs", 1, [0, 1, 3])
    assert result.acked == 3
    wait_durable(durable)
    for attempt in range(queue.QueueSettings().max_deliveries):
        wait_durable(coord.queue_nack(2 + attempt, "workers", "jobs", 1, [2], reason="bad"))
        fetched = coord.queue_fetch(2 + attempt, "workers", "jobs", 1, "c1", 1)
        if fetched is not None:
            for view in fetched.views:
                view.release()
    dlq = log.topic("jobs.workers.dlq")
    assert len(dlq.partitions) == 2 and dlq.partitions[1].end_offset == 1
    wait_durable(coord.consumer_gone(10, "c1"))  # 4 and 5 back to available
    close_all(log, coord)

    log, coord = open_all(tmp_path)
    fetched = coord.queue_fetch(20, "workers", "jobs", 1, "c2", 10)
    assert fetched is not None
    offsets = sorted(o for s, e in fetched.delivery.ranges for o in range(s, e))
    for view in fetched.views:
        view.release()
    assert offsets == [4, 5]  # acked and dead-lettered records never come back
    assert coord.metrics()["queues"][0]["in_flight"] == 2
    close_all(log, coord)


def test_idempotent_produce_survives_restart(tmp_path: Path) -> None:
    log, coord = open_all(tmp_path)
    log.create_topic("t", 1)
    pid = coord.init_producer(0)
    request = produce(log, "t", 0, 5, pid=pid, seq=0)
    coord.record_produce("t", 0, request, 0)
    assert [d.verdict for d in coord.plan_produce("t", 0, request)] == [Verdict.DUPLICATE]
    close_all(log, coord)
    log, coord = open_all(tmp_path)
    decisions = coord.plan_produce("t", 0, request)
    assert decisions[0].verdict is Verdict.DUPLICATE and decisions[0].original.base_offset == 0
    assert coord.init_producer(0) != pid
    close_all(log, coord)


def test_unknown_topic_and_partition_are_clear_errors(tmp_path: Path) -> None:
    from rustmq.coordination.service import UnknownPartitionError
    from rustmq.storage import errors

    log, coord = open_all(tmp_path)
    log.create_topic("t", 1)
    with pytest.raises(UnknownPartitionError, match="no partition 3"):
        coord.queue_fetch(0, "s", "t", 3, "c", 1)
    with pytest.raises(errors.UnknownTopicError):
        coord.queue_fetch(0, "s", "nope", 0, "c", 1)
    close_all(log, coord)
