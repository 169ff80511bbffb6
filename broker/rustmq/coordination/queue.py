"""Queue subscriptions: per-message acknowledgement over one partition's log (a shared subscription).

The log is never modified: a subscription keeps, per partition, which offsets are *done*
(acknowledged, dead-lettered or expired) and hands out the others under leases. Sans-IO: the
server offers records as it reads them from the log (`offer`), asks for deliveries
(`acquire`), forwards acks/nacks/extensions, calls `expire_leases` from a timer, performs the
effects returned (dead letters to write) and persists `drain_changes()` with `QueueStore`.

State of one (subscription, topic, partition):

* ``ack_floor``: every offset below it is done. ``done``: the sparse set of done offsets above it.
  Persisted as floor + ranges, so a long acked prefix costs one integer.
* ``next_offset``: the log position up to which records have been offered.
* available records: one deque per priority lane of ``(start, end, expires_at_ms)`` ranges, so a
  batch of new records costs one entry; redeliveries wait in a per-lane retry deque served first.
* in flight: ``offset -> Lease`` (one Lease object per `acquire` call, shared by its offsets) and a
  heap of lease deadlines (stale entries skipped lazily).
* ``failures``: offset -> failed deliveries so far (only offsets that failed at least once).
* delayed: a heap of ``(deliver_at_ms, offset, lane, expires_at_ms)``.

Rules (docs/semantics.md repeats them for users):

* Leases: `acquire` leases up to `max_messages` records for `ack_wait_ms`; `extend` renews the
  deadline; an ack is honoured while the record is not done, even after its lease expired (the
  work was done; NATS does the same), and is ignored afterwards (duplicate).
* Failure = nack, lease expiry or the holder leaving. The record's failure count goes up; once
  it reaches `max_deliveries` the record is done and a `DeadLetter` is returned for the server to
  write (headers: origin topic, partition, offset, attempts, last reason); otherwise it becomes
  available again at once or after the nack's delay.
* Delays: a record with a deliver-at time in the future waits in the delayed heap. TTL: a record
  whose expiry time has passed is marked done and counted (`expired`), never delivered. The
  per-topic TTL counts from the batch's first_timestamp_ms, so a record may expire early by at
  most its batch's timestamp spread (the producer's linger), never late.
* Priorities: lanes 0 (highest) .. levels-1. Weighted rounds: each round a lane may deliver
  weight * PRIORITY_QUANTUM records, higher lanes first; an empty lane's share goes to the
  others, and credits refill when no lane with records has credit left. So a busy high lane
  cannot starve a lower one: lane i gets at least weight_i / sum(weights) of the deliveries
  while it has records.
* Ordering: first deliveries within one lane of one partition are in offset order; redeliveries
  go before new records of their lane, so a redelivered record can arrive after later ones.
  Nothing is ordered across lanes or partitions.
* Limits: at most `max_in_flight` leased records and `max_lookahead` offsets between the ack
  floor and `next_offset` (a long-delayed or stuck record holds the floor; the server stops
  offering until it moves), so memory per partition is bounded.

Persistence granularity: done offsets and failure counts are persisted; leases are not. After
a broker crash every leased record becomes available again (at-least-once), and a record's
failure count loses at most the delivery that was in flight.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import itertools
import logging
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

import msgpack

from rustmq.coordination.journal import DEFAULT_COMPACT_BYTES, Entry, Journal

logger = logging.getLogger("rustmq.coordination")

NEVER: Final = (1 << 63) - 1
DLQ_RETRY_MS: Final = 1000  # a dead letter whose write failed is written again after this
PRIORITY_QUANTUM: Final = 64

# Record headers a producer sets (values: ASCII decimal) to control queue delivery.
HEADER_DELIVER_AT: Final = "rustmq-deliver-at-ms"
HEADER_DELAY: Final = "rustmq-delay-ms"
HEADER_TTL: Final = "rustmq-ttl-ms"
HEADER_PRIORITY: Final = "rustmq-priority"
# Headers a dead letter carries (values: UTF-8 text).
DLQ_TOPIC: Final = "rustmq-dlq-topic"
DLQ_PARTITION: Final = "rustmq-dlq-partition"
DLQ_OFFSET: Final = "rustmq-dlq-offset"
DLQ_ATTEMPTS: Final = "rustmq-dlq-attempts"
DLQ_REASON: Final = "rustmq-dlq-reason"
DLQ_SUBSCRIPTION: Final = "rustmq-dlq-subscription"
DLQ_HEADERS: Final = (DLQ_TOPIC, DLQ_PARTITION, DLQ_OFFSET, DLQ_ATTEMPTS, DLQ_REASON, DLQ_SUBSCRIPTION)


# A record as msgpack decodes it: [timestamp_delta, key, value, headers]; the fields are Any
# because they come off the wire and are checked where used.
DecodedRecord = Sequence[Any]

class QueueError(ValueError):
    code = "INVALID_QUEUE_REQUEST"


@dataclasses.dataclass(frozen=True, slots=True)
class QueueSettings:
    ack_wait_ms: int = 30_000
    max_deliveries: int = 5
    max_in_flight: int = 10_000
    max_lookahead: int = 1_000_000
    priority_weights: tuple[int, ...] = (8, 4, 1)
    default_priority: int = 1
    ttl_ms: int | None = None
    max_delay_ms: int = 7 * 24 * 3600 * 1000

    def __post_init__(self) -> None:
        if self.ack_wait_ms < 1 or self.max_deliveries < 1 or self.max_in_flight < 1:
            raise QueueError("ack_wait_ms, max_deliveries and max_in_flight must be >= 1")
        if self.max_lookahead < self.max_in_flight:
            raise QueueError("max_lookahead must be >= max_in_flight")
        if not 1 <= len(self.priority_weights) <= 10 or min(self.priority_weights) < 1:
            raise QueueError("priority_weights: 1 to 10 levels, each weight >= 1")
        if not 0 <= self.default_priority < len(self.priority_weights):
            raise QueueError("default_priority must name one of the levels")
        if self.ttl_ms is not None and self.ttl_ms < 1:
            raise QueueError("ttl_ms must be >= 1 or None")


class RecordAttributes(NamedTuple):
    """Delivery attributes of one record that differs from its batch's defaults."""

    deliver_at_ms: int = 0
    expires_at_ms: int = NEVER
    priority: int | None = None


