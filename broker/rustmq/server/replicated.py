"""The request path's side of cluster mode: who leads what, the high watermark, acks=all.

``ClusterRoles`` is what the Broker consults on every produce and fetch when the broker runs in
cluster mode (``Broker.cluster``; None in standalone mode, where none of this costs anything).
The replication runtime (rustmq.replication) keeps it current from the coordination store:
``assign`` installs a partition's role (leader or follower, epoch, replicas, ISR) and
``set_view`` the brokers and topics METADATA reports. Everything here runs on the event loop.

Rules enforced here (docs/cluster.md):
- produce only on the leader, only while its broker lease is valid (``lease_valid``), each batch
  stamped with the partition's leader epoch; otherwise NOT_LEADER;
- acks=all: refused with NOT_ENOUGH_REPLICAS when the stored ISR is below min_insync_replicas,
  answered when the high watermark passes the batch AND the lease is still valid at that
  moment (a deposed or frozen leader gets nothing acknowledged);
- consumer fetch: leader only, never above the high watermark;
- replica fetch (``replica_id`` set): the follower's leader epoch must be the current one
  (older: FENCED_LEADER_EPOCH, newer: NOT_LEADER, this broker is behind); with
  ``last_fetched_epoch`` the leader answers ``diverging`` (KIP-101/279 via Fetch, as Kafka
  2.7+) when the follower's log holds records of an epoch past that epoch's end here; the
  fetch offset is the follower's acknowledgement and may move the high watermark.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from rustmq.cluster.replica import ReplicaTracker
from rustmq.protocol import api
from rustmq.protocol import batch as record_batch
from rustmq.protocol.api import ErrorCode, RequestError


class ClusterAdmin(Protocol):
    """Cluster-wide topic administration, implemented by the replication runtime."""

    async def create_topic(self, name: str, partitions: int | None, config: dict[str, Any],
                           replication_factor: int | None, min_insync: int | None) -> Any: ...

    async def delete_topic(self, name: str) -> None: ...

    async def refresh(self) -> None: ...


class Placer(Protocol):
    """Places a batch built here on the partition's leader, this broker or another one
    (rustmq.replication.forward); for clients that cannot route (simple produce)."""

    async def place(self, topic: str, partition: int, batch: bytes, record_count: int) -> int: ...


class Diverging(NamedTuple):
    epoch: int
    end_offset: int


class PartitionRole:
    """This broker's part in one partition (a replica of it, or only a bystander)."""

    __slots__ = ("topic", "index", "leader", "leader_epoch", "replicas", "isr", "min_insync",
                 "tracker", "high_watermark", "epochs", "plog")

    def __init__(self, topic: str, index: int, plog: Any) -> None:
        self.topic = topic
        self.index = index
        self.plog = plog
        self.leader = -1
        self.leader_epoch = -1
        self.replicas: tuple[int, ...] = ()
        self.isr: tuple[int, ...] = ()
        self.min_insync = 1
        self.tracker: ReplicaTracker | None = None
        self.high_watermark = 0
        self.epochs: list[tuple[int, int]] | None = None  # (epoch, start offset), oldest first

    def epoch_cache(self) -> list[tuple[int, int]]:
        if self.epochs is None:
            self.epochs = self.plog.epoch_starts()
        return self.epochs

    def note_epochs(self, buf: memoryview | bytes, base_epoch_hint: int | None = None) -> None:
        """Extend the epoch cache with the epochs of batches just appended (headers only)."""
        cache = self.epoch_cache()
        last = cache[-1][0] if cache else -1
        for _, header in record_batch.iter_batches(buf):
            if header.leader_epoch > last:
                cache.append((header.leader_epoch, header.base_offset))
                last = header.leader_epoch

    def last_epoch(self) -> int:
        cache = self.epoch_cache()
        return cache[-1][0] if cache else -1

    def end_offset_for_epoch(self, epoch: int) -> Diverging:
        """(largest epoch <= epoch held here, the offset where it ends here): KIP-279's answer."""
        cache = self.epoch_cache()
        i = bisect.bisect_right(cache, (epoch, float("inf"))) - 1
        if i < 0:
            return Diverging(-1, cache[0][1] if cache else self.plog.end_offset)
        found = cache[i][0]
        end = cache[i + 1][1] if i + 1 < len(cache) else self.plog.end_offset
        return Diverging(found, end)

    def truncated(self, end: int) -> None:
        if self.epochs is not None:
            self.epochs = [(e, s) for e, s in self.epochs if s < end]
        self.high_watermark = min(self.high_watermark, end)


