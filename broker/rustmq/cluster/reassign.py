"""Scaling, sans-IO: membership, reassignment planning, leadership moves, health, the throttle.

The operator tells the controller where data should live through the ConfigMap
``<cluster>-membership`` and reads the controller's report from ``<cluster>-health``
(docs/cluster.md, "Scaling"). Everything the controller decides about them is a pure function
here, so its safety rules are checked exhaustively without an API server:

- ``plan`` is one controller round over every topic. It moves data Kafka's way: a partition to
  be moved gets a ``target`` replica list and the new replicas are appended to ``replicas``;
  they fetch and join the ISR like any follower; only once every target replica is in the
  stored ISR does a later round set ``replicas`` to the target (moving leadership first if the
  leader is not in it). So a partition never has fewer replicas than its target, and an
  in-sync copy is only dropped when the target's copies are all in sync. Out-of-sync replicas
  that are no longer wanted (a destination that left the membership) may be dropped at once:
  they held no copy anyone counted on. At most ``max_moves`` partitions are moving at a time.
- Leadership: a broker in controlled shutdown (``avoid``) hands every leadership it holds to
  another live in-sync replica; a partition's first replica (its preferred leader) gets the
  leadership back once it is live, in sync and ``stable`` (alive for a while), which keeps
  leaders balanced after restarts. Every leader change bumps the leader epoch (the fencing
  token); the new leader is always a member of the stored ISR, so it holds every record an
  acks=all producer was told is committed.
- Scale-up balance: replicas move from the most to the least loaded live member until they
  differ by at most one, then preferred leaders are swapped within replica lists (no data
  moves) until each topic's leaders are spread over the members as evenly as its replica lists
  allow, and then the totals per broker (a topic of 12 partitions on 3 brokers: 4 leaders each;
  after growing to 5: 3, 3, 2, 2, 2).
- Racks (``RoundInput.racks``, each broker's RUSTMQ_RACK): a replica moved off a broker goes
  preferably to a rack the partition's other replicas are not in, and a balancing move never
  leaves a partition in fewer racks than before.

``health`` renders the report of section 2 of the scaling contract; ``Throttle`` is the token
bucket that bounds the catch-up traffic of reassigned replicas.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from rustmq.cluster.state import NO_LEADER, PartitionState, TopicState


def membership_name(cluster: str) -> str:
    return f"{cluster}-membership"


def health_name(cluster: str) -> str:
    return f"{cluster}-health"


@dataclass(frozen=True, slots=True)
class Membership:
    brokers: frozenset[int]
    shutdown: int | None
    generation: int


def _broker_ids(text: str, what: str) -> list[int]:
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if not item.isdigit() or int(item) >= 1024:
            raise ValueError(f"{what}: {item!r} is not a broker id (0..1023)")
        out.append(int(item))
    return out


def parse_membership(data: Mapping[str, str]) -> Membership:
    """The membership ConfigMap's data; ValueError naming the bad key otherwise."""
    brokers = _broker_ids(data.get("brokers", ""), "brokers")
    if not brokers:
        raise ValueError("brokers is empty: at least one broker must hold data")
    shutdown = _broker_ids(data.get("shutdown", "") or "", "shutdown")
    if len(shutdown) > 1:
        raise ValueError(f"shutdown names one broker at a time, not {shutdown}")
    raw_generation = (data.get("generation") or "0").strip()
    if not raw_generation.lstrip("-").isdigit():
        raise ValueError(f"generation: {raw_generation!r} is not an integer")
    return Membership(frozenset(brokers), shutdown[0] if shutdown else None, int(raw_generation))


@dataclass(frozen=True, slots=True)
class RoundInput:
    """What the controller knows in one round besides the topics."""

    alive: frozenset[int]  # brokers whose Lease is live
    eligible: frozenset[int]  # alive and not restarted since last seen: may lead
    avoid: frozenset[int] = frozenset()  # controlled shutdown: hand leaderships away
    stable: frozenset[int] = frozenset()  # eligible long enough to get preferred leaderships back
    members: frozenset[int] | None = None  # membership's brokers; None: no membership, move nothing
    max_moves: int = 4  # partitions being reassigned at once
    racks: Mapping[int, str] = field(default_factory=dict)  # broker -> rack (RUSTMQ_RACK); absent: none