class Lease:
    __slots__ = ("lease_id", "consumer", "deadline_ms", "ranges")

    def __init__(self, lease_id: int, consumer: str, deadline_ms: int,
                 ranges: list[tuple[int, int, int, int]]) -> None:
        self.lease_id = lease_id
        self.consumer = consumer
        self.deadline_ms = deadline_ms
        self.ranges = ranges  # (start, end, lane, expires_at_ms), sorted by start

    def info(self, offset: int) -> tuple[int, int]:
        """(lane, expires_at_ms) of an offset of this lease."""
        i = bisect.bisect_right(self.ranges, (offset, NEVER)) - 1
        start, end, lane, expires = self.ranges[i]
        assert start <= offset < end
        return lane, expires


class Delivery(NamedTuple):
    lease_id: int
    deadline_ms: int
    ranges: list[tuple[int, int]]  # [start, end) offset ranges leased, in service order
    attempts: dict[int, int]  # delivery number of offsets delivered before (absent: first)

    @property
    def record_count(self) -> int:
        return sum(end - start for start, end in self.ranges)


class DeadLetter(NamedTuple):
    topic: str
    partition: int
    offset: int
    attempts: int
    reason: str


class AckResult(NamedTuple):
    acked: int
    duplicates: int  # already done (acked twice, or acked after dead-letter/expiry)


