"""Benchmark of the coordination state machines (no sockets): queue acks, offsets, rebalances.

Prints one JSON object. Each figure is the best of --repeat runs (the machine is shared, so the
best run is the least disturbed one). Usage::

    .venv/bin/python benchmarks/coordination.py [--messages 200000] [--batch 500] [--repeat 3]

Figures:
* queue_batched_msg_per_s: offer + acquire(batch) + ack(batch list) per message, state only.
* queue_batched_persisted_msg_per_s: the same plus one journal append of the ack ranges per
  batch (QueueStore.persist; page cache, no fsync).
* queue_batched_durable_msg_per_s: the same plus an fsync per batch (QueueStore.flush).
* queue_individual_ack_per_s: ack([offset]) one call per message (acquire in batches).
* queue_individual_persisted_ack_per_s: the same with a journal append after every ack.
* queue_from_log_msg_per_s: a real PartitionLog holding --messages 100-byte records in batches of
  --batch: queue_log.fill + acquire + read_delivery + ack + QueueStore.persist per batch (no
  fsync); everything a QUEUE_FETCH/QUEUE_ACK pair costs except the network.
* offsets_commit_per_s: OffsetStore.commit of one partition per call, no fsync.
* rebalance_12_partitions_ms: Group.leave of one of 4 members of a 12-partition group.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "broker"))

from rustmq.coordination import group as group_mod  # noqa: E402
from rustmq.coordination import queue_log  # noqa: E402
from rustmq.coordination.offsets import OffsetStore  # noqa: E402
from rustmq.coordination.queue import QueueSettings, QueueStore, QueueSubscription  # noqa: E402
from rustmq.protocol import batch as record_batch  # noqa: E402
from rustmq.protocol import records  # noqa: E402
from rustmq.storage.config import LogConfig  # noqa: E402
from rustmq.storage.partition import PartitionLog  # noqa: E402


def queue_batched(messages: int, batch: int, store: QueueStore | None, durable: bool) -> float:
    settings = QueueSettings(max_in_flight=batch * 2, max_lookahead=batch * 4)
    sub = store.get("s", "t", 0) if store else QueueSubscription("s", "t", 0, settings)
    sub.settings = settings
    start = time.perf_counter()
    now = 0
    for base in range(0, messages, batch):
        now += 1
        sub.offer(now, base, batch, now)
        delivery = sub.acquire(now, "c", batch)
        assert delivery is not None
        sub.ack([o for s, e in delivery.ranges for o in range(s, e)])
        if store is not None:
            store.persist(now)
            if durable:
                store.flush()
    elapsed = time.perf_counter() - start
    assert sub.ack_floor == messages
    return messages / elapsed


def queue_individual(messages: int, batch: int, store: QueueStore | None) -> float:
    settings = QueueSettings(max_in_flight=batch * 2, max_lookahead=batch * 4)
    sub = store.get("s", "t", 0) if store else QueueSubscription("s", "t", 0, settings)
    sub.settings = settings
    acked = 0
    elapsed = 0.0
    now = 0
    for base in range(0, messages, batch):
        now += 1
        sub.offer(now, base, batch, now)
        delivery = sub.acquire(now, "c", batch)
        assert delivery is not None
        offsets = [o for s, e in delivery.ranges for o in range(s, e)]
        start = time.perf_counter()
        for offset in offsets:
            sub.ack([offset])
            if store is not None:
                store.persist(now)
        elapsed += time.perf_counter() - start
        acked += len(offsets)
    assert sub.ack_floor == messages
    return acked / elapsed


def queue_from_log(messages: int, batch: int, directory: Path) -> float:
    log = PartitionLog.open(directory / "log", LogConfig(segment_bytes=64 << 20, retention_ms=None))
    body = records.encode_body([[0, None, b"v" * 100, None]] * batch)
    built = record_batch.build_batch(body, record_count=batch, first_timestamp_ms=1,
                                      max_timestamp_ms=1)
    for _ in range(messages // batch):
        log.append(built)
    store = QueueStore.open(directory / "state")
    sub = store.get("s", "t", 0)
    sub.settings = QueueSettings(max_in_flight=batch * 2, max_lookahead=batch * 4)
    start = time.perf_counter()
    now = 0
    while sub.ack_floor < log.end_offset:
        now += 1
        queue_log.fill(sub, log, now)
        delivery = sub.acquire(now, "c", batch)
        assert delivery is not None
        for view in queue_log.read_delivery(log, delivery):
            view.release()
        sub.ack([o for s, e in delivery.ranges for o in range(s, e)])
        store.persist(now)
    elapsed = time.perf_counter() - start
    consumed = log.end_offset
    store.close()
    log.close()
    return consumed / elapsed


def offsets_commit(count: int, directory: Path) -> float:
    store = OffsetStore.open(directory)
    start = time.perf_counter()
    for i in range(count):
        store.commit(i, "g", {("t", i % 12): i})
    elapsed = time.perf_counter() - start
    store.close()
    return count / elapsed


def rebalance_ms() -> float:
    g = group_mod.Group("g", lambda topic: 12)
    members = [g.join(0, ["t"]).member_id for _ in range(4)]
    start = time.perf_counter()
    g.leave(members[1])
    elapsed = time.perf_counter() - start
    assert sorted(len(m.assignment) for m in g.members.values()) == [4, 4, 4]
    return elapsed * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, float] = {}

    def best(name: str, fn, higher_is_better: bool = True) -> None:
        runs = [fn() for _ in range(args.repeat)]
        results[name] = round(max(runs) if higher_is_better else min(runs), 3)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        counter = iter(range(1_000_000))

        def fresh_store() -> QueueStore:
            return QueueStore.open(root / f"q{next(counter)}")

        def with_store(fn):
            def run() -> float:
                store = fresh_store()
                try:
                    return fn(store)
                finally:
                    store.close()
            return run

        n, b = args.messages, args.batch
        best("queue_batched_msg_per_s", lambda: queue_batched(n, b, None, False))
        best("queue_batched_persisted_msg_per_s",
             with_store(lambda s: queue_batched(n, b, s, False)))
        best("queue_batched_durable_msg_per_s",
             with_store(lambda s: queue_batched(n // 4, b, s, True)))
        best("queue_individual_ack_per_s", lambda: queue_individual(n, b, None))
        best("queue_individual_persisted_ack_per_s",
             with_store(lambda s: queue_individual(n // 4, b, s)))
        best("queue_from_log_msg_per_s",
             lambda: queue_from_log(n, b, Path(tempfile.mkdtemp(dir=root))))
        best("offsets_commit_per_s", lambda: offsets_commit(20_000, root / f"o{next(counter)}"))
        best("rebalance_12_partitions_ms", rebalance_ms, higher_is_better=False)
    results.update({
        "messages": args.messages, "batch": args.batch, "repeat": args.repeat,
        "python": platform.python_version(), "cpus": os.cpu_count() or 0,
    })
    print(json.dumps(results))


if __name__ == "__main__":
    main()
