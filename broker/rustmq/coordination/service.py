"""One object per broker that holds all coordination state and speaks in typed calls, so the
server only maps requests to methods and waits for durability.

Data layout (next to the storage engine's ``topics/`` under the broker's data dir)::

    coordination/consumer_offsets/   OffsetStore journal
    coordination/queue_state/        QueueStore journal
    coordination/producer_ids/       ProducerIds journal
    coordination/producer_names/     ProducerNames journal (stable producer names -> id, epoch)

Threading: every method runs on the thread that owns the `rustmq.storage.Log` (the event loop).
Durability: methods that write return `Durable(partition, offset)` values; the server answers
the request only once `partition.durable_offset > offset` (`Broker.when_durable`). For the
journals that position is taken after the append's compaction check (`Journal.position`), since a
compaction moves the state to a generation with other offsets.

Dead letters are written to ``<topic>.<subscription>.dlq`` (created on first use with as many
partitions as the origin topic; a dead letter keeps its partition number). The record is marked
done only once its dead letter is durable: the append returns a `DeadLetterWrite` the server
waits for (`take_dead_letter_writes`, through the GroupCommitter: no fsync on the event loop),
then `dead_letters_durable` marks it done for the next persist. So no crash, power loss
included, loses a dead letter, and a failed DLQ write (disk full) leaves the record unsettled
and retried, never journaled as done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

from rustmq.coordination import group as group_mod
from rustmq.coordination import queue, queue_log
from rustmq.coordination.offsets import InvalidCommitError, OffsetStore
from rustmq.coordination.producers import (
    Decision,
    NamedProducer,
    ProducerIds,
    ProducerNames,
    ProducerRebuild,
    ProducerSnapshots,
    ProducerStateTable,
)
from rustmq.protocol import batch
from rustmq.storage import errors
from rustmq.storage.durability import FlushTarget
from rustmq.storage.log import Log
from rustmq.storage.partition import PartitionLog

logger = logging.getLogger("rustmq.coordination")

TopicPartition = tuple[str, int]
# A producer-table rebuild walks this many bytes of log per step (the server yields between steps).
PRODUCER_REBUILD_STEP_BYTES = 1 << 20


class UnknownPartitionError(LookupError):
    code = "UNKNOWN_PARTITION"


class Durable(NamedTuple):
    """Answer the request once `partition.durable_offset > offset`."""

    partition: FlushTarget
    offset: int


class NotCoordinatorError(LookupError):
    """Cluster mode: this broker does not lead the coordination partition of the group now."""

    code = "NOT_COORDINATOR"


class CoordinatorLoadingError(LookupError):
    """Cluster mode: this broker leads the key's coordination partition and is still replaying
    it (rustmq.server.group_stores); the client retries shortly."""

    code = "LOAD_IN_PROGRESS"


class GroupStores(Protocol):
    """Cluster mode (installed by the server, docs/cluster.md): committed offsets live in one
    `OffsetStore` per partition of the replicated internal topic; a group's store is that of
    the partition it hashes to, served only by that partition's leader."""

    def store_for(self, group: str) -> OffsetStore:
        """The group's store, replayed from the partition if leadership changed since;
        NotCoordinatorError when this broker does not lead that partition."""
        ...

    def stores(self) -> list[OffsetStore]:
        """The stores of the partitions this broker leads now."""
        ...

    def names_for(self, name: str) -> ProducerNames:
        """The producer-name registry of the partition `name` hashes to (as `store_for`)."""
        ...

    def partition_count(self, topic: str) -> int:
        """Partitions of a topic in the cluster state (0: no such topic)."""
        ...

    def queues_for(self, topic: str) -> queue.QueueStore:
        """The queue state of every subscription of `topic` (as `store_for`, under the key
        `internal_topic.queue_key(topic)`)."""
        ...

    def queue_stores(self) -> list[queue.QueueStore]:
        """The queue stores of the partitions this broker leads now."""
        ...

    def check_queue_store(self, store: queue.QueueStore) -> None:
        """NotCoordinatorError unless this broker still leads the store's partition at the epoch
        it was built at; NOT_ENOUGH_REPLICAS when its in-sync replicas could not take a write."""
        ...

    def queue_source(self, subscription: str, topic: str, partition: int) -> tuple[queue_log.RecordSource, int]:
        """Where a subscription reads the partition's records and how far (its high
        watermark): this broker's replica, or a window fetched from the partition's leader."""
        ...


