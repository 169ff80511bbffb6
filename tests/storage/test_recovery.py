"""Recovery after an unclean stop, against every kind of damaged tail, on real segment files.

The damaged logs are made the way a crash makes them: by writing with the real engine, closing
without the clean-shutdown marker, then truncating, flipping or zeroing bytes of the files. The
property in every case: the reopened log serves exactly the original batches that lie wholly
before the damage (byte for byte, offsets contiguous), nothing after it, and accepts appends.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rustmq.protocol import batch
from rustmq.storage.partition import PartitionLog
from storage_testlib import make_batch, read_all, small_config, stamped

BATCHES = 40  # 117..202 bytes each in 4 KiB segments: at least one sealed segment + the active


def write_log(directory: Path, flush_first: int = 0) -> list[tuple[str, int, int, bytes]]:
    """Write BATCHES batches, stop uncleanly; return (file, position, base offset, bytes) each."""
    partition = PartitionLog.open(directory, small_config())
    for i in range(BATCHES):
        partition.append(make_batch(i, records=1 + i % 4, body_size=60 + 7 * (i % 13)))
        if i + 1 == flush_first:
            partition.flush()
    partition.close(clean=False)
    layout = []
    for path in sorted(directory.glob("*.log")):
        data = path.read_bytes()
        position = 0
        while position + 12 <= len(data) and data[position : position + 12] != bytes(12):
            header = batch.read_header(data, position)
            layout.append((path.name, position, header.base_offset,
                           data[position : position + header.size]))
            position += header.size
    assert sum(1 for _ in layout) == BATCHES
    return layout


def expected_after(layout, file_name: str, damaged_from: int) -> tuple[bytes, int]:
    """The bytes and end offset a correct recovery keeps when `file_name` is bad from a byte on."""
    kept = []
    damaged = any(n == file_name and p + len(d) > damaged_from for n, p, _, d in layout)
    for name, position, base, data in layout:
        if damaged and (name > file_name or (name == file_name and position + len(data) > damaged_from)):
            return b"".join(kept), base
        kept.append(data)
    return b"".join(kept), layout[-1][2] + batch.read_header(layout[-1][3]).record_count


def reopen_and_check(directory: Path, expected: bytes, end_offset: int) -> None:
    partition = PartitionLog.open(directory, small_config())
    try:
        assert partition.end_offset == end_offset
        served = read_all(partition)
        assert served == expected
        if served:
            batch.scan_batches(served)  # every served batch is valid
        extra = make_batch(999, records=2)
        result = partition.append(extra)
        assert result.base_offset == end_offset
    finally:
        partition.close(clean=False)
    partition = PartitionLog.open(directory, small_config())  # the cut is stable: no ghosts
    try:
        assert read_all(partition) == expected + stamped(extra, end_offset)
    finally:
        partition.close()


def segment_choice(layout, data):  # type: ignore[no-untyped-def]
    names = sorted({name for name, *_ in layout})
    return data.draw(st.sampled_from(names), label="segment")


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_recovery_from_a_random_truncation_point(data) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        layout = write_log(directory)
        name = segment_choice(layout, data)
        path = directory / name
        cut = data.draw(st.integers(0, path.stat().st_size), label="cut")
        with open(path, "r+b") as f:
            f.truncate(cut)
        reopen_and_check(directory, *expected_after(layout, name, cut))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_recovery_from_a_flipped_byte(data) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        layout = write_log(directory)
        name = segment_choice(layout, data)
        path = directory / name
        used = max(p + len(d) for n, p, _, d in layout if n == name)
        position = data.draw(st.integers(0, min(path.stat().st_size - 1, used + 64)),
                             label="position")
        xor = data.draw(st.integers(1, 255), label="xor")
        last = max((p, d) for n, p, _, d in layout if n == name)
        # Documented weakening (docs/storage.md, Recovery): leader_epoch is outside the CRC and
        # epochs may rise (cluster mode), so a flip that raises the epoch of a segment's last
        # batch is not detected: nothing after it in that segment is below it.
        raised = (last[0] + 12 <= position < last[0] + 16 and batch.HEADER_STRUCT.unpack_from(
            bytes(last[1][:12]) + bytes(b ^ (xor if last[0] + 12 + i == position else 0)
                                        for i, b in enumerate(last[1][12:16]))
            + bytes(last[1][16:batch.HEADER_SIZE]))[2] >= batch.NO_LEADER_EPOCH)
        assume(not raised)
        raw = bytearray(path.read_bytes())
        raw[position] ^= xor
        path.write_bytes(raw)
        reopen_and_check(directory, *expected_after(layout, name, position))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_recovery_from_a_zero_filled_tail(data) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        layout = write_log(directory)
        name = segment_choice(layout, data)
        path = directory / name
        size = path.stat().st_size
        start = data.draw(st.integers(0, size), label="start")
        with open(path, "r+b") as f:
            f.seek(start)
            f.write(bytes(size - start))
        reopen_and_check(directory, *expected_after(layout, name, start))


def test_the_cut_is_logged_with_offset_reason_and_removed_segments(tmp_path, caplog) -> None:
    layout = write_log(tmp_path)
    first_segment = layout[0][0]
    victim = next(entry for entry in layout[3:] if entry[0] == first_segment)
    raw = bytearray((tmp_path / first_segment).read_bytes())
    raw[victim[1] + 40] ^= 0xFF
    (tmp_path / first_segment).write_bytes(raw)
    with caplog.at_level(logging.WARNING, logger="rustmq.storage"):
        partition = PartitionLog.open(tmp_path, small_config())
    report = partition.recovery
    assert report.truncated_at_offset == victim[2] == partition.end_offset
    assert report.truncated_segment == first_segment and report.truncated_position == victim[1]
    assert "CRC32C mismatch" in report.reason
    later = sorted({name for name, *_ in layout} - {first_segment})
    assert later and list(report.removed_segments) == later
    message = caplog.records[-1].getMessage()
    assert f"cut the log at offset {victim[2]}" in message and "CRC32C mismatch" in message
    assert "segments removed" in message
    partition.close()


def test_an_unclean_start_scans_only_from_the_recovery_point(tmp_path) -> None:
    layout = write_log(tmp_path, flush_first=BATCHES - 5)
    segments = sorted({name for name, *_ in layout})
    recovery_point = int((tmp_path / "recovery-point").read_text())
    assert recovery_point == int(segments[-1][:20])
    (tmp_path / (segments[0][:20] + ".index")).write_bytes(b"garbage!")  # rebuilt from the log
    partition = PartitionLog.open(tmp_path, small_config())
    assert not partition.recovery.clean_shutdown
    assert partition.recovery.scanned_segments == 2  # the sealed one with a bad index + active
    assert len(segments) == 2
    assert read_all(partition) == b"".join(d for *_, d in layout)
    assert partition.durable_offset == recovery_point  # the rest was never fsynced
    partition.close()


def test_a_stale_clean_marker_is_not_trusted_after_more_appends(tmp_path) -> None:
    partition = PartitionLog.open(tmp_path, small_config())
    partition.append(make_batch(1))
    partition.close()
    marker = (tmp_path / "clean-shutdown").read_bytes()
    partition = PartitionLog.open(tmp_path, small_config())
    partition.append(make_batch(2))
    partition.close(clean=False)
    (tmp_path / "clean-shutdown").write_bytes(marker)  # as if the old marker had survived
    partition = PartitionLog.open(tmp_path, small_config())
    assert not partition.recovery.clean_shutdown  # end offset in the marker does not match
    assert partition.end_offset == 6
    partition.close()
