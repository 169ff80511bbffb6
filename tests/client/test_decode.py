"""The consumer's batch decoding refuses record bodies of the wrong shape with RecordDecodeError.

The broker checks batch headers and CRCs on produce, never records, so a producer can store a
body that is valid msgpack but not a list of [timestamp_delta, key, value, headers] records. The
consumer must report such a batch clearly, not crash with a TypeError or IndexError.
"""

from __future__ import annotations

import msgpack
import pytest

from rustmq.client.consumer import decode_batches
from rustmq.protocol import batch, records


def _raw(entries: list, record_count: int) -> bytes:
    body = msgpack.packb(entries, use_bin_type=True)
    return bytes(batch.build_batch(body, record_count=record_count, first_timestamp_ms=1000, max_timestamp_ms=1000))


def test_well_formed_records_decode() -> None:
    messages, position = decode_batches("t", 0, _raw([[0, b"k", b"v", None], [1, None, b"w", None]], 2), 0)
    assert [(m.offset, m.timestamp_ms, m.key, m.value) for m in messages] == [(0, 1000, b"k", b"v"), (1, 1001, None, b"w")]
    assert position == 2


@pytest.mark.parametrize(
    "entries",
    [
        [["x", None, b"v", None]],  # timestamp delta not a number
        [[0, b"k"]],  # too short
        [7],  # not a record at all
    ],
)
def test_wrong_record_shape_is_a_decode_error(entries: list) -> None:
    with pytest.raises(records.RecordDecodeError, match="not \\[timestamp_delta, key, value, headers\\]"):
        decode_batches("t", 0, _raw(entries, 1), 0)


def test_record_count_that_disagrees_with_the_header_is_a_decode_error() -> None:
    with pytest.raises(records.RecordDecodeError, match="holds 1 records, its header says 3"):
        decode_batches("t", 0, _raw([[0, None, b"v", None]], 3), 0)
