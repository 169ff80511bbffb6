"""Sticky balanced assignment: exact examples and hypothesis properties (ownership, balance, minimal moves)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from rustmq.coordination import assignment


def test_balanced_for_twelve_partitions_and_five_members() -> None:
    result = assignment.assign({"orders": 12}, {f"m{i}": ["orders"] for i in range(5)})
    sizes = sorted(len(tps) for tps in result.values())
    assert sizes == [2, 2, 2, 3, 3]
    owned = sorted(tp for tps in result.values() for tp in tps)
    assert owned == [("orders", p) for p in range(12)]


def test_leave_moves_only_the_leavers_partitions() -> None:
    members = {f"m{i}": ["t"] for i in range(4)}
    before = assignment.assign({"t": 12}, members)
    del members["m2"]
    after = assignment.assign({"t": 12}, members, before)
    assert assignment.moves({m: before[m] for m in members}, after) == 3
    for member in members:
        assert set(before[member]) <= set(after[member])


def test_join_takes_partitions_from_the_largest_only() -> None:
    before = assignment.assign({"t": 12}, {"a": ["t"], "b": ["t"], "c": ["t"]})
    after = assignment.assign({"t": 12}, {"a": ["t"], "b": ["t"], "c": ["t"], "d": ["t"]}, before)
    assert [len(after[m]) for m in "abcd"] == [3, 3, 3, 3]
    assert assignment.moves(before, after) == 3
    for member in "abc":
        assert set(after[member]) <= set(before[member])


def test_only_subscribers_get_a_topics_partitions() -> None:
    result = assignment.assign({"a": 3, "b": 2}, {"x": ["a"], "y": ["a", "b"], "z": ["b"]})
    assert all(tp[0] == "a" for tp in result["x"])
    assert all(tp[0] == "b" for tp in result["z"])
    assert sorted(tp for tps in result.values() for tp in tps) == [
        ("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]


def test_single_partition_topics_spread_over_members() -> None:
    topics = {f"t{i}": 1 for i in range(6)}
    result = assignment.assign(topics, {m: list(topics) for m in "abc"})
    assert sorted(len(v) for v in result.values()) == [2, 2, 2]


def test_partition_count_shrinking_and_unknown_previous_members_are_ignored() -> None:
    result = assignment.assign({"t": 2}, {"a": ["t"]}, {"a": [("t", 5)], "ghost": [("t", 0)]})
    assert result == {"a": [("t", 0), ("t", 1)]}


def _best_kept(count: int, members: list[str], held: dict[int, str]) -> int:
    """Brute force: the most partitions any balanced assignment can leave with their owner."""
    base, extra = divmod(count, len(members))
    prev = {m: sum(1 for owner in held.values() if owner == m) for m in members}
    best = 0
    for bigger in itertools.combinations(members, extra):
        kept = sum(min(prev[m], base + (m in bigger)) for m in members)
        best = max(best, kept)
    return best


@settings(max_examples=300, deadline=None)
@given(
    count=st.integers(0, 24),
    before_members=st.lists(st.sampled_from("abcdefg"), min_size=1, max_size=7, unique=True),
    after_members=st.lists(st.sampled_from("abcdefg"), min_size=1, max_size=7, unique=True),
)
def test_rebalance_owns_everything_once_balanced_and_moves_minimally(
        count: int, before_members: list[str], after_members: list[str]) -> None:
    before = assignment.assign({"t": count}, {m: ["t"] for m in before_members})
    after = assignment.assign({"t": count}, {m: ["t"] for m in after_members}, before)
    assert set(after) == set(after_members)
    owned = sorted(tp for tps in after.values() for tp in tps)
    assert owned == [("t", p) for p in range(count)]  # each partition exactly once, live members only
    sizes = [len(tps) for tps in after.values()]
    assert max(sizes) - min(sizes) <= 1
    held = {tp[1]: m for m, tps in before.items() for tp in tps if m in after_members}
    kept = sum(1 for m, tps in after.items() for tp in tps if held.get(tp[1]) == m)
    assert kept == _best_kept(count, sorted(after_members), held)
    assert assignment.moves(before, after) == count - kept


@settings(max_examples=200, deadline=None)
@given(
    counts=st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(0, 8), min_size=1),
    subs=st.dictionaries(st.sampled_from("uvwxyz"),
                         st.sets(st.sampled_from(["a", "b", "c"]), min_size=1), min_size=1),
)
def test_mixed_subscriptions_assign_each_partition_to_one_subscriber(
        counts: dict[str, int], subs: dict[str, set[str]]) -> None:
    result = assignment.assign(counts, subs)
    seen: list[tuple[str, int]] = []
    for member, tps in result.items():
        for topic, partition in tps:
            assert topic in subs[member]
            seen.append((topic, partition))
    expected = sorted((t, p) for t, n in counts.items()
                      if any(t in s for s in subs.values()) for p in range(n))
    assert sorted(seen) == expected
    assert result == assignment.assign(counts, subs)  # deterministic
