"""Retention floors, the cleanup-policy config and compacted segments (gaps) in the storage engine.

Real files throughout. The compacted contents come from rustmq.compaction (the planner that
decodes records) or are built here by hand where a test needs exact gaps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rustmq import compaction
from rustmq.protocol import batch, records
from rustmq.storage import config, errors
from rustmq.storage import log as storage_log
from rustmq.storage.partition import PartitionLog
from storage_testlib import make_batch, read_records, small_config


def keyed_batch(first_offset: int, count: int, keys: int = 5, timestamp_ms: int = 1_000) -> bytes:
    entries = [(0, b"k%d" % (o % keys), b"v%d" % o, None)
               for o in range(first_offset, first_offset + count)]
    return batch.build_batch(records.encode_body(entries), record_count=count,
                             first_timestamp_ms=timestamp_ms, max_timestamp_ms=timestamp_ms)


def stamped_batch(base_offset: int, offsets_values: list[tuple[bytes | None, bytes | None]]
                  ) -> bytes:
    raw = bytearray(batch.build_batch(
        records.encode_body([(0, k, v, None) for k, v in offsets_values]),
        record_count=len(offsets_values), first_timestamp_ms=5, max_timestamp_ms=5))
    batch.stamp_batch(raw, 0, base_offset)
    return bytes(raw)


def fill(log: PartitionLog, batches: int, count: int = 4) -> None:
    for _ in range(batches):
        log.append(keyed_batch(log.end_offset, count))
    log.flush()


# ----------------------------------------------------------------------------------- config


def test_new_keys_round_trip_through_json_and_validate() -> None:
    changed = config.LogConfig.from_dict({
        "cleanup_policy": "compact,delete", "delete_retention_ms": 5,
        "retain_until_consumed_by": ["billing", "audit"], "retain_until_settled": True,
    })
    assert changed.retain_until_consumed_by == ("billing", "audit")
    assert changed.compacted and changed.deletes
    assert config.LogConfig.from_dict(json.loads(json.dumps(changed.to_dict()))) == changed
    assert not config.LogConfig().compacted and config.LogConfig().deletes
    assert not config.LogConfig(cleanup_policy="compact").deletes


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cleanup_policy": "compacted"}, "cleanup_policy must be one of"),
        ({"delete_retention_ms": -1}, "delete_retention_ms must be >= 0"),
        ({"retain_until_consumed_by": "billing"}, "retain_until_consumed_by must be a list"),
        ({"retain_until_consumed_by": ["ok", ""]}, "retain_until_consumed_by must be a list"),
        ({"retain_until_consumed_by": [1]}, "retain_until_consumed_by must be a list"),
        ({"retain_until_consumed_by": ["g"] * 65}, "at most 64"),
        ({"retain_until_settled": 1}, "retain_until_settled must be true or false"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(overrides: dict, message: str) -> None:
    with pytest.raises(errors.InvalidConfigError, match=message):
        config.LogConfig.from_dict(overrides)


# ----------------------------------------------------------------------------------- retention


def test_retention_floor_keeps_segments_at_or_above_it(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path, small_config(retention_messages=1))
    try:
        for i in range(80):
            log.append(make_batch(i, body_size=300))
        log.flush()
        segments = log.segment_count
        assert segments > 4
        assert log.enforce_retention(0, keep_from_offset=0) == 0  # nobody consumed anything
        assert log.segment_count == segments and log.start_offset == 0
        sealed = log.sealed_segments()
        second_base = sealed[1].base_offset
        for segment in sealed:
            segment.view.release()
        floor = second_base + 1  # consumed up to inside the second segment
        assert log.enforce_retention(0, keep_from_offset=floor) == 1
        assert log.start_offset == second_base  # the segment holding the floor stays
        assert log.enforce_retention(0, keep_from_offset=log.end_offset) == segments - 2
        assert log.segment_count == 1  # the active segment is never deleted
    finally:
        log.close()


def test_compact_only_policy_deletes_nothing_by_limits(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path, small_config(retention_messages=1, retention_ms=0,
                                                   cleanup_policy="compact"))
    try:
        for i in range(40):
            log.append(make_batch(i))
        assert log.enforce_retention(1 << 60) == 0 and log.start_offset == 0
    finally:
        log.close()


def test_log_asks_the_floor_only_for_waiting_topics(tmp_path: Path) -> None:
    data = storage_log.Log.open(tmp_path, small_config(retention_messages=1),
                                background_flusher=False)
    try:
        plain = data.create_topic("plain", 1)
        waiting = data.create_topic("waiting", 1, {"retain_until_consumed_by": ["g"]})
        for topic in (plain, waiting):
            for i in range(30):
                topic.partitions[0].append(make_batch(i))
        asked: list[tuple[str, int]] = []

        def floor(topic: storage_log.Topic, partition: int) -> int | None:
            asked.append((topic.name, partition))
            return 0

        assert data.enforce_retention(0, floor) > 0
        assert asked == [("waiting", 0)]
        assert plain.partitions[0].segment_count == 1
        assert waiting.partitions[0].start_offset == 0
        assert data.enforce_retention(0) == 0  # no floor callback: a waiting topic keeps all
        assert data.enforce_retention(0, lambda topic, partition: None) > 0
        assert waiting.partitions[0].segment_count == 1
    finally:
        data.close()
    reopened = storage_log.Log.open(tmp_path, small_config(), background_flusher=False)
    try:
        assert reopened.topic("waiting").config.retain_until_consumed_by == ("g",)
    finally:
        reopened.close()


# ----------------------------------------------------------------------------------- compaction


def test_compaction_keeps_latest_per_key_and_survives_reopen(tmp_path: Path) -> None:
    cfg = small_config(cleanup_policy="compact")
    log = PartitionLog.open(tmp_path, cfg)
    fill(log, 60)
    before = read_records(log)
    active_base = log.sealed_segments()[-1].next_offset
    result = compaction.compact(log, 10_000)
    assert result is not None and result.records_after < result.records_before
    after = read_records(log)
    sealed = [r for r in before if r[0] < active_base]
    latest = {key: offset for offset, key, _ in sealed}
    expected = [r for r in sealed if latest[r[1]] == r[0]] + [r for r in before if r[0] >= active_base]
    assert after == expected
    assert log.start_offset == expected[0][0] and log.end_offset == before[-1][0] + 1
    fill(log, 3)
    after = read_records(log)
    log.close()
    reopened = PartitionLog.open(tmp_path, cfg)
    try:
        assert reopened.recovery.clean_shutdown and read_records(reopened) == after
    finally:
        reopened.close(clean=False)
    (tmp_path / "recovery-point").unlink()
    for index in tmp_path.glob("*.index"):
        index.unlink()  # force a full scan of every segment, compacted ones included
    rescanned = PartitionLog.open(tmp_path, cfg)
    try:
        assert rescanned.recovery.reason is None and rescanned.recovery.scanned_segments > 1
        assert read_records(rescanned) == after
        rescanned.append(keyed_batch(rescanned.end_offset, 2))
    finally:
        rescanned.close()


def gapped_log(tmp_path: Path) -> PartitionLog:
    """Three sealed segments replaced by one with gaps: offsets 0, 1, 5, 9 of [0, 12)."""
    log = PartitionLog.open(tmp_path, small_config(segment_bytes=4096))
    for _ in range(3):
        log.append(keyed_batch(log.end_offset, 4))
        log._roll(0)  # seal: one batch per segment
    log.flush()
    sealed = log.sealed_segments()
    assert [s.base_offset for s in sealed] == [0, 4, 8]
    output = [stamped_batch(0, [(b"a", b"0"), (b"b", b"1")]), stamped_batch(5, [(b"c", b"5")]),
              stamped_batch(9, [(None, b"9")])]
    result = log.replace_sealed_segments(sealed, output)
    for segment in sealed:
        segment.view.release()
    assert (result.replaced_segments, result.new_segments, result.start_offset) == (3, 1, 0)
    log.append(keyed_batch(12, 2))
    return log


def test_reads_from_inside_gaps_return_the_next_batch(tmp_path: Path) -> None:
    log = gapped_log(tmp_path)
    try:
        assert [r[0] for r in read_records(log)] == [0, 1, 5, 9, 12, 13]
        assert [r[0] for r in read_records(log, 2)] == [5, 9, 12, 13]
        assert [r[0] for r in read_records(log, 6)] == [9, 12, 13]
        assert [r[0] for r in read_records(log, 10)] == [12, 13]  # the trailing gap
        fetched = log.read(10, 1 << 20)
        assert fetched.next_offset == 14 and len(fetched.views) == 1
        del fetched
        assert log.offset_for_timestamp(0) == 0
        assert sorted(p.name for p in tmp_path.glob("*.compacted")) == ["00000000000000000000.compacted"]
        assert (tmp_path / "00000000000000000000.compacted").read_bytes() == b"12\n"
    finally:
        log.close()


def test_a_flipped_base_offset_in_a_compacted_segment_cuts_the_log_there(tmp_path: Path) -> None:
    log = gapped_log(tmp_path)
    log.close()
    (tmp_path / "recovery-point").unlink()
    (tmp_path / "clean-shutdown").unlink()
    path = tmp_path / "00000000000000000000.log"
    data = bytearray(path.read_bytes())
    second = batch.read_header(data).size
    data[second + 7] = 1  # base_offset 5 -> 1: goes backwards
    path.write_bytes(bytes(data))
    reopened = PartitionLog.open(tmp_path, small_config())
    try:
        assert reopened.recovery.truncated_at_offset == 2
        assert [r[0] for r in read_records(reopened)] == [0, 1]
    finally:
        reopened.close()


def test_a_compacted_last_segment_gets_a_fresh_active_one(tmp_path: Path) -> None:
    log = gapped_log(tmp_path)
    log.close()
    (tmp_path / "00000000000000000012.log").unlink()  # as if the active segment were lost
    reopened = PartitionLog.open(tmp_path, small_config())
    try:
        assert reopened.end_offset == 12 and reopened.segment_count == 2
        reopened.append(keyed_batch(12, 1))
        assert [r[0] for r in read_records(reopened)] == [0, 1, 5, 9, 12]
    finally:
        reopened.close()


def test_stale_or_bad_plans_change_nothing(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path, small_config(retention_messages=1))
    try:
        fill(log, 200)
        sealed = log.sealed_segments()
        assert len(sealed) >= 3
        before = read_records(log)
        good = [stamped_batch(sealed[0].base_offset, [(b"x", b"y")])]
        beyond = [stamped_batch(sealed[0].next_offset, [(b"x", b"y")])]
        with pytest.raises(errors.CorruptBatchError, match="does not fit"):  # past the range
            log.replace_sealed_segments(sealed[:1], beyond)
        with pytest.raises(errors.StaleCompactionError):  # not the leading run
            log.replace_sealed_segments(sealed[1:2], [stamped_batch(sealed[1].base_offset,
                                                                    [(b"x", b"y")])])
        broken = bytearray(good[0])
        broken[-1] ^= 0xFF  # CRC mismatch: the re-scan refuses it
        with pytest.raises(errors.CorruptBatchError):
            log.replace_sealed_segments(sealed[:1], [bytes(broken)])
        assert read_records(log) == before
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".compacting")]
        log.enforce_retention(0, keep_from_offset=sealed[1].base_offset)  # drops the first
        with pytest.raises(errors.StaleCompactionError):
            log.replace_sealed_segments(sealed[:1], good)
        for segment in sealed:
            segment.view.release()
    finally:
        log.close()


def test_no_outputs_deletes_the_replaced_segments(tmp_path: Path) -> None:
    log = PartitionLog.open(tmp_path, small_config())
    try:
        fill(log, 40)
        sealed = log.sealed_segments()
        end = sealed[-1].next_offset
        result = log.replace_sealed_segments(sealed, [])
        for segment in sealed:
            segment.view.release()
        assert result.new_segments == 0 and log.start_offset == end and log.segment_count == 1
        left = {name.partition(".")[0] for name in os.listdir(tmp_path) if name[0].isdigit()}
        assert left == {f"{end:020d}"}
    finally:
        log.close()


def test_a_committed_swap_is_finished_on_open(tmp_path: Path) -> None:
    """The state after a crash right after the commit file was written (nothing renamed yet)."""
    log = gapped_log(tmp_path)
    expected = read_records(log)
    log.close()
    # Reconstruct "outputs written, commit written, nothing applied": move the output back to
    # its .compacting names and put back stand-ins for the replaced segments 4 and 8.
    for suffix in (".log", ".index", ".timeindex", ".compacted"):
        name = f"00000000000000000000{suffix}"
        os.rename(tmp_path / name, tmp_path / (name + ".compacting"))
    for base in (0, 4, 8):
        (tmp_path / f"{base:020d}.log").write_bytes(b"stale")
    (tmp_path / "compaction-commit").write_text(json.dumps({"replaced": [0, 4, 8], "outputs": [0]}))
    reopened = PartitionLog.open(tmp_path, small_config())
    try:
        assert read_records(reopened) == expected
        assert not (tmp_path / "compaction-commit").exists()
        assert not (tmp_path / "00000000000000000004.log").exists()
    finally:
        reopened.close()
