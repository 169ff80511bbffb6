"""Consumer group membership: joins, heartbeats, session timeouts, generations and rebalances.

A sans-IO state machine per group. The broker assigns partitions itself (server-side
assignment, `assignment.assign`), so a rebalance is a single step: whenever the member set, a
member's subscription or a topic's partition count changes, the generation increases and a new
sticky assignment is computed at once. Members learn of it from their next heartbeat (or from
the join answer), so a clean leave is rebalanced within one heartbeat interval.

Fencing: a commit is accepted only from a current member, with the current generation, for
partitions assigned to it in that generation (`check_commit`). A member that was too slow to
heartbeat (session expired) or that still acts on an older generation gets an error and must
rejoin or adopt the new assignment; the messages it processed but could not commit are then
delivered again to the partition's new owner (at-least-once, never loss).

Member ids embed the coordinator's `incarnation` (chosen by the caller at broker start), so an
id from before a broker restart can never collide with a new member's id. Membership itself is
not persisted: after a restart members get UNKNOWN_MEMBER and rejoin, and their committed
offsets (see `offsets`) are what carries over.

Time is an argument (`now_ms`, any monotonic millisecond clock); nothing here sleeps or reads
a clock.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from rustmq.coordination import assignment as assignment_mod
from rustmq.coordination.assignment import TopicPartition

MIN_SESSION_TIMEOUT_MS: Final = 1_000
MAX_SESSION_TIMEOUT_MS: Final = 300_000
DEFAULT_SESSION_TIMEOUT_MS: Final = 10_000
MAX_MEMBERS_PER_GROUP: Final = 1_000
NO_GENERATION: Final = -1


class GroupError(Exception):
    """A request the group cannot honour; `code` is the protocol error name."""

    code = "GROUP_ERROR"


class UnknownMemberError(GroupError):
    code = "UNKNOWN_MEMBER"


class IllegalGenerationError(GroupError):
    code = "ILLEGAL_GENERATION"


class NotAssignedError(GroupError):
    code = "PARTITION_NOT_ASSIGNED"


class InvalidSessionTimeoutError(GroupError):
    code = "INVALID_SESSION_TIMEOUT"


class GroupFullError(GroupError):
    code = "GROUP_FULL"


class HeartbeatStatus(enum.Enum):
    OK = "ok"  # the member's generation is current; keep going
    REBALANCED = "rebalanced"  # a new generation: adopt `assignment`, commit only with it


@dataclasses.dataclass(slots=True)
class Member:
    member_id: str
    client_id: str
    instance_id: str | None
    topics: frozenset[str]
    session_timeout_ms: int
    last_seen_ms: int
    assignment: list[TopicPartition] = dataclasses.field(default_factory=list)

    @property
    def expires_at_ms(self) -> int:
        return self.last_seen_ms + self.session_timeout_ms


@dataclasses.dataclass(frozen=True, slots=True)
class MemberView:
    """What a member is told after join or heartbeat."""

    member_id: str
    generation: int
    status: HeartbeatStatus
    assignment: tuple[TopicPartition, ...]


class Group:
    """One consumer group. `partition_counts(topic)` returns a topic's partition count (0 if none)."""

    def __init__(self, group_id: str, partition_counts: Callable[[str], int],
                 incarnation: str = "0") -> None:
        self.group_id = group_id
        self.generation = 0
        self.members: dict[str, Member] = {}
        self.rebalances = 0
        self._partition_counts = partition_counts
        self._incarnation = incarnation
        self._member_seq = 0
        self._counts: dict[str, int] = {}

    # ------------------------------------------------------------------------------- queries

    @property
    def state(self) -> str:
        return "stable" if self.members else "empty"

    def topics(self) -> set[str]:
        return {topic for member in self.members.values() for topic in member.topics}

    def owner(self, tp: TopicPartition) -> str | None:
        for member in self.members.values():
            if tp in member.assignment:
                return member.member_id
        return None

    def next_deadline_ms(self) -> int | None:
        """When the next session could expire (for the caller's timer); None with no members."""
        return min((m.expires_at_ms for m in self.members.values()), default=None)

    def describe(self) -> dict[str, object]:
        return {
            "group": self.group_id,
            "state": self.state,
            "generation": self.generation,
            "members": [
                {
                    "member_id": m.member_id,
                    "client_id": m.client_id,
                    "instance_id": m.instance_id,
                    "topics": sorted(m.topics),
                    "assignment": [list(tp) for tp in m.assignment],
                }
                for m in sorted(self.members.values(), key=lambda m: m.member_id)
            ],
        }

    # ------------------------------------------------------------------------------- requests

    def join(self, now_ms: int, topics: Iterable[str], *, member_id: str | None = None,
             client_id: str = "consumer", instance_id: str | None = None,
             session_timeout_ms: int = DEFAULT_SESSION_TIMEOUT_MS) -> MemberView:
        """Add a member (or refresh one) and rebalance if anything changed.

        `member_id` is None for a first join; a known id rejoins (e.g. with new topics); an
        unknown id raises UnknownMemberError (it expired: join again without an id). A static
        `instance_id` already in the group takes over that member's id and partitions without a
        rebalance (a restarted pod keeps its partitions).
        """
        if not MIN_SESSION_TIMEOUT_MS <= session_timeout_ms <= MAX_SESSION_TIMEOUT_MS:
            raise InvalidSessionTimeoutError(
                f"session_timeout_ms must be between {MIN_SESSION_TIMEOUT_MS} and "
                f"{MAX_SESSION_TIMEOUT_MS}, not {session_timeout_ms}"
            )
        wanted = frozenset(topics)
        if not wanted:
            raise GroupError("a member must subscribe to at least one topic")
        self.expire(now_ms)
        member: Member | None = None
        if member_id is not None:
            member = self.members.get(member_id)
            if member is None:
                raise UnknownMemberError(f"member {member_id} is not in group {self.group_id}")
        elif instance_id is not None:
            member = next((m for m in self.members.values() if m.instance_id == instance_id), None)
        if member is None:
            if len(self.members) >= MAX_MEMBERS_PER_GROUP:
                raise GroupFullError(f"group {self.group_id} has {MAX_MEMBERS_PER_GROUP} members")
            self._member_seq += 1
            new_id = f"{instance_id or client_id}-{self._incarnation}-{self._member_seq}"
            member = Member(new_id, client_id, instance_id, wanted, session_timeout_ms, now_ms)
            self.members[new_id] = member
            self._rebalance()
        else:
            member.last_seen_ms = now_ms
            member.session_timeout_ms = session_timeout_ms
            if member.topics != wanted:
                member.topics = wanted
                self._rebalance()
            else:
                self._refresh_partition_counts()
        return MemberView(member.member_id, self.generation, HeartbeatStatus.REBALANCED,
                          tuple(member.assignment))

    def heartbeat(self, now_ms: int, member_id: str, generation: int) -> MemberView:
        """Keep a member alive; tell it whether its generation is still current."""
        self.expire(now_ms)
        member = self.members.get(member_id)
        if member is None:
            raise UnknownMemberError(f"member {member_id} is not in group {self.group_id} "
                                     "(session expired or left): join again")
        member.last_seen_ms = now_ms
        self._refresh_partition_counts()
        status = HeartbeatStatus.OK if generation == self.generation else HeartbeatStatus.REBALANCED
        return MemberView(member_id, self.generation, status, tuple(member.assignment))

    def leave(self, member_id: str) -> None:
        """A clean leave: rebalance at once. Unknown ids are ignored (leave is idempotent)."""
        if self.members.pop(member_id, None) is not None:
            self._rebalance()

    def expire(self, now_ms: int) -> list[str]:
        """Remove members whose session ran out at `now_ms`; rebalance once if any did."""
        dead = [m.member_id for m in self.members.values() if m.expires_at_ms <= now_ms]
        for member_id in dead:
            del self.members[member_id]
        if dead:
            self._rebalance()
        return dead

    def check_commit(self, member_id: str | None, generation: int,
                     partitions: Iterable[TopicPartition]) -> None:
        """Raise unless this commit may be applied (see the module docstring on fencing).

        A commit without a member (member_id None, generation NO_GENERATION) is an admin or
        standalone-consumer commit, accepted only while the group has no members.
        """
        if member_id is None:
            if generation != NO_GENERATION:
                raise IllegalGenerationError("a commit without a member carries no generation")
            if self.members:
                raise UnknownMemberError(
                    f"group {self.group_id} has active members: commit as a member, or stop them"
                )
            return
        member = self.members.get(member_id)
        if member is None:
            raise UnknownMemberError(f"member {member_id} is not in group {self.group_id}")
        if generation != self.generation:
            raise IllegalGenerationError(
                f"generation {generation} is stale (group {self.group_id} is at {self.generation})"
            )
        owned = set(member.assignment)
        missing = [tp for tp in partitions if tp not in owned]
        if missing:
            raise NotAssignedError(f"{missing[0][0]}/{missing[0][1]} is not assigned to {member_id}")

    # ------------------------------------------------------------------------------- internals

    def _refresh_partition_counts(self) -> None:
        counts = {topic: self._partition_counts(topic) for topic in self.topics()}
        if counts != self._counts:
            self._rebalance()

    def _rebalance(self) -> None:
        self._counts = {topic: self._partition_counts(topic) for topic in self.topics()}
        previous = {member_id: m.assignment for member_id, m in self.members.items()}
        result = assignment_mod.assign(
            self._counts, {member_id: m.topics for member_id, m in self.members.items()}, previous
        )
        for member_id, tps in result.items():
            self.members[member_id].assignment = tps
        self.generation += 1
        self.rebalances += 1


class GroupCoordinator:
    """All groups of a broker; creates a group on first join."""

    def __init__(self, partition_counts: Callable[[str], int], incarnation: str = "0") -> None:
        self._partition_counts = partition_counts
        self._incarnation = incarnation
        self.groups: dict[str, Group] = {}

    def group(self, group_id: str) -> Group:
        group = self.groups.get(group_id)
        if group is None:
            group = self.groups[group_id] = Group(group_id, self._partition_counts,
                                                  self._incarnation)
        return group

    def expire(self, now_ms: int) -> dict[str, list[str]]:
        """Expire sessions in every group; returns group -> members removed (only non-empty)."""
        expired = {}
        for group_id, group in self.groups.items():
            dead = group.expire(now_ms)
            if dead:
                expired[group_id] = dead
        return expired

    def next_deadline_ms(self) -> int | None:
        deadlines = [d for g in self.groups.values() if (d := g.next_deadline_ms()) is not None]
        return min(deadlines, default=None)

    def describe(self) -> list[Mapping[str, object]]:
        return [self.groups[g].describe() for g in sorted(self.groups)]