class Counters:
    __slots__ = ("delivered", "redelivered", "acked", "nacked", "lease_expired", "dead_lettered",
                 "expired", "skipped")

    delivered: int
    redelivered: int
    acked: int
    nacked: int
    lease_expired: int
    dead_lettered: int
    expired: int
    skipped: int

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class QueueSubscription:
    """One subscription's state on one partition (see the module docstring)."""

    def __init__(self, subscription: str, topic: str, partition: int,
                 settings: QueueSettings | None = None, *, start_offset: int = 0) -> None:
        self.subscription = subscription
        self.topic = topic
        self.partition = partition
        self.settings = settings or QueueSettings()
        self.ack_floor = start_offset
        self.next_offset = start_offset
        self.done: set[int] = set()
        self.failures: dict[int, int] = {}
        self.reasons: dict[int, str] = {}
        self.in_flight: dict[int, Lease] = {}
        self.counters = Counters()
        levels = len(self.settings.priority_weights)
        self._fresh: list[deque[tuple[int, int, int]]] = [deque() for _ in range(levels)]
        self._retry: list[deque[tuple[int, int, int]]] = [deque() for _ in range(levels)]
        self._credits = [w * PRIORITY_QUANTUM for w in self.settings.priority_weights]
        self._delayed: list[tuple[int, int, int, int]] = []
        self._deadlines: list[tuple[int, int, Lease]] = []
        self._lease_ids = itertools.count(1)
        self._dirty_done: list[int] = []
        self._dirty_failures: dict[int, int] = {}
        self._outbox: list[DeadLetter] = []  # dead letters produced inside acquire()
        # Offsets whose dead letter is being written: neither available nor done until the
        # write is durable (`dead_letters_written`); a failed write retries (`dead_letters_failed`).
        self.dead_pending: set[int] = set()
        self._dlq_retry: list[DeadLetter] = []
        self._dlq_retry_at_ms: int | None = None
        self.needs_snapshot = True  # its start offset is not persisted yet
        self.changed: set[QueueSubscription] | None = None  # the store's set of dirty states

    # ------------------------------------------------------------------------------- feeding

    def offer_room(self) -> int:
        """How many more offsets the server may offer now (lookahead limit)."""
        return max(0, self.ack_floor + self.settings.max_lookahead - self.next_offset)

    def offer(self, now_ms: int, base_offset: int, count: int, timestamp_ms: int,
              special: Mapping[int, RecordAttributes] | None = None) -> None:
        """Make records base_offset .. base_offset+count-1 of the log known (in log order).

        `timestamp_ms` is the batch's first timestamp (the per-topic TTL counts from it);
        `special` gives per-record attributes for the few records that carry delivery headers.
        Offsets below `next_offset` (a re-read after restart) are skipped. An offer above
        `next_offset` means the records in between are gone (key compaction removed them): they
        count as `skipped` and settle nothing else.
        """
        end = base_offset + count
        if base_offset > self.next_offset:
            self._skip_gap(self.next_offset, base_offset)
        start = max(base_offset, self.next_offset)
        if start >= end:
            return
        ttl = self.settings.ttl_ms
        expires = NEVER if ttl is None else timestamp_ms + ttl
        lane = self.settings.default_priority
        fresh = self._fresh
        if special:
            cursor = start
            for offset in sorted(o for o in special if start <= o < end):
                if cursor < offset:
                    fresh[lane].append((cursor, offset, expires))
                self._offer_special(now_ms, offset, special[offset], expires)
                cursor = offset + 1
            if cursor < end:
                fresh[lane].append((cursor, end, expires))
        else:
            fresh[lane].append((start, end, expires))
        self.next_offset = end

    def _skip_gap(self, start: int, end: int) -> None:
        self.counters.skipped += end - start
        self.next_offset = end
        if self.ack_floor == start:  # everything below is settled: the floor jumps the gap
            self.ack_floor = end
            self._advance_floor()
        else:
            self.done.update(range(start, end))

    def _offer_special(self, now_ms: int, offset: int, attrs: RecordAttributes,
                       batch_expires: int) -> None:
        levels = len(self._fresh)
        lane = self.settings.default_priority if attrs.priority is None else min(
            max(attrs.priority, 0), levels - 1)
        expires = min(attrs.expires_at_ms, batch_expires)
        deliver_at = min(attrs.deliver_at_ms, now_ms + self.settings.max_delay_ms)
        if offset < self.ack_floor or offset in self.done:
            return
        if deliver_at > now_ms:
            heapq.heappush(self._delayed, (deliver_at, offset, lane, expires))
        else:
            self._fresh[lane].append((offset, offset + 1, expires))

    # ------------------------------------------------------------------------------- delivering

    def acquire(self, now_ms: int, consumer: str, max_messages: int,
                ack_wait_ms: int | None = None) -> Delivery | None:
        """Lease up to `max_messages` available records to `consumer`; None if there are none.

        Expired leases it processes first may dead-letter records: `take_dead_letters()` after.
        """
        self._outbox.extend(self._release_due(now_ms))
        room = min(max_messages, self.settings.max_in_flight - len(self.in_flight))
        if room <= 0:
            return None
        taken: list[tuple[int, int, int, int]] = []
        credits = self._credits
        levels = len(credits)
        while room > 0:
            progressed = False
            for lane in range(levels):
                if credits[lane] <= 0:
                    continue
                n = self._take(now_ms, lane, min(room, credits[lane]), taken)
                if n:
                    credits[lane] -= n
                    room -= n
                    progressed = True
                    break
            if not progressed:
                if not self._has_available():
                    break
                self._credits = credits = [w * PRIORITY_QUANTUM
                                           for w in self.settings.priority_weights]
        if not taken:
            return None
        wait = self.settings.ack_wait_ms if ack_wait_ms is None else ack_wait_ms
        deadline = now_ms + wait
        lease = Lease(next(self._lease_ids), consumer, deadline, sorted(taken))
        in_flight = self.in_flight
        failures = self.failures
        attempts: dict[int, int] = {}
        delivered = 0
        for start, end, _, _ in taken:
            in_flight.update(dict.fromkeys(range(start, end), lease))
            delivered += end - start
            if failures:
                for offset in range(start, end):
                    failed = failures.get(offset)
                    if failed:
                        attempts[offset] = failed + 1
        heapq.heappush(self._deadlines, (deadline, lease.lease_id, lease))
        if len(self._deadlines) > 2 * self.settings.max_in_flight + 64:
            self._prune_deadlines()
        self.counters.delivered += delivered
        self.counters.redelivered += len(attempts)
        return Delivery(lease.lease_id, deadline, [(s, e) for s, e, _, _ in taken], attempts)

    def _prune_deadlines(self) -> None:
        """Drop heap entries of leases with nothing left in flight (all acked or re-leased), so
        the heap stays within about 2 x max_in_flight entries however fast acks come."""
        live = {id(lease) for lease in self.in_flight.values()}  # heap entries keep ids unique
        self._deadlines = [entry for entry in self._deadlines if id(entry[2]) in live]
        heapq.heapify(self._deadlines)

    def _has_available(self) -> bool:
        return any(self._fresh) or any(self._retry)

    def _take(self, now_ms: int, lane: int, limit: int,
              taken: list[tuple[int, int, int, int]]) -> int:
        """Move up to `limit` deliverable offsets of `lane` into `taken`; return how many."""
        got = 0
        done = self.done
        for source in (self._retry[lane], self._fresh[lane]):
            while got < limit and source:
                start, end, expires = source.popleft()
                if end <= self.ack_floor:  # settled meanwhile (late ack, restart)
                    continue
                start = max(start, self.ack_floor)
                if expires <= now_ms:
                    self._expire_range(start, end)
                    continue
                stop = min(end, start + (limit - got))
                if stop < end:
                    source.appendleft((stop, end, expires))
                if done:
                    run = start
                    for offset in range(start, stop):
                        if offset in done:
                            if run < offset:
                                taken.append((run, offset, lane, expires))
                                got += offset - run
                            run = offset + 1
                    if run < stop:
                        taken.append((run, stop, lane, expires))
                        got += stop - run
                else:
                    taken.append((start, stop, lane, expires))
                    got += stop - start
        return got

    def _expire_range(self, start: int, end: int) -> None:
        count = 0
        for offset in range(start, end):
            if offset >= self.ack_floor and offset not in self.done:
                self._mark_done(offset)
                count += 1
        self.counters.expired += count
        self._advance_floor()

    # ------------------------------------------------------------------------------- settling

    def ack(self, offsets: Iterable[int], known_end: int | None = None) -> AckResult:
        """Acknowledge offsets (any order). Unknown offsets raise QueueError before any change.

        `known_end` (cluster mode: the partition's high watermark as the coordinator knows it)
        accepts acks of records not offered here yet: a new coordinator after a failover gets
        the acks of records its predecessor delivered before it has read that far itself."""
        offsets = offsets if isinstance(offsets, (list, range, tuple)) else list(offsets)
        next_offset = self.next_offset if known_end is None else max(self.next_offset, known_end)
        if offsets and (max(offsets) >= next_offset or min(offsets) < 0):
            raise QueueError(f"ack of an offset never delivered (known offsets end at {next_offset})")
        floor = self.ack_floor
        done = self.done
        pop = self.in_flight.pop
        dirty = self._dirty_done
        failures = self.failures
        acked = duplicates = 0
        for offset in offsets:
            if offset < floor or offset in done:
                duplicates += 1
                continue
            pop(offset, None)
            done.add(offset)
            dirty.append(offset)
            if failures:
                failures.pop(offset, None)
                self.reasons.pop(offset, None)
            acked += 1
        self.counters.acked += acked
        if self.dead_pending:  # acked while its dead letter was being written: settled anyway
            self.dead_pending.difference_update(offsets)
        if acked and self.changed is not None:
            self.changed.add(self)
        self._advance_floor()
        return AckResult(acked, duplicates)

    def ack_range(self, start: int, end: int) -> AckResult:
        """Acknowledge every offset in [start, end)."""
        return self.ack(range(start, end))

    def nack(self, now_ms: int, offsets: Iterable[int], delay_ms: int = 0,
             reason: str = "nack") -> list[DeadLetter]:
        """Give leased records back (after `delay_ms`); returns the dead letters this causes."""
        if delay_ms < 0 or delay_ms > self.settings.max_delay_ms:
            raise QueueError(f"nack delay must be between 0 and {self.settings.max_delay_ms} ms")
        letters: list[DeadLetter] = []
        for offset in offsets:
            lease = self.in_flight.pop(offset, None)
            if lease is not None:
                self.counters.nacked += 1
                self._fail(now_ms, offset, lease, reason, delay_ms, letters)
        self._advance_floor()
        return letters

    def extend(self, now_ms: int, offsets: Iterable[int], ack_wait_ms: int | None = None) -> int:
        """Renew the lease of in-flight offsets; returns how many were still leased."""
        wait = self.settings.ack_wait_ms if ack_wait_ms is None else ack_wait_ms
        ranges: list[tuple[int, int, int, int]] = []
        held = [o for o in sorted(set(offsets)) if o in self.in_flight]
        if not held:
            return 0
        first = self.in_flight[held[0]]
        for offset in held:
            lane, expires = self.in_flight[offset].info(offset)
            ranges.append((offset, offset + 1, lane, expires))
        lease = Lease(next(self._lease_ids), first.consumer, now_ms + wait, ranges)
        for offset in held:
            self.in_flight[offset] = lease
        heapq.heappush(self._deadlines, (lease.deadline_ms, lease.lease_id, lease))
        return len(held)

    def release_consumer(self, now_ms: int, consumer: str, reason: str = "consumer left"
                         ) -> list[DeadLetter]:
        """Fail every record leased to `consumer` (it disconnected or was declared dead)."""
        letters: list[DeadLetter] = []
        for offset, lease in list(self.in_flight.items()):
            if lease.consumer == consumer:
                del self.in_flight[offset]
                self._fail(now_ms, offset, lease, reason, 0, letters)
        self._advance_floor()
        return letters

    def expire_leases(self, now_ms: int) -> list[DeadLetter]:
        """Fail records whose lease deadline passed; also releases due delayed records.

        Returns the dead letters this causes, and any left by an earlier `acquire`.
        """
        letters = self._release_due(now_ms)
        if self._dlq_retry and self._dlq_retry_at_ms is not None and now_ms >= self._dlq_retry_at_ms:
            letters = [letter for letter in self._dlq_retry if letter.offset in self.dead_pending] + letters
            self._dlq_retry, self._dlq_retry_at_ms = [], None
        return self.take_dead_letters() + letters if self._outbox else letters

    def take_dead_letters(self) -> list[DeadLetter]:
        """Dead letters produced by `acquire` (lease expiries it processed) not yet returned."""
        letters, self._outbox = self._outbox, []
        return letters

    def next_deadline_ms(self) -> int | None:
        """The next time `expire_leases` has something to do (lease or delay due)."""
        times = []
        if self._deadlines:
            times.append(self._deadlines[0][0])
        if self._delayed:
            times.append(self._delayed[0][0])
        if self._dlq_retry_at_ms is not None:
            times.append(self._dlq_retry_at_ms)
        return min(times, default=None)

    def _release_due(self, now_ms: int) -> list[DeadLetter]:
        letters: list[DeadLetter] = []
        deadlines = self._deadlines
        in_flight = self.in_flight
        while deadlines and deadlines[0][0] <= now_ms:
            _, _, lease = heapq.heappop(deadlines)
            for start, end, _, _ in lease.ranges:
                for offset in range(start, end):
                    if in_flight.get(offset) is lease:
                        del in_flight[offset]
                        self.counters.lease_expired += 1
                        self._fail(now_ms, offset, lease, "lease expired", 0, letters)
        delayed = self._delayed
        while delayed and delayed[0][0] <= now_ms:
            _, offset, lane, expires = heapq.heappop(delayed)
            if offset >= self.ack_floor and offset not in self.done:
                self._retry[lane].append((offset, offset + 1, expires))
        if letters:
            self._advance_floor()
        return letters

    def _fail(self, now_ms: int, offset: int, lease: Lease, reason: str, delay_ms: int,
              letters: list[DeadLetter]) -> None:
        failed = self.failures.get(offset, 0) + 1
        lane, expires = lease.info(offset)
        if failed >= self.settings.max_deliveries:
            # Hazard: not done yet. Done is journaled with the next persist, and the dead
            # letter may not be durable by then (or its write may fail): the server marks it
            # done only once the DLQ write is durable (`dead_letters_written`).
            self.failures.pop(offset, None)
            self.reasons.pop(offset, None)
            self._dirty_failures.pop(offset, None)
            self.dead_pending.add(offset)
            letters.append(DeadLetter(self.topic, self.partition, offset, failed, reason))
            return
        self.failures[offset] = failed
        self.reasons[offset] = reason
        self._dirty_failures[offset] = failed
        if self.changed is not None:
            self.changed.add(self)
        if delay_ms > 0:
            heapq.heappush(self._delayed, (now_ms + delay_ms, offset, lane, expires))
        else:
            self._retry[lane].append((offset, offset + 1, expires))

    def dead_letters_written(self, letters: Iterable[DeadLetter]) -> None:
        """Their DLQ write is durable: the offsets are done (journaled by the next persist)."""
        for letter in letters:
            offset = letter.offset
            if offset in self.dead_pending:
                self.dead_pending.discard(offset)
                self.counters.dead_lettered += 1
                if offset >= self.ack_floor and offset not in self.done:
                    self._mark_done(offset)
        self._advance_floor()

    def dead_letters_failed(self, now_ms: int, letters: Iterable[DeadLetter]) -> None:
        """Their DLQ write failed: they stay pending (not delivered, not done) and are handed
        out again by `expire_leases` after DLQ_RETRY_MS. After a restart before that they are
        delivered again (their last failure was not journaled: at-least-once)."""
        for letter in letters:
            if letter.offset in self.dead_pending:
                self._dlq_retry.append(letter)
        if self._dlq_retry:
            self._dlq_retry_at_ms = now_ms + DLQ_RETRY_MS

    def _mark_done(self, offset: int) -> None:
        self.done.add(offset)
        self._dirty_done.append(offset)
        if self.changed is not None:
            self.changed.add(self)

    def _advance_floor(self) -> None:
        done = self.done
        floor = self.ack_floor
        if floor in done:
            while floor in done:
                done.discard(floor)
                floor += 1
            self.ack_floor = floor

    # ------------------------------------------------------------------------------- persistence

    def drain_changes(self) -> tuple[list[tuple[int, int]], dict[int, int]] | None:
        """Done offsets (as ranges) and failure counts changed since the last call, or None."""
        if not self._dirty_done and not self._dirty_failures:
            return None
        ranges = to_ranges(self._dirty_done)
        failures = self._dirty_failures
        self._dirty_done = []
        self._dirty_failures = {}
        return ranges, failures

    def snapshot(self) -> tuple[int, list[tuple[int, int]], dict[int, int]]:
        """(ack floor, done ranges above it, failure counts): everything that is persisted."""
        return self.ack_floor, to_ranges(sorted(self.done)), dict(self.failures)

    def restore(self, floor: int, done: Iterable[tuple[int, int]], failures: Mapping[int, int]
                ) -> None:
        """Apply persisted state (before any offer). Later calls add to earlier ones."""
        if floor > self.ack_floor:
            self.ack_floor = floor
            self.done = {o for o in self.done if o >= floor}
        for start, end in done:
            self.done.update(range(max(start, self.ack_floor), end))
        for offset, count in failures.items():
            if offset >= self.ack_floor and offset not in self.done:
                self.failures[offset] = count
        self.failures = {o: c for o, c in self.failures.items()
                         if o >= self.ack_floor and o not in self.done}
        self._advance_floor()
        self.next_offset = max(self.next_offset, self.ack_floor)

    def skip_to(self, offset: int) -> None:
        """Treat every offset below `offset` as gone (retention deleted it before this
        subscription settled it): counted as `skipped`, persisted as a new floor."""
        if offset <= self.ack_floor:
            return
        below = sum(1 for o in self.done if o < offset)
        self.counters.skipped += offset - self.ack_floor - below
        self.ack_floor = offset
        self.done = {o for o in self.done if o >= offset}
        self.dead_pending = {o for o in self.dead_pending if o >= offset}
        for o in [o for o in self.in_flight if o < offset]:
            del self.in_flight[o]
        self.failures = {o: n for o, n in self.failures.items() if o >= offset}
        self.reasons = {o: r for o, r in self.reasons.items() if o >= offset}
        self.next_offset = max(self.next_offset, offset)
        self._advance_floor()
        self.needs_snapshot = True
        if self.changed is not None:
            self.changed.add(self)

    def reset(self, start_offset: int) -> None:
        """Forget all progress and start over at `start_offset` (an admin "reset subscription to
        an offset or time", resolved to an offset by the caller). Leases in flight are dropped:
        acks for them are then rejected or counted as duplicates."""
        if start_offset < 0:
            raise QueueError("start offset must be >= 0")
        changed, counters = self.changed, self.counters
        self.__init__(self.subscription, self.topic, self.partition, self.settings,  # type: ignore[misc]
                      start_offset=start_offset)
        self.changed, self.counters = changed, counters
        if changed is not None:
            changed.add(self)

    def describe(self) -> dict[str, object]:
        return {
            "subscription": self.subscription, "topic": self.topic, "partition": self.partition,
            "ack_floor": self.ack_floor, "next_offset": self.next_offset,
            "done_above_floor": len(self.done), "in_flight": len(self.in_flight),
            "delayed": len(self._delayed), **self.counters.as_dict(),
        }


