"""Group membership state machine: joins, heartbeats, session timeouts, fencing, rebalances."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustmq.coordination import group as group_mod
from rustmq.coordination.group import Group, HeartbeatStatus

COUNTS = {"orders": 12, "audit": 3}


def new_group() -> Group:
    return Group("g", lambda topic: COUNTS.get(topic, 0), incarnation="i1")


def test_first_member_gets_everything_and_commits_with_its_generation() -> None:
    g = new_group()
    view = g.join(0, ["orders"], client_id="c")
    assert view.member_id == "c-i1-1"
    assert view.generation == 1
    assert len(view.assignment) == 12
    g.check_commit(view.member_id, 1, [("orders", 3)])


def test_join_rebalances_and_fences_the_old_generation() -> None:
    g = new_group()
    a = g.join(0, ["orders"])
    b = g.join(10, ["orders"])
    assert b.generation == 2 and len(b.assignment) == 6
    with pytest.raises(group_mod.IllegalGenerationError):
        g.check_commit(a.member_id, a.generation, [("orders", 0)])
    hb = g.heartbeat(20, a.member_id, a.generation)
    assert hb.status is HeartbeatStatus.REBALANCED and hb.generation == 2
    assert set(hb.assignment).isdisjoint(b.assignment)
    assert set(hb.assignment) <= set(a.assignment)  # sticky: a keeps half of what it had
    g.check_commit(a.member_id, 2, [hb.assignment[0]])
    with pytest.raises(group_mod.NotAssignedError):
        g.check_commit(a.member_id, 2, [b.assignment[0]])
    assert g.heartbeat(30, a.member_id, 2).status is HeartbeatStatus.OK


def test_session_timeout_removes_a_silent_member_and_its_partitions_move() -> None:
    g = new_group()
    a = g.join(0, ["orders"], session_timeout_ms=3000)
    b = g.join(0, ["orders"], session_timeout_ms=3000)
    g.heartbeat(2500, b.member_id, b.generation)
    assert g.next_deadline_ms() == 3000
    assert g.expire(2999) == []
    assert g.expire(3000) == [a.member_id]
    hb = g.heartbeat(3100, b.member_id, b.generation)
    assert hb.status is HeartbeatStatus.REBALANCED and len(hb.assignment) == 12
    with pytest.raises(group_mod.UnknownMemberError):
        g.heartbeat(3200, a.member_id, a.generation)
    with pytest.raises(group_mod.UnknownMemberError):
        g.check_commit(a.member_id, hb.generation, [("orders", 0)])


def test_clean_leave_rebalances_at_once() -> None:
    g = new_group()
    views = [g.join(0, ["orders"]) for _ in range(3)]
    generation = g.generation
    g.leave(views[0].member_id)
    g.leave(views[0].member_id)  # idempotent
    assert g.generation == generation + 1
    assert sorted(len(m.assignment) for m in g.members.values()) == [6, 6]


def test_static_member_rejoin_keeps_partitions_without_rebalance() -> None:
    g = new_group()
    a = g.join(0, ["orders"], instance_id="pod-0")
    g.join(0, ["orders"], instance_id="pod-1")
    generation = g.generation
    again = g.join(100, ["orders"], instance_id="pod-0")
    assert again.member_id == a.member_id and g.generation == generation


def test_partition_growth_triggers_a_rebalance_on_heartbeat() -> None:
    counts = {"t": 2}
    g = Group("g", lambda topic: counts.get(topic, 0))
    a = g.join(0, ["t"])
    counts["t"] = 4
    hb = g.heartbeat(1, a.member_id, a.generation)
    assert hb.status is HeartbeatStatus.REBALANCED and len(hb.assignment) == 4


def test_bad_requests_are_rejected_with_codes() -> None:
    g = new_group()
    with pytest.raises(group_mod.InvalidSessionTimeoutError):
        g.join(0, ["orders"], session_timeout_ms=10)
    with pytest.raises(group_mod.GroupError):
        g.join(0, [])
    with pytest.raises(group_mod.UnknownMemberError) as info:
        g.join(0, ["orders"], member_id="nobody")
    assert info.value.code == "UNKNOWN_MEMBER"
    g.check_commit(None, group_mod.NO_GENERATION, [("orders", 1)])  # admin commit, empty group
    g.join(0, ["orders"])
    with pytest.raises(group_mod.UnknownMemberError):
        g.check_commit(None, group_mod.NO_GENERATION, [("orders", 1)])


def test_coordinator_expires_across_groups() -> None:
    coordinator = group_mod.GroupCoordinator(lambda topic: COUNTS.get(topic, 0))
    coordinator.group("a").join(0, ["orders"], session_timeout_ms=1000)
    coordinator.group("b").join(500, ["audit"], session_timeout_ms=1000)
    assert coordinator.next_deadline_ms() == 1000
    assert list(coordinator.expire(1000)) == ["a"]
    assert [d["group"] for d in coordinator.describe()] == ["a", "b"]


operations = st.lists(
    st.one_of(
        st.tuples(st.just("join"), st.sampled_from(["orders", "audit", "both"])),
        st.tuples(st.just("leave"), st.integers(0, 9)),
        st.tuples(st.just("heartbeat"), st.integers(0, 9)),
        st.tuples(st.just("advance"), st.integers(0, 4000)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops=operations)
def test_any_history_keeps_every_partition_owned_by_exactly_one_live_member(ops) -> None:
    g = new_group()
    now = 0
    for op, arg in ops:
        ids = sorted(g.members)
        if op == "join":
            topics = ["orders", "audit"] if arg == "both" else [arg]
            g.join(now, topics, session_timeout_ms=3000)
        elif op == "leave" and ids:
            g.leave(ids[arg % len(ids)])
        elif op == "heartbeat" and ids:
            member = g.members.get(ids[arg % len(ids)])
            if member is not None and member.expires_at_ms > now:
                g.heartbeat(now, member.member_id, g.generation)
        elif op == "advance":
            now += arg
            g.expire(now)
        owners: dict[tuple[str, int], str] = {}
        for member in g.members.values():
            assert member.expires_at_ms > now or op != "advance"
            for tp in member.assignment:
                assert tp[0] in member.topics
                assert tp not in owners
                owners[tp] = member.member_id
        wanted = {(t, p) for t in g.topics() for p in range(COUNTS[t])}
        assert set(owners) == wanted
        for topic in g.topics():
            sizes = [sum(1 for tp in m.assignment if tp[0] == topic)
                     for m in g.members.values() if topic in m.topics]
            assert max(sizes) - min(sizes) <= 1
