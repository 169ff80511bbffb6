"""Cluster mode: consumer-group coordinators on the replicated internal topic.

A group's coordinator is the leader of partition ``partition_for(group)`` of
``__rustmq_coordination`` (rustmq.coordination.internal_topic). `ClusterGroupStores` is the
`GroupStores` the Coordinator consults in cluster mode: for each partition this broker leads it
keeps one `OffsetStore` and one `ProducerNames` (stable producer names -> id, epoch) on a
`LogJournal` over that partition, stamped with the leader epoch; one replay feeds both.

- Leadership is checked on every group request (the stored leader, this broker, a valid broker
  lease); otherwise NOT_COORDINATOR and the client finds the coordinator again.
- A store is rebuilt by replaying its partition whenever the leader epoch differs from the one
  it was built at (this broker became leader again, or for the first time): what the broker
  appended as a follower is exactly what the previous leader wrote. Group membership is not
  replicated: on a new coordinator members get UNKNOWN_MEMBER and join again; the members a
  broker held in an earlier term are dropped when it rebuilds.
- The replay runs in steps of REPLAY_STEP_BYTES (128 KiB), one per event-loop pass (a short log in
  one go, at once): meanwhile requests for that partition's keys get LOAD_IN_PROGRESS, which
  clients retry (Kafka's COORDINATOR_LOAD_IN_PROGRESS), and the loop keeps serving everything
  else. A leadership lost or changed during the replay abandons it.
- A commit is answered once the partition's high watermark passes it (acks=all; refused with
  NOT_ENOUGH_REPLICAS when the ISR is below min_insync_replicas before anything is written). A
  leadership lost while waiting answers NOT_COORDINATOR: the commit may or may not survive,
  and the client retries it at the new coordinator.
- Compaction: `PartitionStores` is everything kept on one partition; its `live_entries` is the
  snapshot the journal appends when the tail since the last one exceeds
  ``coordination_compact_bytes`` (rustmq.coordination.journal.LogJournal). Once the high
  watermark passes the snapshot the segments below it are deleted here (the leader's log start
  moves to it; followers follow the leader's log start, rustmq.replication.node). A new leader
  that replayed a snapshot its predecessor had not yet advanced to advances itself.
- Queue subscriptions: the queue state of every subscription of topic T (done marks, failure
  counts, settings overrides; rustmq.coordination.queue.QueueStore) lives on partition
  ``partition_for(queue_key(T))``, its keys wrapped as ``[3, key]`` (`SharedJournal`) so one
  replay feeds the three stores. Leases are not replicated: a new coordinator hands the records
  that were in flight out again. A queue reads T's partitions from this broker's replica (below
  the high watermark) or, without one, from a window fetched from the leader (`Window`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

from rustmq.coordination import internal_topic, queue_log
from rustmq.coordination.journal import Entry, LogJournal, LogReplay
from rustmq.coordination.offsets import OffsetStore
from rustmq.coordination.producers import ProducerNames
from rustmq.coordination.queue import QueueSettings, QueueStore, SharedJournal
from rustmq.coordination.service import Coordinator, CoordinatorLoadingError, NotCoordinatorError
from rustmq.protocol.api import ErrorCode, RequestError

if TYPE_CHECKING:
    from rustmq.server.broker import Broker
    from rustmq.server.replicated import ClusterRoles, PartitionRole

log = logging.getLogger("rustmq.coordination")

# Bytes of the internal partition replayed per loop pass: small commits cost about 13 ms of CPU
# per 128 KiB here (benchmarks/coordination_replay.py, docs/benchmarks.md).
REPLAY_STEP_BYTES: Final = 128 << 10


class Window(queue_log.RecordSource, Protocol):
    """A coordinator's copy of a partition it holds no replica of, fetched from its leader
    (rustmq.replication.queue_sources.RemoteWindow, injected by the replication runtime)."""

    known: bool
    high_watermark: int

    def start(self) -> None: ...

    def close(self) -> None: ...


WindowFactory = Callable[..., Window]


class PartitionStores:
    """Every store kept on one partition of the internal topic, over one journal.

    A store added here (its own key format) needs three things: `apply` routes its entries to
    it, `live_entries` includes its live state (the compaction snapshot is exactly this list:
    a store left out would lose its state at the next compaction), `reset` starts it empty.
    Committed offsets have keys ``[1, ...]``, producer names ``[2, name]``, queue state
    ``[3, key]`` (the QueueStore's own key wrapped by `SharedJournal`)."""

    def __init__(self, journal: LogJournal, queue_settings: QueueSettings | None = None) -> None:
        self.journal = journal
        self.queue_settings = queue_settings or QueueSettings()
        self.offsets = OffsetStore(journal)
        self.names = ProducerNames(journal)
        self.queues = QueueStore(SharedJournal(journal), self.queue_settings)

    def apply(self, key: bytes, value: bytes | None) -> None:
        if SharedJournal.is_queue_key(key):
            self.queues.apply(SharedJournal.unwrap_key(key), value)
        elif ProducerNames.is_name_key(key):
            self.names.apply(key, value)
        else:
            self.offsets.apply(key, value)

    def replayed(self) -> None:
        """After the last entry of a replay."""
        self.queues.replayed()

    def reset(self) -> None:
        """A snapshot marker: the entries after it are the whole state."""
        self.offsets = OffsetStore(self.journal)
        self.names = ProducerNames(self.journal)
        self.queues = QueueStore(SharedJournal(self.journal), self.queue_settings)

    def live_entries(self) -> list[Entry]:
        return [*self.offsets.live_entries(), *self.names.live_entries(),
                *SharedJournal.wrap(self.queues.live_entries())]


class _Led:
    """A partition this broker leads with its stores built (at `epoch`), or being replayed."""

    __slots__ = ("role", "epoch", "stores", "replay", "task")

    def __init__(self, role: PartitionRole, stores: PartitionStores) -> None:
        self.role = role
        self.epoch = role.leader_epoch
        self.stores = stores
        self.replay = LogReplay(role.plog, stores.apply, stores.reset)
        self.task: asyncio.Task[None] | None = None


class ClusterGroupStores:
    def __init__(self, broker: Broker, coordinator: Coordinator, roles: ClusterRoles,
                 wake_queues: Callable[[], None] | None = None, windows: WindowFactory | None = None) -> None:
        self.broker = broker
        self.coordinator = coordinator
        self.roles = roles
        self.compact_bytes: int = broker.settings.coordination_compact_bytes
        self.wake_queues = wake_queues or (lambda: None)
        self._window_factory = windows
        self._stores: dict[int, _Led] = {}  # built
        self._loads: dict[int, _Led] = {}  # being replayed
        # Subscription partitions read from another broker: (subscription, topic, partition) ->
        # (the store it belongs to, its window); dropped with the store.
        self._windows: dict[tuple[str, str, int], tuple[QueueStore, Window]] = {}

    # -- GroupStores -------------------------------------------------------------------------

    def partition_count(self, topic: str) -> int:
        state = self.roles.topics.get(topic)
        return len(state.partitions) if state is not None else 0

    def store_for(self, group: str) -> OffsetStore:
        return self._state(group).stores.offsets

    def names_for(self, name: str) -> ProducerNames:
        return self._state(name).stores.names

    def queues_for(self, topic: str) -> QueueStore:
        return self._state(internal_topic.queue_key(topic)).stores.queues

    def _state(self, key: str) -> _Led:
        index = self.partition_of(key)
        role = self._led_role(index, key)
        led = self._stores.get(index)
        if led is not None and led.role is role and led.epoch == role.leader_epoch:
            self._advance(led)
            return led
        load = self._loads.get(index)
        if load is None or load.role is not role or load.epoch != role.leader_epoch:
            if load is not None and load.task is not None:
                load.task.cancel()
            journal = LogJournal(role.plog, role.leader_epoch, lambda: self._appended(role),
                                 compact_bytes=self.compact_bytes)
            load = self._loads[index] = _Led(role, PartitionStores(journal, self.coordinator.queues.settings))
            journal.live = load.stores.live_entries
            journal.on_snapshot = lambda end: self._snapshot_appended(load, end)
            try:
                if load.replay.step(REPLAY_STEP_BYTES):  # a short log: at once
                    return self._install(index, load)
            except Exception:
                del self._loads[index]  # the next request starts afresh
                raise
            load.task = asyncio.get_running_loop().create_task(self._replay(index, load))
        raise CoordinatorLoadingError(
            f"broker {self.roles.broker_id} is loading partition {index} of {internal_topic.TOPIC} "
            f"({load.replay.bytes_read} bytes read so far); retry")

    async def _replay(self, index: int, load: _Led) -> None:
        try:
            while True:
                await asyncio.sleep(0)  # one step per loop pass: other requests run in between
                if self._loads.get(index) is not load:
                    return  # a newer load took over
                if load.role.leader_epoch != load.epoch or not self._leads(load.role):
                    del self._loads[index]  # leadership moved or in doubt: the next request starts afresh
                    return
                if load.replay.step(REPLAY_STEP_BYTES):
                    self._install(index, load)
                    return
        except Exception:  # the partition was truncated or removed underneath: the next request retries
            log.exception("replaying partition %d of %s failed", index, internal_topic.TOPIC)
            if self._loads.get(index) is load:
                del self._loads[index]

    def _install(self, index: int, load: _Led) -> _Led:
        self._loads.pop(index, None)
        count = self.partition_count(internal_topic.TOPIC)
        for name in [g for g in self.coordinator.groups.groups if internal_topic.partition_for(g, count) == index]:
            del self.coordinator.groups.groups[name]  # members of an earlier term join again
        journal = load.stores.journal
        journal.replayed(load.replay)
        load.stores.replayed()
        previous = self._stores.get(index)
        if previous is not None:
            self._dropped(previous)
        self._stores[index] = load
        log.info("partition %d of %s loaded at epoch %d: %d bytes replayed from offset %d (snapshot at %s)",
                 index, internal_topic.TOPIC, load.epoch, load.replay.bytes_read, load.role.plog.start_offset,
                 journal.snapshot_offset)
        if journal.snapshot_offset is not None and load.role.plog.start_offset < journal.snapshot_offset:
            # A snapshot the previous leader had not advanced to yet: advance once replicated.
            self._snapshot_appended(load, journal.snapshot_end)
        return load

    def _snapshot_appended(self, led: _Led, end: int) -> None:
        self.roles.when_replicated(led.role, end, lambda error: None if error is not None else self._advance(led))

    def _advance(self, led: _Led) -> None:
        """Move the log start to the newest snapshot once the high watermark passed it."""
        journal = led.stores.journal
        tracker = led.role.tracker
        if tracker is None or journal.snapshot_offset is None or led.role.plog.closed:
            return
        if led.role.leader_epoch != led.epoch or led.role.plog.start_offset >= journal.snapshot_offset:
            return
        if journal.advance_start(tracker.high_watermark):
            log.info("%s/%d: log start moved to %d (the snapshot at %d is replicated)", led.role.topic,
                     led.role.index, led.role.plog.start_offset, journal.snapshot_offset)

    def _led_states(self) -> list[_Led]:
        led = []
        for index, state in list(self._stores.items()):
            if self._leads(state.role) and state.role.leader_epoch == state.epoch:
                led.append(state)
            else:
                del self._stores[index]
                self._dropped(state)
        return led

    def stores(self) -> list[OffsetStore]:
        return [state.stores.offsets for state in self._led_states()]

    # -- queues ------------------------------------------------------------------------------

    def queue_stores(self) -> list[QueueStore]:
        return [state.stores.queues for state in self._led_states()]

    def check_queue_store(self, store: QueueStore) -> None:
        for state in self._led_states():
            if state.stores.queues is store:
                self.roles.check_insync(state.role)
                return
        raise NotCoordinatorError(f"broker {self.roles.broker_id} no longer coordinates these queue subscriptions")

    def _dropped(self, state: _Led) -> None:
        """Stores of an earlier term: their windows stop (new stores start their own)."""
        queues = state.stores.queues
        for key, (store, window) in list(self._windows.items()):
            if store is queues:
                window.close()
                del self._windows[key]

    def queue_source(self, subscription: str, topic: str, index: int) -> tuple[queue_log.RecordSource, int]:
        role = self.roles.role(topic, index)
        key = (subscription, topic, index)
        if role is not None and not role.plog.closed:
            stale = self._windows.pop(key, None)
            if stale is not None:  # a replica arrived here (reassignment): the window is not needed
                stale[1].close()
            hw = role.tracker.high_watermark if role.tracker is not None else role.high_watermark
            return role.plog, min(hw, role.plog.end_offset)
        store = self.queues_for(topic)
        held = self._windows.get(key)
        if held is None or held[0] is not store:
            if held is not None:
                held[1].close()
            if self._window_factory is None:
                raise CoordinatorLoadingError(f"broker {self.roles.broker_id} holds no replica of {topic}/{index} "
                                              "and cannot read it from its leader")
            sub = store.subscriptions.get(key)
            window = self._window_factory(topic, index, sub.ack_floor if sub is not None else 0,
                                          leader=lambda: self._leader_of(topic, index),
                                          floor=lambda: self._floor(store, key), wake=self.wake_queues)
            window.start()
            held = self._windows[key] = (store, window)
        window = held[1]
        return window, window.high_watermark if window.known else 0

    def _floor(self, store: QueueStore, key: tuple[str, str, int]) -> int:
        sub = store.subscriptions.get(key)
        return sub.ack_floor if sub is not None else 0

    def _leader_of(self, topic: str, index: int) -> dict[str, Any] | None:
        state = self.roles.topics.get(topic)
        if state is None or index >= len(state.partitions):
            return None
        leader = state.partitions[index].leader
        return next((b for b in self.roles.brokers if b["id"] == leader), None)

    def close(self) -> None:
        for _, window in self._windows.values():
            window.close()
        self._windows.clear()

    # -- the request path --------------------------------------------------------------------

    def partition_of(self, group: str) -> int:
        count = self.partition_count(internal_topic.TOPIC)
        if count == 0:
            raise NotCoordinatorError(
                f"the coordination topic {internal_topic.TOPIC} does not exist yet (the controller "
                "creates it once the brokers have registered)")
        return internal_topic.partition_for(group, count)

    def find(self, group: str) -> dict[str, Any]:
        """FIND_COORDINATOR's answer: the stored leader of the key's partition (a group id, a
        producer name, or `internal_topic.queue_key(topic)`)."""
        index = self.partition_of(group)
        state = self.roles.topics[internal_topic.TOPIC]
        leader = state.partitions[index].leader
        broker = next((b for b in self.roles.brokers if b["id"] == leader), None)
        if broker is None:
            raise NotCoordinatorError(f"partition {index} of {internal_topic.TOPIC} has no live leader right now")
        return {"coordinator": leader, "partition": index, **{k: v for k, v in broker.items() if k != "id"}}

    def check_replicas(self, group: str) -> None:
        """NOT_ENOUGH_REPLICAS before a write the ISR could not acknowledge."""
        self.roles.check_insync(self._led_role(self.partition_of(group), group))

    def replicated_role(self, plog: Any) -> PartitionRole | None:
        for state in self._stores.values():
            if state.role.plog is plog:
                return state.role
        return None

    def when_replicated(self, role: PartitionRole, offset: int, done: Callable[[BaseException | None], None]) -> None:
        def translated(error: BaseException | None) -> None:
            if isinstance(error, RequestError) and error.code is ErrorCode.NOT_LEADER:
                error = RequestError(ErrorCode.NOT_COORDINATOR, f"coordinator moved before the write was replicated: {error.message}")
            done(error)

        self.roles.when_replicated(role, offset + 1, translated)

    # -- internals ---------------------------------------------------------------------------

    def _leads(self, role: PartitionRole) -> bool:
        return role.tracker is not None and role.leader == self.roles.broker_id and self.roles.lease_valid()

    def _led_role(self, index: int, key: str) -> PartitionRole:
        role = self.roles.role(internal_topic.TOPIC, index)
        if role is None or not self._leads(role):
            leader = role.leader if role is not None else -1
            raise NotCoordinatorError(
                f"broker {self.roles.broker_id} does not coordinate {key!r} "
                f"(partition {index} of {internal_topic.TOPIC}, leader: {leader})")
        return role

    def _appended(self, role: PartitionRole) -> None:
        self.broker._wake(role.plog)
        self.roles.appended(role)
