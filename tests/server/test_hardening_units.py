"""Work and memory a request can force on the broker, measured on the server's own functions
(issue 11): counts are checked before anything is expanded or allocated."""

from __future__ import annotations

import tracemalloc

import pytest

from rustmq.protocol.api import ErrorCode, RequestError
from rustmq.server import coordination_handlers


def test_ranges_beyond_the_offset_limit_are_refused_before_they_are_expanded() -> None:
    header = {"ranges": [[0, 1_000_000], [2_000_000, 3_000_000]]}  # 2 million offsets, 50 bytes
    tracemalloc.start()
    try:
        with pytest.raises(RequestError) as refused:
            coordination_handlers._offsets(header)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.code is ErrorCode.INVALID_REQUEST
    assert "1,000,000" in refused.value.message
    assert peak < 1 << 20, f"refusing a 50-byte request allocated {peak} bytes"


def test_offsets_and_ranges_within_the_limit_are_all_returned() -> None:
    got = coordination_handlers._offsets({"offsets": [7, 3], "ranges": [[10, 13], [20, 20]]})
    assert sorted(got) == [3, 7, 10, 11, 12]
