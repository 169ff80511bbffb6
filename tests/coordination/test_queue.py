"""Queue subscription state machine: leases, acks, nacks, redelivery, dead letters, delays, TTL, priorities."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustmq.coordination import queue as q
from rustmq.coordination.queue import QueueSettings, QueueSubscription, RecordAttributes


def offsets_of(delivery: q.Delivery | None) -> list[int]:
    return [] if delivery is None else [o for s, e in delivery.ranges for o in range(s, e)]


def new_sub(**kw) -> QueueSubscription:
    return QueueSubscription("workers", "jobs", 0, QueueSettings(**kw))


def test_competing_consumers_share_and_acks_advance_the_floor() -> None:
    sub = new_sub()
    sub.offer(0, 0, 10, 0)
    a = sub.acquire(0, "a", 4)
    b = sub.acquire(0, "b", 4)
    assert offsets_of(a) == [0, 1, 2, 3] and offsets_of(b) == [4, 5, 6, 7]
    assert sub.ack([4, 5, 6, 7]) == (4, 0)
    assert sub.ack_floor == 0 and len(sub.done) == 4
    assert sub.ack(range(0, 4)) == (4, 0)
    assert sub.ack_floor == 8 and not sub.done
    assert sub.ack([3]) == (0, 1)  # a duplicate
    assert offsets_of(sub.acquire(0, "a", 100)) == [8, 9]
    assert sub.acquire(0, "a", 100) is None


def test_offsets_removed_by_compaction_are_skipped() -> None:
    """Offers with gaps between them (a compacted log): the gaps are never delivered and the ack
    floor crosses them, whether the records below them are settled yet or not."""
    sub = new_sub()
    sub.offer(0, 0, 3, 0)
    sub.offer(0, 10, 2, 0)  # 3..9 gone
    assert offsets_of(sub.acquire(0, "a", 100)) == [0, 1, 2, 10, 11]
    assert sub.ack([10, 11]) == (2, 0)
    assert sub.ack_floor == 0
    assert sub.ack([0, 1]) == (2, 0)
    assert sub.ack_floor == 2  # offset 2 is still unsettled
    sub.offer(0, 20, 1, 0)  # 12..19 gone while everything below is settled except 2
    assert sub.ack([2]) == (1, 0)
    assert sub.ack_floor == 20 and not sub.done
    assert sub.counters.skipped == 7 + 8
    assert offsets_of(sub.acquire(0, "a", 100)) == [20]


def test_unknown_offsets_are_rejected_without_change() -> None:
    sub = new_sub()
    sub.offer(0, 0, 3, 0)
    sub.acquire(0, "a", 3)
    with pytest.raises(q.QueueError):
        sub.ack([1, 3])
    assert not sub.done and len(sub.in_flight) == 3


def test_expired_lease_is_redelivered_with_its_attempt_number() -> None:
    sub = new_sub(ack_wait_ms=1000)
    sub.offer(0, 0, 2, 0)
    first = sub.acquire(0, "a", 2)
    assert first is not None and first.deadline_ms == 1000 and first.attempts == {}
    sub.ack([1])
    assert sub.acquire(999, "b", 10) is None
    again = sub.acquire(1000, "b", 10)
    assert offsets_of(again) == [0] and again.attempts == {0: 2}
    assert sub.counters.lease_expired == 1 and sub.counters.redelivered == 1


def test_extend_keeps_the_lease() -> None:
    sub = new_sub(ack_wait_ms=1000)
    sub.offer(0, 0, 3, 0)
    sub.acquire(0, "a", 3)
    assert sub.extend(900, [0, 2, 7]) == 2
    assert offsets_of(sub.acquire(1000, "b", 10)) == [1]
    assert sub.next_deadline_ms() == 1900  # the first lease's entry was consumed at 1000
    assert offsets_of(sub.acquire(1900, "b", 10)) == [0, 2]


def test_late_ack_after_expiry_is_honoured() -> None:
    sub = new_sub(ack_wait_ms=10)
    sub.offer(0, 0, 1, 0)
    sub.acquire(0, "a", 1)
    sub.expire_leases(10)
    assert sub.ack([0]) == (1, 0)
    assert sub.acquire(20, "b", 1) is None
    assert sub.ack_floor == 1


def test_nack_with_delay_is_not_redelivered_early() -> None:
    sub = new_sub()
    sub.offer(0, 0, 1, 0)
    sub.acquire(0, "a", 1)
    assert sub.nack(100, [0], delay_ms=500, reason="busy") == []
    assert sub.acquire(599, "a", 1) is None
    assert sub.next_deadline_ms() == 600
    got = sub.acquire(600, "a", 1)
    assert offsets_of(got) == [0] and got.attempts == {0: 2}


def settled(sub: q.QueueSubscription, letters: list[q.DeadLetter]) -> list[int]:
    """The server's part: the dead letters are written durably, then marked done."""
    sub.dead_letters_written(letters)
    return [d.offset for d in letters]