class LimitReachedError(Exception):
    """A new group or subscription beyond the broker's limit (nothing was created)."""

    code = "LIMIT_REACHED"


class CoordinationLimits(NamedTuple):
    max_groups: int = 10_000  # groups with members or committed offsets
    max_subscriptions: int = 10_000  # distinct (subscription, topic) pairs with state or settings


class Placement(NamedTuple):
    """Cluster mode: a dead-letter batch to place on the DLQ topic's partition leader."""

    topic: str  # the DLQ topic (created cluster-wide if missing)
    partition: int  # the origin partition (the DLQ partition is this modulo its partition count)
    partitions: int  # the origin topic's partition count (the DLQ topic is created with as many)
    batch: bytes
    record_count: int


class DeadLetterWrite(NamedTuple):
    """Dead letters appended to a DLQ partition (standalone: `durable`) or to be placed on its
    leader (cluster mode: `placement`), not yet settled in their subscription."""

    sub: queue.QueueSubscription
    letters: list[queue.DeadLetter]
    durable: Durable | None
    placement: Placement | None = None


# What a persist gives to wait for: one position (standalone), one per store (cluster mode).
Durables = Durable | list[Durable] | None


class QueueFetch(NamedTuple):
    delivery: queue.Delivery
    views: list[memoryview]  # whole batches holding the leased offsets; release once sent