def to_ranges(sorted_or_not: Sequence[int]) -> list[tuple[int, int]]:
    """Compress offsets into sorted, merged [start, end) ranges."""
    offsets = sorted_or_not if _is_sorted(sorted_or_not) else sorted(sorted_or_not)
    ranges: list[tuple[int, int]] = []
    if not offsets:
        return ranges
    start = prev = offsets[0]
    for offset in itertools.islice(offsets, 1, None):
        if offset != prev + 1:
            if offset == prev:
                continue
            ranges.append((start, prev + 1))
            start = offset
        prev = offset
    ranges.append((start, prev + 1))
    return ranges


def _is_sorted(values: Sequence[int]) -> bool:
    return all(a <= b for a, b in itertools.pairwise(values))


# ----------------------------------------------------------------------------- record headers

def attributes_from_headers(headers: Sequence[Sequence[Any]] | None, timestamp_ms: int,
                            levels: int) -> RecordAttributes | None:
    """The queue attributes a record's headers ask for, or None when it has none.

    Unparsable values are ignored (the record is delivered normally) rather than rejected here:
    the produce path is where bad headers get a clear error.
    """
    if not headers:
        return None
    deliver_at = 0
    expires = NEVER
    priority: int | None = None
    found = False
    for name, value in headers:
        if name not in (HEADER_DELIVER_AT, HEADER_DELAY, HEADER_TTL, HEADER_PRIORITY):
            continue
        try:
            number = int(bytes(value))
        except (TypeError, ValueError):
            continue
        found = True
        if name == HEADER_DELIVER_AT:
            deliver_at = max(deliver_at, number)
        elif name == HEADER_DELAY:
            deliver_at = max(deliver_at, timestamp_ms + number)
        elif name == HEADER_TTL:
            expires = min(expires, timestamp_ms + number)
        else:
            priority = min(max(number, 0), levels - 1)
    return RecordAttributes(deliver_at, expires, priority) if found else None


