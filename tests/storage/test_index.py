"""Sparse offset and time indexes: lookups find the greatest entry at or before the target."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rustmq.storage.index import OffsetIndex, TimeIndex

increasing = st.lists(st.integers(0, 2**32 - 1), unique=True, max_size=200).map(sorted)


@given(offsets=increasing, target=st.integers(0, 2**32 - 1))
def test_offset_lookup_returns_the_greatest_entry_at_or_before_the_target(offsets, target) -> None:
    index = OffsetIndex()
    for i, relative in enumerate(offsets):
        index.append(relative, i * 10)
    found = index.lookup(target)
    candidates = [(r, i * 10) for i, r in enumerate(offsets) if r <= target]
    assert found == (candidates[-1] if candidates else (0, 0))


@given(offsets=increasing)
def test_encoded_indexes_decode_to_the_same_entries(offsets) -> None:
    index, times = OffsetIndex(), TimeIndex()
    for i, relative in enumerate(offsets):
        index.append(relative, i * 7)
        times.append(i * 3, relative)
    decoded = OffsetIndex.decode(index.encode(), size_limit=len(offsets) * 7 + 1)
    assert list(decoded.relative_offsets) == offsets
    assert list(decoded.positions) == [i * 7 for i in range(len(offsets))]
    decoded_times = TimeIndex.decode(times.encode())
    assert list(decoded_times.timestamps) == [i * 3 for i in range(len(offsets))]


@given(timestamps=st.lists(st.integers(-10, 10**6), max_size=100).map(sorted),
       target=st.integers(-20, 10**6 + 10))
def test_time_lookup_finds_the_last_entry_strictly_before(timestamps, target) -> None:
    times = TimeIndex()
    for i, ts in enumerate(timestamps):
        times.append(ts, i)
    i = times.last_entry_before(target)
    assert all(ts < target for ts in timestamps[: i + 1])
    assert i + 1 == len(timestamps) or timestamps[i + 1] >= target


def test_a_terminal_entry_is_appended_only_when_new() -> None:
    index = OffsetIndex()
    index.append(5, 100)
    assert len(index.encode((5, 100))) == 8
    assert len(index.encode((9, 300))) == 16


@pytest.mark.parametrize(
    "data",
    [b"\0" * 7, (b"\0\0\0\2\0\0\0\1" + b"\0\0\0\1\0\0\0\2"), b"\0\0\0\1\0\0\x10\0"],
)
def test_damaged_offset_index_files_are_rejected(data) -> None:
    with pytest.raises(ValueError):
        OffsetIndex.decode(data, size_limit=4096)