class Coordinator:
    def __init__(self, log: Log, offsets: OffsetStore, queues: queue.QueueStore,
                 producer_ids: ProducerIds, incarnation: str,
                 producer_snapshots: ProducerSnapshots | None = None,
                 limits: CoordinationLimits | None = None) -> None:
        self.log = log
        self.limits = limits or CoordinationLimits()
        self.offsets = offsets
        self.queues = queues
        self.producer_ids = producer_ids
        self.groups = group_mod.GroupCoordinator(self._partition_count, incarnation)
        # Cluster mode: where committed offsets, producer names and queue state live (None:
        # this broker's own journals, `offsets`, `queues`, `_names`).
        self.group_stores: GroupStores | None = None
        self._names: ProducerNames | None = None  # standalone: set by `open`
        self._producer_states: dict[TopicPartition, tuple[PartitionLog, ProducerStateTable]] = {}
        self._producer_snapshots = producer_snapshots
        self._dlq_writes: list[DeadLetterWrite] = []
        self._subscription_names = {(s, t) for s, t, _ in queues.subscriptions}
        self._subscription_names.update((s, t) for s, t in queues.overrides if s is not None)
        # Tables saved by the last clean shutdown, bound to the partitions open now (a topic
        # deleted and re-created later gets a new PartitionLog and so no stale table).
        self._saved_states: dict[TopicPartition, tuple[PartitionLog, int, ProducerStateTable]] = {}
        self._producer_forgets: dict[TopicPartition, int] = {}  # makes a running rebuild stale
        for (topic, partition), (end, table) in (producer_snapshots.take() if producer_snapshots else {}).items():
            try:
                plog = self._partition(topic, partition)
            except (errors.UnknownTopicError, UnknownPartitionError):
                continue
            if end <= plog.end_offset:
                self._saved_states[(topic, partition)] = (plog, end, table)

    @classmethod
    def open(cls, data_dir: Path, log: Log, *, incarnation: str,
             queue_settings: queue.QueueSettings | None = None,
             limits: CoordinationLimits | None = None) -> Coordinator:
        root = Path(data_dir) / "coordination"
        offsets = OffsetStore.open(root / "consumer_offsets")
        try:
            queues = queue.QueueStore.open(root / "queue_state", queue_settings)
            try:
                producer_ids = ProducerIds.open(root / "producer_ids")
            except BaseException:
                queues.close()
                raise
        except BaseException:
            offsets.close()
            raise
        coordinator = cls(log, offsets, queues, producer_ids, incarnation,
                          ProducerSnapshots(root / "producer_state"), limits)
        try:
            coordinator._names = ProducerNames.open(root / "producer_names")
        except BaseException:
            coordinator.close(clean=False)
            raise
        return coordinator

    def close(self, clean: bool = True) -> None:
        """Close the journals; on a clean close (after the last append) also save the producer
        tables, so the next start need not walk every batch header again."""
        try:
            if clean:
                self.flush_dead_letters()
                self.queues.persist(int(time.time() * 1000))  # journal.close(clean) flushes it
            if clean and self._producer_snapshots is not None:
                self._save_producer_states()
        finally:
            self.offsets.close(clean)
            self.queues.close(clean)
            self.producer_ids.close(clean)
            if self._names is not None:
                self._names.close(clean)

    def _save_producer_states(self) -> None:
        tables = {key: (plog, plog.end_offset, table) for key, (plog, table) in self._producer_states.items()
                  if not plog.closed}
        for key, (plog, end, table) in self._saved_states.items():  # loaded but not used since
            if key not in tables and not plog.closed:
                tables[key] = (plog, end, table)
        if tables:
            assert self._producer_snapshots is not None
            self._producer_snapshots.save(
                (topic, partition, end, table) for (topic, partition), (_, end, table) in tables.items())

    def _partition_count(self, topic: str) -> int:
        if self.group_stores is not None:
            return self.group_stores.partition_count(topic)
        try:
            return len(self.log.topic(topic).partitions)
        except errors.UnknownTopicError:
            return 0

    def _partition(self, topic: str, partition: int) -> PartitionLog:
        partitions = self.log.topic(topic).partitions  # UnknownTopicError
        if not 0 <= partition < len(partitions):
            raise UnknownPartitionError(
                f"topic {topic!r} has {len(partitions)} partitions; there is no partition {partition}")
        return partitions[partition]

    # ------------------------------------------------------------------------------- groups

    def join_group(self, now_ms: int, group: str, topics: Sequence[str], **member: object
                   ) -> group_mod.MemberView:
        """Join (see `Group.join` for member_id, client_id, instance_id, session_timeout_ms)."""
        return self._group(group).join(now_ms, topics, **member)  # type: ignore[arg-type]

    def heartbeat(self, now_ms: int, group: str, member_id: str, generation: int
                  ) -> group_mod.MemberView:
        return self._group(group).heartbeat(now_ms, member_id, generation)

    def leave_group(self, group: str, member_id: str) -> None:
        self._group(group).leave(member_id)

    def commit_offsets(self, now_ms: int, group: str, member_id: str | None, generation: int,
                       offsets: Mapping[TopicPartition, int], metadata: str = "") -> Durable:
        """Fenced commit (GroupError subclasses, InvalidCommitError); answer once durable.
        Offsets below 0 and topics or partitions that do not exist are InvalidCommitError."""
        for (topic, partition), offset in offsets.items():
            if offset < 0:
                raise InvalidCommitError(f"{topic}/{partition}: offset must be >= 0, not {offset}")
            if not 0 <= partition < self._partition_count(topic):
                raise InvalidCommitError(f"{topic}/{partition}: no such topic or partition on this broker")
        self._group(group).check_commit(member_id, generation, offsets)
        store = self.offsets_for(group)
        store.commit(now_ms, group, offsets, metadata)
        return Durable(*store.journal.position())

    def offsets_for(self, group: str) -> OffsetStore:
        """The store of the group's committed offsets (cluster mode: NotCoordinatorError when
        another broker coordinates the group)."""
        if self.group_stores is None:
            return self.offsets
        return self.group_stores.store_for(group)

    def _offset_stores(self) -> list[OffsetStore]:
        return [self.offsets] if self.group_stores is None else self.group_stores.stores()

    def _group(self, group: str) -> group_mod.Group:
        """The group, created if new unless max_groups groups exist (LimitReachedError)."""
        store = self.offsets_for(group)
        if group not in self.groups.groups and group not in store.fetch_groups_view():
            count = len(set(self.groups.groups).union(*(s.groups() for s in self._offset_stores())))
            if count >= self.limits.max_groups:
                raise LimitReachedError(f"the broker allows {self.limits.max_groups} groups (max_groups)")
        return self.groups.group(group)

    def fetch_offsets(self, group: str, partitions: Iterable[TopicPartition] | None = None
                      ) -> dict[TopicPartition, int]:
        return {tp: c.offset for tp, c in self.offsets_for(group).fetch(group, partitions).items()}

    def group_lag(self, group: str) -> dict[TopicPartition, int]:
        """Lag of every partition of every topic the group has members for or committed on."""
        store = self.offsets_for(group)
        topics = set(self.groups.groups[group].topics()) if group in self.groups.groups else set()
        topics.update(t for t, _ in store.fetch(group))
        ends: dict[TopicPartition, int] = {}
        starts: dict[TopicPartition, int] = {}
        for topic in sorted(topics):
            try:
                partitions = self.log.topic(topic).partitions
            except errors.UnknownTopicError:
                continue
            for index, plog in enumerate(partitions):
                ends[(topic, index)] = plog.end_offset
                starts[(topic, index)] = plog.start_offset
        return store.lag(group, ends, starts)

    def describe_group(self, group: str) -> dict[str, object]:
        described = (self.groups.groups[group].describe() if group in self.groups.groups
                     else {"group": group, "state": "empty", "generation": 0, "members": []})
        described["lag"] = [[t, p, lag] for (t, p), lag in sorted(self.group_lag(group).items())]
        return described

    def list_groups(self) -> list[str]:
        """Every group known here (cluster mode: the groups this broker coordinates now)."""
        names = set(self.groups.groups).union(*(s.groups() for s in self._offset_stores()))
        if self.group_stores is not None:
            names = {g for g in names if self._coordinates(g)}
        return sorted(names)

    def _coordinates(self, group: str) -> bool:
        try:
            self.offsets_for(group)
        except (NotCoordinatorError, CoordinatorLoadingError):
            return False
        return True

    # ------------------------------------------------------------------------------- queues

    def queues_for(self, topic: str) -> queue.QueueStore:
        """The store of the topic's queue subscriptions (cluster mode: NotCoordinatorError when
        another broker coordinates them)."""
        if self.group_stores is None:
            return self.queues
        return self.group_stores.queues_for(topic)

    def _queue_stores(self) -> list[queue.QueueStore]:
        return [self.queues] if self.group_stores is None else self.group_stores.queue_stores()

    def _source(self, subscription: str, topic: str, partition: int) -> tuple[queue_log.RecordSource, int | None]:
        """Where a queue reads the partition and up to where (None: the log end)."""
        if self.group_stores is None:
            return self._partition(topic, partition), None
        count = self.group_stores.partition_count(topic)
        if count == 0:
            raise errors.UnknownTopicError(topic)
        if not 0 <= partition < count:
            raise UnknownPartitionError(f"topic {topic!r} has {count} partitions; there is no partition {partition}")
        return self.group_stores.queue_source(subscription, topic, partition)

    def subscription(self, subscription: str, topic: str, partition: int
                     ) -> queue.QueueSubscription:
        source, _ = self._source(subscription, topic, partition)
        store = self.queues_for(topic)
        state = store.subscriptions.get((subscription, topic, partition))
        if state is not None:
            return state
        self._check_subscription(subscription, topic, store)
        return store.get(subscription, topic, partition, start_offset=source.start_offset)

    def _check_subscription(self, subscription: str | None, topic: str, store: queue.QueueStore) -> None:
        """LimitReachedError for a new (subscription, topic) beyond max_subscriptions."""
        if subscription is None:
            return
        if self.group_stores is None:
            names = self._subscription_names
        else:  # the subscriptions this broker coordinates now
            if (subscription, topic) in store.subscription_names():
                return
            names = set().union(*(s.subscription_names() for s in self._queue_stores()))
        if (subscription, topic) in names:
            return
        if len(names) >= self.limits.max_subscriptions:
            raise LimitReachedError(
                f"the broker allows {self.limits.max_subscriptions} queue subscriptions (max_subscriptions)")
        names.add((subscription, topic))

    def queue_fetch(self, now_ms: int, subscription: str, topic: str, partition: int,
                    consumer: str, max_messages: int, ack_wait_ms: int | None = None
                    ) -> QueueFetch | None:
        source, limit = self._source(subscription, topic, partition)
        sub = self.subscription(subscription, topic, partition)
        queue_log.fill(sub, source, now_ms, end_offset=limit)
        delivery = sub.acquire(now_ms, consumer, max_messages, ack_wait_ms)
        self._dead_letter(now_ms, sub, sub.take_dead_letters())
        if delivery is None:
            return None
        return QueueFetch(delivery, queue_log.read_delivery(source, delivery))

    def ack(self, subscription: str, topic: str, partition: int, offsets: Sequence[int]) -> queue.AckResult:
        """Apply an ack in memory (persisted by the next `persist_store`). Cluster mode: acks of
        records this coordinator has not read yet are taken up to the partition's high
        watermark (acks a previous coordinator delivered); one above it waits (LoadInProgress)."""
        sub = self.subscription(subscription, topic, partition)
        if self.group_stores is None:
            return sub.ack(offsets)
        _, limit = self._source(subscription, topic, partition)
        assert limit is not None
        if offsets and max(offsets) >= max(sub.next_offset, limit):
            raise CoordinatorLoadingError(
                f"ack of offset {max(offsets)} of {topic}/{partition}: this coordinator has seen the partition "
                f"up to {max(sub.next_offset, limit)} so far; retry")
        return sub.ack(offsets, known_end=limit)

    def queue_ack(self, now_ms: int, subscription: str, topic: str, partition: int,
                  offsets: Sequence[int]) -> tuple[queue.AckResult, Durables]:
        result = self.ack(subscription, topic, partition, offsets)
        return result, self.persist(now_ms)

    def queue_nack(self, now_ms: int, subscription: str, topic: str, partition: int,
                   offsets: Sequence[int], delay_ms: int = 0, reason: str = "nack"
                   ) -> Durables:
        sub = self.subscription(subscription, topic, partition)
        self._dead_letter(now_ms, sub, sub.nack(now_ms, offsets, delay_ms, reason))
        return self.persist(now_ms)

    def queue_extend(self, now_ms: int, subscription: str, topic: str, partition: int,
                     offsets: Sequence[int], ack_wait_ms: int | None = None) -> int:
        return self.subscription(subscription, topic, partition).extend(now_ms, offsets,
                                                                        ack_wait_ms)

    def _check_topic(self, topic: str) -> None:
        if self.group_stores is None:
            self.log.topic(topic)  # UnknownTopicError
        elif self.group_stores.partition_count(topic) == 0:
            raise errors.UnknownTopicError(topic)

    def configure_queue(self, now_ms: int, topic: str, subscription: str | None,
                        values: Mapping[str, object], reset: Sequence[str] = ()
                        ) -> tuple[dict[str, object], Durable]:
        """Set or reset settings overrides (subscription None: for every subscription of the
        topic); returns the new description and the journal position to wait for."""
        self._check_topic(topic)  # overrides of a topic that does not exist
        store = self.queues_for(topic)
        if self.group_stores is not None:
            self.group_stores.check_queue_store(store)
        self._check_subscription(subscription, topic, store)
        store.configure(now_ms, topic, subscription, values, reset)
        return store.describe(topic, subscription), Durable(*store.journal.position())

    def describe_queue(self, topic: str, subscription: str | None) -> dict[str, object]:
        self._check_topic(topic)
        return self.queues_for(topic).describe(topic, subscription)

    def consumer_gone(self, now_ms: int, consumer: str) -> Durables:
        """A queue consumer disconnected: its leases fail (count towards max deliveries)."""
        for store in self._queue_stores():
            for sub in list(store.subscriptions.values()):
                self._dead_letter(now_ms, sub, sub.release_consumer(now_ms, consumer))
        return self.persist(now_ms)

    def persist(self, now_ms: int) -> Durables:
        """Journal the changes of every queue store; standalone the position to wait for (None:
        nothing changed), in cluster mode one per store written."""
        if self.group_stores is None:
            if self.queues.persist(now_ms) is None:
                return None
            return Durable(*self.queues.journal.position())
        durables = []
        for store in self.group_stores.queue_stores():
            if store.has_changes():
                try:
                    durable = self.persist_store(now_ms, store)
                except Exception as error:  # kept in memory: the next persist retries
                    logger.warning("queue state not persisted now: %s", error)
                    continue
                if durable is not None:
                    durables.append(durable)
        return durables

    def persist_store(self, now_ms: int, store: queue.QueueStore) -> Durable | None:
        """Journal one store's changes; the position to wait for covers everything it journaled
        before too (cluster mode: a change journaled by an earlier persist may not be
        replicated yet). NotCoordinatorError / NOT_ENOUGH_REPLICAS: nothing written, the
        changes stay for a later persist."""
        if self.group_stores is None:
            return None if store.persist(now_ms) is None else Durable(*store.journal.position())
        self.group_stores.check_queue_store(store)
        store.persist(now_ms)
        return Durable(*store.journal.position())

    def _dead_letter(self, now_ms: int, sub: queue.QueueSubscription,
                     letters: list[queue.DeadLetter]) -> None:
        """Append the dead letters to the DLQ (page cache only); the done marks wait until the
        append is durable (`take_dead_letter_writes`). A failed append is retried later.
        Cluster mode: build the batch; the server places it on the DLQ partition's leader
        (acks=all) before the done marks are made."""
        if not letters:
            return
        name = queue.dead_letter_topic(sub.topic, sub.subscription)
        try:
            if self.group_stores is not None:
                source, _ = self._source(sub.subscription, sub.topic, sub.partition)
                built = queue_log.dead_letter_batch(letters, sub.subscription, source)
                placement = Placement(name, sub.partition, self._partition_count(sub.topic) or 1, built, len(letters))
                self._dlq_writes.append(DeadLetterWrite(sub, letters, None, placement))
                return
            try:
                dlq_topic = self.log.topic(name)
            except errors.UnknownTopicError:
                dlq_topic = self.log.create_topic(name, self._partition_count(sub.topic) or 1)
            dlq = dlq_topic.partitions[sub.partition % len(dlq_topic.partitions)]
            written = queue_log.write_dead_letters(letters, sub.subscription,
                                                   self._partition(sub.topic, sub.partition), dlq, now_ms)
        except (errors.StorageError, OSError, UnknownPartitionError, NotCoordinatorError, CoordinatorLoadingError) as error:
            logger.error("dead letters of %s/%s/%d not written (%s); retrying in %d ms",
                         sub.subscription, sub.topic, sub.partition, error, queue.DLQ_RETRY_MS)
            sub.dead_letters_failed(now_ms, letters)
            return
        assert written is not None
        self._dlq_writes.append(DeadLetterWrite(sub, letters, Durable(dlq, written.last_offset)))

    def take_dead_letter_writes(self) -> list[DeadLetterWrite]:
        """DLQ appends made since the last call. For each, wait until `durable` holds, then call
        `dead_letters_durable` (or `dead_letters_failed`), then persist."""
        writes, self._dlq_writes = self._dlq_writes, []
        return writes

    def give_back_dead_letter_writes(self, writes: Iterable[DeadLetterWrite]) -> None:
        """Writes taken but not settled (shutdown): `flush_dead_letters`/`close` settle them."""
        self._dlq_writes.extend(writes)

    def dead_letters_durable(self, write: DeadLetterWrite) -> None:
        write.sub.dead_letters_written(write.letters)

    def dead_letters_failed(self, now_ms: int, write: DeadLetterWrite) -> None:
        write.sub.dead_letters_failed(now_ms, write.letters)

    def flush_dead_letters(self, now_ms: int = 0) -> None:
        """Blocking: make every pending DLQ append durable and settle it (shutdown, tests).
        Cluster mode: placements not made are dropped (their records stay pending and are
        delivered again by the next coordinator: at-least-once)."""
        for write in self.take_dead_letter_writes():
            if write.durable is None:
                continue
            try:
                write.durable.partition.flush()
            except (errors.StorageError, OSError) as error:
                logger.error("flushing dead letters failed: %s", error)
                self.dead_letters_failed(now_ms, write)
                continue
            self.dead_letters_durable(write)

    # ------------------------------------------------------------------------------- timers

    def tick(self, now_ms: int) -> Durables:
        """Expire group sessions and queue leases; handle dead letters; persist."""
        self.groups.expire(now_ms)
        for store in self._queue_stores():
            for sub in list(store.subscriptions.values()):
                self._dead_letter(now_ms, sub, sub.expire_leases(now_ms))
        return self.persist(now_ms)

    def next_deadline_ms(self) -> int | None:
        times = [t for t in (self.groups.next_deadline_ms(),
                             *(s.next_deadline_ms() for store in self._queue_stores()
                               for s in store.subscriptions.values()))
                 if t is not None]
        return min(times, default=None)

    # ------------------------------------------------------------------------------- producers

    def init_producer(self, now_ms: int) -> int:
        """A fresh producer id, its block reservation fsynced here (blocking; standalone use)."""
        return self.producer_ids.allocate(now_ms)

    def allocate_producer(self, now_ms: int) -> tuple[int, Durable]:
        """A fresh producer id and the position to wait for before handing it out (the server:
        no fsync on the event loop; cheap when the block's reservation is durable already)."""
        producer_id = self.producer_ids.allocate(now_ms, flush=False)
        return producer_id, Durable(*self.producer_ids.reservation_position())

    def producer_names_for(self, name: str) -> ProducerNames:
        """The registry of stable producer names holding `name` (cluster mode: NotCoordinatorError
        unless this broker coordinates it; standalone: ``coordination/producer_names``)."""
        if self.group_stores is not None:
            return self.group_stores.names_for(name)
        if self._names is None:
            raise NotCoordinatorError("this broker keeps no producer names (no data directory)")
        return self._names

    def init_named_producer(self, now_ms: int, name: str, new_id: int | None) -> tuple[NamedProducer, Durable]:
        """The name's producer id with its epoch bumped, or `new_id` at epoch 0 when the name is
        new (`next_named_producer` says which); answer once the returned position is durable."""
        names = self.producer_names_for(name)
        producer = names.next_for(name)
        if producer is None:
            if new_id is None:
                raise ValueError("a new producer name needs a new producer id")
            producer = NamedProducer(new_id, 0)
        names.assign(now_ms, name, producer)
        return producer, Durable(*names.journal.position())

    def named_producer_needs_id(self, name: str) -> bool:
        return self.producer_names_for(name).next_for(name) is None

    def producer_state(self, topic: str, partition: int) -> ProducerStateTable:
        """The partition's producer table, rebuilt from its batch headers on first use (and
        again if the partition object changed, e.g. the topic was deleted and re-created).
        Blocking while it rebuilds; the server first finishes a `begin_producer_rebuild`."""
        table = self.ready_producer_state(topic, partition)
        if table is None:
            rebuild = self.begin_producer_rebuild(topic, partition)
            while not rebuild.step(PRODUCER_REBUILD_STEP_BYTES):
                pass
            table = self.finish_producer_rebuild(topic, partition, rebuild)
            assert table is not None  # nothing ran in between
        return table

    def ready_producer_state(self, topic: str, partition: int) -> ProducerStateTable | None:
        """The cached producer table if it describes the partition's current log, else None."""
        plog = self._partition(topic, partition)
        cached = self._producer_states.get((topic, partition))
        if cached is None or cached[0] is not plog:
            return None
        return cached[1]

    def begin_producer_rebuild(self, topic: str, partition: int) -> ProducerRebuild:
        """A stepwise rebuild of the partition's producer table: from the snapshot saved at the
        last clean shutdown on, if there is one for this partition, else from the log's start."""
        plog = self._partition(topic, partition)
        saved = self._saved_states.pop((topic, partition), None)
        if saved is not None and saved[0] is plog:
            rebuild = ProducerRebuild(plog, base=saved[2], from_offset=saved[1])
        else:
            rebuild = ProducerRebuild(plog)
        rebuild.generation = self._producer_forgets.get((topic, partition), 0)
        return rebuild

    def finish_producer_rebuild(self, topic: str, partition: int, rebuild: ProducerRebuild
                                ) -> ProducerStateTable | None:
        """Install a completed rebuild (on the owner thread right after its last step). None:
        the rebuild is stale (the partition was re-created or its state forgotten meanwhile)."""
        key = (topic, partition)
        try:
            current = self._partition(topic, partition)
        except (UnknownPartitionError, errors.UnknownTopicError):
            return None
        if current is not rebuild.partition or self._producer_forgets.get(key, 0) != rebuild.generation:
            return None
        self._producer_states[key] = (rebuild.partition, rebuild.table)
        return rebuild.table

    def forget_producer_state(self, topic: str, partition: int) -> None:
        """Drop the cached producer table (cluster mode: this broker just became the leader and
        its log holds batches it appended as a follower); the next use rebuilds it from the log."""
        self._producer_states.pop((topic, partition), None)
        self._producer_forgets[(topic, partition)] = self._producer_forgets.get((topic, partition), 0) + 1

    def plan_produce(self, topic: str, partition: int, batches: bytes | memoryview
                     ) -> list[Decision]:
        """Idempotence decisions for the (already validated) batches of one produce request."""
        headers = _headers(batches)
        return self.producer_state(topic, partition).plan(
            [(h.producer_id, h.producer_epoch, h.base_sequence, h.record_count) for h in headers])

    def record_produce(self, topic: str, partition: int, appended: bytes | memoryview,
                       base_offset: int) -> None:
        """After appending `appended` (the non-duplicate batches) at `base_offset`."""
        state = self.producer_state(topic, partition)
        offset = base_offset
        for h in _headers(appended):
            state.record(h.producer_id, h.producer_epoch, h.base_sequence, h.record_count, offset)
            offset += h.record_count

    # ------------------------------------------------------------------------------- metrics

    def metrics(self) -> dict[str, object]:
        """Scrape-time snapshot: lag per group and partition, queue counters and in-flight."""
        return {
            "group_lag": {g: {f"{t}/{p}": lag for (t, p), lag in self.group_lag(g).items()}
                          for g in self.list_groups()},
            "queues": [s.describe() for store in self._queue_stores() for s in store.subscriptions.values()],
        }


def _headers(batches: bytes | memoryview) -> list[batch.BatchHeader]:
    return [header for _, header in batch.iter_batches(batches)]
