"""Hypothesis strategies shared by the fuzz tests: msgpack-shaped values and request headers.

Headers are drawn with the field names the protocol knows (docs/protocol.md), so that most
examples reach the checks of a field instead of stopping at "missing field", plus random ones.
"""

from __future__ import annotations

import os
from typing import Any

import msgpack
from hypothesis import strategies as st

from rustmq.protocol.api import ApiKey

FIELDS = (
    "api", "corr", "topic", "topics", "partition", "partitions", "key", "acks", "timeout_ms",
    "offset", "max_bytes", "max_wait_ms", "min_bytes", "at", "config", "set", "reset", "create",
    "subscription", "group", "member_id", "generation", "offsets", "metadata", "ranges",
    "producer_id", "producer_epoch", "session_timeout_ms", "max_records", "lease_ms", "reason",
)

SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
           | st.floats(allow_nan=True) | st.text(max_size=12) | st.binary(max_size=24))
VALUES: st.SearchStrategy[Any] = st.recursive(
    SCALARS,
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=8) | st.sampled_from(FIELDS), children,
                                        max_size=4)),
    max_leaves=12,
)
HEADERS: st.SearchStrategy[dict[str, Any]] = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=8), VALUES, max_size=8)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """A request header with a valid envelope (api, corr) and random fields."""
    header = draw(HEADERS)
    header["api"] = draw(st.sampled_from([int(key) for key in ApiKey]) | st.integers(0, 70000))
    header["corr"] = draw(st.integers(0, 2**31 - 1))
    return header


def packable(value: Any) -> bool:
    try:
        msgpack.packb(value, use_bin_type=True)
    except (OverflowError, TypeError, ValueError):
        return False
    return True


def examples(default: int) -> int:
    """Examples per target: `default` in CI, RUSTMQ_FUZZ_EXAMPLES for a longer run by hand."""
    return int(os.environ.get("RUSTMQ_FUZZ_EXAMPLES", default))


_TOPICS = st.sampled_from(["steady", "default", "fuzz-new", "rustmq-dlq-x"])
_SMALL = st.integers(-3, 5)
_OFFSETS = st.integers(-3, 200) | st.integers(2**62, 2**63 + 5)
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "topic": _TOPICS,
    "topics": st.none() | st.lists(_TOPICS, max_size=3),
    "partition": _SMALL,
    "partitions": _SMALL | st.lists(st.fixed_dictionaries(
        {"topic": _TOPICS, "partition": _SMALL, "offset": _OFFSETS},
        optional={"max_bytes": st.integers(-1, 1 << 20)}), max_size=3)
        | st.lists(st.lists(_TOPICS | _SMALL, max_size=3), max_size=3),
    "offset": _OFFSETS,
    "at": st.integers(-3, 2**62),
    "acks": st.integers(-1, 3),
    "group": st.sampled_from(["g1", "g2", ""]),
    "member_id": st.none() | st.sampled_from(["", "m-1"]),
    "generation": st.integers(-2, 3),
    "offsets": st.lists(st.lists(_TOPICS | _SMALL | _OFFSETS, max_size=4), max_size=3),
    "ranges": st.lists(st.lists(_OFFSETS, max_size=3), max_size=4),
    "subscription": st.none() | st.sampled_from(["s1", "s2", ""]),
    "max_records": st.integers(-1, 100),
    "lease_ms": st.integers(-1, 100_000),
    "session_timeout_ms": st.integers(-1, 100_000),
    "producer_id": st.integers(-2, 5),
    "producer_epoch": st.integers(-2, 5),
    "set": st.dictionaries(st.sampled_from(
        ["max_deliveries", "lease_ms", "dlq", "retention_ms", "segment_bytes", "flush", "x"]),
        _SMALL | VALUES, max_size=3),
    "reset": st.lists(st.sampled_from(["max_deliveries", "retention_ms", "x"]), max_size=2),
    "metadata": st.text(max_size=8),
    "max_wait_ms": st.integers(-1, 50),
    "min_bytes": st.integers(-1, 10),
    "max_bytes": st.integers(-1, 1 << 20),
    "create": st.booleans(),
    "config": st.none() | st.dictionaries(
        st.sampled_from(["segment_bytes", "retention_ms", "flush", "cleanup_policy", "x"]),
        VALUES, max_size=3),
}


@st.composite
def plausible_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A request of a known api whose fields have the right names and mostly plausible values
    (one in eight drawn from anything), so that examples get past the first type check into the
    handlers."""
    header: dict[str, Any] = {"api": draw(st.sampled_from([int(key) for key in ApiKey])),
                              "corr": draw(st.integers(0, 2**31 - 1))}
    for name in sorted(PLAUSIBLE):
        choice = draw(st.integers(0, 15))
        if choice < 13:  # most fields present, plausible; some absent; a few anything at all
            header[name] = draw(PLAUSIBLE[name])
        elif choice == 15:
            header[name] = draw(VALUES)
    return header