def special_records(base_offset: int, first_timestamp_ms: int, records: Sequence[DecodedRecord],
                    levels: int) -> dict[int, RecordAttributes]:
    """Attributes of the records of a decoded batch that carry delivery headers."""
    special: dict[int, RecordAttributes] = {}
    for index, record in enumerate(records):
        headers = record[3]
        if headers:
            attrs = attributes_from_headers(headers, first_timestamp_ms + int(record[0]), levels)
            if attrs is not None:
                special[base_offset + index] = attrs
    return special


def dead_letter_topic(topic: str, subscription: str) -> str:
    return f"{topic}.{subscription}.dlq"


def dead_letter_record(letter: DeadLetter, subscription: str, record: DecodedRecord
                       ) -> list[object]:
    """The DLQ copy of `record` ([timestamp_delta, key, value, headers]) with origin headers."""
    headers = [list(h) for h in (record[3] or []) if h[0] not in DLQ_HEADERS]
    headers += [
        [DLQ_TOPIC, letter.topic.encode()],
        [DLQ_PARTITION, str(letter.partition).encode()],
        [DLQ_OFFSET, str(letter.offset).encode()],
        [DLQ_ATTEMPTS, str(letter.attempts).encode()],
        [DLQ_REASON, letter.reason.encode()[:1024]],
        [DLQ_SUBSCRIPTION, subscription.encode()],
    ]
    return [record[0], record[1], record[2], headers]


