"""The storage side of queue delivery: feed a QueueSubscription from a partition log, read the
batches of a delivery, write dead letters, and build replays.

Synchronous calls on a `RecordSource`: a `rustmq.storage.partition.PartitionLog` (run them on the
thread that owns the logs, the server's event loop), or in cluster mode a coordinator's window
of a partition it holds no replica of (rustmq.server.queue_sources). What the server still does itself: send the views,
wait for durability (`Broker.when_durable` with the returned partition and offset) and persist
queue state after the dead letters are durable.

Ordering hazard for dead letters: write the DLQ batch, wait until it is durable, and only then
persist the subscription's state (which records the offset as done). A crash in between
writes the dead letter twice at worst; the reverse order could lose it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final, Protocol

from rustmq.coordination import queue
from rustmq.protocol import batch, records
from rustmq.storage.partition import AppendResult, PartitionLog

READ_CHUNK_BYTES: Final = 1 << 20

# Every delivery header name starts with this; an uncompressed batch body without these bytes
# (a C-speed scan) has no record to look at, which spares decoding plain batches record by record.
_DELIVERY_HEADER_PREFIX: Final = b"rustmq-"
assert all(name.encode().startswith(_DELIVERY_HEADER_PREFIX) for name in
           (queue.HEADER_DELIVER_AT, queue.HEADER_DELAY, queue.HEADER_TTL, queue.HEADER_PRIORITY))
_DELIVERY_HEADER_MARK: Final = re.compile(re.escape(_DELIVERY_HEADER_PREFIX))


class RecordSource(Protocol):
    """What a queue reads a partition's records from (PartitionLog's reading side)."""

    @property
    def start_offset(self) -> int: ...

    @property
    def end_offset(self) -> int: ...

    def read(self, offset: int, max_bytes: int) -> Any: ...


def fill(sub: queue.QueueSubscription, partition: RecordSource, now_ms: int,
         max_bytes: int = READ_CHUNK_BYTES, end_offset: int | None = None) -> int:
    """Offer the subscription the records after `sub.next_offset`, up to its lookahead room and
    about `max_bytes` of batches; returns how many records were offered.

    Batch bodies are decoded (one msgpack call per batch) only to find delivery headers, and
    only when they may hold one (compressed, or the header prefix occurs in the raw bytes).
    Records that retention deleted before the subscription reached them are skipped
    (`skip_to`), so a slow subscription never blocks on a gone offset. `end_offset` (cluster
    mode: the high watermark, a batch boundary) bounds what is offered: never a record that
    may still be truncated away.
    """
    limit = partition.end_offset if end_offset is None else min(end_offset, partition.end_offset)
    if sub.next_offset < partition.start_offset:
        sub.skip_to(partition.start_offset)
    room = sub.offer_room()
    offered = 0
    levels = len(sub.settings.priority_weights)
    while room > 0 and sub.next_offset < limit and max_bytes > 0:
        fetched = partition.read(sub.next_offset, max_bytes)
        max_bytes -= fetched.size_bytes
        for view in fetched.views:
            try:
                pos = 0
                while pos < len(view) and room > 0:
                    header = batch.read_header(view, pos)
                    if header.base_offset >= limit:
                        room = 0  # above the high watermark: not yet
                        break
                    end = header.base_offset + header.record_count
                    if end > sub.next_offset:
                        body = view[pos + batch.HEADER_SIZE : pos + header.size]
                        decoded: Sequence[Any]
                        try:
                            if header.codec == records.CODEC_NONE and _DELIVERY_HEADER_MARK.search(body) is None:
                                decoded = []  # no record can carry a delivery header
                            else:
                                decoded = records.decode_body(body, header.codec)
                        except records.RecordDecodeError:
                            decoded = []  # undecodable: delivered as is, the consumer reports it
                        finally:
                            body.release()
                        special = queue.special_records(header.base_offset,
                                                        header.first_timestamp_ms, decoded, levels)
                        start = max(header.base_offset, sub.next_offset)
                        count = min(end - start, room)
                        sub.offer(now_ms, start, count, header.first_timestamp_ms, special)
                        offered += count
                        room -= count
                    pos += header.size
            finally:
                view.release()
        if not fetched.views:
            break
    return offered


def read_delivery(partition: RecordSource, delivery: queue.Delivery,
                  max_bytes: int = READ_CHUNK_BYTES) -> list[memoryview]:
    """Zero-copy views of the batches holding a delivery's ranges, and no others (whole batches:
    the client keeps only the leased offsets). Release the views once sent."""
    views: list[memoryview] = []
    covered = -1  # offsets below this are already in `views`
    for start, end in sorted(delivery.ranges):
        offset = max(start, covered)
        while offset < end:
            fetched = partition.read(offset, max_bytes)
            if not fetched.views:
                break
            offset = covered = fetched.next_offset
            for index, view in enumerate(fetched.views):
                kept, next_base = _batches_before(view, end)
                if kept is not None:
                    views.append(kept)
                if next_base is not None:  # the rest lies beyond this range
                    offset = covered = next_base
                    for rest in fetched.views[index + 1:]:
                        rest.release()
                    break
    return views


def _batches_before(view: memoryview, end: int) -> tuple[memoryview | None, int | None]:
    """Cut `view` before its first batch that starts at or after offset `end`: (the leading
    part or None, that batch's base offset), or (view, None) when no batch does. A cut view is
    released (the returned slice keeps the mapping alive on its own)."""
    pos = 0
    while pos < len(view):
        header = batch.read_header(view, pos)
        if header.base_offset >= end:
            kept = view[:pos] if pos else None
            view.release()
            return kept, header.base_offset
        pos += header.size
    return view, None


def read_record(partition: RecordSource, offset: int) -> list[Any]:
    """The decoded record ([timestamp_delta, key, value, headers]) at `offset`, with the
    timestamp delta made absolute (first_timestamp_ms + delta)."""
    fetched = partition.read(offset, 1)
    try:
        view = fetched.views[0]
        header = batch.read_header(view, 0)
        body = view[batch.HEADER_SIZE : header.size]
        try:
            decoded = records.decode_body(body, header.codec)
        finally:
            body.release()
        record = list(decoded[offset - header.base_offset])
        record[0] = header.first_timestamp_ms + int(record[0])
        return record
    finally:
        for view in fetched.views:
            view.release()


def write_dead_letters(letters: Sequence[queue.DeadLetter], subscription: str,
                       source: RecordSource, dlq: PartitionLog, now_ms: int
                       ) -> AppendResult | None:
    """Append the dead letters (one batch) to the DLQ partition; None when there are none.

    The caller waits until `dlq` is durable up to the result's last_offset, then persists the
    subscription state (see the module docstring).
    """
    if not letters:
        return None
    return dlq.append(dead_letter_batch(letters, subscription, source))


def dead_letter_batch(letters: Sequence[queue.DeadLetter], subscription: str, source: RecordSource) -> bytes:
    """The dead letters of `letters` (not empty) as one batch (cluster mode: placed on the DLQ
    partition's leader with acks=all before the subscription records them as done)."""
    dead: list[list[object]] = []
    first_ts = None
    for letter in letters:
        record = read_record(source, letter.offset)
        timestamp = int(record[0])
        first_ts = timestamp if first_ts is None else min(first_ts, timestamp)
        dead.append(queue.dead_letter_record(letter, subscription, record))
    assert first_ts is not None
    max_ts = max(int(r[0]) for r in dead)  # type: ignore[call-overload]
    for record in dead:
        record[0] = int(record[0]) - first_ts  # type: ignore[call-overload]
    body = records.encode_body(dead)
    return batch.build_batch(body, record_count=len(dead), first_timestamp_ms=first_ts, max_timestamp_ms=max_ts)


def replay_batches(dead: Sequence[Sequence[Any]], now_ms: int) -> dict[str, bytes]:
    """Group decoded dead letters (absolute timestamps are replaced by `now_ms`) by origin topic
    and build one batch per topic to produce there (the server then partitions by key)."""
    by_topic: dict[str, list[list[object]]] = {}
    for record in dead:
        origin, clean = queue.replay_record(record)
        clean[0] = 0
        by_topic.setdefault(origin, []).append(clean)
    return {
        topic: batch.build_batch(records.encode_body(recs), record_count=len(recs),
                                 first_timestamp_ms=now_ms, max_timestamp_ms=now_ms)
        for topic, recs in by_topic.items()
    }
