"""The sans-IO cluster rules: encoding, placement, election, ISR changes, lease timing, HW."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustmq.cluster import state
from rustmq.cluster.lease import HeldLease, LeaseObserver, LeaseTiming
from rustmq.cluster.replica import ReplicaTracker
from rustmq.cluster.state import PartitionState, TopicState
from rustmq.cluster.store import LeaseRecord


def topic(parts: list[PartitionState], rf: int = 3, min_isr: int = 2) -> TopicState:
    return TopicState("t", "id1", rf, min_isr, tuple(parts))


def test_topic_state_round_trips_through_its_json() -> None:
    t = state.new_topic("orders", "abc", 4, 3, 2, [0, 1, 2], config={"retention_ms": 5})
    assert TopicState.decode("orders", t.encode()) == t
    shard = state.encode_shard([t])
    assert state.decode_shard(shard) == {"orders": t}
    assert 0 <= state.shard_of("orders") < state.SHARDS
    assert state.shard_name("c", 3) == "c-state-03"


def test_placement_spreads_leaders_and_replicas_evenly() -> None:
    placed = state.place(12, 3, [0, 1, 2])
    assert all(len(set(r)) == 3 for r in placed)
    assert Counter(r[0] for r in placed) == {0: 4, 1: 4, 2: 4}
    existing = [state.new_topic("a", "x", 2, 1, 1, [0, 1, 2])]  # leaders on 0 and 1 already
    assert state.place(1, 1, [0, 1, 2], existing) == [(2,)]


def test_placement_refuses_more_replicas_than_brokers() -> None:
    with pytest.raises(ValueError, match="needs 3 live brokers, 2 available"):
        state.place(1, 3, [0, 1])


@settings(max_examples=200, deadline=None)
@given(brokers=st.integers(1, 7), partitions=st.integers(1, 40), data=st.data())
def test_placement_balance_property(brokers: int, partitions: int, data: st.DataObject) -> None:
    rf = data.draw(st.integers(1, brokers))
    placed = state.place(partitions, rf, range(brokers))
    leaders = Counter(r[0] for r in placed)
    counts = [leaders.get(b, 0) for b in range(brokers)]
    assert max(counts) - min(counts) <= 1
    assert all(len(set(r)) == rf for r in placed)


def test_rack_alternating_order_puts_neighbours_in_different_racks() -> None:
    racks = {0: "a", 1: "a", 2: "b", 3: "b", 4: "c", 5: "c"}
    assert state.rack_alternating(range(6), racks) == [0, 2, 4, 1, 3, 5]
    assert state.rack_alternating([3, 1, 2], {}) == [1, 2, 3]  # no racks: id order
    assert state.rack_alternating([0, 1, 2], {0: "a", 1: "a", 2: "a"}) == [0, 1, 2]
    # Uneven racks: the larger one fills the tail.
    assert state.rack_alternating(range(4), {0: "a", 1: "a", 2: "a", 3: "b"}) == [0, 3, 1, 2]


def test_placement_without_racks_ignores_them_and_with_racks_spreads_replicas_over_them() -> None:
    racks = {0: "a", 1: "a", 2: "b", 3: "b", 4: "c", 5: "c"}
    placed = state.place(12, 3, range(6), racks=racks)
    assert all({racks[b] for b in r} == {"a", "b", "c"} for r in placed), placed
    assert Counter(r[0] for r in placed) == {b: 2 for b in range(6)}
    # In id order (no racks) two of three consecutive brokers share a rack here.
    assert any(len({racks[b] for b in r}) < 3 for r in state.place(12, 3, range(6)))


@settings(max_examples=200, deadline=None)
@given(racks=st.lists(st.integers(1, 3), min_size=1, max_size=4), partitions=st.integers(1, 30), data=st.data())
def test_placement_spans_as_many_racks_as_it_can(racks: list[int], partitions: int, data: st.DataObject) -> None:
    """Equal racks (`racks[i]` brokers in rack i, cut to the smallest): every partition spans
    min(replication factor, racks) racks, and leaders stay balanced."""
    per_rack = min(racks)
    rack_of = {r * per_rack + i: f"rack-{r}" for r in range(len(racks)) for i in range(per_rack)}
    rf = data.draw(st.integers(1, len(rack_of)))
    placed = state.place(partitions, rf, rack_of, racks=rack_of)
    assert all(len({rack_of[b] for b in r}) == min(rf, len(racks)) for r in placed), placed
    counts = Counter(r[0] for r in placed)
    assert max(counts.get(b, 0) for b in rack_of) - min(counts.get(b, 0) for b in rack_of) <= 1


def test_defaults_follow_the_broker_count() -> None:
    assert [state.default_replication_factor(n) for n in (1, 2, 3, 5)] == [1, 2, 3, 3]
    assert [state.default_min_insync(rf) for rf in (1, 2, 3)] == [1, 2, 2]


def test_elect_moves_leadership_to_a_live_isr_member_and_bumps_the_epoch() -> None:
    t = topic([PartitionState((0, 1, 2), 0, 5, (0, 1, 2))])
    new = state.elect(t, alive={1, 2}, controller_epoch=3)
    assert new is not None
    assert new.partitions[0] == PartitionState((0, 1, 2), 1, 6, (1, 2))
    assert new.controller_epoch == 3
    assert state.elect(new, alive={1, 2}) is None  # stable: nothing more to change


def test_elect_never_picks_a_replica_outside_the_isr() -> None:
    t = topic([PartitionState((0, 1, 2), 0, 5, (0, 1))])  # 2 is out of sync
    new = state.elect(t, alive={2})
    assert new is not None
    p = new.partitions[0]
    assert p.leader == state.NO_LEADER and p.leader_epoch == 6
    assert p.isr == (0,)  # the old leader stays the sole ISR member: it has every committed record
    back = state.elect(new, alive={0, 2})
    assert back is not None and back.partitions[0].leader == 0 and back.partitions[0].leader_epoch == 7


def test_unclean_election_takes_any_live_replica() -> None:
    t = topic([PartitionState((0, 1, 2), 0, 5, (0,))])
    new = state.elect(t, alive={2}, unclean=True)
    assert new is not None and new.partitions[0].leader == 2 and new.partitions[0].isr == (2,)


def test_a_restarted_broker_leaves_the_isr_and_loses_leadership() -> None:
    t = topic([PartitionState((0, 1, 2), 0, 1, (0, 1, 2)), PartitionState((1, 2, 0), 1, 1, (1, 2, 0))])
    new = state.elect(t, alive={0, 1, 2}, restarted={0})
    assert new is not None
    assert new.partitions[0] == PartitionState((0, 1, 2), 1, 2, (1, 2))
    assert new.partitions[1] == PartitionState((1, 2, 0), 1, 1, (1, 2))


def test_all_brokers_restarted_at_once_come_back_with_the_old_leader() -> None:
    t = topic([PartitionState((0, 1, 2), 1, 4, (1, 2, 0))])
    first = state.elect(t, alive={0, 1, 2}, restarted={0, 1, 2})
    assert first is not None and first.partitions[0].isr == (1,) and first.partitions[0].leader == state.NO_LEADER
    second = state.elect(first, alive={0, 1, 2})
    assert second is not None and second.partitions[0].leader == 1 and second.partitions[0].leader_epoch == 6


def test_change_isr_is_refused_to_a_stale_leader() -> None:
    t = topic([PartitionState((0, 1, 2), 0, 5, (0, 1, 2))])
    assert state.change_isr(t, 0, leader=0, leader_epoch=4, isr=(0,)) is None
    assert state.change_isr(t, 0, leader=1, leader_epoch=5, isr=(1,)) is None
    shrunk = state.change_isr(t, 0, leader=0, leader_epoch=5, isr=(0, 2))
    assert shrunk is not None and shrunk.partitions[0].isr == (0, 2)
    assert state.change_isr(t, 0, leader=0, leader_epoch=5, isr=(2,)).partitions[0].isr == (0, 2)  # type: ignore[union-attr]


def test_lease_timing_rule() -> None:
    LeaseTiming(6, 1, 2).check()
    with pytest.raises(ValueError, match="must not exceed lease_duration_s"):
        LeaseTiming(4, 1, 2).check()
    assert LeaseTiming(5.5, 1, 2).duration_seconds == 6


def test_held_lease_expires_before_any_observer_may_take_over() -> None:
    timing = LeaseTiming(6, 1, 2)
    held = HeldLease(timing)
    assert not held.valid(0)
    held.renewed(10.0)
    assert held.valid(14.9) and not held.valid(15.0)
    # An observer that saw the renewal no earlier than it started considers it live until 16.
    observer = LeaseObserver()
    observer.observe("l", LeaseRecord("me", 6, "t1"), now=10.0)
    assert observer.holder("l", 15.9) == "me" and observer.holder("l", 16.1) is None


def test_observer_restarts_the_clock_on_every_change_and_treats_release_as_expiry() -> None:
    observer = LeaseObserver()
    observer.observe("l", LeaseRecord("me", 6, "t1"), now=0.0)
    observer.observe("l", LeaseRecord("me", 6, "t1"), now=5.0)  # unchanged: the clock keeps running
    assert observer.holder("l", 6.5) is None
    observer.observe("l", LeaseRecord("me", 6, "t2"), now=7.0)
    assert observer.holder("l", 12.0) == "me"
    observer.observe("l", LeaseRecord("", 6, "t3"), now=12.5)
    assert observer.holder("l", 12.5) is None


def test_tracker_high_watermark_is_the_slowest_isr_member() -> None:
    tracker = ReplicaTracker(0, 3, 0, (0, 1, 2), (0, 1, 2), 2, lag_s=5.0, high_watermark=0, now=0.0)
    assert not tracker.advance(leader_end=10)
    assert tracker.follower_fetched(1, 10, 10, now=1.0) is False  # 2 has not fetched yet
    assert tracker.follower_fetched(2, 6, 10, now=1.0) is True and tracker.high_watermark == 6
    assert tracker.follower_fetched(2, 10, 10, now=1.5) and tracker.high_watermark == 10
    tracker.follower_fetched(2, 4, 10, now=1.6)  # a follower going back never lowers it
    assert tracker.high_watermark == 10


def test_tracker_shrinks_a_lagging_follower_only_once_stored() -> None:
    tracker = ReplicaTracker(0, 3, 0, (0, 1, 2), (0, 1, 2), 2, lag_s=5.0, high_watermark=0, now=0.0)
    tracker.follower_fetched(1, 20, 20, now=4.0)
    tracker.follower_fetched(2, 5, 20, now=4.0)
    assert tracker.proposed_isr(20, now=4.0) is None
    assert tracker.proposed_isr(20, now=5.5) == (0, 1)
    assert tracker.high_watermark == 5  # 2 still counts until the shrink is stored
    assert tracker.isr_stored((0, 1), 20) and tracker.high_watermark == 20


def test_tracker_expands_a_follower_that_caught_up() -> None:
    tracker = ReplicaTracker(0, 3, 8, (0, 1, 2), (0, 1), 2, lag_s=5.0, high_watermark=10, now=0.0)
    tracker.follower_fetched(2, 7, 12, now=1.0)
    assert tracker.proposed_isr(12, now=1.0) is None  # below the epoch start and HW: not yet
    tracker.follower_fetched(1, 12, 12, now=1.1)
    tracker.follower_fetched(2, 12, 12, now=1.2)
    assert tracker.proposed_isr(12, now=1.2) == (0, 1, 2)


def test_a_follower_trailing_a_steady_stream_by_one_fetch_stays_in_sync() -> None:
    tracker = ReplicaTracker(0, 1, 0, (0, 1), (0, 1), 1, lag_s=2.0, high_watermark=0, now=0.0)
    end = 0
    for step in range(1, 40):  # the leader appends 10 every 0.5 s; each fetch reaches the previous end
        fetched_to = end
        end += 10
        tracker.follower_fetched(1, fetched_to, end, now=step * 0.5)
    assert tracker.proposed_isr(end, now=20.0) is None
    # A follower that stops advancing is caught up no more and leaves after lag_s.
    for step in range(40, 50):
        end += 10
        tracker.follower_fetched(1, 300, end, now=step * 0.5)
    assert tracker.proposed_isr(end, now=25.0) == (0,)


def test_grow_places_new_partitions_like_a_new_topic_and_never_shrinks() -> None:
    topic = state.new_topic("g", "id", 2, 3, 2, [0, 1, 2])
    other = state.new_topic("o", "id2", 4, 1, 1, [0, 1, 2], [topic])
    grown = state.grow(topic, 5, [0, 1, 2], [topic, other])
    assert grown.partitions[:2] == topic.partitions
    added = grown.partitions[2:]
    assert all(p.leader == p.replicas[0] and p.leader_epoch == 0 and p.isr == p.replicas for p in added)
    assert all(len(set(p.replicas)) == 3 for p in added)
    # Leaders over both topics stay balanced: 2 + 4 + 3 = 9 partitions, 3 per broker.
    leaders = Counter(p.leader for t in (grown, other) for p in t.partitions)
    assert sorted(leaders.values()) == [3, 3, 3], leaders
    with pytest.raises(ValueError, match="can only grow"):
        state.grow(topic, 2, [0, 1, 2])
    with pytest.raises(ValueError, match="needs 3 live brokers"):
        state.grow(topic, 3, [0, 1])


def test_an_observer_that_was_blind_gives_holders_a_fresh_duration() -> None:
    # Blind for longer than max_gap_s (an API outage): the unchanged record is not judged on the
    # time nobody could renew; a holder that stays silent afterwards still expires.
    observer = LeaseObserver(max_gap_s=5.0)
    observer.observe("l", LeaseRecord("me", 6, "t1"), now=0.0)
    observer.observe("l", LeaseRecord("me", 6, "t1"), now=1.0)
    observer.observe("l", LeaseRecord("me", 6, "t1"), now=20.0)  # first look after 19 s
    assert observer.holder("l", 20.0) == "me"
    observer.observe("l", LeaseRecord("me", 6, "t1"), now=24.0)  # normal gap: the clock keeps running
    assert observer.holder("l", 25.9) == "me" and observer.holder("l", 26.1) is None
    # Without max_gap_s the time blind counts (the old rule, kept for callers that want it).
    strict = LeaseObserver()
    strict.observe("l", LeaseRecord("me", 6, "t1"), now=0.0)
    strict.observe("l", LeaseRecord("me", 6, "t1"), now=20.0)
    assert strict.holder("l", 20.0) is None
