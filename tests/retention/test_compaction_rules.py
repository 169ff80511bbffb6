"""The compaction rules (rustmq.compaction) and the broker's retention floor, on real files.

No sockets here: partitions are real PartitionLogs in tmp dirs, the floor comes from a real
Coordinator over a real Log.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from rustmq import app, compaction
from rustmq.client.consumer import decode_batches
from rustmq.coordination.service import Coordinator
from rustmq.protocol import batch, records
from rustmq.storage import config
from rustmq.storage import log as storage_log
from rustmq.storage.partition import PartitionLog


def cfg(**changes: object) -> config.LogConfig:
    values: dict[str, object] = {"segment_bytes": 4096, "index_interval_bytes": 256,
                                 "retention_ms": None, "segment_ms": None,
                                 "flush": {"mode": "none"}, "cleanup_policy": "compact"}
    values.update(changes)
    return config.LogConfig.from_dict(values)


def append(log: PartitionLog, entries: list[tuple[bytes | None, bytes | None]], *,
           timestamp_ms: int = 1_000, codec: int = records.CODEC_NONE, producer_id: int = -1
           ) -> None:
    body = records.encode_body([(i, k, v, None) for i, (k, v) in enumerate(entries)], codec)
    log.append(batch.build_batch(body, record_count=len(entries), first_timestamp_ms=timestamp_ms,
                                 max_timestamp_ms=timestamp_ms + len(entries), codec=codec,
                                 producer_id=producer_id, producer_epoch=0 if producer_id >= 0 else -1,
                                 base_sequence=0 if producer_id >= 0 else -1))


def seal(log: PartitionLog) -> None:
    log._roll(0)
    log.flush()


def messages(log: PartitionLog) -> list[tuple[int, int, bytes | None, bytes | None]]:
    out = []
    offset = log.start_offset
    while offset < log.end_offset:
        fetched = log.read(offset, 1 << 20)
        data = b"".join(bytes(v) for v in fetched.views)
        found, position = decode_batches("t", 0, data, offset)
        out += [(m.offset, m.timestamp_ms, m.key, m.value) for m in found]
        offset = max(position, fetched.next_offset)
    return out


def headers(log: PartitionLog) -> list[batch.BatchHeader]:
    fetched = log.read(log.start_offset, 1 << 30)
    return [header for view in fetched.views for _, header in batch.iter_batches(view)]


def test_latest_per_key_unkeyed_kept_timestamps_and_runs(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path, cfg())
    try:
        append(log, [(b"a", b"a1"), (b"b", b"b1"), (None, b"n1"), (b"a", b"a2")], timestamp_ms=100)
        append(log, [(b"c", b"c1"), (b"b", b"b2")], timestamp_ms=200)
        seal(log)
        append(log, [(b"a", b"a3")], timestamp_ms=300)  # active: not compacted, not counted
        result = compaction.compact(log, 10_000)
        assert result is not None
        assert (result.records_before, result.records_after) == (6, 4)
        assert messages(log) == [
            (2, 102, None, b"n1"), (3, 103, b"a", b"a2"), (4, 200, b"c", b"c1"),
            (5, 201, b"b", b"b2"), (6, 300, b"a", b"a3")]
        # offsets 2..3 are one run of the first batch; the second batch survives whole
        assert [(h.base_offset, h.record_count) for h in headers(log)] == [(2, 2), (4, 2), (6, 1)]
        assert compaction.compact(log, 10_000) is None  # nothing left to remove
    finally:
        log.close()


def test_tombstones_go_only_after_delete_retention(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path, cfg(delete_retention_ms=1_000))
    try:
        append(log, [(b"a", b"a1"), (b"a", None), (b"b", b"b1")], timestamp_ms=5_000)
        seal(log)
        state = compaction.CompactionState()
        first = compaction.compact(log, 5_500, state)
        assert first is not None and first.tombstones_removed == 0
        assert [m[2:] for m in messages(log)] == [(b"a", None), (b"b", b"b1")]
        assert state.next_tombstone_expiry_ms == 5_001 + 1_000 + 1
        assert compaction.compact(log, 5_600, state) is None  # not due: nothing new, not expired
        second = compaction.compact(log, 6_100, state)
        assert second is not None and second.tombstones_removed == 1
        assert [m[2:] for m in messages(log)] == [(b"b", b"b1")]
        assert log.start_offset == 2
    finally:
        log.close()


def test_codec_is_kept_and_producer_ids_are_dropped(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path, cfg())
    try:
        append(log, [(b"a", b"x" * 300)] * 3 + [(b"z", b"keep")], codec=records.CODEC_ZSTD,
               producer_id=7)
        append(log, [(b"q", b"whole")], producer_id=7)
        seal(log)
        assert compaction.compact(log, 10_000) is not None
        found = headers(log)
        assert [(h.base_offset, h.record_count, h.codec, h.producer_id) for h in found[:2]] == [
            (2, 2, batch.Codec.ZSTD, -1), (4, 1, batch.Codec.NONE, -1)]
        assert [m[2:] for m in messages(log)][:3] == [(b"a", b"x" * 300), (b"z", b"keep"),
                                                     (b"q", b"whole")]
    finally:
        log.close()


def test_undecodable_batches_are_kept_as_they_are(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path, cfg())
    try:
        log.append(batch.build_batch(b"not msgpack at all", record_count=2,
                                     first_timestamp_ms=1, max_timestamp_ms=1))
        append(log, [(b"a", b"1"), (b"a", b"2")])
        seal(log)
        before = log.read(0, 1 << 20)
        first = bytes(before.views[0][: batch.read_header(before.views[0]).size])
        del before
        assert compaction.compact(log, 10_000) is not None
        after = log.read(0, 1 << 20)
        assert bytes(after.views[0][: len(first)]) == first
        del after
        assert [(h.base_offset, h.record_count) for h in headers(log)] == [(0, 2), (3, 1)]
    finally:
        log.close()


def test_outputs_are_split_at_segment_bytes(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path, cfg())
    try:
        for round_number in range(30):
            append(log, [(None, b"%d" % round_number + b"." * 200),
                         (b"k", b"%d" % round_number)])
        seal(log)
        result = compaction.compact(log, 10_000)
        assert result is not None and result.replace.new_segments > 1
        sizes = [s.view.nbytes for s in log.sealed_segments()]
        assert all(size <= 4096 for size in sizes)
        assert [m[3] for m in messages(log)][-1] == b"29"
        log.close()
        reopened = PartitionLog.open(tmp_path, cfg())
        assert [m[3] for m in messages(reopened)][-1] == b"29"
        reopened.close()
    finally:
        log.close()


def test_retention_floor_from_group_commits_and_queue_acks(tmp_path: Path) -> None:
    data = storage_log.Log.open(tmp_path / "data", cfg(), background_flusher=False)
    coordinator = Coordinator.open(tmp_path / "data", data, incarnation="t")
    try:
        plain = data.create_topic("plain", 1)
        waiting = data.create_topic("waiting", 2, {"retain_until_consumed_by": ["g1", "g2"],
                                                   "retain_until_settled": True})
        floor = app._retention_floor(coordinator)
        assert floor(plain, 0) is None
        assert floor(waiting, 0) == 0  # neither group committed
        coordinator.offsets.commit(1, "g1", {("waiting", 0): 40, ("waiting", 1): 7})
        assert floor(waiting, 0) == 0  # g2 still has not
        coordinator.offsets.commit(1, "g2", {("waiting", 0): 25})
        assert (floor(waiting, 0), floor(waiting, 1)) == (25, 0)
        for _ in range(3):
            append(waiting.partitions[0], [(None, b"x")] * 10)
        subscription = coordinator.subscription("s", "waiting", 0)
        assert subscription.ack_floor == 0
        assert floor(waiting, 0) == 0  # the queue subscription settled nothing yet
        subscription.skip_to(12)
        assert floor(waiting, 0) == 12
    finally:
        coordinator.close()
        data.close()


record_strategy = st.tuples(
    st.one_of(st.none(), st.sampled_from([b"a", b"b", b"c", b"d", b"e"])),  # key
    st.one_of(st.none(), st.binary(min_size=0, max_size=120)),  # value (None: tombstone)
    st.integers(min_value=0, max_value=3_000),  # timestamp
)


@settings(max_examples=40, deadline=None)
@example(rounds=[([(b"a", None, 0)], True)], codec=records.CODEC_NONE, now_ms=1001)  # a lone expired tombstone
@given(
    rounds=st.lists(st.tuples(st.lists(record_strategy, min_size=1, max_size=12),
                              st.booleans()),  # roll (seal) after this batch
                    min_size=1, max_size=25),
    codec=st.sampled_from([records.CODEC_NONE, records.CODEC_ZSTD]),
    now_ms=st.integers(min_value=0, max_value=6_000),
)
def test_compaction_property(rounds, codec, now_ms) -> None:  # type: ignore[no-untyped-def]
    """Any history, any segment boundaries, repeated passes, reopened with indexes deleted:
    every served record is what was written at its offset, unkeyed records and every key's
    latest sealed record (unless an expired tombstone) stay, and the active segment is intact."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        log = PartitionLog.open(directory, cfg(delete_retention_ms=1_000))
        written: dict[int, tuple[int, bytes | None, bytes | None]] = {}
        rolled_at = 0  # everything below was sealed by a roll (compaction may empty those segments)
        try:
            for entries, roll in rounds:
                base = log.end_offset
                first_ts = entries[0][2]
                body = records.encode_body([(ts - first_ts, k, v, None) for k, v, ts in entries], codec)
                log.append(batch.build_batch(body, record_count=len(entries),
                                             first_timestamp_ms=first_ts,
                                             max_timestamp_ms=max(first_ts, *(e[2] for e in entries)),
                                             codec=codec))
                for index, (key, value, ts) in enumerate(entries):
                    written[base + index] = (ts, key, value)
                if roll:
                    seal(log)
                    rolled_at = log.end_offset
                    compaction.compact(log, now_ms)  # passes between rolls, like the broker
            log.flush()
            sealed = log.sealed_segments()
            sealed_end = max(rolled_at, sealed[-1].next_offset if sealed else 0)
            for segment in sealed:
                segment.view.release()
            compaction.compact(log, now_ms)
            served = messages(log)
            end = log.end_offset
            log.close()
            for index_file in directory.glob("*.index"):
                index_file.unlink()
            (directory / "recovery-point").unlink(missing_ok=True)
            (directory / "clean-shutdown").unlink(missing_ok=True)
            log = PartitionLog.open(directory, cfg(delete_retention_ms=1_000))
            assert log.recovery.reason is None
            assert messages(log) == served and log.end_offset == end
        finally:
            log.close()
    for offset, timestamp, key, value in served:
        assert written[offset] == (timestamp, key, value)
    present = {offset for offset, *_ in served}
    latest = {}
    for offset in sorted(written):
        if offset < sealed_end and written[offset][1] is not None:
            latest[written[offset][1]] = offset
    for offset, (timestamp, key, value) in written.items():
        if offset >= sealed_end or key is None:
            assert offset in present, offset  # active segment and unkeyed records stay
        elif latest[key] == offset:
            if value is None and timestamp < now_ms - 1_000:
                continue  # an expired tombstone may have gone (it must, if it was compacted)
            assert offset in present, offset
        else:
            assert offset not in present, offset  # superseded within the sealed segments