class _Planner:
    def __init__(self, topics: Mapping[str, TopicState], given: RoundInput) -> None:
        self.given = given
        self.topics = topics
        self.parts: dict[tuple[str, int], PartitionState] = {
            (name, i): p for name, t in sorted(topics.items()) for i, p in enumerate(t.partitions)}
        self.loads: Counter[int] = Counter()
        self.prefs: Counter[int] = Counter()
        self.topic_loads: dict[str, Counter[int]] = {name: Counter() for name in topics}
        self.topic_prefs: dict[str, Counter[int]] = {name: Counter() for name in topics}
        for (name, _), p in self.parts.items():
            final = p.final_replicas
            self.loads.update(final)
            self.topic_loads[name].update(final)
            if final:
                self.prefs[final[0]] += 1
                self.topic_prefs[name][final[0]] += 1
        members = given.members
        self.dests = sorted(members & given.alive) if members is not None else []
        self.touched: set[tuple[str, int]] = set()  # changed this round: not moved again before the next

    def rf(self, key: tuple[str, int]) -> int:
        return self.topics[key[0]].replication_factor

    def set(self, key: tuple[str, int], new: PartitionState) -> None:
        old = self.parts[key]
        self.loads.subtract(old.final_replicas)
        self.loads.update(new.final_replicas)
        self.topic_loads[key[0]].subtract(old.final_replicas)
        self.topic_loads[key[0]].update(new.final_replicas)
        if old.final_replicas:
            self.prefs[old.final_replicas[0]] -= 1
            self.topic_prefs[key[0]][old.final_replicas[0]] -= 1
        if new.final_replicas:
            self.prefs[new.final_replicas[0]] += 1
            self.topic_prefs[key[0]][new.final_replicas[0]] += 1
        self.parts[key] = new

    def pick_dest(self, exclude: Iterable[int], beside: Iterable[int] = ()) -> int | None:
        """The least loaded live member not in `exclude`, preferring one in a rack that none of
        `beside` (the replicas the partition keeps) is in."""
        taken = set(exclude)
        racks = self.given.racks
        used = {racks[b] for b in beside if racks.get(b)}
        free = [d for d in self.dests if d not in taken]
        return min(free, key=lambda d: (racks.get(d, "") in used, self.loads[d], self.prefs[d], d)) if free else None

    def rack_count(self, replicas: Iterable[int]) -> int:
        """How many racks `replicas` span (a broker without a rack counts as its own)."""
        racks = self.given.racks
        return len({racks.get(b) or f"broker-{b}" for b in replicas})

    # -- per partition ------------------------------------------------------------------

    def progress(self, key: tuple[str, int], p: PartitionState) -> PartitionState:
        """Advance a reassignment: repair a target that names a departed broker, finish it
        once the whole target is in sync."""
        given, isr = self.given, set(p.isr)
        target = list(p.target)
        if given.members is not None and any(b not in given.members for b in target):
            spare = [b for b in p.replicas if b not in target and b in given.members]
            spare.sort(key=lambda b: (b not in isr, b not in given.alive))
            for i, b in enumerate(target):
                if b in given.members:
                    continue
                dest = spare.pop(0) if spare else self.pick_dest([*target, *p.replicas],
                                                                 [x for x in target if x in given.members])
                if dest is not None:
                    target[i] = dest
            wanted = set(target)
            replicas = [b for b in p.replicas if b in wanted or b in isr] + [b for b in target if b not in p.replicas]
            p = replace(p, replicas=tuple(replicas), target=tuple(target))
        if not set(target) <= isr:
            return p
        final = tuple(target)
        leader, epoch = p.leader, p.leader_epoch
        if leader not in final:
            candidates = [b for b in final if b in isr and b in given.eligible]
            preferred = [b for b in candidates if b not in given.avoid]
            if not candidates:
                return p
            leader, epoch = (preferred or candidates)[0], epoch + 1
        return replace(p, replicas=final, leader=leader, leader_epoch=epoch,
                       isr=tuple(b for b in final if b in isr), target=())

    def leadership(self, p: PartitionState) -> PartitionState:
        given, isr = self.given, set(p.isr)
        if p.leader in given.avoid:
            others = [b for b in p.replicas if b in isr and b in given.eligible and b not in given.avoid]
            if others:
                return replace(p, leader=others[0], leader_epoch=p.leader_epoch + 1)
            return p
        if p.target or not p.replicas:
            return p
        first = p.replicas[0]
        if (first != p.leader and first in isr and first in given.stable and first in given.eligible
                and first not in given.avoid and (given.members is None or first in given.members)):
            return replace(p, leader=first, leader_epoch=p.leader_epoch + 1)
        return p

    # -- new moves ----------------------------------------------------------------------

    def movable(self, key: tuple[str, int], p: PartitionState) -> bool:
        return not p.target and p.leader != NO_LEADER and key not in self.touched

    def start(self, key: tuple[str, int], p: PartitionState, target: list[int]) -> None:
        added = tuple(b for b in target if b not in p.replicas)
        self.set(key, replace(p, replicas=p.replicas + added, target=tuple(target)))

    def drain(self, budget: int) -> int:
        members = self.given.members
        assert members is not None
        for key, p in self.parts.items():
            if budget <= 0:
                break
            if not self.movable(key, p) or all(b in members for b in p.replicas):
                continue
            target = list(p.replicas)
            for i, b in enumerate(target):
                if b not in members:
                    dest = self.pick_dest(target, [x for x in target if x in members])
                    if dest is None:
                        break
                    target[i] = dest
            else:
                self.start(key, p, target)
                budget -= 1
        return budget

    def rebalance(self, budget: int) -> int:
        members = self.given.members
        assert members is not None
        while budget > 0 and len(self.dests) > 1:
            found = None
            by_load = sorted(self.dests, key=lambda d: (-self.loads[d], d))
            for hi in by_load:
                for lo in reversed(by_load):
                    if self.loads[hi] - self.loads[lo] <= 1:
                        break
                    found = self._rebalance_candidate(hi, lo, members)
                    if found is not None:
                        break
                if found is not None:
                    break
            if found is None:
                break
            key, p, target = found
            self.start(key, p, target)
            budget -= 1
        return budget

    def _rebalance_candidate(self, hi: int, lo: int, members: frozenset[int]
                             ) -> tuple[tuple[str, int], PartitionState, list[int]] | None:
        """The partition to move from hi to lo: preferably of the topic whose replicas on hi
        exceed those on lo by the most, relative to its fair share per broker (so each topic
        spreads too, not only the totals), then one whose preferred leadership moving along
        helps leader balance. A move that would put the partition in fewer racks is never
        taken; one that puts it in more comes first."""
        lead_too = self.prefs[hi] > self.prefs[lo] + 1
        best = None
        best_score: tuple[int, float, bool] | None = None
        for key, p in self.parts.items():
            if (not self.movable(key, p) or hi not in p.replicas or lo in p.replicas
                    or set(p.isr) != set(p.replicas) or any(b not in members for b in p.replicas)):
                continue
            target = [lo if b == hi else b for b in p.replicas]
            racks_gained = self.rack_count(target) - self.rack_count(p.replicas)
            if racks_gained < 0:
                continue
            spread = self.topic_loads[key[0]]
            share = max(1.0, sum(spread[d] for d in self.dests) / len(self.dests))  # the topic's fair share
            score = (racks_gained, (spread[hi] - spread[lo]) / share, (p.replicas[0] == hi) == lead_too)
            if best_score is None or score > best_score:
                best, best_score = (key, p, target), score
        return best

    def balance_leaders(self, budget: int) -> None:
        """Swap preferred leaders within replica lists (no data moves) while a swap makes
        leadership more even: each topic's leaders over the live members first (so a topic's
        traffic spreads, not only the totals), then the totals per broker. A swap is taken only
        if it lowers the sum of squares of the per-topic counts, or leaves it and lowers that of
        the totals; when none does, a chain of swaps through brokers whose totals stay the same
        (`_leadership_path`) is taken if it lowers the pair. The pair decreases with every
        step, so this ends."""
        members = self.given.members
        assert members is not None
        dests = set(self.dests)
        while budget > 0 and len(dests) > 1:
            best: tuple[tuple[int, int], tuple[str, int], int] | None = None
            for key, p in self.parts.items():
                if not self.movable(key, p) or not p.replicas or any(b not in members for b in p.replicas):
                    continue
                hi = p.replicas[0]
                if hi not in dests:
                    continue
                per_topic = self.topic_prefs[key[0]]
                for lo in p.replicas[1:]:
                    if lo not in dests:
                        continue
                    gain = (per_topic[lo] - per_topic[hi] + 1, self.prefs[lo] - self.prefs[hi] + 1)
                    if gain < (0, 0) and (best is None or gain < best[0]):
                        best = (gain, key, lo)
            if best is not None:
                self._swap_preferred(best[1], best[2])
                budget -= 1
                continue
            path = self._leadership_path(members, dests)
            if path is None:  # taken whole even if longer than what is left of the budget
                return
            before = self._leader_spread()
            undo = [(key, self.parts[key].replicas[0]) for key, _ in path]
            for key, lo in path:
                self._swap_preferred(key, lo)
            if self._leader_spread() >= before:  # swaps within one topic interfered: undo, stop here
                for key, hi in reversed(undo):
                    self._swap_preferred(key, hi)
                return
            budget -= len(path)

    def _swap_preferred(self, key: tuple[str, int], lo: int) -> None:
        """Make `lo` the partition's first replica (its preferred leader), in hi's place."""
        p = self.parts[key]
        hi = p.replicas[0]
        self.set(key, replace(p, replicas=tuple(lo if b == hi else hi if b == lo else b for b in p.replicas)))
        self.touched.add(key)

    def _leader_spread(self) -> tuple[int, int]:
        """What balance_leaders lowers: the sums of squares of the per-topic, then total, counts."""
        per_topic = sum(n * n for counts in self.topic_prefs.values() for n in counts.values())
        return per_topic, sum(n * n for n in self.prefs.values())

    def _leadership_path(self, members: frozenset[int], dests: Collection[int]) -> list[tuple[tuple[str, int], int]] | None:
        """When no single swap helps: a chain of swaps that hands one preferred leadership from
        a broker with the most to one with at least two fewer, through brokers whose totals stay
        as they are, each swap leaving its topic at least as evenly led (a shortest path, found
        breadth-first over the brokers). Each partition appears in it at most once."""
        edges: dict[int, list[tuple[int, tuple[str, int]]]] = {}
        for key, p in self.parts.items():
            if not self.movable(key, p) or not p.replicas or any(b not in members for b in p.replicas):
                continue
            hi, per_topic = p.replicas[0], self.topic_prefs[key[0]]
            if hi in dests:
                for lo in p.replicas[1:]:
                    if lo in dests and per_topic[lo] + 1 <= per_topic[hi]:
                        edges.setdefault(hi, []).append((lo, key))
        top = max(self.prefs[d] for d in dests)
        came_from: dict[int, tuple[int, tuple[str, int]] | None] = {d: None for d in sorted(dests) if self.prefs[d] == top}
        queue = deque(came_from)
        while queue:
            broker = queue.popleft()
            if self.prefs[broker] <= top - 2:
                path = []
                step = came_from[broker]
                while step is not None:
                    path.append((step[1], broker))
                    broker = step[0]
                    step = came_from[broker]
                return path[::-1]
            for lo, key in edges.get(broker, ()):
                if lo not in came_from:
                    came_from[lo] = (broker, key)
                    queue.append(lo)
        return None


