"""ClusterNode: one broker's membership, its controller duty, its state sync and its followers.

Loops (each bounded by the store's api_timeout_s per call; docs/cluster.md has the timings):

- renew: every renew_period_s, CAS-renew this broker's Lease ``<cluster>-broker-<id>`` (its
  annotations carry the broker's addresses and incarnation). While renewals succeed in time the
  broker may act as leader (rustmq.cluster.lease.HeldLease); when they stop, acks=all waiters
  fail at once and nothing more is acknowledged.
- controller: every renew_period_s, hold or try to take the controller Lease; the holder bumps
  the controller epoch (an annotation) in the very CAS that takes it, then runs one election
  round: brokers whose Lease expired on its clock, or that restarted (new incarnation), leave
  the ISRs and lose their leaderships (rustmq.cluster.state.elect), one CAS per changed shard.
- sync: every poll_s, list the broker Leases and the state ConfigMaps, create local partitions
  for the replicas assigned here, install roles (leader/follower, epoch, ISR) for the request
  path, store the ISR changes this broker's leaderships want (CAS, checked against the stored
  leader and epoch), and run two fetch sessions per leader this broker follows.
- fetchers: per leader, one session (its own connection) for the partitions this replica is in
  the ISR of and one for those it is not (new replicas of a reassignment, a restarted follower):
  an acks=all write waits only for in-sync copies, so it must never queue behind a catch-up
  chunk, nor catch-up behind the in-sync session's long poll (Kafka keeps throttled replicas
  apart the same way). Each sends a replica FETCH (replica_id, leader_epoch,
  last_fetched_epoch per partition) in a loop; batches are appended with the leader's offsets and epochs; a ``diverging`` answer
  truncates the local log to the leader's end of that epoch first (KIP-101/279; the file work
  on a worker thread, `rebuild_off_loop`), and every answer's ``log_start_offset`` moves the
  local log start up to the leader's (whole segments, never above the high watermark). Replicas being
  added by a reassignment fetch within the ``reassign_bytes_per_s`` token bucket, in responses of
  at most ``catchup_fetch_max_bytes`` (while throttled); a replica that moved away is deleted on a worker thread.

Scaling (rustmq.cluster.reassign, docs/cluster.md "Scaling"): the controller reads the
operator's ``<cluster>-membership``, plans reassignments, controlled-shutdown and preferred-leader
moves in the same CAS writes as its election, and publishes ``<cluster>-health``. Each broker
reports its log bytes (and, as a leader, the bytes its reassigned followers still lack) in its
Lease annotations. On stop a broker first asks for a controlled shutdown (Lease annotation
``rustmq.io/shutting-down``) and waits until its leaderships have moved to in-sync followers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rustmq.client.connection import Connection
from rustmq.client.errors import BrokerError, ClientError
from rustmq.cluster import reassign
from rustmq.cluster import state as cstate
from rustmq.cluster.lease import HeldLease, LeaseObserver, LeaseTiming
from rustmq.cluster.state import TopicState
from rustmq.cluster.store import Conflict, LeaseRecord, ObjectStore, StoreUnavailable, Versioned
from rustmq.coordination import internal_topic
from rustmq.protocol.api import ApiKey, ErrorCode, RequestError
from rustmq.replication.forward import Forwarder
from rustmq.replication.queue_sources import RemoteWindow
from rustmq.replication.topics import TopicChanges, apply_local, check_config
from rustmq.server.broker import Broker
from rustmq.server.replicated import ClusterRoles, PartitionRole
from rustmq.storage import errors as storage_errors
from rustmq.storage.log import validate_topic_name
from rustmq.storage.partition import PartitionLog, Rebuild

log = logging.getLogger("rustmq.replication")

ANNOTATION = "rustmq.io/"
CAS_ATTEMPTS = 8


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    cluster_name: str
    namespace: str
    broker_id: int
    internal_host: str
    timing: LeaseTiming = field(default_factory=LeaseTiming)
    poll_s: float = 0.5
    replica_lag_s: float = 5.0
    unclean_leader_election: bool = False
    replica_fetch_wait_ms: int = 250
    replica_fetch_max_bytes: int = 4 << 20
    forward_timeout_s: float = 10.0  # a forwarded simple produce waits at most this long for its leader
    forward_max_inflight: int = 256  # forwarded PRODUCE requests outstanding at once, all leaders together
    reassign_bytes_per_s: int = 50 << 20  # catch-up fetches of replicas being added; 0: unlimited
    catchup_fetch_max_bytes: int = 1 << 20  # one throttled catch-up response at most (at least one whole batch)
    max_reassignments: int = 4  # partitions moving at once
    controlled_shutdown_s: float = 20.0  # how long a stopping broker waits for its leaderships to move
    preferred_leader_delay_s: float = 10.0  # a returning broker leads its preferred partitions after this
    rack: str = ""  # this broker's rack or zone (RUSTMQ_RACK): replicas of a partition spread over racks


def _now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ClusterNode:
    def __init__(self, broker: Broker, store: ObjectStore, settings: ClusterSettings, incarnation: str) -> None:
        settings.timing.check()
        self.broker = broker
        self.store = store
        self.settings = settings
        self.incarnation = incarnation
        self.holder = f"broker-{settings.broker_id}/{incarnation}"
        self.held = HeldLease(settings.timing)
        self.controlling = HeldLease(settings.timing)
        self.controller_epoch = 0
        self._controller_since = 0.0
        self._members_since = 0.0
        self._last_alive: set[int] = set()
        self.observer = LeaseObserver(max_gap_s=settings.timing.holder_validity_s)
        self.roles = ClusterRoles(settings.broker_id, self._lease_valid, settings.replica_lag_s, broker._wake)
        self.roles.admin = self
        self.roles.isr_changes = self._nudge
        self.forwarder = Forwarder(self, timeout_s=settings.forward_timeout_s, max_inflight=settings.forward_max_inflight)
        self.roles.placer = self.forwarder
        self.roles.topic_changes = TopicChanges(self)
        coordination = getattr(broker, "coordination", None)
        if coordination is not None:
            self.roles.became_leader = coordination.coordinator.forget_producer_state
            coordination.use_cluster(self.roles, RemoteWindow)
        broker.cluster = self.roles
        self.topics: dict[str, TopicState] = {}
        self.members: dict[int, dict[str, Any]] = {}
        self._lease_version: str | None = None
        self._applied: set[str] = set()
        self._fetchers: dict[tuple[int, bool], asyncio.Task[None]] = {}  # (leader, catch-up session)
        self._discards: set[asyncio.Task[None]] = set()  # replicas being deleted (_discard)
        self._reclassified = asyncio.Event()  # replaced at each _apply: an idle session looks again
        self._follow: dict[int, dict[tuple[str, int], PartitionRole]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._wakeup = asyncio.Event()
        self._sync_lock = asyncio.Lock()
        self._next_refresh: asyncio.Future[None] | None = None
        self._stopping = False
        self._shutting_down = False
        self._throttle = reassign.Throttle(settings.reassign_bytes_per_s, time.monotonic())
        self._since: dict[int, tuple[str, float]] = {}  # broker -> (incarnation, first seen), for preferred leaders
        self._avoid: frozenset[int] = frozenset()  # brokers shutting down, as of the last controller round
        self._health: dict[str, Any] | None = None
        self._health_version: str | None = None
        self._health_written = float("-inf")
        self._membership_error = ""
        c = settings.cluster_name
        self._lease_name = cstate.broker_lease_name(c, settings.broker_id)
        self._controller_name = cstate.controller_lease_name(c)
        self._broker_prefix = f"{c}-broker-"
        self._state_prefix = f"{c}-state-"
        self._brokers_map = cstate.brokers_map_name(c)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                await self._renew()
                break
            except (StoreUnavailable, Conflict) as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("registering broker lease failed (%s); retrying", exc)
                await asyncio.sleep(self.settings.timing.renew_period_s)
        while True:  # serve only once the cluster state is known (else METADATA would be empty)
            try:
                await self._sync()
                break
            except (StoreUnavailable, Conflict) as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("first state sync failed (%s); retrying", exc)
                await asyncio.sleep(self.settings.timing.renew_period_s)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._loop(self._renew_round, self.settings.timing.renew_period_s, "renew")),
                       loop.create_task(self._loop(self._controller_round, self.settings.timing.renew_period_s, "controller")),
                       loop.create_task(self._sync_loop())]

    async def stop(self) -> None:
        """Controlled shutdown first (leaderships move to in-sync followers), then stop every loop
        and fetcher and release the leases so peers need not wait them out."""
        await self.controlled_shutdown()
        self._stopping = True
        await _cancel_all([*self._tasks, *self._fetchers.values(), *self._discards])
        self.forwarder.close()
        self.held.lost()
        for name in (self._controller_name, self._lease_name):
            try:
                current = await self.store.get_lease(name)
                if current is not None and current.value.holder == self.holder:
                    record = current.value
                    await self.store.replace_lease(name, LeaseRecord("", record.duration_s, _now_rfc3339(),
                                                                     record.transitions, record.annotations), current.version)
            except (StoreUnavailable, Conflict) as exc:
                log.warning("releasing %s failed: %s", name, exc)
        await self.store.close()

    async def controlled_shutdown(self) -> None:
        """Ask the controller (Lease annotation) to move this broker's leaderships away and wait,
        bounded by controlled_shutdown_s, until none is left that another live in-sync replica
        could take. The broker keeps serving meanwhile: requests for partitions it still leads
        are answered, the others get NOT_LEADER and clients follow the new leader."""
        if self._stopping or self._shutting_down or not self._tasks:
            return
        self._shutting_down = True
        started = time.monotonic()
        try:
            await self._renew()
        except (StoreUnavailable, Conflict) as exc:
            log.warning("announcing the controlled shutdown: %s", exc)
        while time.monotonic() - started < self.settings.controlled_shutdown_s:
            left = self._movable_leaderships()
            if not left:
                log.info("controlled shutdown: no leadership left to hand over after %.1f s", time.monotonic() - started)
                return
            self._nudge()
            await asyncio.sleep(self.settings.poll_s)
        log.warning("controlled shutdown: %d leadership(s) not moved within %.0f s", len(self._movable_leaderships()),
                    self.settings.controlled_shutdown_s)

    def racks(self) -> dict[int, str]:
        """broker -> rack of the live brokers that have one (their Leases, as last read)."""
        return {b: m["rack"] for b, m in self.members.items() if m.get("rack")}

    def _movable_leaderships(self) -> list[tuple[str, int]]:
        me = self.settings.broker_id
        return [key for key, role in self.roles.roles.items()
                if role.tracker is not None and any(b != me and b in self.members for b in role.isr)]

    def _lease_valid(self) -> bool:
        return self.held.valid(time.monotonic())

    def _nudge(self) -> None:
        self._wakeup.set()

    def request_sync(self) -> None:
        """Read the cluster state soon (a forward found the leader it knew gone)."""
        self._wakeup.set()

    async def _loop(self, body: Any, period: float, name: str) -> None:
        while True:
            started = time.monotonic()
            try:
                await body()
            except asyncio.CancelledError:
                raise
            except (StoreUnavailable, Conflict) as exc:
                log.warning("%s: %s", name, exc)
            except Exception:
                log.exception("%s round failed", name)
            await asyncio.sleep(max(0.0, period - (time.monotonic() - started)))

    # -- own lease --------------------------------------------------------------------------

    def _own_record(self, transitions: int) -> LeaseRecord:
        ports = self.broker.ports
        scaling = {ANNOTATION + "log-bytes": str(self._log_bytes()),
                   ANNOTATION + "reassign-bytes": str(self._reassign_bytes())}
        if self._shutting_down:
            scaling[ANNOTATION + "shutting-down"] = "true"
        return LeaseRecord(
            holder=self.holder,
            duration_s=self.settings.timing.duration_seconds,
            renew_time=_now_rfc3339(),
            transitions=transitions,
            annotations={
                ANNOTATION + "host": self.settings.internal_host,
                ANNOTATION + "producer-port": str(ports.get("producer", 0)),
                ANNOTATION + "consumer-port": str(ports.get("consumer", 0)),
                ANNOTATION + "incarnation": self.incarnation,
                **({ANNOTATION + "rack": self.settings.rack} if self.settings.rack else {}),
                **scaling,
            },
        )

    def _log_bytes(self) -> int:
        return sum(plog.size_bytes for topic in self.broker.log.topics() for plog in topic.partitions)

    def _reassign_bytes(self) -> int:
        """As a leader: the bytes the replicas being added to its partitions still have to copy,
        estimated from offsets (log bytes x the share of offsets the follower lacks)."""
        total = 0
        for (name, index), role in self.roles.roles.items():
            tracker = role.tracker
            topic = self.topics.get(name)
            if tracker is None or topic is None or index >= len(topic.partitions):
                continue
            p = topic.partitions[index]
            lagging = [b for b in p.target if b not in p.isr]
            if not lagging:
                continue
            plog = role.plog
            start, end = plog.start_offset, plog.end_offset
            if end <= start:
                continue
            for b in lagging:
                have = max(start, min(end, tracker.follower_end(b) or start))
                total += plog.size_bytes * (end - have) // (end - start)
        return total

    async def _renew(self) -> None:
        started = time.monotonic()
        if self._lease_version is None:
            current = await self.store.get_lease(self._lease_name)
            if current is None:
                written = await self.store.create_lease(self._lease_name, self._own_record(0))
            else:
                transitions = current.value.transitions + (current.value.holder != self.holder)
                written = await self.store.replace_lease(self._lease_name, self._own_record(transitions), current.version)
        else:
            try:
                written = await self.store.replace_lease(self._lease_name, self._own_record(0), self._lease_version)
            except Conflict:
                self._lease_version = None
                raise
        self._lease_version = written.version
        self.held.renewed(started)

    async def _renew_round(self) -> None:
        try:
            await self._renew()
        finally:
            self.roles.expire_waiters()

    # -- controller -------------------------------------------------------------------------

    async def _controller_round(self) -> None:
        now = time.monotonic()
        started = now
        current = await self.store.get_lease(self._controller_name)
        if current is not None:
            self.observer.observe(self._controller_name, current.value, now)
        timing = self.settings.timing
        if current is None:
            record = LeaseRecord(self.holder, timing.duration_seconds, _now_rfc3339(), 0, {ANNOTATION + "controller-epoch": "1"})
            written = await self.store.create_lease(self._controller_name, record)
        elif current.value.holder == self.holder:
            written = await self.store.replace_lease(
                self._controller_name, LeaseRecord(self.holder, timing.duration_seconds, _now_rfc3339(),
                                                   current.value.transitions, current.value.annotations), current.version)
        elif self.observer.holder(self._controller_name, now) is None:
            epoch = int(current.value.annotations.get(ANNOTATION + "controller-epoch", "0")) + 1
            record = LeaseRecord(self.holder, timing.duration_seconds, _now_rfc3339(), current.value.transitions + 1,
                                 {**current.value.annotations, ANNOTATION + "controller-epoch": str(epoch)})
            written = await self.store.replace_lease(self._controller_name, record, current.version)
            log.info("broker %d is the controller (epoch %d)", self.settings.broker_id, epoch)
        else:
            self.controlling.lost()
            return
        self.controller_epoch = int(written.value.annotations.get(ANNOTATION + "controller-epoch", "0"))
        if not self.controlling.valid(started):
            self._controller_since = started
        self.controlling.renewed(started)
        await self._elect()
        await self._ensure_default_topic(started)
        await self._ensure_default_topic(started, internal_topic.TOPIC)

    async def _ensure_default_topic(self, now: float, name: str | None = None) -> None:
        """The controller creates the default topic (where simple produce messages without a topic
        go) once it has been controller, and the set of live brokers has not changed, for two
        lease durations: the brokers of a starting StatefulSet have registered by then and the
        topic gets its full replication factor. The same for the internal coordination topic
        (`name`, rustmq.coordination.internal_topic)."""
        internal = name is not None
        name = name or self.broker.settings.default_topic
        settle = 2 * self.settings.timing.lease_duration_s
        if name in self.topics or now - self._controller_since < settle or now - self._members_since < settle:
            return
        try:
            if internal:
                await self.create_topic(name, internal_topic.PARTITIONS,
                                        internal_topic.config(self.broker.settings.coordination_compact_bytes), None, None,
                                        internal=True)
            else:
                await self.create_topic(name, None, {}, None, None)
        except RequestError as exc:
            if exc.code is not ErrorCode.TOPIC_EXISTS:
                log.warning("creating the default topic %r: %s", name, exc.message)

    async def _elect(self) -> None:
        leases = await self.store.list_leases(self._broker_prefix)
        now = time.monotonic()
        alive: set[int] = set()
        incarnations: dict[int, str] = {}
        notes: dict[int, dict[str, str]] = {}
        for name, lease in leases.items():
            self.observer.observe(name, lease.value, now)
            broker_id = _broker_id(name, self._broker_prefix)
            if broker_id is not None and self.observer.holder(name, now) is not None:
                alive.add(broker_id)
                notes[broker_id] = lease.value.annotations
                incarnations[broker_id] = lease.value.annotations.get(ANNOTATION + "incarnation", "")
        if alive != self._last_alive:
            self._last_alive, self._members_since = alive, now
        known = await self.store.get_map(self._brokers_map)
        recorded = dict(known.value) if known is not None else {}
        restarted = {b for b, inc in incarnations.items() if recorded.get(f"broker-{b}", inc) != inc}
        membership = await self._membership()
        shards = await self.store.list_maps(self._state_prefix)
        by_shard: dict[str, dict[str, TopicState]] = {}
        changed: set[str] = set()
        for name, shard in shards.items():
            if name == self._brokers_map:
                continue
            topics = by_shard[name] = cstate.decode_shard(shard.value)
            for topic_name, topic in list(topics.items()):
                if topic.controller_epoch > self.controller_epoch:
                    self.controlling.lost()
                    log.warning("a newer controller (epoch %d) wrote %s: stepping down", topic.controller_epoch, topic_name)
                    return
                new = cstate.elect(topic, alive, restarted, self.controller_epoch, self.settings.unclean_leader_election)
                if new is not None:
                    topics[topic_name] = new
                    changed.add(name)
        # Scaling: reassignments, controlled shutdown, preferred leaders (rustmq.cluster.reassign).
        for b in set(self._since) - alive:
            del self._since[b]  # back after an absence (or a pause past its Lease): waits again
        for b, inc in incarnations.items():
            if self._since.get(b, ("",))[0] != inc:
                self._since[b] = (inc, now)
        eligible = alive - restarted
        delay = self.settings.preferred_leader_delay_s
        avoid = {b for b in alive if notes[b].get(ANNOTATION + "shutting-down") == "true"}
        if membership is not None and membership.shutdown is not None:
            avoid.add(membership.shutdown)
        self._avoid = frozenset(avoid)
        given = reassign.RoundInput(
            alive=frozenset(alive), eligible=frozenset(eligible), avoid=frozenset(avoid),
            stable=frozenset(b for b in eligible if now - self._since[b][1] >= delay),
            members=membership.brokers if membership is not None else None,
            max_moves=self.settings.max_reassignments, racks=_racks(leases, self._broker_prefix))
        everything = {t: topic for topics in by_shard.values() for t, topic in topics.items()}
        for topic_name, topic in reassign.plan(everything, given, self.controller_epoch).items():
            shard_name = cstate.shard_name(self.settings.cluster_name, cstate.shard_of(topic_name))
            by_shard[shard_name][topic_name] = everything[topic_name] = topic
            changed.add(shard_name)
        conflicts = 0
        for name in sorted(changed):
            if not self.controlling.valid(time.monotonic()):
                return
            try:
                await self.store.replace_map(name, cstate.encode_shard(by_shard[name].values()), shards[name].version)
            except Conflict:
                conflicts += 1  # a topic created or an ISR changed meanwhile: decided again next round
                continue
            log.info("controller epoch %d: wrote %s (alive %s, restarted %s, avoid %s, members %s)", self.controller_epoch,
                     name, sorted(alive), sorted(restarted), sorted(avoid),
                     sorted(membership.brokers) if membership is not None else "-")
        wanted = {**recorded, **{f"broker-{b}": inc for b, inc in incarnations.items()}}
        if wanted != recorded:
            if known is None:
                await self.store.create_map(self._brokers_map, wanted)
            else:
                await self.store.replace_map(self._brokers_map, wanted, known.version)
        if restarted or shards:
            self._nudge()
        await self._publish_health(everything, alive, membership, notes, now, acted=not conflicts)

    async def _membership(self) -> reassign.Membership | None:
        """The operator's membership ConfigMap, or None (absent or unusable: move nothing)."""
        current = await self.store.get_map(reassign.membership_name(self.settings.cluster_name))
        if current is None:
            self._membership_error = ""
            return None
        try:
            membership = reassign.parse_membership(current.value)
        except ValueError as exc:
            if str(exc) != self._membership_error:
                log.error("ignoring %s: %s", reassign.membership_name(self.settings.cluster_name), exc)
            self._membership_error = str(exc)
            return None
        self._membership_error = ""
        return membership

    async def _publish_health(self, topics: dict[str, TopicState], alive: set[int],
                              membership: reassign.Membership | None, notes: dict[int, dict[str, str]], now: float,
                              acted: bool) -> None:
        """Write ``<cluster>-health`` (CAS) when it changed, and at least every 5 s so the
        operator can tell a live report from a dead controller's."""
        def number(b: int, key: str) -> int:
            text = notes.get(b, {}).get(ANNOTATION + key, "0")
            return int(text) if text.isdigit() else 0

        # The generation is echoed once a round acted on it with every write stored.
        observed = membership.generation if membership is not None and acted else (
            self._health or {}).get("observedMembershipGeneration")
        report = reassign.health(
            topics.values(), alive=alive, members=membership.brokers if membership is not None else None,
            log_bytes={b: number(b, "log-bytes") for b in alive}, bytes_to_move=sum(number(b, "reassign-bytes") for b in alive),
            controller=self.settings.broker_id, controller_epoch=self.controller_epoch,
            observed_generation=observed, updated_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        self.roles.health = report
        self.roles.membership = None if membership is None else {
            "brokers": sorted(membership.brokers), "shutdown": membership.shutdown, "generation": membership.generation}
        if reassign.same_health(self._health, report) and now - self._health_written < 5.0:
            return
        name = reassign.health_name(self.settings.cluster_name)
        data = reassign.encode_health(report)
        if not self.controlling.valid(time.monotonic()):
            return
        try:
            if self._health_version is None:
                current = await self.store.get_map(name)
                written = await (self.store.create_map(name, data) if current is None
                                 else self.store.replace_map(name, data, current.version))
            else:
                written = await self.store.replace_map(name, data, self._health_version)
        except Conflict:
            self._health_version = None  # another controller wrote it meanwhile: re-read next round
            return
        self._health_version, self._health, self._health_written = written.version, report, now

    # -- state sync -------------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        while not self._stopping:
            try:
                # Hazard: not asyncio.wait_for, which on 3.11 can swallow a cancellation that
                # arrives as the wake-up fires (stop() then waited for this loop forever).
                async with asyncio.timeout(self.settings.poll_s):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            self._wakeup.clear()
            try:
                await self._sync()
            except asyncio.CancelledError:
                raise
            except (StoreUnavailable, Conflict) as exc:
                log.warning("state sync: %s", exc)
            except Exception:
                log.exception("state sync failed")

    async def _sync(self) -> None:
        async with self._sync_lock:
            await self._read_state()

    async def _read_state(self) -> None:
        """One read of the leases and the state maps, applied here (the caller holds _sync_lock)."""
        leases = await self.store.list_leases(self._broker_prefix)
        controller = await self.store.get_lease(self._controller_name)
        shards = await self.store.list_maps(self._state_prefix)
        # The operator's per-broker external addresses (read-only here; may not exist).
        listeners = await self.store.get_map(f"{self.settings.cluster_name}-listeners")
        external = listeners.value if listeners is not None else {}
        now = time.monotonic()
        members: dict[int, dict[str, Any]] = {}
        for name, lease in leases.items():
            self.observer.observe(name, lease.value, now)
            broker_id = _broker_id(name, self._broker_prefix)
            if broker_id is None or self.observer.holder(name, now) is None:
                continue
            notes = lease.value.annotations
            members[broker_id] = {
                "id": broker_id,
                "host": notes.get(ANNOTATION + "host", ""),
                "producer_port": int(notes.get(ANNOTATION + "producer-port", "0")),
                "consumer_port": int(notes.get(ANNOTATION + "consumer-port", "0")),
            }
            if notes.get(ANNOTATION + "rack"):
                members[broker_id]["rack"] = notes[ANNOTATION + "rack"]
            if external.get(f"broker-{broker_id}"):
                members[broker_id]["external_host"] = external[f"broker-{broker_id}"]
        self.members = members
        self.roles.brokers = [members[b] for b in sorted(members)]
        self.roles.controller = -1
        if controller is not None and controller.value.holder:
            self.roles.controller = _holder_id(controller.value.holder)
        topics: dict[str, TopicState] = {}
        versions: dict[str, Versioned[dict[str, str]]] = {}
        for name, shard in shards.items():
            if name == self._brokers_map:
                continue
            versions[name] = shard
            topics.update(cstate.decode_shard(shard.value))
        self.topics = topics
        self.roles.topics = topics
        known = shards.get(self._brokers_map)
        # A restarted broker leads nothing until the controller has seen its new incarnation
        # (and so taken it out of the ISRs it may no longer deserve: KIP-903's lesson).
        seen = known is not None and known.value.get(f"broker-{self.settings.broker_id}") == self.incarnation
        self._apply(topics, may_lead=seen)
        await self._store_isr_changes(versions)

    def _apply(self, topics: dict[str, TopicState], may_lead: bool = True) -> None:
        me = self.settings.broker_id
        storage = self.broker.log
        wanted: set[tuple[str, int]] = set()
        follow: dict[int, dict[tuple[str, int], PartitionRole]] = {}
        for name, topic in topics.items():
            mine = [i for i, p in enumerate(topic.partitions) if me in p.replicas]
            if not mine:
                self._drop_local(name)
                continue
            try:
                local = storage.topic(name)
            except storage_errors.UnknownTopicError:
                local = storage.create_topic(name, len(topic.partitions), topic.config or None)
            else:  # ADD_PARTITIONS, ALTER_TOPIC_CONFIG (rustmq.replication.topics)
                apply_local(storage, topic)
            self._applied.add(name)
            for i, plog in enumerate(local.partitions):
                if i not in mine and plog.end_offset and not plog.closed and not plog.busy:
                    # A replica moved away (or left over from before a restart): nothing reads
                    # it; its files go, and should it come back it copies from the leader anew.
                    # Off the loop: deleting a GB of segments stalled this broker's requests
                    # for a quarter second, acks=all of the partitions it still serves with them.
                    self.roles.remove(name, i)
                    self._discard(name, i, plog)
            for i in mine:
                p = topic.partitions[i]
                key = (name, i)
                wanted.add(key)
                role = self.roles.roles.get(key)
                if role is None or role.plog is not local.partitions[i]:
                    role = self.roles.roles[key] = PartitionRole(name, i, local.partitions[i])
                # A replica being truncated (fenced, rustmq.storage.partition) leads nothing
                # until its log is whole again: the next sync installs the leadership.
                usable = may_lead and not local.partitions[i].busy
                leader = p.leader if usable or p.leader != me else cstate.NO_LEADER
                self.roles.assign(role, leader, p.leader_epoch, p.replicas, p.isr, topic.min_insync)
                if p.leader != me and p.leader != cstate.NO_LEADER:
                    follow.setdefault(p.leader, {})[key] = role
        for key in set(self.roles.roles) - wanted:
            self.roles.remove(*key)
        for name in list(self._applied):
            if name not in topics:
                self._applied.discard(name)
                try:
                    self.broker.delete_topic(name)
                except RequestError:
                    pass
        self._follow = follow
        self._reclassified.set()
        self._reclassified = asyncio.Event()
        for leader in follow:
            for catchup in (False, True):
                task = self._fetchers.get((leader, catchup))
                if task is None or task.done():
                    self._fetchers[(leader, catchup)] = asyncio.get_running_loop().create_task(
                        self._fetch_loop(leader, catchup), name=f"fetch-{leader}-{'catchup' if catchup else 'insync'}")

    def _discard(self, name: str, index: int, plog: PartitionLog) -> None:
        """Empty a replica that moved away, its file work on a worker thread (fenced meanwhile)."""
        async def discard() -> None:
            try:
                await rebuild_off_loop(plog, plog.begin_restart(0, reuse_offsets=True))
                log.info("%s/%d: deleted the local replica (this broker is no longer one of its replicas)", name, index)
            except storage_errors.StorageError as exc:
                log.warning("%s/%d: deleting the local replica: %s", name, index, exc)

        task = asyncio.get_running_loop().create_task(discard(), name=f"discard-{name}-{index}")
        self._discards.add(task)
        task.add_done_callback(self._discards.discard)

    def _drop_local(self, name: str) -> None:
        """A topic this broker holds no replica of any more (moved away by a reassignment): its
        local copy goes, since nothing reads it and the state may hand it back only as a new
        replica that copies from the leader again."""
        storage = self.broker.log
        try:
            storage.topic(name)
        except storage_errors.UnknownTopicError:
            return
        self._applied.discard(name)
        for key in [k for k in self.roles.roles if k[0] == name]:
            self.roles.remove(*key)
        try:
            self.broker.delete_topic(name)
            log.info("deleted the local replicas of %s: this broker holds none of its partitions any more", name)
        except RequestError as exc:
            log.warning("deleting the local replicas of %s: %s", name, exc.message)

    async def _store_isr_changes(self, versions: dict[str, Versioned[dict[str, str]]]) -> None:
        now = time.monotonic()
        proposals: dict[str, list[tuple[str, int, PartitionRole, tuple[int, ...]]]] = {}
        for (name, index), role in self.roles.roles.items():
            tracker = role.tracker
            if tracker is None:
                continue
            proposed = tracker.proposed_isr(role.plog.end_offset, now)
            if proposed is not None:  # never adds a broker whose Lease is gone (the controller just removed it)
                proposed = tuple(b for b in proposed if b in role.isr or b in self.members)
            if proposed is not None and set(proposed) != set(role.isr):
                shard = cstate.shard_name(self.settings.cluster_name, cstate.shard_of(name))
                proposals.setdefault(shard, []).append((name, index, role, proposed))
        for shard, changes in proposals.items():
            current = versions.get(shard)
            if current is None or not self._lease_valid():
                continue
            topics = cstate.decode_shard(current.value)
            applied = []
            for name, index, role, proposed in changes:
                topic = topics.get(name)
                if topic is None:
                    continue
                new = cstate.change_isr(topic, index, self.settings.broker_id, role.leader_epoch, proposed)
                if new is not None:
                    topics[name] = new
                    applied.append((role, new.partitions[index]))
            if not applied:
                continue
            await self.store.replace_map(shard, cstate.encode_shard(topics.values()), current.version)
            for role, p in applied:
                log.info("%s/%d: ISR %s -> %s (epoch %d)", role.topic, role.index, list(role.isr), list(p.isr), p.leader_epoch)
                self.roles.assign(role, p.leader, p.leader_epoch, p.replicas, p.isr, role.min_insync)
            self._nudge()

    # -- followers --------------------------------------------------------------------------

    async def _fetch_loop(self, leader: int, catchup: bool) -> None:
        """One fetch session with `leader`: its in-sync partitions (catchup False) or the ones
        this replica is not in the ISR of (catchup True; the throttle applies there). Apart, so
        an acks=all write never waits behind a catch-up chunk, nor catch-up behind a long poll."""
        connection: Connection | None = None
        backoff = 0.05
        try:
            while not self._stopping:
                parts = self._follow.get(leader)
                if not parts:
                    return
                member = self.members.get(leader)
                if member is None:
                    await asyncio.sleep(self.settings.poll_s)
                    continue
                try:
                    if connection is None or connection.closed:
                        connection = await Connection.open(member["host"], member["consumer_port"], timeout=2.0)
                    await self._fetch_once(connection, leader, parts, catchup)
                    backoff = 0.05
                except (ClientError, OSError, TimeoutError) as exc:
                    log.debug("fetch from broker %d: %s", leader, exc)
                    if connection is not None:
                        connection.close()
                        connection = None
                    self._nudge()
                    await asyncio.sleep(backoff)
                    backoff = min(1.0, backoff * 2)
        finally:
            if connection is not None:
                connection.close()

    def _being_added(self, role: PartitionRole) -> bool:
        """This replica is being added by a reassignment and is not in sync yet (throttled)."""
        topic = self.topics.get(role.topic)
        if topic is None or role.index >= len(topic.partitions):
            return False
        p = topic.partitions[role.index]
        return bool(p.target) and self.settings.broker_id not in p.isr

    async def _fetch_once(self, connection: Connection, leader: int, parts: dict[tuple[str, int], PartitionRole],
                          catchup: bool = False) -> None:
        me = self.settings.broker_id
        reclassified = self._reclassified
        # Not fenced (truncated off the loop), and this session's kind: in the ISR or not.
        roles = [r for r in parts.values() if not r.plog.busy and (me not in r.isr) == catchup]
        if not roles:
            with contextlib.suppress(TimeoutError):  # until the next state sync (or a truncation ends)
                await asyncio.wait_for(reclassified.wait(), 0.05 if any(r.plog.busy for r in parts.values())
                                       else self.settings.poll_s)
            return
        throttled = ({id(r) for r in roles if self._being_added(r)}
                     if catchup and self.settings.reassign_bytes_per_s > 0 else set())
        # Throttled catch-up comes in small responses (its rate is capped anyway); unthrottled
        # (a follower back from a restart, or no throttle set) as large as in sync: 1 MiB
        # responses made an unthrottled drain of 1 GiB take 13 s instead of 8.
        limit = total = self.settings.catchup_fetch_max_bytes if throttled else self.settings.replica_fetch_max_bytes
        if throttled:
            allowance = self._throttle.allowance(time.monotonic())
            if allowance <= 0:
                roles = [r for r in roles if id(r) not in throttled]
                if not roles:
                    await asyncio.sleep(min(1.0, self._throttle.wait_s(time.monotonic())))
                    return
            limit = min(limit, max(allowance, 1))
        asked = [r.plog.end_offset for r in roles]
        request = {
            "api": int(ApiKey.FETCH),
            "replica_id": me,
            "max_wait_ms": self.settings.replica_fetch_wait_ms,
            "min_bytes": 1,
            "max_bytes": total,
            "partitions": [
                {"topic": r.topic, "partition": r.index, "offset": r.plog.end_offset, "leader_epoch": r.leader_epoch,
                 "last_fetched_epoch": r.last_epoch(), "max_bytes": limit if id(r) in throttled else total}
                for r in roles
            ],
        }
        future = connection.send(request)
        assert future is not None
        async with asyncio.timeout(self.settings.replica_fetch_wait_ms / 1000 + self.settings.timing.api_timeout_s + 5):
            response = await future
        if response.header.get("error"):
            raise BrokerError(response.header["error"], str(response.header.get("message", "")))
        payload = memoryview(response.payload)
        position = 0
        stale = False
        for role, offset, entry in zip(roles, asked, response.header["partitions"], strict=True):
            size = int(entry.get("size", 0))
            chunk = payload[position:position + size]
            position += size
            if self.roles.roles.get((role.topic, role.index)) is not role or role.plog.end_offset != offset:
                continue  # moved away, restarted or truncated while the fetch was out: ask again
            if size and id(role) in throttled:
                self._throttle.spent(size, time.monotonic())
            if role.leader != leader or role.plog.closed or role.plog.busy:
                continue  # the state moved while the fetch was out
            if entry.get("error"):
                if entry["error"] in (ErrorCode.NOT_LEADER, ErrorCode.FENCED_LEADER_EPOCH, ErrorCode.UNKNOWN_TOPIC):
                    stale = True
                elif entry["error"] == ErrorCode.OFFSET_OUT_OF_RANGE and int(entry.get("log_start_offset", -1)) > role.plog.end_offset:
                    # The leader's retention removed what this replica lacks (a new replica of an
                    # old topic): start over, empty, where the leader's log starts.
                    log.warning("%s/%d: leader %d starts at %s, after this replica's end %d: restarting there",
                                role.topic, role.index, leader, entry["log_start_offset"], role.plog.end_offset)
                    await rebuild_off_loop(role.plog, role.plog.begin_restart(int(entry["log_start_offset"])))
                    role.epochs = None
                continue
            diverging = entry.get("diverging")
            if diverging is not None:
                end = min(int(diverging["end_offset"]), role.plog.end_offset)
                log.warning("%s/%d: log diverges from leader %d after epoch %s: truncating to %d",
                            role.topic, role.index, leader, diverging["epoch"], end)
                role.truncated(await rebuild_off_loop(role.plog, role.plog.begin_truncate(end)))
                continue
            if size:
                try:
                    role.plog.append(chunk, None)
                except storage_errors.CorruptBatchError as exc:
                    log.warning("%s/%d: unusable batches from leader %d (%s); fetching again", role.topic, role.index, leader, exc)
                    continue
                role.note_epochs(chunk)
            high_watermark = max(role.high_watermark, min(int(entry.get("high_watermark", 0)), role.plog.end_offset))
            if high_watermark > role.high_watermark:
                role.high_watermark = high_watermark
                self.broker._wake(role.plog)  # a queue coordinator reading this replica delivers up to it
            # Follow the leader's log start (Kafka's follower does the same): whole segments
            # below it go, never above this replica's high watermark (a compacted coordination
            # partition, a retention hold the leader decided; docs/cluster.md).
            # When the leader's log start lies inside this replica's active segment (its
            # segments are cut by its own size, not the leader's), that segment is rolled so the
            # leader's next advance past it can delete it.
            leader_start = min(int(entry.get("log_start_offset", -1)), role.high_watermark)
            if leader_start > role.plog.start_offset:
                if role.plog.delete_before(leader_start):
                    log.info("%s/%d: log start moved to %d following leader %d (its log starts at %s)",
                             role.topic, role.index, role.plog.start_offset, leader, entry.get("log_start_offset"))
                if role.plog.active_base_offset < leader_start:
                    role.plog.roll()
        if stale:
            self._nudge()
            await asyncio.sleep(0.05)

    # -- admin (rustmq.server.replicated.ClusterAdmin) ---------------------------------------

    async def create_topic(self, name: str, partitions: int | None, config: dict[str, Any],
                           replication_factor: int | None, min_insync: int | None, *,
                           internal: bool = False) -> TopicState:
        try:
            validate_topic_name(name)
            if internal_topic.is_internal(name) and not internal:
                raise ValueError(f"topic names starting with {internal_topic.INTERNAL_PREFIX!r} are reserved for the broker")
        except (storage_errors.InvalidConfigError, ValueError, TypeError) as exc:
            raise RequestError(ErrorCode.INVALID_CONFIG, str(exc)) from None
        check_config(self.broker.log.default_config, config)
        count = partitions or self.broker.settings.default_partitions
        live = sorted(self.members)
        membership = await self._store_call(self._membership())
        if membership is not None:  # not on brokers being drained, nor on ones not added yet
            live = [b for b in live if b in membership.brokers]
        rf = replication_factor or cstate.default_replication_factor(len(live))
        min_isr = min_insync or cstate.default_min_insync(rf)
        shard = cstate.shard_name(self.settings.cluster_name, cstate.shard_of(name))
        for _ in range(CAS_ATTEMPTS):
            current = await self._store_call(self.store.get_map(shard))
            topics = cstate.decode_shard(current.value) if current is not None else {}
            if name in topics:
                raise RequestError(ErrorCode.TOPIC_EXISTS, f"topic {name!r} already exists")
            try:
                # User topics are balanced among themselves: the internal topic, created by the
                # controller at some point, must not shift where the next user topic goes.
                peers = [t for t in self.topics.values() if internal or not internal_topic.is_internal(t.name)]
                topic = cstate.new_topic(name, uuid.uuid4().hex, count, rf, min_isr, live, peers, config,
                                         racks=self.racks())
                if internal and self._avoid:
                    topic = _lead_elsewhere(topic, self._avoid)
            except ValueError as exc:
                raise RequestError(ErrorCode.INVALID_CONFIG, str(exc)) from None
            topics[name] = topic
            try:
                if current is None:
                    await self._store_call(self.store.create_map(shard, cstate.encode_shard(topics.values())))
                else:
                    await self._store_call(self.store.replace_map(shard, cstate.encode_shard(topics.values()), current.version))
            except Conflict:
                continue
            log.info("created topic %s: %d partitions, replication factor %d, min in-sync %d", name, count, rf, min_isr)
            await self._store_call(self._sync())
            return topic
        raise RequestError(ErrorCode.CLUSTER_UNAVAILABLE, f"creating {name!r}: too many concurrent changes, retry")

    async def delete_topic(self, name: str) -> None:
        if internal_topic.is_internal(name):
            raise RequestError(ErrorCode.INVALID_REQUEST, f"{name!r} is internal to the cluster and cannot be deleted")
        shard = cstate.shard_name(self.settings.cluster_name, cstate.shard_of(name))
        for _ in range(CAS_ATTEMPTS):
            current = await self._store_call(self.store.get_map(shard))
            topics = cstate.decode_shard(current.value) if current is not None else {}
            if current is None or name not in topics:
                raise RequestError(ErrorCode.UNKNOWN_TOPIC, f"unknown topic {name!r}")
            del topics[name]
            try:
                await self._store_call(self.store.replace_map(shard, cstate.encode_shard(topics.values()), current.version))
            except Conflict:
                continue
            await self._store_call(self._sync())
            return
        raise RequestError(ErrorCode.CLUSTER_UNAVAILABLE, f"deleting {name!r}: too many concurrent changes, retry")

    async def refresh(self) -> None:
        """Read the cluster state, a read that starts after this call (a topic another broker
        just created is then known). Callers share reads: those arriving while one is under
        way wait for the next, so a burst of lookups of topics that do not exist costs the
        API server one read at a time, not one per request."""
        if self._next_refresh is None:
            self._next_refresh = asyncio.ensure_future(self._refresh_after_current())
            self._next_refresh.add_done_callback(_retrieve)
        await self._store_call(asyncio.shield(self._next_refresh))

    async def _refresh_after_current(self) -> None:
        async with self._sync_lock:  # a read under way started before some callers asked
            self._next_refresh = None
            await self._read_state()

    async def _store_call(self, call: Any) -> Any:
        try:
            return await call
        except StoreUnavailable as exc:
            raise RequestError(ErrorCode.CLUSTER_UNAVAILABLE, f"the coordination store did not answer: {exc}") from None


def _racks(leases: Mapping[str, Versioned[LeaseRecord]], prefix: str) -> dict[int, str]:
    """broker -> rack from the broker Leases (a broker that is down keeps its last rack)."""
    out = {}
    for name, lease in leases.items():
        broker_id = _broker_id(name, prefix)
        rack = lease.value.annotations.get(ANNOTATION + "rack")
        if broker_id is not None and rack:
            out[broker_id] = rack
    return out


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a shared read's failure as seen (its callers may all have been cancelled)."""
    if not future.cancelled():
        future.exception()


async def rebuild_off_loop(plog: PartitionLog, rebuild: Rebuild | None) -> int:
    """Run a truncation's or restart's file work (`PartitionLog.begin_truncate`/`begin_restart`)
    on a worker thread and adopt the result here; return the new end offset. The partition is
    fenced meanwhile (its reads and appends answer PartitionBusyError), so the loop keeps
    serving every other partition and nobody sees a half-truncated log. Cancelled meanwhile,
    the thread still finishes and the fence is lifted when it does (or `close` takes it over)."""
    if rebuild is None:
        return plog.end_offset
    future = asyncio.get_running_loop().run_in_executor(None, rebuild.run)
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(lambda _: _finish_quietly(plog, rebuild))
        raise
    return plog.finish_rebuild(rebuild)


def _finish_quietly(plog: PartitionLog, rebuild: Rebuild) -> None:
    try:
        plog.finish_rebuild(rebuild)
    except storage_errors.StorageError as exc:
        log.error("%s: rebuilding the partition failed: %s", plog.directory, exc)


def _lead_elsewhere(topic: TopicState, avoid: frozenset[int]) -> TopicState:
    """The controller's own topic created while a broker shuts down: each partition's first
    replica (its leader and preferred leader) is one that stays, where there is one."""
    partitions = []
    for p in topic.partitions:
        staying = [b for b in p.replicas if b not in avoid]
        if staying and p.replicas[0] in avoid:
            replicas = (staying[0], *[b for b in p.replicas if b != staying[0]])
            p = dataclasses.replace(p, replicas=replicas, leader=replicas[0], isr=replicas)
        partitions.append(p)
    return dataclasses.replace(topic, partitions=tuple(partitions))


def _broker_id(name: str, prefix: str) -> int | None:
    tail = name[len(prefix):]
    return int(tail) if name.startswith(prefix) and tail.isdigit() else None


def _holder_id(holder: str) -> int:
    head = holder.split("/", 1)[0]
    tail = head.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


async def _cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and wait for them; a task still running a second later is cancelled again.
    Hazard: on Python 3.11 a cancellation can be swallowed (asyncio.wait_for whose inner
    awaitable finishes as the cancellation arrives), and a loop that lost it runs on: waiting
    for it unbounded made stop(), and with it SIGTERM, hang."""
    pending = {task for task in tasks if not task.done()}
    for attempt in range(30):
        if not pending:
            return
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
        if pending and attempt == 0:
            log.warning("stop: %d task(s) still running after their cancellation; cancelling again: %s",
                        len(pending), ", ".join(sorted(task.get_name() for task in pending)))
    log.error("stop: %d task(s) ignored 30 cancellations; leaving them", len(pending))