def replay_record(dead: DecodedRecord) -> tuple[str, list[object]]:
    """(origin topic, record without the DLQ headers) for replaying a dead letter."""
    headers = dead[3] or []
    origin = next((bytes(v).decode() for n, v in headers if n == DLQ_TOPIC), None)
    if origin is None:
        raise QueueError("not a dead letter: no origin topic header")
    kept = [list(h) for h in headers if h[0] not in DLQ_HEADERS]
    return origin, [dead[0], dead[1], dead[2], kept or None]


# ----------------------------------------------------------------------------- settings overrides

class QueueConfigError(ValueError):
    """An unknown setting name, or settings that are inconsistent once merged."""

    code = "INVALID_CONFIG"


class QueueSettingValueError(ValueError):
    """One setting of the wrong type or outside its range."""

    code = "INVALID_REQUEST"


_DAY_MS: Final = 24 * 3600 * 1000
# The integer settings a subscription (or a topic) may override, with their inclusive limits.
SETTING_LIMITS: Final[Mapping[str, tuple[int, int]]] = {
    "ack_wait_ms": (1, 12 * 3600 * 1000),
    "max_deliveries": (1, 10_000),
    "max_in_flight": (1, 100_000),
    "max_lookahead": (1, 10_000_000),
    "default_priority": (0, 9),
    "ttl_ms": (1, 3650 * _DAY_MS),  # or None: no TTL
    "max_delay_ms": (0, 365 * _DAY_MS),
}
MAX_PRIORITY_WEIGHT: Final = 1000
OVERRIDABLE: Final = (*SETTING_LIMITS, "priority_weights")


def check_overrides(values: Mapping[str, object]) -> dict[str, object]:
    """Check each override on its own (name, type, range); return a normalised copy.

    Unknown names raise QueueConfigError; a wrong type or range QueueSettingValueError.
    ``ttl_ms`` may be None (no TTL, even if the topic layer sets one); ``priority_weights`` is a
    list of 1 to 10 weights in 1..MAX_PRIORITY_WEIGHT and comes back as a tuple.
    """
    checked: dict[str, object] = {}
    for name, value in values.items():
        if name not in OVERRIDABLE:
            raise QueueConfigError(f"unknown queue setting {name!r}; known: {', '.join(OVERRIDABLE)}")
        if name == "priority_weights":
            if (not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 10
                    or not all(_is_int(w) and 1 <= w <= MAX_PRIORITY_WEIGHT for w in value)):
                raise QueueSettingValueError(
                    f"setting 'priority_weights' must be a list of 1 to 10 weights in "
                    f"[1, {MAX_PRIORITY_WEIGHT}], got {value!r}")
            checked[name] = tuple(value)
            continue
        if name == "ttl_ms" and value is None:
            checked[name] = None
            continue
        low, high = SETTING_LIMITS[name]
        if not _is_int(value) or not low <= value <= high:  # type: ignore[operator]
            raise QueueSettingValueError(f"setting {name!r} must be an integer in [{low}, {high}]"
                                         f"{' or nil' if name == 'ttl_ms' else ''}, got {value!r}")
        checked[name] = value
    return checked


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def merge_settings(base: QueueSettings, *layers: Mapping[str, object]) -> QueueSettings:
    """`base` with the checked overrides of each layer applied in order (later layers win).

    QueueConfigError if the result is inconsistent (e.g. max_lookahead < max_in_flight) or
    changes the number of priority levels: a subscription's lanes are fixed for its lifetime,
    so only the weights may differ from the broker's.
    """
    fields: dict[str, object] = {}
    for layer in layers:
        fields.update(layer)
    if not fields:
        return base
    weights = fields.get("priority_weights")
    if weights is not None and len(weights) != len(base.priority_weights):  # type: ignore[arg-type]
        raise QueueConfigError(f"priority_weights must keep the broker's {len(base.priority_weights)} "
                               f"levels, got {len(weights)}")  # type: ignore[arg-type]
    try:
        return dataclasses.replace(base, **fields)  # type: ignore[arg-type]
    except QueueError as error:
        raise QueueConfigError(str(error)) from None


def settings_dict(settings: QueueSettings) -> dict[str, object]:
    """The settings as a plain map (the wire shape of QUEUE_DESCRIBE)."""
    values = dataclasses.asdict(settings)
    values["priority_weights"] = list(settings.priority_weights)
    return values


# ----------------------------------------------------------------------------- persistence

STATE_KEY_VERSION: Final = 1
OVERRIDES_KEY_KIND: Final = 2


