"""The pure scaling rules (rustmq.cluster.reassign): membership, reassignment plans, leadership
moves, the health report and the catch-up throttle. The properties run every plan step on random
cluster states and check that no step ever leaves fewer copies than the replication factor or
drops an in-sync copy before its replacement is in sync."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustmq.cluster import reassign, state
from rustmq.cluster.reassign import RoundInput
from rustmq.cluster.state import NO_LEADER, PartitionState, TopicState


def topic(parts: list[PartitionState], rf: int = 3, min_isr: int = 2, name: str = "t") -> TopicState:
    return TopicState(name, "id-" + name, rf, min_isr, tuple(parts))


def everyone(*brokers: int, members: set[int] | None = None, **kw: object) -> RoundInput:
    live = frozenset(brokers)
    return RoundInput(alive=live, eligible=live, stable=live, members=None if members is None else frozenset(members),
                      **kw)  # type: ignore[arg-type]


def catch_up(topics: dict[str, TopicState], alive: set[int]) -> dict[str, TopicState]:
    """What the leaders do between controller rounds: live replicas that fetch join the ISR."""
    out = {}
    for name, t in topics.items():
        parts = []
        for p in t.partitions:
            if p.leader != NO_LEADER:
                p = PartitionState(p.replicas, p.leader, p.leader_epoch,
                                   tuple(b for b in p.replicas if b in p.isr or b in alive), p.target)
            parts.append(p)
        out[name] = TopicState(name, t.topic_id, t.replication_factor, t.min_insync, tuple(parts))
    return out


def run(topics: dict[str, TopicState], given_: RoundInput, rounds: int = 60,
        alive: set[int] | None = None) -> dict[str, TopicState]:
    for _ in range(rounds):
        changed = reassign.plan(topics, given_)
        for name, new in changed.items():
            check_step(topics[name], new, given_)
        caught = catch_up({**topics, **changed}, set(given_.alive) if alive is None else alive)
        if not changed and caught == topics:
            break
        topics = caught
    return topics


def check_step(old: TopicState, new: TopicState, given_: RoundInput) -> None:
    rf = old.replication_factor
    for before, after in zip(old.partitions, new.partitions, strict=True):
        assert len(set(after.replicas)) == len(after.replicas), after
        assert len(after.replicas) >= min(rf, len(before.replicas)), (before, after)
        assert set(after.isr) <= set(before.isr), "the planner never adds to an ISR"
        assert set(after.isr) <= set(after.replicas)
        if after.target:
            assert len(after.target) == rf and set(after.target) <= set(after.replicas)
        dropped_in_sync = (set(before.isr) - set(after.isr))
        if dropped_in_sync:  # only when the replacement copies are all in sync
            assert len(after.isr) >= rf and not after.target, (before, after)
        assert after.isr or not before.isr, "never the last in-sync copy"
        if after.leader != before.leader:
            assert after.leader in before.isr and after.leader in given_.eligible, (before, after)
            assert after.leader_epoch == before.leader_epoch + 1
        else:
            assert after.leader_epoch == before.leader_epoch
        if after.leader != NO_LEADER:
            assert after.leader in after.isr


def loads(topics: dict[str, TopicState]) -> Counter[int]:
    return Counter(b for t in topics.values() for p in t.partitions for b in p.replicas)


def leaders(topics: dict[str, TopicState]) -> Counter[int]:
    return Counter(p.leader for t in topics.values() for p in t.partitions)


def placed(name: str, partitions: int, rf: int, brokers: list[int]) -> TopicState:
    return state.new_topic(name, "id-" + name, partitions, rf, min(2, rf), brokers)


def test_membership_parses_and_refuses_clearly() -> None:
    m = reassign.parse_membership({"brokers": "0,1, 3", "shutdown": "1", "generation": "4"})
    assert m == reassign.Membership(frozenset({0, 1, 3}), 1, 4)
    assert reassign.parse_membership({"brokers": "2"}) == reassign.Membership(frozenset({2}), None, 0)
    with pytest.raises(ValueError, match="brokers is empty"):
        reassign.parse_membership({"brokers": " "})
    with pytest.raises(ValueError, match="'x' is not a broker id"):
        reassign.parse_membership({"brokers": "0,x"})
    with pytest.raises(ValueError, match="one broker at a time"):
        reassign.parse_membership({"brokers": "0", "shutdown": "1,2"})
    with pytest.raises(ValueError, match="generation"):
        reassign.parse_membership({"brokers": "0", "generation": "two"})


def test_partition_json_carries_the_target_only_while_moving() -> None:
    still = PartitionState((0, 1), 0, 3, (0, 1))
    moving = PartitionState((0, 1, 2), 0, 3, (0, 1), (0, 2))
    assert len(still.to_json()) == 4 and PartitionState.from_json(still.to_json()) == still
    assert moving.to_json()[4] == [0, 2] and PartitionState.from_json(moving.to_json()) == moving
    assert moving.final_replicas == (0, 2) and still.final_replicas == (0, 1)


def test_drain_adds_the_new_replica_then_drops_the_old_one_once_it_is_in_sync() -> None:
    topics = {"t": topic([PartitionState((2, 0, 1), 2, 5, (2, 0, 1))])}
    given_ = everyone(0, 1, 2, 3, members={0, 1, 3})
    step1 = reassign.plan(topics, given_)["t"].partitions[0]
    assert step1 == PartitionState((2, 0, 1, 3), 2, 5, (2, 0, 1), (3, 0, 1))
    # Not in sync yet: nothing else happens, whatever the number of rounds.
    assert reassign.plan({"t": topic([step1])}, given_) == {}
    # The new replica joins the ISR: leadership leaves broker 2 with the old replica.
    synced = PartitionState((2, 0, 1, 3), 2, 5, (2, 0, 1, 3), (3, 0, 1))
    done = reassign.plan({"t": topic([synced])}, given_)["t"].partitions[0]
    assert done == PartitionState((3, 0, 1), 3, 6, (3, 0, 1))


def test_drain_waits_when_the_remaining_brokers_cannot_hold_the_replication_factor() -> None:
    topics = {"t": topic([PartitionState((0, 1, 2), 0, 1, (0, 1, 2))])}
    assert reassign.plan(topics, everyone(0, 1, 2, members={0, 1})) == {}


def test_a_target_naming_a_broker_that_left_the_membership_is_repaired() -> None:
    # 3 was being added (not in sync yet) but the operator took it out again: back to 2.
    moving = PartitionState((2, 0, 1, 3), 2, 5, (2, 0, 1), (3, 0, 1))
    new = reassign.plan({"t": topic([moving])}, everyone(0, 1, 2, 3, members={0, 1, 2}))["t"].partitions[0]
    # The target falls back to broker 2's in-sync copy, which completes at once; 3 held no
    # in-sync copy and is dropped.
    assert new == PartitionState((2, 0, 1), 2, 5, (2, 0, 1))
    # Broker 3 in sync already and replaced by a fifth broker: it stays until 4 is in sync.
    synced = PartitionState((2, 0, 1, 3), 2, 5, (2, 0, 1, 3), (3, 0, 1))
    new = reassign.plan({"t": topic([synced])}, everyone(0, 1, 2, 3, 4, members={0, 1, 4}))["t"].partitions[0]
    assert new.target == (4, 0, 1) and new.replicas == (2, 0, 1, 3, 4) and new.isr == (2, 0, 1, 3)


RACKS = {0: "a", 1: "a", 2: "b", 3: "b", 4: "c", 5: "c"}


def racks_of(replicas: tuple[int, ...]) -> set[str]:
    return {RACKS[b] for b in replicas}


def test_a_drained_replica_goes_to_the_rack_the_partition_would_lose() -> None:
    # Broker 4 (rack c) leaves; brokers 0 and 2 are the least loaded, but only 5 keeps rack c.
    busy = placed("busy", 6, 1, [1, 3, 5])
    topics = {"t": topic([PartitionState((0, 2, 4), 0, 1, (0, 2, 4))]), "busy": busy}
    given_ = everyone(0, 1, 2, 3, 4, 5, members={0, 1, 2, 3, 5}, racks=RACKS)
    assert reassign.plan(topics, given_)["t"].partitions[0].target == (0, 2, 5)
    without_racks = everyone(0, 1, 2, 3, 4, 5, members={0, 1, 2, 3, 5})
    assert reassign.plan(topics, without_racks)["t"].partitions[0].target != (0, 2, 5)


def test_scale_up_into_new_racks_never_leaves_a_partition_in_fewer_racks() -> None:
    four = {b: RACKS[b] for b in range(4)}
    topics = {"a": state.new_topic("a", "id-a", 8, 2, 1, range(4), racks=four)}
    assert all(len(racks_of(p.replicas)) == 2 for p in topics["a"].partitions)
    final = run(topics, everyone(*range(6), members=set(range(6)), racks=RACKS))
    assert all(len(racks_of(p.replicas)) == 2 for p in final["a"].partitions), final
    counts = loads(final)
    assert max(counts.values()) - min(counts[b] for b in range(6)) <= 1, counts


def test_scale_up_moves_replicas_and_leaders_onto_the_new_broker() -> None:
    topics = {"a": placed("a", 6, 3, [0, 1, 2]), "b": placed("b", 6, 2, [0, 1, 2])}
    assert loads(topics)[3] == 0
    given_ = everyone(0, 1, 2, 3, members={0, 1, 2, 3}, max_moves=2)
    first = reassign.plan(topics, given_)
    assert sum(bool(p.target) for t in first.values() for p in t.partitions) == 2  # bounded batch
    final = run(topics, given_)
    counts = loads(final)
    assert max(counts.values()) - min(counts[b] for b in range(4)) <= 1, counts
    lead = leaders(final)
    assert max(lead.values()) - min(lead[b] for b in range(4)) <= 1, lead
    assert not any(p.target for t in final.values() for p in t.partitions)
    assert all(len(p.replicas) == t.replication_factor for t in final.values() for p in t.partitions)
    for t in final.values():  # each topic spreads too, not only the totals
        per_topic = Counter(b for p in t.partitions for b in p.replicas)
        assert max(per_topic.values()) - min(per_topic[b] for b in range(4)) <= 1, (t.name, per_topic)


def per_topic_leaders(t: TopicState, brokers: list[int]) -> list[int]:
    counts = Counter(p.leader for p in t.partitions)
    return [counts[b] for b in brokers]


def test_leaders_balance_per_topic_and_per_broker_on_placement_scale_up_and_drain() -> None:
    three = [0, 1, 2]
    topics: dict[str, TopicState] = {}
    # Topics placed one after another, the earlier ones leaving the totals uneven (8 and 5
    # partitions on 3 brokers): a 12-partition topic still gets 4 leaders on each broker.
    for name, count, rf in (("__rustmq_coordination", 8, 3), ("audit", 5, 3), ("orders", 12, 2), ("default", 12, 3)):
        topics[name] = state.new_topic(name, "id-" + name, count, rf, min(2, rf), three, list(topics.values()))
    assert per_topic_leaders(topics["orders"], three) == [4, 4, 4]
    assert per_topic_leaders(topics["default"], three) == [4, 4, 4]
    grown = state.grow(topics["orders"], 15, three, list(topics.values()))
    assert per_topic_leaders(grown, three) == [5, 5, 5]  # added partitions keep the topic even
    # Created on 5 brokers whose 2 new ones lead nothing yet: spread, not piled onto the new ones.
    late = state.new_topic("late", "id-late", 12, 2, 2, [0, 1, 2, 3, 4], list(topics.values()))
    assert sorted(per_topic_leaders(late, [0, 1, 2, 3, 4])) == [2, 2, 2, 3, 3]

    def balanced(final: dict[str, TopicState], brokers: list[int]) -> None:
        assert not any(p.target for t in final.values() for p in t.partitions)
        for t in final.values():
            spread = per_topic_leaders(t, brokers)
            assert max(spread) - min(spread) <= 1, (t.name, spread)
        totals = [leaders(final)[b] for b in brokers]
        assert max(totals) - min(totals) <= 1, totals
        assert all(p.leader == p.replicas[0] for t in final.values() for p in t.partitions)  # preferred leaders lead
        report = reassign.health(final.values(), alive=brokers, members=brokers, log_bytes={}, bytes_to_move=0,
                                 controller=0, controller_epoch=1, observed_generation=1, updated_at="now")
        assert report["leaderSkew"] <= 1 and report["topicLeaderSkew"] <= 1 and report["leadersNotPreferred"] == 0

    five = [0, 1, 2, 3, 4]
    after_growth = run(topics, everyone(*five, members=set(five), max_moves=4), rounds=300)
    balanced(after_growth, five)
    assert per_topic_leaders(after_growth["orders"], five) in ([3, 3, 2, 2, 2], [3, 2, 3, 2, 2], [2, 3, 3, 2, 2],
                                                                [3, 2, 2, 3, 2], [3, 2, 2, 2, 3], [2, 3, 2, 3, 2],
                                                                [2, 3, 2, 2, 3], [2, 2, 3, 3, 2], [2, 2, 3, 2, 3],
                                                                [2, 2, 2, 3, 3])
    four = [0, 1, 2, 3]
    after_drain = run(after_growth, everyone(*five, members=set(four), max_moves=4), rounds=300)
    assert leaders(after_drain)[4] == 0 and loads(after_drain)[4] == 0
    balanced(after_drain, four)
    assert per_topic_leaders(after_drain["orders"], four) == [3, 3, 3, 3]


def test_health_reports_leadership_balance() -> None:
    t = topic([PartitionState((0, 1, 2), 0, 1, (0, 1, 2)), PartitionState((1, 2, 0), 0, 2, (0, 1, 2)),
               PartitionState((2, 0, 1), 0, 2, (2, 0, 1)), PartitionState((0, 1, 2), 0, 1, (0, 1, 2))])
    u = topic([PartitionState((1, 2, 0), 1, 1, (1, 2, 0)), PartitionState((2, 0, 1), 2, 1, (2, 0, 1))], name="u")
    report = reassign.health([t, u], alive=[0, 1, 2, 3], members=[0, 1, 2], log_bytes={}, bytes_to_move=0,
                             controller=0, controller_epoch=1, observed_generation=1, updated_at="now")
    # Broker 3 is alive but not a member: it is not expected to lead, so it does not count.
    assert report["brokers"]["0"]["leaders"] == 4 and report["leaderSkew"] == 3
    assert report["topicLeaderSkew"] == 4  # t: 4, 0, 0 over the members
    assert report["leadersNotPreferred"] == 2


def test_controlled_shutdown_hands_leadership_to_a_live_in_sync_follower() -> None:
    topics = {"t": topic([PartitionState((1, 0, 2), 1, 4, (1, 0, 2)), PartitionState((1, 2, 0), 1, 2, (1,)),
                          PartitionState((0, 1, 2), 0, 1, (0, 1, 2))])}
    given_ = RoundInput(alive=frozenset({0, 1, 2}), eligible=frozenset({0, 1, 2}), avoid=frozenset({1}),
                        stable=frozenset({0, 1, 2}))
    new = reassign.plan(topics, given_)["t"].partitions
    assert new[0] == PartitionState((1, 0, 2), 0, 5, (1, 0, 2))  # moved, ISR kept
    assert new[1] == topics["t"].partitions[1]  # no other in-sync copy: it cannot move
    assert new[2] == topics["t"].partitions[2]  # broker 1 led nothing there


def test_preferred_leader_returns_once_its_broker_is_stable() -> None:
    topics = {"t": topic([PartitionState((1, 0, 2), 0, 7, (0, 2, 1))])}
    not_yet = RoundInput(alive=frozenset({0, 1, 2}), eligible=frozenset({0, 1, 2}), stable=frozenset({0, 2}))
    assert reassign.plan(topics, not_yet) == {}
    back = RoundInput(alive=frozenset({0, 1, 2}), eligible=frozenset({0, 1, 2}), stable=frozenset({0, 1, 2}))
    assert reassign.plan(topics, back)["t"].partitions[0] == PartitionState((1, 0, 2), 1, 8, (0, 2, 1))
    out_of_sync = {"t": topic([PartitionState((1, 0, 2), 0, 7, (0, 2))])}
    assert reassign.plan(out_of_sync, back) == {}


def test_health_reports_data_safety_per_broker() -> None:
    t = topic([PartitionState((0, 1, 2), 0, 1, (0, 1, 2)), PartitionState((1, 2, 0), 1, 1, (1,)),
               PartitionState((2, 0, 1), NO_LEADER, 3, (2,)), PartitionState((0, 1, 2, 3), 0, 1, (0, 1, 2), (0, 1, 3))])
    report = reassign.health([t], alive=[0, 1, 3], members=[0, 1, 3, 4], log_bytes={0: 100, 3: 5}, bytes_to_move=42,
                             controller=1, controller_epoch=7, observed_generation=3, updated_at="2026-12-06T07:00:00Z")
    assert report["partitions"] == 4 and report["offline"] == 1 and report["underReplicated"] == 1
    assert report["underMinIsr"] == 1 and report["reassigning"] == 1 and report["bytesToMove"] == 42
    assert report["maxReplicationFactor"] == 3 and report["observedMembershipGeneration"] == 3
    assert report["brokers"]["0"] == {"alive": True, "replicas": 4, "leaders": 2, "inSyncReplicas": 2, "bytes": 100}
    assert report["brokers"]["2"]["alive"] is False and report["brokers"]["2"]["leaders"] == 0
    assert report["brokers"]["3"] == {"alive": True, "replicas": 1, "leaders": 0, "inSyncReplicas": 0, "bytes": 5}
    assert report["brokers"]["4"] == {"alive": False, "replicas": 0, "leaders": 0, "inSyncReplicas": 0, "bytes": 0}
    assert reassign.same_health(report, {**report, "updatedAt": "later"})
    assert not reassign.same_health(report, {**report, "offline": 0})


def test_throttle_bounds_the_rate_and_allows_debt() -> None:
    bucket = reassign.Throttle(1000, now=0.0, burst_s=0.5)
    assert bucket.allowance(0.0) == 500
    bucket.spent(800, 0.0)  # one batch larger than the allowance: debt
    assert bucket.allowance(0.0) == 0 and bucket.wait_s(0.0) == pytest.approx(0.301)
    assert bucket.allowance(1.0) == 500  # refilled, capped at the burst
    unlimited = reassign.Throttle(0, now=0.0)
    assert unlimited.allowance(0.0) > 1 << 40 and unlimited.wait_s(0.0) == 0.0


@st.composite
def clusters(draw: st.DrawFn) -> tuple[dict[str, TopicState], RoundInput]:
    size = draw(st.integers(1, 6))
    brokers = list(range(size))
    topics: dict[str, TopicState] = {}
    for n in range(draw(st.integers(1, 3))):
        rf = draw(st.integers(1, size))
        base = placed(f"t{n}", draw(st.integers(1, 8)), rf, brokers)
        parts = []
        for p in base.partitions:
            isr = tuple(b for b in p.replicas if draw(st.booleans())) or p.replicas[:1]
            leader = draw(st.sampled_from([*isr, NO_LEADER]))
            if leader == NO_LEADER:
                isr = isr[:1]
            parts.append(PartitionState(p.replicas, leader, draw(st.integers(0, 5)), isr))
        topics[base.name] = TopicState(base.name, base.topic_id, rf, base.min_insync, tuple(parts))
    extra = draw(st.integers(0, 2))
    everybody = list(range(size + extra))
    alive = frozenset(draw(st.sets(st.sampled_from(everybody), min_size=1)))
    eligible = frozenset(b for b in alive if draw(st.booleans()) or True)
    members = draw(st.one_of(st.none(), st.sets(st.sampled_from(everybody), min_size=1).map(frozenset)))
    avoid = frozenset(draw(st.sets(st.sampled_from(everybody), max_size=1)))
    stable = frozenset(b for b in eligible if draw(st.booleans()))
    return topics, RoundInput(alive, eligible, avoid, stable, members, draw(st.integers(1, 4)))


@settings(max_examples=150, deadline=None)
@given(case=clusters())
def test_every_plan_step_keeps_the_copies_and_the_in_sync_ones(case: tuple[dict[str, TopicState], RoundInput]) -> None:
    topics, given_ = case
    current = topics
    for _ in range(12):
        changed = reassign.plan(current, given_)
        for name, new in changed.items():
            check_step(current[name], new, given_)
        moving = sum(bool(p.target) for t in {**current, **changed}.values() for p in t.partitions)
        before = sum(bool(p.target) for t in current.values() for p in t.partitions)
        assert moving <= max(before, given_.max_moves)
        current = catch_up({**current, **changed}, set(given_.alive))


@settings(max_examples=80, deadline=None)
@given(size=st.integers(2, 5), grow=st.integers(-2, 2), data=st.data())
def test_scaling_converges_to_the_membership_with_balanced_replicas(size: int, grow: int, data: st.DataObject) -> None:
    brokers = list(range(size))
    topics = {}
    for n in range(data.draw(st.integers(1, 3))):
        rf = data.draw(st.integers(1, size))
        topics[f"t{n}"] = placed(f"t{n}", data.draw(st.integers(1, 10)), rf, brokers)
    target_size = max(1, size + grow)
    members = set(range(target_size))
    alive = set(range(max(size, target_size)))
    given_ = everyone(*alive, members=members, max_moves=data.draw(st.integers(1, 5)))
    final = run(topics, given_, rounds=120)
    max_rf = max(t.replication_factor for t in topics.values())
    assert not any(p.target for t in final.values() for p in t.partitions) or max_rf > target_size
    if max_rf <= target_size:
        counts = loads(final)
        assert set(counts) <= members, counts
        assert max(counts[b] for b in members) - min(counts[b] for b in members) <= 1, counts
        if min(t.replication_factor for t in topics.values()) > 1:  # RF 1: leaders move only with data
            lead = leaders(final)
            assert max(lead[b] for b in members) - min(lead[b] for b in members) <= 1, (lead, final)
