"""Sticky, balanced assignment of topic partitions to the live members of a group.

The rule (documented for users in docs/semantics.md), applied topic by topic in name order:

1. The members eligible for a topic are those subscribed to it. With n partitions and m
   eligible members every member gets a quota of n // m partitions, and n % m of them get one
   more: so per topic, counts differ by at most one (balanced).
2. The "one more" slots go first to members that already held more than n // m partitions of
   the topic (they can keep one more without moving anything), then to members with the fewest
   partitions assigned so far across the topics already processed (so single-partition topics
   spread over the group), then by member id.
3. Every member keeps up to its quota of the partitions it held before, lowest partition
   numbers first (sticky).
4. The partitions left over (new, orphaned by a dead member, or above someone's quota) go in
   partition order to the members below their quota, in member id order.

Steps 2 and 3 keep the largest number of partitions any balanced assignment can keep, so a
rebalance moves the minimum number of partitions (property-tested against brute force). A
partition claimed by two members in `previous` (which a correct coordinator never produces)
is treated as held by the smaller member id.

Pure function of its inputs; deterministic (no dict-order or hash dependence).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

TopicPartition = tuple[str, int]
Assignment = dict[str, list[TopicPartition]]


def assign(
    partitions: Mapping[str, int],
    subscriptions: Mapping[str, Iterable[str]],
    previous: Mapping[str, Iterable[TopicPartition]] | None = None,
) -> Assignment:
    """Assign every partition of every subscribed topic to exactly one eligible member.

    `partitions`: topic -> partition count (topics missing here are not assigned).
    `subscriptions`: member id -> topics it consumes.
    `previous`: member id -> partitions it held (members no longer present are ignored).
    Returns member id -> sorted list of (topic, partition), with an entry for every member.
    """
    members = sorted(subscriptions)
    subscribed = {member: set(subscriptions[member]) for member in members}
    held: dict[TopicPartition, str] = {}
    for member in sorted(previous or {}):
        if member in subscribed:
            for tp in (previous or {})[member]:
                held.setdefault((tp[0], int(tp[1])), member)
    result: Assignment = {member: [] for member in members}
    for topic in sorted(partitions):
        eligible = [member for member in members if topic in subscribed[member]]
        count = partitions[topic]
        if not eligible or count <= 0:
            continue
        _assign_topic(topic, count, eligible, held, result)
    for member in members:
        result[member].sort()
    return result


def _assign_topic(topic: str, count: int, eligible: list[str],
                  held: Mapping[TopicPartition, str], result: Assignment) -> None:
    base, extra = divmod(count, len(eligible))
    kept_before: dict[str, list[int]] = {member: [] for member in eligible}
    for partition in range(count):
        owner = held.get((topic, partition))
        if owner is not None and owner in kept_before:
            kept_before[owner].append(partition)
    by_preference = sorted(
        eligible,
        key=lambda member: (len(kept_before[member]) <= base, len(result[member]), member),
    )
    quota = {member: base for member in eligible}
    for member in by_preference[:extra]:
        quota[member] = base + 1
    owned: set[int] = set()
    for member in eligible:
        keep = kept_before[member][: quota[member]]
        result[member].extend((topic, partition) for partition in keep)
        owned.update(keep)
        quota[member] -= len(keep)
    free = iter(partition for partition in range(count) if partition not in owned)
    for member in eligible:
        for _ in range(quota[member]):
            result[member].append((topic, next(free)))


def moves(previous: Mapping[str, Iterable[TopicPartition]], current: Mapping[str, Iterable[TopicPartition]]
          ) -> int:
    """How many partitions changed owner between two assignments (new partitions count too)."""
    before = {tp: member for member, tps in previous.items() for tp in tps}
    return sum(
        1 for member, tps in current.items() for tp in tps if before.get(tp) != member
    )