class QueueStore:
    """Persists every QueueSubscription of a broker in one Journal (``coordination/queue_state``).

    Record format (msgpack): key ``[1, subscription, topic, partition]``; value one of
    ``["s", floor, [[start, end], ...], [[offset, failures], ...]]`` (a snapshot: replaces the
    state) or ``["d", [[start, end], ...], [[offset, failures], ...]]`` (a delta: more done
    ranges, new failure counts). Compaction writes one snapshot per subscription partition.

    Settings overrides: key ``[2, subscription, topic]`` (subscription nil: the topic layer every
    subscription of the topic inherits), value a map ``{setting: value}`` replacing the previous
    one (nil: no overrides left). The settings of a subscription are the store's defaults
    (the broker's configuration) merged with the topic layer, then the subscription's own.
    Compaction writes every override map again.
    """

    def __init__(self, journal: Journal | SharedJournal, settings: QueueSettings) -> None:
        self.journal = journal
        self.settings = settings
        self.subscriptions: dict[tuple[str, str, int], QueueSubscription] = {}
        self.overrides: dict[tuple[str | None, str], dict[str, object]] = {}
        self._changed: set[QueueSubscription] = set()

    @classmethod
    def open(cls, directory: Path, settings: QueueSettings | None = None, *,
             compact_bytes: int = DEFAULT_COMPACT_BYTES) -> QueueStore:
        journal = Journal.open(directory, compact_bytes=compact_bytes)
        store = cls(journal, settings or QueueSettings())
        for key, value in journal.replay():
            store._apply(key, value)
        store.replayed()
        return store

    def apply(self, key: bytes, value: bytes | None) -> None:
        """Apply one journal entry (replay of a journal shared with other stores); call
        `replayed` after the last one."""
        self._apply(key, value)

    def replayed(self) -> None:
        """After a replay: every subscription gets its merged settings."""
        for (subscription, topic, _), state in self.subscriptions.items():
            state.settings = self.settings_for(subscription, topic)

    def subscription_names(self) -> set[tuple[str, str]]:
        """Every (subscription, topic) with state or settings here."""
        names = {(s, t) for s, t, _ in self.subscriptions}
        names.update((s, t) for s, t in self.overrides if s is not None)
        return names

    def get(self, subscription: str, topic: str, partition: int, *, start_offset: int = 0,
            settings: QueueSettings | None = None) -> QueueSubscription:
        """The subscription's state on a partition (created at `start_offset` if new)."""
        key = (subscription, topic, partition)
        state = self.subscriptions.get(key)
        if state is None:
            state = QueueSubscription(subscription, topic, partition,
                                      settings or self.settings_for(subscription, topic),
                                      start_offset=start_offset)
            self.subscriptions[key] = state
            state.changed = self._changed
            self._changed.add(state)
        elif settings is not None:
            state.settings = settings
        return state

    def settings_for(self, subscription: str | None, topic: str) -> QueueSettings:
        """Effective settings: defaults, then the topic layer, then the subscription's own.

        Overrides were valid when set; if the broker's defaults changed since (a restart with
        another configuration) and a merge no longer holds, the offending layer is ignored
        with a warning rather than failing the subscription.
        """
        topic_layer = self.overrides.get((None, topic), {})
        own = {} if subscription is None else self.overrides.get((subscription, topic), {})
        try:
            return merge_settings(self.settings, topic_layer, own)
        except QueueConfigError as error:
            logger.warning("queue %s/%s: ignoring its settings overrides (%s)", topic, subscription, error)
        try:
            return merge_settings(self.settings, topic_layer)
        except QueueConfigError as error:
            logger.warning("queue topic %s: ignoring its settings overrides (%s)", topic, error)
            return self.settings

    def configure(self, now_ms: int, topic: str, subscription: str | None,
                  values: Mapping[str, object], reset: Iterable[str] = ()) -> int:
        """Set overrides of a subscription (None: the topic layer) and drop those named in
        `reset` (back to inherited). Every affected subscription's merged settings are checked
        before anything changes (QueueConfigError / QueueSettingValueError). The new map is
        journaled (the caller makes it durable before answering; returns the journal offset) and
        applied at once to the subscription's partitions known to the store; partitions first
        used later get it when created."""
        checked = check_overrides(values)
        reset = list(reset)
        for name in reset:
            if name not in OVERRIDABLE:
                raise QueueConfigError(f"unknown queue setting {name!r} to reset")
        key = (subscription, topic)
        updated = {n: v for n, v in self.overrides.get(key, {}).items() if n not in reset}
        updated.update(checked)
        if subscription is None:
            merge_settings(self.settings, updated)
            for name in self._subscription_names(topic):
                try:
                    merge_settings(self.settings, updated, self.overrides.get((name, topic), {}))
                except QueueConfigError as error:
                    raise QueueConfigError(f"subscription {name!r} of topic {topic!r}: {error}") from None
        else:
            merge_settings(self.settings, self.overrides.get((None, topic), {}), updated)
        if updated:
            self.overrides[key] = updated
        else:
            self.overrides.pop(key, None)
        last = self.journal.append([_overrides_entry(subscription, topic, updated)], now_ms)
        for (name, t, _), state in self.subscriptions.items():
            if t == topic and (subscription is None or name == subscription):
                state.settings = self.settings_for(name, topic)
        self.journal.maybe_compact(self._live_entries, now_ms)
        return last

    def describe(self, topic: str, subscription: str | None) -> dict[str, object]:
        """Defaults, both override layers and the effective settings; with a subscription also
        its partitions' state, without one the names of the topic's subscriptions."""
        described: dict[str, object] = {
            "topic": topic,
            "subscription": subscription,
            "defaults": settings_dict(self.settings),
            "topic_overrides": _plain(self.overrides.get((None, topic), {})),
            "overrides": {} if subscription is None else _plain(self.overrides.get((subscription, topic), {})),
            "effective": settings_dict(self.settings_for(subscription, topic)),
        }
        if subscription is None:
            described["subscriptions"] = sorted(self._subscription_names(topic))
        else:
            described["partitions"] = [
                state.describe() for (name, t, _), state in sorted(self.subscriptions.items(), key=lambda i: i[0][2])
                if t == topic and name == subscription
            ]
        return described

    def _subscription_names(self, topic: str) -> set[str]:
        names = {name for (name, t, _) in self.subscriptions if t == topic}
        names.update(name for (name, t) in self.overrides if t == topic and name is not None)
        return names

    def min_floor(self, topic: str, partition: int) -> int | None:
        """The lowest ack floor of the queue subscriptions on a partition (None: there are none):
        everything below it is settled for every subscription (acked-only retention)."""
        floors = [s.ack_floor for (_, t, p), s in self.subscriptions.items()
                  if t == topic and p == partition]
        return min(floors, default=None)

    def persist(self, now_ms: int) -> int | None:
        """Journal every subscription's changes as one batch; returns its offset (None: nothing).

        The caller flushes (or group-commits) before acknowledging the acks it covers.
        """
        entries: list[Entry] = []
        changed = self._changed
        while changed:
            state = changed.pop()
            if state.needs_snapshot:
                state.drain_changes()
                state.needs_snapshot = False
                entries.append(_snapshot_entry(state))
                continue
            changes = state.drain_changes()
            if changes is not None:
                ranges, failures = changes
                entries.append((_state_key(state.subscription, state.topic, state.partition),
                                msgpack.packb(
                    ["d", ranges, list(failures.items())])))
        if not entries:
            return None
        last = self.journal.append(entries, now_ms)
        self.journal.maybe_compact(self._live_entries, now_ms)
        return last

    def has_changes(self) -> bool:
        return bool(self._changed)

    def flush(self) -> int:
        return self.journal.flush()

    def close(self, clean: bool = True) -> None:
        self.journal.close(clean)

    def live_entries(self) -> list[Entry]:
        """The store's state as entries (a compaction's snapshot)."""
        return self._live_entries()

    def _live_entries(self) -> list[Entry]:
        entries = [_overrides_entry(subscription, topic, values)
                   for (subscription, topic), values in self.overrides.items()]
        entries.extend(_snapshot_entry(state) for state in self.subscriptions.values())
        return entries

    def _apply(self, key: bytes, value: bytes | None) -> None:
        fields = msgpack.unpackb(key)
        if fields[0] == OVERRIDES_KEY_KIND:
            _, subscription, topic = fields
            loaded = {} if value is None else _load_overrides(subscription, topic, msgpack.unpackb(value))
            if loaded:
                self.overrides[(subscription, topic)] = loaded
            else:
                self.overrides.pop((subscription, topic), None)
            return
        version, subscription, topic, partition = fields
        if version != STATE_KEY_VERSION:
            raise ValueError(f"unknown queue state key version {version}")
        if value is None:
            self.subscriptions.pop((subscription, topic, partition), None)
            return
        kind, *rest = msgpack.unpackb(value)
        if kind == "s":
            floor, ranges, failures = rest
            state = QueueSubscription(subscription, topic, partition, self.settings,
                                      start_offset=floor)
            self.subscriptions[(subscription, topic, partition)] = state
            state.restore(floor, ranges, dict(failures))
            state.needs_snapshot = False
            state.changed = self._changed
        elif kind == "d":
            ranges, failures = rest
            state = self.get(subscription, topic, partition)
            state.restore(state.ack_floor, ranges, dict(failures))
        else:
            raise ValueError(f"unknown queue state record kind {kind!r}")


