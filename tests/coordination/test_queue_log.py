"""Queue delivery over real partition logs: fill from batches with delivery headers, read the
leased batches, dead letters into a DLQ partition and replay back, retention skips."""

from __future__ import annotations

from pathlib import Path

from rustmq.coordination import queue, queue_log
from rustmq.coordination.queue import QueueSettings, QueueSubscription
from rustmq.protocol import batch, records
from rustmq.storage.config import LogConfig
from rustmq.storage.partition import PartitionLog

CONFIG = LogConfig(segment_bytes=4096, retention_ms=None)


def produce(log: PartitionLog, values: list[bytes], ts: int, headers=None) -> int:
    recs = [[i, b"k%d" % i, v, (headers or {}).get(i)] for i, v in enumerate(values)]
    built = batch.build_batch(records.encode_body(recs), record_count=len(recs),
                              first_timestamp_ms=ts, max_timestamp_ms=ts + len(recs))
    return log.append(built).base_offset


def offsets_of(delivery) -> list[int]:
    return [] if delivery is None else [o for s, e in delivery.ranges for o in range(s, e)]


def decode(views) -> list[tuple[int, list]]:
    out = []
    for view in views:
        pos = 0
        while pos < len(view):
            h = batch.read_header(view, pos)
            recs = records.decode_body(view[pos + batch.HEADER_SIZE: pos + h.size], h.codec)
            out += [(h.base_offset + i, r) for i, r in enumerate(recs)]
            pos += h.size
        view.release()
    return out


def test_fill_honours_headers_and_delivery_reads_whole_batches(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path / "jobs-0", CONFIG)
    produce(log, [b"a", b"b", b"c"], 1000,
            {1: [[queue.HEADER_DELAY, b"5000"]], 2: [[queue.HEADER_PRIORITY, b"0"]]})
    produce(log, [b"d"], 1010)
    sub = QueueSubscription("w", "jobs", 0)
    assert queue_log.fill(sub, log, now_ms=2000) == 4
    got = sub.acquire(2000, "c", 10)
    assert offsets_of(got) == [2, 0, 3]  # priority 0 first, then lane 1 in offset order
    delivered = {o: r for o, r in decode(queue_log.read_delivery(log, got))}
    assert {delivered[o][2] for o in offsets_of(got)} == {b"a", b"c", b"d"}
    assert sub.acquire(6000, "c", 10) is None  # record 1's timestamp is 1001: due at 6001
    assert offsets_of(sub.acquire(6001, "c", 10)) == [1]
    log.close()


def test_dead_letters_go_to_the_dlq_with_headers_and_replay_back(tmp_path: Path) -> None:
    source = PartitionLog.open(tmp_path / "jobs-0", CONFIG)
    dlq = PartitionLog.open(tmp_path / "dlq-0", CONFIG)
    produce(source, [b"poison", b"fine"], 1000, {0: [["trace", b"t1"]]})
    sub = QueueSubscription("w", "jobs", 0, QueueSettings(max_deliveries=2))
    queue_log.fill(sub, source, 0)
    letters = []
    for attempt in range(2):
        got = sub.acquire(attempt, "c", 1)
        assert offsets_of(got) == [0]
        letters += sub.nack(attempt, [0], reason=f"ValueError {attempt}")
    result = queue_log.write_dead_letters(letters, "w", source, dlq, now_ms=5)
    assert result is not None and result.base_offset == 0
    dead = decode(dlq.read(0, 1 << 20).views)
    assert len(dead) == 1
    _, record = dead[0]
    headers = {n: v for n, v in record[3]}
    assert list(record[1:3]) == [b"k0", b"poison"]
    assert headers[queue.DLQ_TOPIC] == b"jobs" and headers[queue.DLQ_OFFSET] == b"0"
    assert headers[queue.DLQ_ATTEMPTS] == b"2" and headers[queue.DLQ_REASON] == b"ValueError 1"
    assert headers["trace"] == b"t1"
    replays = queue_log.replay_batches([record], now_ms=9)
    assert list(replays) == ["jobs"]
    offset = source.append(replays["jobs"]).base_offset
    replayed = decode(source.read(offset, 1 << 20).views)[0][1]
    assert list(replayed[1:3]) == [b"k0", b"poison"]
    assert [list(h) for h in replayed[3]] == [["trace", b"t1"]]
    assert queue_log.write_dead_letters([], "w", source, dlq, 0) is None
    source.close()
    dlq.close()


def test_records_deleted_by_retention_are_skipped(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path / "p", LogConfig(segment_bytes=4096, retention_messages=10))
    for i in range(40):
        produce(log, [b"x" * 200], 1000 + i)
    log.enforce_retention(10**13)
    assert log.start_offset > 0
    sub = QueueSubscription("w", "t", 0)
    queue_log.fill(sub, log, 0)
    assert sub.ack_floor == log.start_offset and sub.counters.skipped == log.start_offset
    assert offsets_of(sub.acquire(0, "c", 100)) == list(range(log.start_offset, 40))
    log.close()


def test_fill_respects_the_lookahead(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path / "p", CONFIG)
    produce(log, [b"v"] * 30, 0)
    sub = QueueSubscription("w", "t", 0, QueueSettings(max_in_flight=10, max_lookahead=12))
    assert queue_log.fill(sub, log, 0) == 12
    sub.ack(offsets_of(sub.acquire(0, "c", 10)))
    assert queue_log.fill(sub, log, 0) == 10
    assert sub.next_offset == 22
    log.close()


def test_delivery_reads_only_the_batches_it_leases(tmp_path: Path) -> None:
    """A lease of a few records must not drag the rest of the read chunk along: the client would
    decode every record of it (a 200k backlog made each 1,000-record fetch carry ~9,000)."""
    log = PartitionLog.open(tmp_path / "jobs-0", LogConfig(segment_bytes=1 << 20, retention_ms=None))
    for n in range(20):
        produce(log, [b"v%d" % (n * 10 + i) for i in range(10)], 1000 + n)
    ranges = [(25, 37), (80, 81), (120, 130)]
    got = queue.Delivery(1, 0, ranges, {})
    delivered = [o for o, _ in decode(queue_log.read_delivery(log, got))]
    assert delivered == list(range(20, 40)) + list(range(80, 90)) + list(range(120, 130))
    everything = queue.Delivery(2, 0, [(0, 200)], {})
    assert [o for o, _ in decode(queue_log.read_delivery(log, everything))] == list(range(200))
    log.close()


def test_fill_finds_delivery_headers_in_plain_and_compressed_batches(tmp_path: Path) -> None:
    """The raw-bytes scan that skips decoding plain batches must still see every header."""
    log = PartitionLog.open(tmp_path / "jobs-0", CONFIG)
    produce(log, [b"a", b"b"], 1000, {1: [[queue.HEADER_DELAY, b"5000"]]})
    recs = [[0, None, b"c", [[queue.HEADER_DELAY, b"5000"]]], [1, None, b"d", None]]
    built = batch.build_batch(records.encode_body(recs, records.CODEC_ZSTD), record_count=2,
                              first_timestamp_ms=1002, max_timestamp_ms=1003, codec=batch.Codec.ZSTD)
    log.append(built)
    sub = QueueSubscription("w", "jobs", 0)
    assert queue_log.fill(sub, log, now_ms=2000) == 4
    assert offsets_of(sub.acquire(2000, "c", 10)) == [0, 3]
    assert offsets_of(sub.acquire(6003, "c", 10)) == [1, 2]
    log.close()