def test_max_deliveries_dead_letters_with_the_last_reason() -> None:
    sub = new_sub(max_deliveries=3)
    sub.offer(0, 0, 2, 0)
    letters: list[q.DeadLetter] = []
    for attempt in range(3):
        got = sub.acquire(attempt, "a", 1)
        assert offsets_of(got) == [0]
        letters += sub.nack(attempt, [0], reason=f"boom {attempt}")
    assert letters == [q.DeadLetter("jobs", 0, 0, 3, "boom 2")]
    assert sub.ack_floor == 0  # not done until the dead letter is durable
    sub.dead_letters_written(letters)
    assert offsets_of(sub.acquire(10, "a", 5)) == [1]
    assert sub.ack([0]) == (0, 1)  # dead letters are done
    sub.ack([1])
    assert sub.ack_floor == 2 and sub.counters.dead_lettered == 1


def test_lease_expiry_counts_towards_dead_letter() -> None:
    sub = new_sub(max_deliveries=2, ack_wait_ms=10)
    sub.offer(0, 0, 1, 0)
    sub.acquire(0, "a", 1)
    sub.acquire(10, "a", 1)
    assert sub.expire_leases(20) == [q.DeadLetter("jobs", 0, 0, 2, "lease expired")]


def test_release_consumer_returns_its_records() -> None:
    sub = new_sub()
    sub.offer(0, 0, 4, 0)
    sub.acquire(0, "a", 2)
    sub.acquire(0, "b", 2)
    sub.release_consumer(5, "a")
    assert offsets_of(sub.acquire(5, "c", 10)) == [0, 1]


def test_delayed_records_wait_and_others_pass() -> None:
    sub = new_sub()
    sub.offer(0, 0, 3, 0, {1: RecordAttributes(deliver_at_ms=5000)})
    assert offsets_of(sub.acquire(0, "a", 10)) == [0, 2]
    assert sub.acquire(4999, "a", 10) is None
    assert offsets_of(sub.acquire(5000, "a", 10)) == [1]


def test_ttl_expired_records_are_never_delivered() -> None:
    sub = new_sub(ttl_ms=1000)
    sub.offer(0, 0, 5, 100, {3: RecordAttributes(expires_at_ms=300)})
    assert offsets_of(sub.acquire(200, "a", 2)) == [0, 1]
    assert offsets_of(sub.acquire(300, "a", 5)) == [2, 4]  # 3 expired at 300
    sub.nack(300, [2])
    assert sub.acquire(1100, "a", 5) is None  # batch TTL: 100 + 1000
    assert sub.counters.expired == 2
    sub.ack([0, 1, 4])
    assert sub.ack_floor == 5


def test_priorities_are_weighted_without_starvation() -> None:
    sub = new_sub(priority_weights=(4, 1), default_priority=0, max_in_flight=100_000)
    sub.offer(0, 0, 10_000, 0)  # default lane 0 (high)
    low = {o: RecordAttributes(priority=1) for o in range(10_000, 10_500)}
    sub.offer(0, 10_000, 500, 0, low)
    served = offsets_of(sub.acquire(0, "a", 1000))
    lows = [o for o in served if o >= 10_000]
    assert 150 <= len(lows) <= 250  # about 1/5 of deliveries while both lanes have records
    highs = [o for o in served if o < 10_000]
    assert highs == sorted(highs) and lows == sorted(lows)  # offset order within a lane


def test_limits_in_flight_and_lookahead() -> None:
    sub = new_sub(max_in_flight=5, max_lookahead=8)
    assert sub.offer_room() == 8
    sub.offer(0, 0, 8, 0)
    assert sub.offer_room() == 0
    assert len(offsets_of(sub.acquire(0, "a", 100))) == 5
    assert sub.acquire(0, "a", 100) is None
    sub.ack([0, 1])
    assert sub.offer_room() == 2
    assert offsets_of(sub.acquire(0, "a", 100)) == [5, 6]


def test_headers_and_dead_letter_round_trip() -> None:
    headers = [["rustmq-delay-ms", b"250"], ["rustmq-priority", b"9"], ["x", b"y"],
               ["rustmq-ttl-ms", b"bad"]]
    attrs = q.attributes_from_headers(headers, 1000, levels=3)
    assert attrs == RecordAttributes(1250, q.NEVER, 2)
    assert q.attributes_from_headers([["x", b"1"]], 0, 3) is None
    special = q.special_records(10, 1000, [[0, None, b"a", None], [5, None, b"b", headers]], 3)
    assert special == {11: RecordAttributes(1255, q.NEVER, 2)}
    letter = q.DeadLetter("jobs", 2, 42, 5, "boom")
    dead = q.dead_letter_record(letter, "workers", [7, b"k", b"v", [["x", b"y"]]])
    names = dict((n, v) for n, v in dead[3])
    assert names[q.DLQ_OFFSET] == b"42" and names[q.DLQ_REASON] == b"boom"
    assert q.replay_record(dead) == ("jobs", [7, b"k", b"v", [["x", b"y"]]])
    assert q.dead_letter_topic("jobs", "workers") == "jobs.workers.dlq"
    with pytest.raises(q.QueueError):
        q.replay_record([0, None, b"v", None])