SHARED_KEY_KIND: Final = 3  # offsets use 1 and producer names 2 on the internal partition


class SharedJournal:
    """A QueueStore's view of a journal shared with other stores (cluster mode: a partition of
    the internal topic, which also holds committed offsets ``[1, ...]`` and producer names
    ``[2, name]``): every key is wrapped as msgpack ``[3, key]``, so replay can tell the
    stores' entries apart (`is_queue_key`, `unwrap_key`)."""

    def __init__(self, journal: Any) -> None:
        self.inner = journal

    @staticmethod
    def is_queue_key(key: bytes) -> bool:
        decoded = msgpack.unpackb(key)
        return isinstance(decoded, list) and len(decoded) == 2 and decoded[0] == SHARED_KEY_KIND

    @staticmethod
    def unwrap_key(key: bytes) -> bytes:
        return bytes(msgpack.unpackb(key)[1])

    @staticmethod
    def wrap(entries: Iterable[Entry]) -> list[Entry]:
        return [(msgpack.packb([SHARED_KEY_KIND, key]), value) for key, value in entries]

    def append(self, entries: Sequence[Entry], now_ms: int) -> int:
        return int(self.inner.append(self.wrap(entries), now_ms))

    def position(self) -> Any:
        return self.inner.position()

    def maybe_compact(self, live: Any, now_ms: int) -> bool:
        """Let the shared journal compact if due: its snapshot is its owner's live state of
        every store (rustmq.server.group_stores.PartitionStores), not this store's `live`."""
        return bool(self.inner.maybe_compact(live, now_ms))

    def flush(self) -> int:
        return int(self.inner.flush())

    def close(self, clean: bool = True) -> None:
        """The shared journal belongs to its owner: nothing to close here."""


def _snapshot_entry(state: QueueSubscription) -> Entry:
    floor, ranges, failures = state.snapshot()
    return (_state_key(state.subscription, state.topic, state.partition),
            msgpack.packb(["s", floor, ranges, list(failures.items())]))


def _overrides_entry(subscription: str | None, topic: str, values: Mapping[str, object]) -> Entry:
    return (msgpack.packb([OVERRIDES_KEY_KIND, subscription, topic]),
            msgpack.packb(_plain(values)) if values else None)


def _plain(values: Mapping[str, object]) -> dict[str, object]:
    return {name: list(v) if isinstance(v, tuple) else v for name, v in values.items()}


def _load_overrides(subscription: str | None, topic: str, stored: Mapping[str, object]
                    ) -> dict[str, object]:
    """Journaled overrides, each re-checked: one a newer limit refuses is dropped with a
    warning (the others still apply) instead of failing the broker's start."""
    loaded: dict[str, object] = {}
    for name, value in stored.items():
        try:
            loaded.update(check_overrides({name: value}))
        except (QueueConfigError, QueueSettingValueError) as error:
            logger.warning("queue %s/%s: dropping stored setting (%s)", topic, subscription, error)
    return loaded


def _state_key(subscription: str, topic: str, partition: int) -> bytes:
    return msgpack.packb([STATE_KEY_VERSION, subscription, topic, partition])


def iter_offsets(ranges: Iterable[tuple[int, int]]) -> Iterator[int]:
    for start, end in ranges:
        yield from range(start, end)