def plan(topics: Mapping[str, TopicState], given: RoundInput, controller_epoch: int = 0) -> dict[str, TopicState]:
    """One controller round of scaling decisions; returns only the topics that changed."""
    planner = _Planner(topics, given)
    for key, p in list(planner.parts.items()):
        if p.leader == NO_LEADER:
            continue  # offline: rustmq.cluster.state.elect's business
        new = planner.progress(key, p) if p.target else p
        new = planner.leadership(new)
        if new != p:
            planner.set(key, new)
            planner.touched.add(key)
    if given.members is not None:
        in_flight = sum(1 for p in planner.parts.values() if p.target)
        budget = planner.drain(given.max_moves - in_flight)
        planner.rebalance(budget)
        planner.balance_leaders(given.max_moves)
    out: dict[str, TopicState] = {}
    for name, topic in topics.items():
        parts = tuple(planner.parts[(name, i)] for i in range(len(topic.partitions)))
        if parts != topic.partitions:
            out[name] = replace(topic, partitions=parts, controller_epoch=max(controller_epoch, topic.controller_epoch))
    return out


# -- the health report (scaling contract, section 2) ---------------------------------------------


def health(topics: Iterable[TopicState], *, alive: Iterable[int], members: Iterable[int] | None,
           log_bytes: Mapping[int, int], bytes_to_move: int, controller: int, controller_epoch: int,
           observed_generation: int | None, updated_at: str) -> dict[str, Any]:
    """The controller's report of where data is and how safe it is (JSON-ready)."""
    live = set(alive)
    brokers: dict[int, dict[str, Any]] = {}

    def entry(b: int) -> dict[str, Any]:
        if b not in brokers:
            brokers[b] = {"alive": b in live, "replicas": 0, "leaders": 0, "inSyncReplicas": 0,
                          "bytes": int(log_bytes.get(b, 0))}
        return brokers[b]

    for b in [*(members or ()), *live]:
        entry(b)
    # Leadership balance over the brokers that should lead: live members (live brokers
    # without a membership).
    leading = sorted(live & set(members)) if members is not None else sorted(live)
    partitions = offline = under = under_min = reassigning = max_rf = not_preferred = topic_skew = 0
    for topic in topics:
        max_rf = max(max_rf, topic.replication_factor)
        per_topic: Counter[int] = Counter()
        for p in topic.partitions:
            partitions += 1
            reassigning += bool(p.target)
            if p.leader == NO_LEADER:
                offline += 1
            else:
                entry(p.leader)["leaders"] += 1
                per_topic[p.leader] += 1
                not_preferred += bool(p.replicas) and p.leader != p.replicas[0]
                under += len(p.isr) < topic.replication_factor
                under_min += len(p.isr) < topic.min_insync
            for b in p.replicas:
                entry(b)["replicas"] += 1
            for b in p.isr:
                entry(b)["inSyncReplicas"] += 1
        if leading and per_topic:
            topic_skew = max(topic_skew, max(per_topic[b] for b in leading) - min(per_topic[b] for b in leading))
    totals = [brokers[b]["leaders"] for b in leading]
    return {
        "controllerEpoch": controller_epoch, "controller": controller, "updatedAt": updated_at,
        "observedMembershipGeneration": observed_generation,
        "partitions": partitions, "offline": offline, "underReplicated": under, "underMinIsr": under_min,
        "reassigning": reassigning, "bytesToMove": bytes_to_move, "maxReplicationFactor": max_rf,
        "leaderSkew": max(totals) - min(totals) if totals else 0, "topicLeaderSkew": topic_skew,
        "leadersNotPreferred": not_preferred,
        "brokers": {str(b): brokers[b] for b in sorted(brokers)},
    }