class ClusterRoles:
    def __init__(self, broker_id: int, lease_valid: Callable[[], bool], lag_s: float,
                 wake: Callable[[Any], None]) -> None:
        self.broker_id = broker_id
        self.lease_valid = lease_valid
        self.lag_s = lag_s
        self._wake = wake
        self.roles: dict[tuple[str, int], PartitionRole] = {}
        self.brokers: list[dict[str, Any]] = []
        self.topics: dict[str, Any] = {}  # name -> rustmq.cluster.state.TopicState
        self.controller = -1
        self.health: dict[str, Any] | None = None  # the controller's scaling report (only on the controller)
        self.membership: dict[str, Any] | None = None  # the membership the controller acts on (only there)
        self.admin: ClusterAdmin | None = None
        self.placer: Placer | None = None
        self.topic_changes: Any = None  # rustmq.replication.topics.TopicChanges: ADD_PARTITIONS, ALTER_TOPIC_CONFIG
        self._turn: dict[str, int] = {}  # keyless simple produce: round-robin position per topic
        self.isr_changes: Callable[[], None] | None = None  # the runtime's nudge to store an ISR change
        self.became_leader: Callable[[str, int], None] | None = None  # e.g. rebuild the producer table
        self._replicated: dict[PartitionRole, list[tuple[int, Callable[[BaseException | None], None]]]] = {}

    # -- installed by the runtime -----------------------------------------------------------

    def role(self, topic: str, index: int) -> PartitionRole | None:
        return self.roles.get((topic, index))

    def assign(self, role: PartitionRole, leader: int, leader_epoch: int, replicas: tuple[int, ...],
               isr: tuple[int, ...], min_insync: int) -> None:
        """Install the stored state of a partition; a new epoch resets the leader's tracking."""
        became = leader == self.broker_id and (role.leader != leader or role.leader_epoch != leader_epoch)
        lost = role.leader == self.broker_id and (leader != self.broker_id or leader_epoch != role.leader_epoch)
        role.replicas, role.min_insync = replicas, min_insync
        if lost:
            role.tracker = None
            self.fail_waiters(role, RequestError(ErrorCode.NOT_LEADER, f"{role.topic}/{role.index}: leadership moved"))
        role.leader, role.leader_epoch, role.isr = leader, leader_epoch, isr
        if became:
            end = role.plog.end_offset
            cache = role.epoch_cache()
            if not cache or cache[-1][0] < leader_epoch:
                cache.append((leader_epoch, end))
            role.tracker = ReplicaTracker(self.broker_id, leader_epoch, end, replicas, isr, min_insync,
                                          self.lag_s, min(role.high_watermark, end), time.monotonic())
            if self.became_leader is not None:
                self.became_leader(role.topic, role.index)
            self.appended(role)
        elif role.tracker is not None:
            role.tracker.replicas, role.tracker.min_insync = replicas, min_insync
            if role.tracker.isr_stored(isr, role.plog.end_offset):
                self._hw_moved(role)

    def remove(self, topic: str, index: int) -> None:
        role = self.roles.pop((topic, index), None)
        if role is not None:
            self.fail_waiters(role, RequestError(ErrorCode.NOT_LEADER, f"{topic}/{index}: no longer served here"))

    # -- produce ----------------------------------------------------------------------------

    def led_partitions(self, topic: str) -> list[int]:
        """The partitions of topic this broker leads now, in order."""
        return sorted(i for (t, i), role in self.roles.items() if t == topic and role.tracker is not None)

    def route(self, name: str, partition: int | None, key: bytes | None) -> int:
        """The partition of a simple produce message, from the cluster state (this broker need
        not hold the topic): as given, by key, or keyless round-robin over the partitions this
        broker leads (over all when it leads none; they are forwarded)."""
        topic = self.topics.get(name)
        if topic is None:
            raise RequestError(ErrorCode.UNKNOWN_TOPIC, f"unknown topic {name!r}")
        count = len(topic.partitions)
        if partition is not None:
            if partition >= count:
                raise RequestError(ErrorCode.UNKNOWN_PARTITION, f"topic {name!r} has {count} partitions, no partition {partition}")
            return partition
        if key is not None:
            return api.partition_for_key(key, count)
        led = self.led_partitions(name)
        turn = self._turn.get(name, 0)
        self._turn[name] = turn + 1
        return led[turn % len(led)] if led else turn % count

    def leader_role(self, topic: str, index: int) -> PartitionRole:
        role = self.roles.get((topic, index))
        if role is None or role.tracker is None or role.leader != self.broker_id:
            leader = role.leader if role is not None else -1
            raise RequestError(ErrorCode.NOT_LEADER, f"broker {self.broker_id} does not lead {topic}/{index} (leader: {leader})")
        if not self.lease_valid():
            raise RequestError(ErrorCode.NOT_LEADER, f"broker {self.broker_id} cannot renew its lease: not acting as leader")
        return role

    def check_insync(self, role: PartitionRole) -> None:
        tracker = role.tracker
        assert tracker is not None
        if not tracker.enough_replicas():
            raise RequestError(
                ErrorCode.NOT_ENOUGH_REPLICAS,
                f"{role.topic}/{role.index}: in-sync replicas {list(tracker.isr)} are fewer than "
                f"min_insync_replicas {tracker.min_insync}",
            )

    def appended(self, role: PartitionRole) -> None:
        tracker = role.tracker
        if tracker is not None and tracker.advance(role.plog.end_offset):
            self._hw_moved(role)

    def when_replicated(self, role: PartitionRole, end: int, done: Callable[[BaseException | None], None]) -> None:
        """done(None) once the high watermark reaches end with the lease still valid."""
        if role.tracker is not None and role.tracker.high_watermark >= end:
            done(None if self.lease_valid() else RequestError(ErrorCode.NOT_LEADER, "lease lost before the ack"))
            return
        self._replicated.setdefault(role, []).append((end, done))

    def fail_waiters(self, role: PartitionRole, error: BaseException) -> None:
        for _, done in self._replicated.pop(role, ()):
            done(error)

    def expire_waiters(self) -> None:
        """Called every renew period: a leader whose lease is in doubt fails its acks=all waiters."""
        if self.lease_valid():
            return
        for role in list(self._replicated):
            self.fail_waiters(role, RequestError(ErrorCode.NOT_LEADER, "lease lost: the write may or may not survive"))

    def _hw_moved(self, role: PartitionRole) -> None:
        tracker = role.tracker
        assert tracker is not None
        role.high_watermark = tracker.high_watermark
        waiters = self._replicated.get(role)
        if waiters:
            hw = tracker.high_watermark
            valid = self.lease_valid()
            keep = []
            for end, done in waiters:
                if end <= hw:
                    done(None if valid else RequestError(ErrorCode.NOT_LEADER, "lease lost before the ack"))
                else:
                    keep.append((end, done))
            if keep:
                self._replicated[role] = keep
            else:
                del self._replicated[role]
        self._wake(role.plog)

    # -- fetch ------------------------------------------------------------------------------

    def consumer_limit(self, topic: str, index: int, follower_read: bool = False) -> tuple[PartitionRole, int]:
        """Up to where a consumer may read the partition here: the leader's high watermark, or
        with `follower_read` an in-sync follower's (what its leader last told it, never above
        its own log end); NOT_LEADER otherwise."""
        role = self.roles.get((topic, index))
        if role is not None and role.leader == self.broker_id and role.tracker is not None:
            return role, role.tracker.high_watermark
        if (follower_read and role is not None and role.leader >= 0 and self.broker_id in role.isr
                and not role.plog.busy and self.lease_valid()):
            return role, min(role.high_watermark, role.plog.end_offset)
        leader = role.leader if role is not None else -1
        raise RequestError(ErrorCode.NOT_LEADER, f"broker {self.broker_id} does not lead {topic}/{index} (leader: {leader})")

    def replica_fetch(self, replica_id: int, request: api.FetchPartition) -> tuple[PartitionRole, Diverging | None]:
        role = self.roles.get((request.topic, request.partition))
        if role is None or role.leader != self.broker_id or role.tracker is None:
            raise RequestError(ErrorCode.NOT_LEADER, f"broker {self.broker_id} does not lead {request.topic}/{request.partition}")
        if request.leader_epoch != -1 and request.leader_epoch < role.leader_epoch:
            raise RequestError(ErrorCode.FENCED_LEADER_EPOCH,
                               f"leader epoch {request.leader_epoch} is older than {role.leader_epoch}")
        if request.leader_epoch > role.leader_epoch:
            raise RequestError(ErrorCode.NOT_LEADER, f"this broker has not seen leader epoch {request.leader_epoch} yet")
        if request.last_fetched_epoch >= 0 and request.offset >= role.plog.start_offset:
            # (Below the log start the read answers OFFSET_OUT_OF_RANGE with the log start and the
            # follower starts over there: the epochs of offsets deleted here are unknown, and a
            # divergence answer could never be satisfied.)
            answer = role.end_offset_for_epoch(request.last_fetched_epoch)
            if answer.epoch != request.last_fetched_epoch or answer.end_offset < request.offset:
                return role, answer
        return role, None

    def replica_fetched(self, role: PartitionRole, replica_id: int, offset: int) -> None:
        tracker = role.tracker
        if tracker is None:
            return
        if tracker.follower_fetched(replica_id, offset, role.plog.end_offset, time.monotonic()):
            self._hw_moved(role)
        elif self.isr_changes is not None and replica_id not in tracker.isr:
            self.isr_changes()


def clip_views(views: list[memoryview], limit: int) -> tuple[list[memoryview], int, int]:
    """The whole batches of views whose base offset is below limit: (views, bytes, next offset)."""
    out: list[memoryview] = []
    total = 0
    next_offset = -1
    for view in views:
        keep = 0
        stop = False
        for position, header in record_batch.iter_batches(view):
            if header.base_offset >= limit:
                stop = True
                break
            keep = position + header.size
            next_offset = header.base_offset + header.record_count
        if keep:
            out.append(view[:keep])
            total += keep
        if stop:
            break
    return out, total, next_offset
