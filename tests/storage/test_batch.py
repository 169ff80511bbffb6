"""The batch byte format: build/scan round trip, in-place stamping and rejection of damage."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustmq.protocol import batch
from rustmq.storage import errors

bodies = st.binary(max_size=300)
timestamps = st.integers(min_value=0, max_value=2**40)


@given(body=bodies, count=st.integers(1, 10_000), first=timestamps, extra=st.integers(0, 10**6),
       codec=st.sampled_from(list(batch.Codec)), producer=st.integers(-1, 2**62),
       epoch=st.integers(-1, 2**15 - 1), sequence=st.integers(-1, 2**31 - 1))
def test_build_then_read_header_round_trips_every_field(body, count, first, extra, codec, producer,
                                                         epoch, sequence) -> None:
    raw = batch.build_batch(body, record_count=count, first_timestamp_ms=first,
                            max_timestamp_ms=first + extra, codec=codec, producer_id=producer,
                            producer_epoch=epoch, base_sequence=sequence)
    header = batch.read_header(raw)
    assert len(raw) == batch.HEADER_SIZE + len(body) == header.size
    assert (header.base_offset, header.leader_epoch, header.magic) == (0, -1, batch.MAGIC)
    assert header.codec is codec and header.record_count == count
    assert (header.first_timestamp_ms, header.max_timestamp_ms) == (first, first + extra)
    assert (header.producer_id, header.producer_epoch, header.base_sequence) == (producer, epoch,
                                                                                 sequence)
    assert raw[batch.HEADER_SIZE:] == body
    scan = batch.scan_batches(raw)
    assert (scan.batch_count, scan.record_count, scan.max_timestamp_ms) == (1, count, first + extra)


@given(st.lists(st.tuples(bodies, st.integers(1, 50)), min_size=1, max_size=8))
def test_scan_reports_counts_and_positions_of_concatenated_batches(specs) -> None:
    raws = [batch.build_batch(b, record_count=n, first_timestamp_ms=i, max_timestamp_ms=i)
            for i, (b, n) in enumerate(specs)]
    scan = batch.scan_batches(b"".join(raws))
    assert scan.batch_count == len(raws)
    assert scan.record_count == sum(n for _, n in specs)
    assert scan.max_timestamp_ms == len(specs) - 1
    assert scan.positions == [sum(map(len, raws[:i])) for i in range(len(raws))]


@given(st.lists(st.tuples(bodies, st.integers(1, 50)), min_size=1, max_size=8), st.integers(0, 60))
def test_iter_batches_walks_whole_batches_and_stops_before_a_partial_one(specs, cut) -> None:
    raws = [batch.build_batch(b, record_count=n, first_timestamp_ms=i, max_timestamp_ms=i)
            for i, (b, n) in enumerate(specs)]
    joined = b"".join(raws)
    positions = [sum(map(len, raws[:i])) for i in range(len(raws))]
    walked = list(batch.iter_batches(joined))
    assert [pos for pos, _ in walked] == positions
    assert [h.record_count for _, h in walked] == [n for _, n in specs]
    truncated = joined[: len(joined) - 1 - min(cut, len(raws[-1]) - 1)]  # the last batch cut short
    assert [pos for pos, _ in batch.iter_batches(memoryview(truncated))] == positions[:-1]
    assert list(batch.iter_batches(b"\0" * batch.HEADER_SIZE)) == []  # a size of 0 never loops


@given(body=bodies, offset=st.integers(0, 2**62), epoch=st.integers(-2**31, 2**31 - 1))
def test_stamping_broker_fields_keeps_the_crc_valid(body, offset, epoch) -> None:
    raw = bytearray(batch.build_batch(body, record_count=1, first_timestamp_ms=0,
                                      max_timestamp_ms=0))
    batch.stamp_batch(raw, 0, offset, epoch)
    header = batch.scan_batches(raw) and batch.read_header(raw)
    assert (header.base_offset, header.leader_epoch) == (offset, epoch)


@settings(max_examples=300)
@given(body=st.binary(min_size=1, max_size=200), data=st.data())
def test_any_flipped_byte_the_crc_covers_is_rejected(body, data) -> None:
    raw = bytearray(batch.build_batch(body, record_count=2, first_timestamp_ms=5,
                                      max_timestamp_ms=9))
    position = data.draw(st.integers(batch.CRC_START - 4, len(raw) - 1), label="position")
    raw[position] ^= data.draw(st.integers(1, 255), label="xor")
    with pytest.raises(errors.CorruptBatchError):
        batch.scan_batches(raw)


@given(body=bodies, cut=st.integers(min_value=1))
def test_truncated_batches_are_rejected(body, cut) -> None:
    raw = batch.build_batch(body, record_count=1, first_timestamp_ms=0, max_timestamp_ms=0)
    with pytest.raises(errors.CorruptBatchError):
        batch.scan_batches(raw[: max(0, len(raw) - cut)] or b"\0")


@pytest.mark.parametrize(
    ("offset", "value", "reason"),
    [
        (8, b"\0\0\0\1", "smaller than a header"),
        (8, b"\x7f\0\0\0", "runs past the end"),
        (16, b"\2", "unknown magic"),
        (21, b"\0\x08", "invalid attributes"),
        (21, b"\0\x07", "invalid attributes"),
        (23, b"\0\0\0\0", "record_count 0"),
        (35, b"\0" * 8, "max_timestamp_ms is before"),
    ],
)
def test_bad_header_fields_get_a_readable_reason(offset, value, reason) -> None:
    raw = bytearray(batch.build_batch(b"abc", record_count=1, first_timestamp_ms=10,
                                      max_timestamp_ms=10))
    raw[offset : offset + len(value)] = value
    with pytest.raises(errors.CorruptBatchError, match=reason):
        batch.scan_batches(raw)


def test_error_names_the_position_of_the_bad_batch() -> None:
    good = batch.build_batch(b"a", record_count=1, first_timestamp_ms=0, max_timestamp_ms=0)
    bad = bytearray(good)
    bad[-1] ^= 1
    with pytest.raises(errors.CorruptBatchError) as caught:
        batch.scan_batches(good + bytes(bad))
    assert caught.value.position == len(good)
    assert f"at byte {len(good)}" in str(caught.value)


def test_empty_input_and_invalid_build_arguments_are_refused() -> None:
    with pytest.raises(errors.CorruptBatchError):
        batch.scan_batches(b"")
    with pytest.raises(ValueError):
        batch.build_batch(b"", record_count=0, first_timestamp_ms=0, max_timestamp_ms=0)
    with pytest.raises(ValueError):
        batch.build_batch(b"", record_count=1, first_timestamp_ms=5, max_timestamp_ms=4)


def test_scan_accepts_memoryviews_of_any_format_without_copying() -> None:
    raw = bytearray(batch.build_batch(b"x" * 64, record_count=4, first_timestamp_ms=0,
                                      max_timestamp_ms=0))
    assert batch.scan_batches(memoryview(raw)).record_count == 4
    assert batch.scan_batches(memoryview(raw).cast("c")).record_count == 4