def encode_health(report: Mapping[str, Any]) -> dict[str, str]:
    return {"health": json.dumps(report, sort_keys=True, separators=(",", ":"))}


def same_health(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> bool:
    """Equal apart from the timestamp (so an unchanged report is only rewritten to stay fresh)."""
    return a is not None and {**a, "updatedAt": ""} == {**b, "updatedAt": ""}


# -- catch-up throttle ---------------------------------------------------------------------------


class Throttle:
    """A token bucket over bytes on an explicit clock: ``allowance`` is what may be fetched now,
    ``spent`` charges what was fetched (it may go into debt: a fetch returns at least one whole
    batch), ``wait_s`` is how long until something may be fetched again."""

    __slots__ = ("rate", "burst", "_tokens", "_at")

    def __init__(self, rate: float, now: float, burst_s: float = 0.5) -> None:
        self.rate = float(rate)
        self.burst = max(1.0, self.rate * burst_s)
        self._tokens = self.burst
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now

    def allowance(self, now: float) -> int:
        if self.rate <= 0:
            return 1 << 62  # unlimited
        self._refill(now)
        return max(0, int(self._tokens))

    def spent(self, nbytes: int, now: float) -> None:
        if self.rate > 0:
            self._refill(now)
            self._tokens -= nbytes

    def wait_s(self, now: float) -> float:
        if self.rate <= 0:
            return 0.0
        self._refill(now)
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate
