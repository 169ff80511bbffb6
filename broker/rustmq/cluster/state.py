"""The replicated cluster's state: topics, their partitions' replicas, leader, ISR and epochs.

Storage format (docs/cluster.md). Topics are spread over SHARDS ConfigMaps named
``<cluster>-state-<nn>`` (nn = crc32c(topic) % SHARDS, two digits), so one ISR change rewrites
one small object instead of the whole map, and no object nears the 1 MiB ConfigMap limit
(a partition entry is ~60 bytes of JSON: about 15,000 partitions per shard). Each data key is a
topic name (topic names are [A-Za-z0-9._-], valid ConfigMap keys), its value one JSON object::

    {"id": "<uuid hex>",            distinguishes a re-created topic from the deleted one
     "rf": 3, "min_isr": 2,          replication factor, min_insync_replicas
     "config": {...},                topic config overrides (rustmq.storage.config keys)
     "cepoch": 4,                    controller epoch of the last controller write (fencing)
     "p": [[replicas, leader, leader_epoch, isr], ...]}   one entry per partition

A partition being reassigned (rustmq.cluster.reassign) carries a fifth element, its target
replica list: ``[replicas, leader, leader_epoch, isr, target]``. Its ``replicas`` are then the old
ones plus the new ones being added (the new replicas fetch and join the ISR like any follower);
once every target replica is in the ISR the controller sets ``replicas`` to the target and drops
the fifth element, so a partition not being moved is encoded exactly as before.

and ``<cluster>-state-brokers`` maps ``broker-<id>`` to the incarnation the controller last saw,
so a restarted broker (new incarnation) is never counted in sync before it caught up again.

Every rule that changes the state is a pure function here; the runtime applies its result with
one compare-and-swap per shard. Epochs, not Leases, are the fencing tokens: a leader epoch only
grows, and only the controller bumps it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

import crc32c

SHARDS: Final = 16
NO_LEADER: Final = -1


@dataclass(frozen=True, slots=True)
class PartitionState:
    replicas: tuple[int, ...]
    leader: int
    leader_epoch: int
    isr: tuple[int, ...]
    target: tuple[int, ...] = ()  # reassignment in progress: the replica list it ends with

    def to_json(self) -> list[Any]:
        out = [list(self.replicas), self.leader, self.leader_epoch, list(self.isr)]
        if self.target:
            out.append(list(self.target))
        return out

    @classmethod
    def from_json(cls, raw: list[Any]) -> PartitionState:
        replicas, leader, epoch, isr = raw[:4]
        target = tuple(raw[4]) if len(raw) > 4 else ()
        return cls(tuple(replicas), int(leader), int(epoch), tuple(isr), target)

    @property
    def final_replicas(self) -> tuple[int, ...]:
        """The replicas this partition has once any reassignment in progress is done."""
        return self.target or self.replicas


@dataclass(frozen=True, slots=True)
class TopicState:
    name: str
    topic_id: str
    replication_factor: int
    min_insync: int
    partitions: tuple[PartitionState, ...]
    config: dict[str, Any] = field(default_factory=dict)
    controller_epoch: int = 0

    def encode(self) -> str:
        return json.dumps(
            {
                "id": self.topic_id,
                "rf": self.replication_factor,
                "min_isr": self.min_insync,
                "config": self.config,
                "cepoch": self.controller_epoch,
                "p": [p.to_json() for p in self.partitions],
            },
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def decode(cls, name: str, text: str) -> TopicState:
        raw = json.loads(text)
        return cls(
            name=name,
            topic_id=str(raw["id"]),
            replication_factor=int(raw["rf"]),
            min_insync=int(raw["min_isr"]),
            partitions=tuple(PartitionState.from_json(p) for p in raw["p"]),
            config=dict(raw.get("config") or {}),
            controller_epoch=int(raw.get("cepoch", 0)),
        )

    def with_partition(self, index: int, partition: PartitionState) -> TopicState:
        parts = list(self.partitions)
        parts[index] = partition
        return replace(self, partitions=tuple(parts))


def shard_of(topic: str) -> int:
    return crc32c.crc32c(topic.encode()) % SHARDS


def shard_name(cluster: str, shard: int) -> str:
    return f"{cluster}-state-{shard:02d}"


def brokers_map_name(cluster: str) -> str:
    return f"{cluster}-state-brokers"


def broker_lease_name(cluster: str, broker_id: int) -> str:
    return f"{cluster}-broker-{broker_id}"


def controller_lease_name(cluster: str) -> str:
    return f"{cluster}-controller"


def decode_shard(data: Mapping[str, str]) -> dict[str, TopicState]:
    return {name: TopicState.decode(name, text) for name, text in data.items()}


def encode_shard(topics: Iterable[TopicState]) -> dict[str, str]:
    return {topic.name: topic.encode() for topic in topics}


# -- placement ----------------------------------------------------------------------------------


def default_replication_factor(brokers: int) -> int:
    return max(1, min(3, brokers))


def default_min_insync(replication_factor: int) -> int:
    return max(1, min(2, replication_factor))


def rack_alternating(brokers: Iterable[int], racks: Mapping[int, str]) -> list[int]:
    """The brokers in an order whose neighbours sit in different racks where the racks allow it
    (Kafka's rack-aware assignment): one broker of each rack in turn, racks in name order,
    brokers within a rack by id. Without racks (none known, or all brokers in one), id order."""
    ordered = sorted(set(brokers))
    by_rack: dict[str, list[int]] = {}
    for b in ordered:
        by_rack.setdefault(racks.get(b, ""), []).append(b)
    if len(by_rack) < 2:
        return ordered
    columns = [by_rack[rack] for rack in sorted(by_rack)]
    return [column[row] for row in range(max(map(len, columns))) for column in columns if row < len(column)]


def place(
    partitions: int,
    replication_factor: int,
    brokers: Iterable[int],
    existing: Iterable[TopicState] = (),
    first_index: int = 0,
    own: Iterable[tuple[int, ...]] = (),
    racks: Mapping[int, str] | None = None,
) -> list[tuple[int, ...]]:
    """Replica lists for partitions first_index.. of a new (or growing) topic.

    Leaders (the first replica) go to the broker leading the fewest of this topic's partitions
    so far (``own``: the replica lists it already has, when it grows), then the fewest in all,
    then the fewest replicas, then the lower id; followers to the next brokers after it in the
    ring: id order, or with ``racks`` (broker -> rack) the rack-alternating order, so a
    partition's replicas sit in as many racks as there are (up to its replication factor). So
    each topic's leaders spread evenly (12 partitions on 3 brokers: 4 each), the totals stay
    within what the topics' own spreading allows, and each partition's replicas are distinct
    brokers. Raises ValueError when there are fewer brokers than the replication factor.
    """
    ring = rack_alternating(brokers, racks or {})
    if replication_factor < 1:
        raise ValueError("replication factor must be at least 1")
    if len(ring) < replication_factor:
        raise ValueError(
            f"replication factor {replication_factor} needs {replication_factor} live brokers, "
            f"{len(ring)} available ({', '.join(map(str, ring)) or 'none'})"
        )
    leaders: Counter[int] = Counter({b: 0 for b in ring})
    replicas_load: Counter[int] = Counter({b: 0 for b in ring})
    for topic in existing:
        for p in topic.partitions:
            final = p.final_replicas
            if final and final[0] in leaders:
                leaders[final[0]] += 1
            for r in final:
                if r in replicas_load:
                    replicas_load[r] += 1
    topic_leaders: Counter[int] = Counter(replicas[0] for replicas in own if replicas)
    out = []
    for _ in range(first_index, first_index + partitions):
        leader = min(ring, key=lambda b: (topic_leaders[b], leaders[b], replicas_load[b], b))
        start = ring.index(leader)
        chosen = tuple(ring[(start + i) % len(ring)] for i in range(replication_factor))
        leaders[leader] += 1
        topic_leaders[leader] += 1
        for r in chosen:
            replicas_load[r] += 1
        out.append(chosen)
    return out


def new_topic(
    name: str,
    topic_id: str,
    partitions: int,
    replication_factor: int,
    min_insync: int,
    live_brokers: Iterable[int],
    existing: Iterable[TopicState] = (),
    config: dict[str, Any] | None = None,
    racks: Mapping[int, str] | None = None,
) -> TopicState:
    if not 1 <= min_insync <= replication_factor:
        raise ValueError(f"min_insync_replicas must be between 1 and the replication factor {replication_factor}")
    placed = place(partitions, replication_factor, live_brokers, existing, racks=racks)
    return TopicState(
        name=name,
        topic_id=topic_id,
        replication_factor=replication_factor,
        min_insync=min_insync,
        partitions=tuple(PartitionState(r, r[0], 0, r) for r in placed),
        config=dict(config or {}),
    )


def grow(topic: TopicState, total: int, live_brokers: Iterable[int], existing: Iterable[TopicState] = (),
         racks: Mapping[int, str] | None = None) -> TopicState:
    """ADD_PARTITIONS: partitions len(topic.partitions)..total-1 placed as a new topic's are
    (``existing`` should include topic itself), each led by its first replica at epoch 0 with
    every replica in sync (they are all empty). ValueError unless total grows the topic."""
    have = len(topic.partitions)
    if total <= have:
        raise ValueError(f"topic {topic.name!r} has {have} partitions; can only grow, not to {total}")
    placed = place(total - have, topic.replication_factor, live_brokers, existing, first_index=have,
                   own=[p.final_replicas for p in topic.partitions], racks=racks)
    return replace(topic, partitions=topic.partitions + tuple(PartitionState(r, r[0], 0, r) for r in placed))


# -- controller decisions -----------------------------------------------------------------------


def elect(
    topic: TopicState,
    alive: set[int],
    restarted: set[int] = frozenset(),  # type: ignore[assignment]
    controller_epoch: int = 0,
    unclean: bool = False,
) -> TopicState | None:
    """The controller's decision for one topic; None when nothing changes.

    - A broker that is not alive, or that restarted (new incarnation), leaves every ISR it is
      in, except that an ISR never becomes empty: its last leader (else its first member) stays,
      so the partition comes back when that broker does (it holds every committed record).
    - A partition whose leader is not alive (or restarted, or is none) gets as leader the first
      replica (in replica order) that is in the ISR and alive and did not restart; the
      leader epoch is bumped on every leader change, which fences the old leader.
    - No such replica: the leader becomes none (epoch bumped) and the partition is offline until
      an ISR member returns, unless ``unclean`` allows any live replica (possible data loss).
    """
    changed = False
    parts = []
    eligible = alive - set(restarted)
    for p in topic.partitions:
        isr = tuple(r for r in p.isr if r in eligible)
        if not isr:
            isr = (p.leader,) if p.leader in p.isr else p.isr[:1]
        leader, epoch = p.leader, p.leader_epoch
        if leader not in eligible or leader not in isr:
            candidates = [r for r in p.replicas if r in isr and r in eligible]
            if not candidates and unclean:
                candidates = [r for r in p.replicas if r in eligible]
                if candidates:
                    isr = (candidates[0],)
            new_leader = candidates[0] if candidates else NO_LEADER
            if new_leader != leader:
                leader, epoch = new_leader, epoch + 1
        if leader != NO_LEADER and leader not in isr:
            isr = (leader,) + tuple(r for r in isr if r != leader)
        new = replace(p, leader=leader, leader_epoch=epoch, isr=isr)
        if new != p:
            changed = True
        parts.append(new)
    if not changed:
        return None
    return replace(topic, partitions=tuple(parts), controller_epoch=max(controller_epoch, topic.controller_epoch))


def change_isr(topic: TopicState, index: int, leader: int, leader_epoch: int, isr: Iterable[int]) -> TopicState | None:
    """A leader's ISR change, checked against the current state (Kafka's AlterPartition).

    None when the caller is no longer the leader at that epoch (it must stop acting as leader)
    or the ISR would not change. The leader always stays in its own ISR.
    """
    if index >= len(topic.partitions):
        return None
    p = topic.partitions[index]
    if p.leader != leader or p.leader_epoch != leader_epoch:
        return None
    wanted = tuple(r for r in p.replicas if r in set(isr) or r == leader)
    if wanted == p.isr:
        return None
    return topic.with_partition(index, replace(p, isr=wanted))
