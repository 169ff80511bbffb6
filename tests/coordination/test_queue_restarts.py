"""Random histories of a queue subscription with real journal reopens between steps (hypothesis)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from rustmq.coordination.queue import QueueSettings, QueueStore

steps = st.lists(st.tuples(
    st.integers(1, 30),  # records produced
    st.integers(0, 30),  # records taken
    st.lists(st.integers(0, 100), max_size=10),  # picks to ack (indexes into in-flight)
    st.lists(st.integers(0, 100), max_size=3),  # picks to nack
    st.booleans(),  # restart afterwards (crash: no flush of the unpersisted tail)
), min_size=1, max_size=12)


def settled(sub, letters) -> list[int]:
    """The server's part: the dead letters are written durably, then marked done."""
    sub.dead_letters_written(letters)
    return [d.offset for d in letters]


@settings(max_examples=40, deadline=None)
@given(steps=steps)
def test_persisted_acks_are_never_redelivered_across_reopens(steps) -> None:
    queue_settings = QueueSettings(max_deliveries=3)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "q"
        store = QueueStore.open(path, queue_settings, compact_bytes=1024)
        sub = store.get("s", "t", 0)
        produced = 0
        confirmed: set[int] = set()
        dead: set[int] = set()
        now = 0
        for count, take, acks, nacks, restart in steps:
            now += 1
            produced += count
            room = min(produced - sub.next_offset, sub.offer_room())
            if room > 0:
                sub.offer(now, sub.next_offset, room, 0)
            got = sub.acquire(now, "c", take)
            dead.update(settled(sub, sub.take_dead_letters()))
            delivered = [] if got is None else [o for s, e in got.ranges for o in range(s, e)]
            assert not set(delivered) & confirmed
            leased = sorted(sub.in_flight)
            to_ack = {leased[i % len(leased)] for i in acks} if leased else set()
            sub.ack(sorted(to_ack))
            leased = sorted(sub.in_flight)
            to_nack = {leased[i % len(leased)] for i in nacks} if leased else set()
            dead.update(settled(sub, sub.nack(now, sorted(to_nack))))
            store.persist(now)
            store.flush()
            confirmed |= to_ack
            if restart:
                store.close(clean=False)
                store = QueueStore.open(path, queue_settings, compact_bytes=1024)
                sub = store.get("s", "t", 0)
                assert sub.ack_floor <= min(set(range(produced)) - confirmed - dead, default=produced)
        # Drain everything left: exactly the unconfirmed, non-dead offsets come back.
        remaining: set[int] = set()
        if produced > sub.next_offset:
            sub.offer(now, sub.next_offset, produced - sub.next_offset, 0)
        now += 10**9
        while (got := sub.acquire(now, "c", 1000)) is not None:
            offsets = [o for s, e in got.ranges for o in range(s, e)]
            remaining.update(offsets)
            sub.ack(offsets)
            dead.update(settled(sub, sub.take_dead_letters()))
        dead.update(settled(sub, sub.take_dead_letters()))
        leftovers = set(sub.in_flight)
        assert not remaining & confirmed
        assert not dead & confirmed
        assert remaining | leftovers | confirmed | dead == set(range(produced))
        store.close()