def test_to_ranges() -> None:
    assert q.to_ranges([5, 1, 2, 3, 9, 9, 10]) == [(1, 4), (5, 6), (9, 11)]
    assert q.to_ranges([]) == []


ops = st.lists(st.one_of(
    st.tuples(st.just("offer"), st.integers(1, 20)),
    st.tuples(st.just("acquire"), st.integers(1, 10)),
    st.tuples(st.just("ack"), st.integers(0, 30)),
    st.tuples(st.just("nack"), st.integers(0, 30)),
    st.tuples(st.just("time"), st.integers(0, 600)),
    st.tuples(st.just("restart"), st.just(0)),
), max_size=60)


@settings(max_examples=250, deadline=None)
@given(ops=ops, delayed=st.sets(st.integers(0, 200), max_size=10))
def test_acked_records_are_never_delivered_again_and_everything_settles(ops, delayed) -> None:
    settings_ = QueueSettings(ack_wait_ms=500, max_deliveries=3)
    sub = QueueSubscription("s", "t", 0, settings_)
    now = 0
    acked: set[int] = set()
    dead: set[int] = set()
    deliver_at = {o: 300 + o for o in delayed}

    def offer(n: int) -> None:
        start = sub.next_offset
        special = {o: RecordAttributes(deliver_at_ms=deliver_at[o])
                   for o in range(start, start + n) if o in deliver_at}
        sub.offer(now, start, n, 0, special)

    for op, arg in ops:
        if op == "offer":
            offer(arg)
        elif op == "acquire":
            got = offsets_of(sub.acquire(now, "c", arg))
            dead.update(settled(sub, sub.take_dead_letters()))
            assert not (set(got) & acked), "an acked record was delivered again"
            assert not (set(got) & dead)
            for o in got:
                assert deliver_at.get(o, 0) <= now, "a delayed record was delivered early"
        elif op == "ack" and sub.in_flight:
            target = sorted(sub.in_flight)[arg % len(sub.in_flight)]
            sub.ack([target])
            acked.add(target)
        elif op == "nack" and sub.in_flight:
            target = sorted(sub.in_flight)[arg % len(sub.in_flight)]
            dead.update(settled(sub, sub.nack(now, [target])))
        elif op == "time":
            now += arg
            dead.update(settled(sub, sub.expire_leases(now)))
        elif op == "restart":
            floor, ranges, failures = sub.snapshot()
            next_offset = sub.next_offset
            sub = QueueSubscription("s", "t", 0, settings_, start_offset=floor)
            sub.restore(floor, ranges, failures)
            offer_from = sub.next_offset
            if next_offset > offer_from:
                offer(next_offset - offer_from)
        assert sub.ack_floor <= sub.next_offset
    # Drain: everything not acked or dead-lettered is eventually delivered and can be acked.
    for _ in range(1000):
        now += 1000
        dead.update(settled(sub, sub.expire_leases(now)))
        got = offsets_of(sub.acquire(now, "c", 50))
        dead.update(settled(sub, sub.take_dead_letters()))
        if not got and sub.ack_floor == sub.next_offset:
            break
        assert not (set(got) & acked)
        sub.ack(got)
        acked.update(got)
    assert sub.ack_floor == sub.next_offset
    assert acked.isdisjoint(dead)
    assert acked | dead == set(range(sub.next_offset))


def test_dead_letters_from_expiries_processed_by_acquire_are_kept() -> None:
    sub = new_sub(max_deliveries=1, ack_wait_ms=10)
    sub.offer(0, 0, 2, 0)
    sub.acquire(0, "a", 1)
    assert offsets_of(sub.acquire(10, "b", 5)) == [1]  # offset 0 expired and was dead-lettered
    assert sub.take_dead_letters() == [q.DeadLetter("jobs", 0, 0, 1, "lease expired")]
    assert sub.take_dead_letters() == []
    sub.acquire(20, "b", 5)
    assert sub.expire_leases(20) == [q.DeadLetter("jobs", 0, 1, 1, "lease expired")]


def test_lease_heap_stays_bounded_under_fast_acks() -> None:
    sub = new_sub(max_in_flight=100, ack_wait_ms=60_000)
    for i in range(0, 100_000, 10):
        sub.offer(0, i, 10, 0)
        sub.ack(offsets_of(sub.acquire(i, "c", 10)))
    assert len(sub._deadlines) <= 2 * 100 + 64 + 1
    assert sub.ack_floor == 100_000
