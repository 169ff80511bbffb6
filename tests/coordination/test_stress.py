"""Many producers and consumers over a real Log through the Coordinator (no network): the exact
set of messages is received, nothing lost, and only failed deliveries come again."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from rustmq.coordination.service import Coordinator
from rustmq.protocol import batch, records
from rustmq.storage.config import LogConfig
from rustmq.storage.log import Log


def decode_views(views) -> dict[int, bytes]:
    out = {}
    for view in views:
        pos = 0
        while pos < len(view):
            h = batch.read_header(view, pos)
            body = view[pos + batch.HEADER_SIZE: pos + h.size]
            for i, rec in enumerate(records.decode_body(body, h.codec)):
                out[h.base_offset + i] = bytes(rec[2])
            body.release()
            pos += h.size
        view.release()
    return out


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ten_producers_five_queue_consumers_hundred_thousand_messages(tmp_path: Path) -> None:
    rng = random.Random(7)
    log = Log.open(tmp_path, LogConfig(segment_bytes=1 << 20), background_flusher=False)
    coord = Coordinator.open(tmp_path, log, incarnation="x")
    partitions = 4
    log.create_topic("jobs", partitions)
    sent: set[bytes] = set()
    for producer in range(10):
        for chunk in range(25):
            values = [b"p%d-%d" % (producer, chunk * 400 + i) for i in range(400)]
            recs = [[0, None, v, None] for v in values]
            built = batch.build_batch(records.encode_body(recs), record_count=len(recs),
                                      first_timestamp_ms=1, max_timestamp_ms=1)
            log.topic("jobs").partitions[rng.randrange(partitions)].append(built)
            sent.update(values)
    assert len(sent) == 100_000
    received: dict[bytes, int] = {}
    acked: set[bytes] = set()
    now = 0
    idle_rounds = 0
    while len(acked) < len(sent) and idle_rounds < 50:
        now += 10
        progressed = False
        for consumer in range(5):
            name = f"c{consumer}"
            partition = rng.randrange(partitions)
            fetched = coord.queue_fetch(now, "workers", "jobs", partition, name, 700)
            if fetched is None:
                continue
            progressed = True
            leased = [o for s, e in fetched.delivery.ranges for o in range(s, e)]
            values = decode_views(fetched.views)
            for offset in leased:
                received[values[offset]] = received.get(values[offset], 0) + 1
            roll = rng.random()
            if roll < 0.05:
                coord.consumer_gone(now, name)  # killed mid-batch: everything comes back
            elif roll < 0.10:
                coord.queue_nack(now, "workers", "jobs", partition, leased[:50], delay_ms=20)
                coord.queue_ack(now, "workers", "jobs", partition, leased[50:])
                acked.update(values[o] for o in leased[50:])
            else:
                coord.queue_ack(now, "workers", "jobs", partition, leased)
                acked.update(values[o] for o in leased)
        if not progressed:
            idle_rounds += 1
            now += 1000
            coord.tick(now)
    assert acked == sent  # nothing lost
    assert set(received) == sent
    redelivered = sum(count - 1 for count in received.values())
    assert redelivered > 0  # failures happened and were delivered again
    assert "jobs.workers.dlq" not in [t.name for t in log.topics()]  # max 5 never reached
    coord.close()
    log.close()


@pytest.mark.timeout(60)
def test_a_group_member_killed_before_committing_leaves_its_messages_to_the_next_owner(
        tmp_path: Path) -> None:
    log = Log.open(tmp_path, LogConfig(segment_bytes=1 << 16), background_flusher=False)
    coord = Coordinator.open(tmp_path, log, incarnation="x")
    log.create_topic("orders", 2)
    for p in range(2):
        recs = [[0, None, b"%d-%d" % (p, i), None] for i in range(100)]
        log.topic("orders").partitions[p].append(batch.build_batch(
            records.encode_body(recs), record_count=100, first_timestamp_ms=1, max_timestamp_ms=1))
    a = coord.join_group(0, "g", ["orders"], client_id="a", session_timeout_ms=3000)
    b = coord.join_group(0, "g", ["orders"], client_id="b", session_timeout_ms=3000)
    a = coord.heartbeat(1, "g", a.member_id, a.generation)
    (tp_a,) = a.assignment
    # a processes 60 records of its partition, commits 40, then dies without a word.
    coord.commit_offsets(2, "g", a.member_id, a.generation, {tp_a: 40}).partition.flush()
    for t in range(0, 6000, 1000):
        b = coord.heartbeat(t, "g", b.member_id, b.generation)
    assert set(b.assignment) == {("orders", 0), ("orders", 1)}
    start = coord.fetch_offsets("g").get(tp_a, 0)
    assert start == 40  # b re-reads 40..59: delivered twice, never lost
    coord.close()
    log.close()
