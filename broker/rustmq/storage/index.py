"""Sparse per-segment indexes: offset -> file position, and timestamp -> offset.

File formats (big-endian, no header, no checksum: an index is rebuilt from its segment whenever
it is missing or fails validation, as in Kafka)::

    <base>.index      repeated  relative_offset u32 | position u32           (8 bytes per entry)
    <base>.timeindex  repeated  timestamp_ms   i64 | relative_offset u32     (12 bytes per entry)

`relative_offset` is the base offset of an indexed batch minus the segment's base offset and
`position` its byte position in the `.log`. An entry is added for the first batch that starts
more than `index_interval_bytes` after the previous entry, so a 64 MiB segment of 4 KiB
appends holds ~16 K entries. Both indexes get their entries at the same moments, so entry i of
the time index describes the same batch as entry i of the offset index; its timestamp is the
largest max_timestamp_ms of all batches BEFORE that batch in the segment (so a time lookup may
start its header walk at that batch). A written index file ends with a "terminal" entry for the
segment's last batch, which is how a trusted start-up learns a sealed segment's size without
reading it.

In memory the entries live in `array`s (bisect works on them) and in their encoded file form,
so persisting an index is one write.
"""

from __future__ import annotations

import bisect
import itertools
import struct
import sys
from array import array
from typing import Final

OFFSET_ENTRY: Final = struct.Struct(">II")
TIME_ENTRY: Final = struct.Struct(">qI")
assert OFFSET_ENTRY.size == 8 and TIME_ENTRY.size == 12


class OffsetIndex:
    """Relative offsets and positions of indexed batches, both strictly increasing."""

    __slots__ = ("relative_offsets", "positions", "_encoded")

    def __init__(self) -> None:
        self.relative_offsets = array("I")
        self.positions = array("I")
        self._encoded = bytearray()

    def __len__(self) -> int:
        return len(self.positions)

    def append(self, relative_offset: int, position: int) -> None:
        self.relative_offsets.append(relative_offset)
        self.positions.append(position)
        self._encoded += OFFSET_ENTRY.pack(relative_offset, position)

    def lookup(self, relative_offset: int) -> tuple[int, int]:
        """The indexed (relative offset, position) at or before `relative_offset`, else (0, 0)."""
        i = bisect.bisect_right(self.relative_offsets, relative_offset) - 1
        if i < 0:
            return 0, 0
        return self.relative_offsets[i], self.positions[i]

    def last_position_at_or_before(self, position: int) -> int:
        """The largest indexed batch position <= `position`, or 0."""
        i = bisect.bisect_right(self.positions, position) - 1
        return self.positions[i] if i >= 0 else 0

    def encode(self, terminal: tuple[int, int] | None = None) -> bytes:
        """File contents, with `terminal` (relative offset, position) appended if it is new."""
        if terminal is None or (self.positions and self.positions[-1] == terminal[1]):
            return bytes(self._encoded)
        return bytes(self._encoded) + OFFSET_ENTRY.pack(*terminal)

    @classmethod
    def decode(cls, data: bytes, size_limit: int) -> OffsetIndex:
        """Parse a file; ValueError unless entries are whole, strictly increasing, < size_limit."""
        if len(data) % OFFSET_ENTRY.size:
            raise ValueError(f"offset index length {len(data)} is not a multiple of 8")
        flat = array("I")
        flat.frombytes(data)
        if sys.byteorder == "little":
            flat.byteswap()
        index = cls()
        index.relative_offsets = flat[0::2]
        index.positions = flat[1::2]
        index._encoded = bytearray(data)
        _require_increasing(index.relative_offsets, "relative offsets")
        _require_increasing(index.positions, "positions")
        if index.positions and index.positions[-1] >= size_limit:
            raise ValueError("offset index points past the end of its segment")
        return index


class TimeIndex:
    """Timestamps (non-decreasing) paired with the relative offsets of the same batches."""

    __slots__ = ("timestamps", "relative_offsets", "_encoded")

    def __init__(self) -> None:
        self.timestamps = array("q")
        self.relative_offsets = array("I")
        self._encoded = bytearray()

    def __len__(self) -> int:
        return len(self.timestamps)

    def append(self, timestamp_ms: int, relative_offset: int) -> None:
        self.timestamps.append(timestamp_ms)
        self.relative_offsets.append(relative_offset)
        self._encoded += TIME_ENTRY.pack(timestamp_ms, relative_offset)

    def last_entry_before(self, timestamp_ms: int) -> int:
        """Index i of the last entry whose timestamp is < `timestamp_ms`, or -1."""
        return bisect.bisect_left(self.timestamps, timestamp_ms) - 1

    def encode(self, terminal: tuple[int, int] | None = None) -> bytes:
        if terminal is None or (self.relative_offsets and self.relative_offsets[-1] == terminal[1]):
            return bytes(self._encoded)
        return bytes(self._encoded) + TIME_ENTRY.pack(*terminal)

    @classmethod
    def decode(cls, data: bytes) -> TimeIndex:
        if len(data) % TIME_ENTRY.size:
            raise ValueError(f"time index length {len(data)} is not a multiple of 12")
        index = cls()
        for timestamp_ms, relative_offset in TIME_ENTRY.iter_unpack(data):
            index.timestamps.append(timestamp_ms)
            index.relative_offsets.append(relative_offset)
        index._encoded = bytearray(data)
        _require_increasing(index.relative_offsets, "relative offsets")
        if any(a > b for a, b in itertools.pairwise(index.timestamps)):
            raise ValueError("time index timestamps decrease")
        return index


def _require_increasing(values: array, what: str) -> None:
    if any(a >= b for a, b in itertools.pairwise(values)):
        raise ValueError(f"index {what} are not strictly increasing")
