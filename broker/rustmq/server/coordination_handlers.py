"""The coordination APIs on the wire: consumer groups, queue subscriptions, idempotent produce.

The state machines live in ``rustmq.coordination`` (sans-IO, time passed in); this module maps
requests to `Coordinator` calls and does the I/O around them, on the event loop thread:

* answers that change persisted state (commits, acks, nacks) wait for their journal to be
  fsynced through the broker's GroupCommitter (`Broker.when_durable`);
* acks are applied at once but their journal append is shared: every ack of one event-loop pass
  (any connection) is persisted by one `QueueStore.persist` and one fsync request, so individual
  acks do not cost one journal append each (docs/semantics.md, Figures);
* one timer follows `Coordinator.next_deadline_ms()` and calls `tick` (session expiry, lease
  expiry, delayed records becoming due), then wakes long-polls;
* QUEUE_FETCH and HEARTBEAT long-poll: a queue fetch waits for an append to its partitions, a
  nack, a tick or its max wait; a heartbeat with ``max_wait_ms`` returns as soon as its group
  rebalances, so a rebalance reaches members in one round trip instead of one heartbeat period.

A queue consumer is its connection: leases are held by ``conn-<n>``, and a closed connection
fails its leases at once (they count towards max deliveries).

Responses use the same framing and ordering as every other API (the connection's slots); wire
fields and error codes are listed in docs/protocol.md, "Coordination APIs".
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rustmq.coordination import internal_topic, queue_log
from rustmq.coordination import queue as queue_mod
from rustmq.coordination.producers import ProducerRebuild, Verdict
from rustmq.coordination.queue import QueueStore
from rustmq.coordination.service import (
    PRODUCER_REBUILD_STEP_BYTES,
    Coordinator,
    DeadLetterWrite,
    Durable,
    Durables,
)
from rustmq.protocol import api, frames, records
from rustmq.protocol import batch as record_batch
from rustmq.protocol.api import ApiKey, ErrorCode, RequestError
from rustmq.server.broker import Produced, error_code_for
from rustmq.server.group_stores import ClusterGroupStores, WindowFactory
from rustmq.server.responder import Responder
from rustmq.storage import errors as storage_errors

if TYPE_CHECKING:
    from rustmq.server.broker import Broker
    from rustmq.server.replicated import ClusterRoles

log = logging.getLogger(__name__)

MAX_QUEUE_MESSAGES = 10_000  # per QUEUE_FETCH
MAX_WAIT_MS = 60_000


def _now_ms() -> int:
    return int(time.time() * 1000)


class CoordinationService:
    """The Coordinator of one broker plus its timer, long-poll waiters and shared ack persists."""

    def __init__(self, broker: Broker, coordinator: Coordinator) -> None:
        self.broker = broker
        self.coordinator = coordinator
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due_ms: int | None = None
        # Waiters for the next persist of each queue store (cluster mode: one per internal
        # partition led), answered once that store's journal position is durable/replicated.
        self._persist_waiters: dict[int, tuple[QueueStore, list[Callable[[BaseException | None], None]]]] = {}
        self._persist_scheduled = False
        self._placements: set[asyncio.Task[Any]] = set()
        self._queue_waits: set[_QueueWait] = set()
        self._heartbeat_waits: set[_HeartbeatWait] = set()
        self._consumer_ids: dict[Responder, str] = {}
        self._consumer_seq = itertools.count(1)
        self._rotation: dict[tuple[str, str], int] = {}
        self._dlq_in_flight: list[DeadLetterWrite] = []
        self._producer_rebuilds: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._closed = False
        self.group_stores: ClusterGroupStores | None = None  # cluster mode: groups on the internal topic

    def use_cluster(self, roles: ClusterRoles, windows: WindowFactory | None = None) -> None:
        """Cluster mode: groups, committed offsets and queue state move to the replicated
        internal topic; `windows` makes the windows a queue coordinator reads partitions it holds
        no replica of through (rustmq.replication.queue_sources)."""
        self.group_stores = ClusterGroupStores(self.broker, self.coordinator, roles, self.wake_queues, windows)
        self.coordinator.group_stores = self.group_stores

    # -- lifecycle -----------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Shutdown: answer every long-poll now (empty fetch, heartbeat 'ok')."""
        for wait in list(self._queue_waits):
            wait.finish()
        for hb in list(self._heartbeat_waits):
            hb.finish()

    def close(self) -> None:
        self._closed = True
        for task in self._producer_rebuilds.values():
            task.cancel()
        self._producer_rebuilds.clear()
        for placement in self._placements:
            placement.cancel()
        if self.group_stores is not None:
            self.group_stores.close()
        self.coordinator.give_back_dead_letter_writes(self._dlq_in_flight)
        self._dlq_in_flight = []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._persist_waiters:
            self._persist_now()

    # -- producer tables ---------------------------------------------------------------------------

    def producer_state_ready(self, topic: str, index: int) -> bool:
        """Whether idempotent produce to the partition can be decided now. A table that has to
        be rebuilt from the log (after a crash, or on becoming the leader) is rebuilt in steps of
        PRODUCER_REBUILD_STEP_BYTES with the loop serving others in between; meanwhile requests
        get LOAD_IN_PROGRESS, which clients retry. A short log is rebuilt at once."""
        coordinator = self.coordinator
        if coordinator.ready_producer_state(topic, index) is not None:
            return True
        key = (topic, index)
        if key in self._producer_rebuilds:
            return False
        rebuild = coordinator.begin_producer_rebuild(topic, index)
        if rebuild.step(PRODUCER_REBUILD_STEP_BYTES):
            return coordinator.finish_producer_rebuild(topic, index, rebuild) is not None
        self._producer_rebuilds[key] = self._loop.create_task(self._rebuild_producer_state(key, rebuild))
        return False

    async def _rebuild_producer_state(self, key: tuple[str, int], rebuild: ProducerRebuild) -> None:
        try:
            done = False
            while not done:
                await asyncio.sleep(0)  # one step per loop pass: other requests run in between
                done = rebuild.step(PRODUCER_REBUILD_STEP_BYTES)
            if self.coordinator.finish_producer_rebuild(*key, rebuild) is None:
                log.info("producer table rebuild of %s/%d was overtaken; starting again on next use", *key)
            else:
                log.info("producer table of %s/%d rebuilt from %d bytes of log", *key, rebuild.bytes_read)
        except Exception:  # the partition went away or its log failed: the next request retries
            log.exception("rebuilding the producer table of %s/%d failed", *key)
        finally:
            self._producer_rebuilds.pop(key, None)

    def connection_lost(self, conn: Responder) -> None:
        for wait in [w for w in self._queue_waits if w.conn is conn]:
            wait.cancel()
        for hb in [h for h in self._heartbeat_waits if h.conn is conn]:
            hb.cancel()
        consumer = self._consumer_ids.pop(conn, None)
        if consumer is None or self._closed:
            return
        durable = self.coordinator.consumer_gone(_now_ms(), consumer)
        self._request_fsync(durable)
        self.settle_dead_letters()
        self.wake_queues()
        self.reschedule()

    def consumer_id(self, conn: Responder) -> str:
        consumer = self._consumer_ids.get(conn)
        if consumer is None:
            consumer = self._consumer_ids[conn] = f"conn-{next(self._consumer_seq)}"
        return consumer

    # -- timer ---------------------------------------------------------------------------------

    def reschedule(self) -> None:
        if self._closed:
            return
        due = self.coordinator.next_deadline_ms()
        if due is None or (self._timer is not None and self._timer_due_ms is not None and self._timer_due_ms <= due):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due_ms = due
        self._timer = self._loop.call_later(max(0.0, (due - _now_ms()) / 1000) + 0.001, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_due_ms = None
        if self._closed:
            return
        try:
            durable = self.coordinator.tick(_now_ms())
            self._request_fsync(durable)
            self.settle_dead_letters()
        except Exception:
            log.exception("coordination tick failed")
        self.wake_queues()
        self.wake_heartbeats(None)
        self.reschedule()

    # -- durability ----------------------------------------------------------------------------

    def _request_fsync(self, durable: Durables) -> None:
        if isinstance(durable, list):  # cluster mode: replicated, nothing to ask for
            return
        if durable is not None:
            try:
                self.broker.when_durable(durable.partition, durable.offset, _ignore)
            except Exception:  # the committer is closed (shutdown): close() flushes the journals
                pass

    def when_durable(self, durable: Durables, done: Callable[[BaseException | None], None]) -> None:
        if durable is None:
            done(None)
            return
        if isinstance(durable, list):
            _when_all(durable, done, self.when_durable)
            return
        if self.group_stores is not None:
            role = self.group_stores.replicated_role(durable.partition)
            if role is not None:  # a write to the internal topic: acks=all, not an fsync
                self.group_stores.when_replicated(role, durable.offset, done)
                return
        try:
            self.broker.when_durable(durable.partition, durable.offset, done)
        except Exception as exc:
            done(exc)

    def settle_dead_letters(self, then: Callable[[BaseException | None], None] | None = None) -> bool:
        """Wait (on the committer thread) for the DLQ appends just made, then mark their records
        done and persist, then call then(error) once that persist is durable; a failed flush
        leaves them pending for a retry. Call after every coordinator call that can dead-letter
        (fetch, nack, tick, a consumer gone). False (then not called): there was nothing."""
        writes = self.coordinator.take_dead_letter_writes()
        if not writes:
            return False
        self._dlq_in_flight.extend(writes)
        remaining = [len(writes)]
        stores: dict[int, queue_mod.QueueSubscription] = {}  # one subscription per store touched

        def one_done(write: DeadLetterWrite, error: BaseException | None) -> None:
            if self._closed:
                return  # close() handed it back: Coordinator.close(clean) settles it
            self._dlq_in_flight.remove(write)
            if error is None:
                self.coordinator.dead_letters_durable(write)
            else:
                log.error("dead letters not durable (%s); retrying in %d ms", error, queue_mod.DLQ_RETRY_MS)
                self.coordinator.dead_letters_failed(_now_ms(), write)
            remaining[0] -= 1
            stores[id(write.sub.changed)] = write.sub
            if remaining[0] == 0:
                subs = list(stores.values())
                _when_all(subs, then or _ignore, self._persist_sub)
                self.wake_queues()
                self.reschedule()

        for write in writes:
            if write.placement is not None:
                task = self._loop.create_task(self._place(write, functools.partial(one_done, write)))
                self._placements.add(task)
                task.add_done_callback(self._placements.discard)
            else:
                self.when_durable(write.durable, functools.partial(one_done, write))
        return True

    async def _place(self, write: DeadLetterWrite, done: Callable[[BaseException | None], None]) -> None:
        """Cluster mode: put a dead-letter batch on its DLQ partition's leader with acks=all
        (the DLQ topic is created cluster-wide first if it does not exist: the origin's
        partition count, the cluster's default replication factor), then done(error)."""
        placement = write.placement
        assert placement is not None
        roles = self.broker.cluster
        try:
            state = roles.topics.get(placement.topic)
            if state is None:
                try:
                    await roles.admin.create_topic(placement.topic, placement.partitions, {}, None, None)
                except RequestError as exc:
                    if exc.code is not ErrorCode.TOPIC_EXISTS:
                        raise
                    await roles.admin.refresh()
                state = roles.topics.get(placement.topic)
                if state is None:
                    raise RequestError(ErrorCode.UNKNOWN_TOPIC, f"{placement.topic} was created but is not in the state yet")
            index = placement.partition % len(state.partitions)
            await roles.placer.place(placement.topic, index, placement.batch, placement.record_count)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            done(exc)
            return
        done(None)

    def after_persist(self, store: QueueStore, done: Callable[[BaseException | None], None]) -> None:
        """Persist the store's queue state at the end of this loop pass (shared), then
        done(error) once everything it journaled is durable (cluster mode: replicated)."""
        entry = self._persist_waiters.get(id(store))
        if entry is None:
            self._persist_waiters[id(store)] = (store, [done])
        else:
            entry[1].append(done)
        if not self._persist_scheduled:
            self._persist_scheduled = True
            self._loop.call_soon(self._persist_now)

    def _persist_now(self) -> None:
        self._persist_scheduled = False
        waiting, self._persist_waiters = self._persist_waiters, {}
        for store, waiters in waiting.values():
            try:
                durable = self.coordinator.persist_store(_now_ms(), store)
            except Exception as exc:
                translated = _translate(exc)
                if not isinstance(translated, RequestError):
                    log.exception("persisting queue state failed")
                    self.broker.note_write_failure(exc, "the queue state journal",
                                                   sticky=not isinstance(exc, storage_errors.StorageFullError))
                for done in waiters:
                    done(translated)
                continue
            self.when_durable(durable, functools.partial(_call_all, waiters))

    def _persist_sub(self, sub: queue_mod.QueueSubscription, done: Callable[[BaseException | None], None]) -> None:
        """after_persist for the store holding `sub`."""
        try:
            store = self.coordinator.queues_for(sub.topic)
        except Exception as exc:
            done(_translate(exc))
            return
        if store.subscriptions.get((sub.subscription, sub.topic, sub.partition)) is not sub:
            done(RequestError(ErrorCode.NOT_COORDINATOR, "the subscription's coordinator changed"))
            return
        self.after_persist(store, done)

    def check_topic(self, name: str) -> int:
        """The topic's partition count (cluster mode: from the cluster state, for the queue
        coordinator need not hold a replica); UNKNOWN_TOPIC if there is no such topic."""
        if self.group_stores is None:
            return len(self.broker.topic(name).partitions)
        count = self.group_stores.partition_count(name)
        if count == 0:
            raise RequestError(ErrorCode.UNKNOWN_TOPIC, f"unknown topic {name!r}")
        return count

    # -- wake-ups ------------------------------------------------------------------------------

    def wake_queues(self) -> None:
        for wait in list(self._queue_waits):
            self._loop.call_soon(wait.recheck)

    def wake_heartbeats(self, group: str | None) -> None:
        for hb in list(self._heartbeat_waits):
            if group is None or hb.group == group:
                self._loop.call_soon(hb.recheck)

    # -- queue fetch ---------------------------------------------------------------------------

    def queue_fetch(self, consumer: str, request: QueueFetchRequest) -> tuple[list[dict[str, Any]], list[memoryview], int]:
        count = self.check_topic(request.topic)
        if request.partition is not None:
            if request.partition >= count:
                raise RequestError(ErrorCode.UNKNOWN_PARTITION,
                                   f"topic {request.topic!r} has {count} partitions; there is no partition {request.partition}")
            order = [request.partition]
        else:
            key = (request.subscription, request.topic)
            first = self._rotation.get(key, 0) % count
            self._rotation[key] = first + 1
            order = [(first + i) % count for i in range(count)]
        now = _now_ms()
        remaining = request.max_messages
        entries: list[dict[str, Any]] = []
        views: list[memoryview] = []
        total = 0
        for partition in order:
            if remaining <= 0:
                break
            fetched = self.coordinator.queue_fetch(
                now, request.subscription, request.topic, partition, consumer, remaining, request.ack_wait_ms
            )
            if fetched is None:
                continue
            delivery = fetched.delivery
            size = sum(len(view) for view in fetched.views)
            entries.append({
                "partition": partition,
                "lease_id": delivery.lease_id,
                "deadline_ms": delivery.deadline_ms,
                "ranges": [list(r) for r in delivery.ranges],
                "attempts": [[offset, n] for offset, n in sorted(delivery.attempts.items())],
                "size": size,
            })
            views.extend(fetched.views)
            total += size
            remaining -= delivery.record_count
        self.settle_dead_letters()
        if entries:
            stats = self.broker.stats.topic(request.topic)
            stats.bytes_out += total
            stats.messages_out += request.max_messages - remaining
            self.reschedule()
        return entries, views, total


def _ignore(error: BaseException | None) -> None:
    if error is not None:
        log.error("journal flush failed: %s", error)


def _call_all(waiters: list[Callable[[BaseException | None], None]], error: BaseException | None) -> None:
    for done in waiters:
        done(error)


def _when_all(items: list[Any], done: Callable[[BaseException | None], None],
              wait: Callable[[Any, Callable[[BaseException | None], None]], None]) -> None:
    """done(first error or None) once wait(item, callback) has called back for every item."""
    if not items:
        done(None)
        return
    remaining = [len(items)]
    failure: list[BaseException] = []

    def one(error: BaseException | None) -> None:
        if error is not None and not failure:
            failure.append(error)
        remaining[0] -= 1
        if remaining[0] == 0:
            done(failure[0] if failure else None)

    for item in items:
        wait(item, one)


# -------------------------------------------------------------------------------- requests


class QueueFetchRequest:
    __slots__ = ("subscription", "topic", "partition", "max_messages", "ack_wait_ms", "max_wait_ms")

    def __init__(self, header: dict[str, Any]) -> None:
        self.subscription = _name(header, "subscription")
        self.topic = api._field(header, "topic", str)
        self.partition = api._int(header, "partition", 0, api.MAX_PARTITIONS_PER_TOPIC - 1, None)
        self.max_messages = api._int(header, "max_messages", 1, MAX_QUEUE_MESSAGES, 100)
        self.ack_wait_ms = api._int(header, "ack_wait_ms", 1, 12 * 3600 * 1000, None)
        self.max_wait_ms = api._int(header, "max_wait_ms", 0, MAX_WAIT_MS, 500)


def _name(header: dict[str, Any], field: str) -> str:
    value = api._field(header, field, str)
    if not value or len(value) > 255:
        raise RequestError(ErrorCode.INVALID_REQUEST, f"field {field!r} must be 1 to 255 characters")
    return value


MAX_OFFSETS_PER_REQUEST = 1_000_000  # QUEUE_ACK/NACK/EXTEND/DLQ_REPLAY: offsets plus range lengths


def _offsets(header: dict[str, Any], limit: int = MAX_OFFSETS_PER_REQUEST) -> list[int]:
    """`offsets` (a list of ints) and/or `ranges` ([start, end) pairs), as one list.

    Hazard: a range of a few bytes names up to a million offsets. The count is summed from the
    range bounds and checked against `limit` before any range is expanded."""
    offsets = api._field(header, "offsets", list, None) or []
    ranges = api._field(header, "ranges", list, None) or []
    if not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets):
        raise RequestError(ErrorCode.INVALID_REQUEST, "field 'offsets' must be a list of offsets >= 0")
    count = len(offsets)
    for item in ranges:
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in item)
                and 0 <= item[0] <= item[1]):
            raise RequestError(ErrorCode.INVALID_REQUEST, "field 'ranges' must be a list of [start, end) pairs")
        count += item[1] - item[0]
    if not count:
        raise RequestError(ErrorCode.INVALID_REQUEST, "give 'offsets' or 'ranges'")
    if count > limit:
        raise RequestError(ErrorCode.INVALID_REQUEST, f"at most {limit:,} offsets per request, got {count:,}")
    out = list(offsets)
    for start, end in ranges:
        out.extend(range(start, end))
    return out


def _topic_partitions(header: dict[str, Any], field: str, with_offset: bool) -> list[list[Any]] | None:
    raw = api._field(header, field, list, None)
    if raw is None:
        return None
    width = 3 if with_offset else 2
    for item in raw:
        if not (isinstance(item, list) and len(item) == width and isinstance(item[0], str)
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in item[1:])):
            shape = "[topic, partition, offset]" if with_offset else "[topic, partition]"
            raise RequestError(ErrorCode.INVALID_REQUEST, f"each entry of {field!r} must be {shape}")
    return raw


def _translate(exc: BaseException) -> BaseException:
    """Coordination exceptions carry a `code` name; map it to the wire code."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code in ErrorCode.__members__:
        return RequestError(ErrorCode[code], str(exc))
    return exc


def routes(service: CoordinationService | None) -> dict[int, Callable[[Responder, int, dict[str, Any], memoryview], None]]:
    """The coordination requests' routes (rustmq.server.router), bound to the broker's service
    once ({} when the broker runs without coordination)."""
    if service is None:
        return {}
    table: dict[ApiKey, Callable[[Responder, CoordinationService, int, dict[str, Any], memoryview], None]] = {
        ApiKey.INIT_PRODUCER: _init_producer,
        ApiKey.PRODUCE_IDEMPOTENT: _produce_idempotent,
        ApiKey.JOIN_GROUP: _join_group,
        ApiKey.HEARTBEAT: _heartbeat,
        ApiKey.LEAVE_GROUP: _leave_group,
        ApiKey.COMMIT_OFFSETS: _commit_offsets,
        ApiKey.FETCH_OFFSETS: _fetch_offsets,
        ApiKey.DESCRIBE_GROUP: _describe_group,
        ApiKey.LIST_GROUPS: _list_groups,
        ApiKey.FIND_COORDINATOR: _find_coordinator,
        ApiKey.QUEUE_FETCH: _queue_fetch,
        ApiKey.QUEUE_ACK: _queue_ack,
        ApiKey.QUEUE_NACK: _queue_nack,
        ApiKey.QUEUE_EXTEND: _queue_extend,
        ApiKey.DLQ_REPLAY: _dlq_replay,
        ApiKey.QUEUE_CONFIGURE: _queue_configure,
        ApiKey.QUEUE_DESCRIBE: _queue_describe,
    }

    def bind(function: Callable[[Responder, CoordinationService, int, dict[str, Any], memoryview], None],
             ) -> Callable[[Responder, int, dict[str, Any], memoryview], None]:
        def handle(conn: Responder, corr: int, header: dict[str, Any], payload: memoryview) -> None:
            try:
                function(conn, service, corr, header, payload)
            except Exception as exc:
                raise _translate(exc) from None

        return handle

    return {int(key): bind(function) for key, function in table.items()}


def connection_lost(conn: Responder) -> None:
    service: CoordinationService | None = getattr(conn.broker, "coordination", None)
    if service is not None:
        service.connection_lost(conn)


def _answer_durable(conn: Responder, service: CoordinationService, corr: int, durable: Durable | None,
                    fields: dict[str, Any]) -> None:
    if durable is None:
        conn.ok(corr, fields)
        return
    slot = conn.reserve()

    def done(error: BaseException | None) -> None:
        conn.complete(slot, [_result_frame(corr, fields, error)])

    service.when_durable(durable, done)


def _result_frame(corr: int, fields: dict[str, Any], error: BaseException | None) -> bytes:
    if error is None:
        return frames.encode_frame({"corr": corr, "error": 0, **fields})
    return frames.encode_frame(api.error_header(corr, error_code_for(error), f"flush failed: {error}"))


# -- idempotent produce ------------------------------------------------------------------------

CLUSTER_ID_STRIDE = 1024  # cluster mode: producer id = local id * stride + broker id (ids < 1024)


def _init_producer(conn: Responder, service: CoordinationService, corr: int, header: dict[str, Any], payload: memoryview) -> None:
    name = api._field(header, "producer_name", str, None)
    if name is not None:
        _init_named_producer(conn, service, corr, _name(header, "producer_name"))
        return
    # Answered once the id block's reservation is durable (fsynced by the committer thread once
    # per 1,000 ids; the other requests find it durable already).
    producer_id, durable = _new_producer_id(service)
    _answer_durable(conn, service, corr, durable, {"producer_id": producer_id, "producer_epoch": 0})


def _new_producer_id(service: CoordinationService) -> tuple[int, Durable]:
    producer_id, durable = service.coordinator.allocate_producer(_now_ms())
    if service.broker.cluster is not None:
        # Each broker allocates from its own journal: the broker id in the low bits keeps ids
        # unique across the cluster (a producer's id outlives the broker that handed it out).
        producer_id = producer_id * CLUSTER_ID_STRIDE + service.broker.settings.broker_id
    return producer_id, durable


def _init_named_producer(conn: Responder, service: CoordinationService, corr: int, name: str) -> None:
    """A stable name: its producer id with the epoch bumped (older instances are fenced), kept
    by the name's coordinator (cluster mode: replicated like committed offsets)."""
    coordinator = service.coordinator
    if service.group_stores is not None:
        service.group_stores.check_replicas(name)
    reservation: Durable | None = None
    new_id = None
    if coordinator.named_producer_needs_id(name):
        new_id, reservation = _new_producer_id(service)
    producer, durable = coordinator.init_named_producer(_now_ms(), name, new_id)
    fields = {"producer_id": producer.producer_id, "producer_epoch": producer.epoch}
    if reservation is None:
        _answer_durable(conn, service, corr, durable, fields)
        return
    slot = conn.reserve()

    def reserved(error: BaseException | None) -> None:
        if error is not None:
            conn.complete(slot, [_result_frame(corr, fields, error)])
            return
        service.when_durable(durable, lambda error: conn.complete(slot, [_result_frame(corr, fields, error)]))

    service.when_durable(reservation, reserved)


def _produce_idempotent(conn: Responder, service: CoordinationService, corr: int, header: dict[str, Any], payload: memoryview) -> None:
    request = api.parse_produce(header)
    broker = service.broker
    if request.partition is None and request.key is None:
        raise RequestError(ErrorCode.INVALID_REQUEST, "an idempotent produce needs 'partition' or 'key'")
    topic = broker.topic_for_produce(request.topic)
    index = broker.choose_partition(topic, request.partition, request.key)
    plog = broker.partition_log(topic, index)
    scan = record_batch.scan_batches(payload)
    role = None
    if broker.cluster is not None:  # leader only; the producer table must match the replicated log
        role = broker.cluster.leader_role(topic.name, index)
        if request.acks is api.Acks.ALL:
            broker.cluster.check_insync(role)
    if not service.producer_state_ready(topic.name, index):
        raise RequestError(ErrorCode.LOAD_IN_PROGRESS,
                           f"the producer table of {topic.name}/{index} is being rebuilt from its log; retry")
    decisions = service.coordinator.plan_produce(topic.name, index, payload)
    bounds = [*scan.positions, scan.size_bytes]
    fresh = [i for i, d in enumerate(decisions) if d.verdict is Verdict.APPEND]
    if len(fresh) == len(decisions):
        appended: bytes | memoryview = payload
    elif fresh:
        appended = b"".join(payload[bounds[i] : bounds[i + 1]] for i in fresh)  # rare: a partly retried request
    else:
        appended = b""
    offsets: list[tuple[int, int]] = []
    produced = None
    if appended:
        count = sum(record_batch.read_header(payload, bounds[i]).record_count for i in fresh)
        produced = broker.produce(topic.name, index, None, appended, built_here=count)  # CRCs checked above
        service.coordinator.record_produce(topic.name, index, appended, produced.base_offset)
    next_offset = produced.base_offset if produced is not None else 0
    for i, decision in enumerate(decisions):
        if decision.verdict is Verdict.APPEND:
            n = record_batch.read_header(payload, bounds[i]).record_count
            offsets.append((next_offset, next_offset + n - 1))
            next_offset += n
        else:
            assert decision.original is not None
            offsets.append((decision.original.base_offset, decision.original.last_offset))
    if request.acks is api.Acks.NONE:
        return
    fields = {
        "partition": index,
        "base_offset": offsets[0][0],
        "last_offset": offsets[-1][1],
        "duplicate_batches": len(decisions) - len(fresh),
    }
    last = max(end for _, end in offsets)
    always = topic.config.flush.mode == "always"
    if request.acks is api.Acks.ALL and role is not None:
        # Duplicates too: the original may still be above the high watermark on a new leader.
        conn.when_replicated(corr, request, Produced(index, offsets[0][0], last, plog, always, role),
                              {"corr": corr, "error": 0, **fields})
        return
    if request.acks is not api.Acks.DURABLE and not always:
        conn.ok(corr, fields)
        return
    _answer_durable(conn, service, corr, Durable(plog, last), fields)


# -- groups ------------------------------------------------------------------------------------


def _join_group(conn: Responder, service: CoordinationService, corr: int, header: dict[str, Any], payload: memoryview) -> None:
    group = _name(header, "group")
    topics = api.parse_topic_names(header) or []
    view = service.coordinator.join_group(
        _now_ms(), group, topics,
        member_id=api._field(header, "member_id", str, None),
        instance_id=api._field(header, "instance_id", str, None),
        client_id=api._field(header, "client_id", str, "consumer"),
        session_timeout_ms=api._int(header, "session_timeout_ms", 0, 2**31 - 1, 10_000),
    )
    service.wake_heartbeats(group)
    service.reschedule()
    conn.ok(corr, _member_fields(view))


def _member_fields(view: Any) -> dict[str, Any]:
    return {
        "member_id": view.member_id,
        "generation": view.generation,
        "status": view.status.value,
        "assignment": [list(tp) for tp in view.assignment],
    }


def _heartbeat(conn: Responder, service: CoordinationService, corr: int, header: dict[str, Any], payload: memoryview) -> None:
    group = _name(header, "group")
    member_id = api._field(header, "member_id", str)
    generation = api._int(header, "generation", -1, 2**31 - 1)
    max_wait_ms = api._int(header, "max_wait_ms", 0, MAX_WAIT_MS, 0)
    view = service.coordinator.heartbeat(_now_ms(), group, member_id, generation)
    service.reschedule()
    if view.status.value != "ok" or max_wait_ms == 0 or not conn.long_poll_room():
        conn.ok(corr, _member_fields(view))
        return
    member = service.coordinator.groups.group(group).members.get(member_id)
    if member is not None:  # the wait must end well within the session, which it refreshes
        max_wait_ms = min(max_wait_ms, member.session_timeout_ms // 2)
    hb = _HeartbeatWait(conn, service, corr, group, member_id, generation, max_wait_ms)
    hb.start()


def _leave_group(conn: Responder, service: CoordinationService, corr: int, header: dict[str, Any], payload: memoryview) -> None:
    group = _name(header, "group")
    service.coordinator.leave_group(group, api._field(header, "member_id", str))
    service.wake_heartbeats(group)
    conn.ok(corr, {"group": group})


def _commit_offsets(conn: Responder, service: CoordinationService, corr: int, header: dict[str, Any], payload: memoryview) -> None:
    group = _name(header, "group")
    raw = api._field(header, "offsets", list)
    if not raw or not all(isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                          and all(isinstance(v, int) and not isinstance(v, bool) for v in item[1:]) for item in raw):
        raise RequestError(ErrorCode.INVALID_REQUEST, "field 'offsets' must list [topic, partition, offset]")
    # Well-formed but wrong values (a negative offset, a topic or partition that does not exist)
    # are the commit's own error, INVALID_COMMIT, checked by the coordinator.
    offsets = {(t, p): o for t, p, o in raw}
    if service.group_stores is not None:
        service.group_stores.check_replicas(group)
    durable = service.coordinator.commit_offsets(
        _now_ms(), group,
        api._field(header, "member_id", str, None),
        api._int(header, "generation", -1, 2**31 - 1, -1),
        offsets,
        api._field(header, "metadata", str, ""),
    )
    _answer_durable(conn, service, corr, durable, {"group": group, "committed": len(offsets)})


def _fetch_offsets(conn: Responder, service: CoordinationService, corr: int, header: dict[str, Any], payload: memoryview) -> None:
    group = _name(header, "group")
    wanted = _topic_partitions(header, "partitions", False)
    found = service.coordinator.fetch_offsets(group, None if wanted is None else [(t, p) for t, p in wanted])
    conn.ok(corr, {"group": group, "offsets": [[t, p, o] for (t, p), o in sorted(found.items())]})


def _describe_group(conn: Responder, service: CoordinationService, corr: int, header: dict[str, Any], payload: memoryview) -> None:
    conn.ok(corr, service.coordinator.describe_group(_name(header, "group")))


def _list_groups(conn: Responder, service: CoordinationService, corr: int, header: dict[str, Any], payload: memoryview) -> None:
    conn.ok(corr, {"groups": service.coordinator.list_groups()})


def _find_coordinator(conn: Responder, service: CoordinationService, corr: int, header: dict[str, Any], payload: memoryview) -> None:
    """The broker that coordinates a group (or producer name), or with ``key_type: "queue"``
    the queue subscriptions of ``topic``: in cluster mode the leader of the key's partition of
    the internal topic (NOT_COORDINATOR while it has none); standalone, this broker (host "")."""
    key_type = api._field(header, "key_type", str, "group")
    if key_type == "queue":
        key = internal_topic.queue_key(api._field(header, "topic", str))
    elif key_type == "group":
        key = _name(header, "group")
    else:
        raise RequestError(ErrorCode.INVALID_REQUEST, f"key_type must be 'group' or 'queue', not {key_type!r}")
    if service.group_stores is None:
        conn.ok(corr, {"coordinator": service.broker.settings.broker_id, "partition": -1, "host": ""})
        return
    conn.ok(corr, service.group_stores.find(key))


class _HeartbeatWait:
    """A heartbeat held until its group rebalances or max_wait_ms passes."""

    def __init__(self, conn: Responder, service: CoordinationService, corr: int, group: str, member_id: str,
                 generation: int, max_wait_ms: int) -> None:
        self.conn = conn
        self.service = service
        self.corr = corr
        self.group = group
        self.member_id = member_id
        self.generation = generation
        self.deadline = time.monotonic() + max_wait_ms / 1000
        self.slot = conn.reserve()
        self.timer: asyncio.TimerHandle | None = None
        self.done = False

    def start(self) -> None:
        self.conn.long_polls += 1
        self.service._heartbeat_waits.add(self)
        self.timer = asyncio.get_running_loop().call_later(max(0.0, self.deadline - time.monotonic()), self.finish)

    def recheck(self, final: bool = False) -> None:
        if self.done:
            return
        try:
            view = self.service.coordinator.heartbeat(_now_ms(), self.group, self.member_id, self.generation)
        except Exception as exc:
            translated = _translate(exc)
            code = error_code_for(translated)
            self._answer(frames.encode_frame(api.error_header(self.corr, code, str(exc))))
            return
        if final or view.status.value != "ok" or time.monotonic() >= self.deadline:
            self._answer(frames.encode_frame({"corr": self.corr, "error": 0, **_member_fields(view)}))

    def finish(self) -> None:
        self.recheck(final=True)

    def _answer(self, frame: bytes) -> None:
        self.cancel()
        self.conn.complete(self.slot, [frame])

    def cancel(self) -> None:
        if not self.done:
            self.conn.long_polls -= 1
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        self.service._heartbeat_waits.discard(self)


# -- queues ------------------------------------------------------------------------------------


def _queue_fetch(conn: Responder, service: CoordinationService, corr: int, header: dict[str, Any], payload: memoryview) -> None:
    request = QueueFetchRequest(header)
    consumer = service.consumer_id(conn)
    entries, views, total = service.queue_fetch(consumer, request)
    if entries or request.max_wait_ms == 0 or conn.draining or not conn.long_poll_room():
        conn.respond(_queue_response(corr, entries, views, total))
        return
    wait = _QueueWait(conn, service, corr, request, consumer)
    wait.start()


def _queue_response(corr: int, entries: list[dict[str, Any]], views: list[memoryview], total: int) -> list[bytes | memoryview]:
    header = {"corr": corr, "error": 0, "deliveries": entries}
    return [frames.encode_prefix(header, total), *views]


class _QueueWait:
    """A QUEUE_FETCH that found nothing: retried on appends, nacks and ticks until max_wait_ms."""

    def __init__(self, conn: Responder, service: CoordinationService, corr: int, request: QueueFetchRequest,
                 consumer: str) -> None:
        self.conn = conn
        self.service = service
        self.corr = corr
        self.request = request
        self.consumer = consumer
        self.deadline = time.monotonic() + request.max_wait_ms / 1000
        self.slot = conn.reserve()
        if service.group_stores is None:
            topic = service.broker.topic(request.topic)
            self.plogs = (list(topic.partitions) if request.partition is None
                          else [service.broker.partition_log(topic, request.partition)])
        else:  # the replicas held here (their high watermark moving wakes it); windows wake all
            roles = service.group_stores.roles
            count = service.check_topic(request.topic)
            indexes = range(count) if request.partition is None else [request.partition]
            self.plogs = [role.plog for role in (roles.role(request.topic, i) for i in indexes) if role is not None]
        self.timer: asyncio.TimerHandle | None = None
        self.done = False

    def start(self) -> None:
        self.conn.long_polls += 1
        self.service._queue_waits.add(self)
        self.timer = asyncio.get_running_loop().call_later(max(0.0, self.deadline - time.monotonic()), self.finish)
        self.service.broker.wait_for_data(self.plogs, self._on_append)

    def _on_append(self) -> None:
        if not self.done:
            asyncio.get_running_loop().call_soon(self.recheck)

    def recheck(self, final: bool = False) -> None:
        if self.done:
            return
        try:
            entries, views, total = self.service.queue_fetch(self.consumer, self.request)
        except Exception as exc:
            translated = _translate(exc)
            self._answer([frames.encode_frame(api.error_header(self.corr, error_code_for(translated), str(exc)))])
            return
        if entries or final or time.monotonic() >= self.deadline:
            self._answer(_queue_response(self.corr, entries, views, total))
        else:
            self.service.broker.stop_waiting(self.plogs, self._on_append)
            self.service.broker.wait_for_data(self.plogs, self._on_append)

    def finish(self) -> None:
        self.recheck(final=True)

    def _answer(self, buffers: list[bytes | memoryview]) -> None:
        self.cancel()
        self.conn.complete(self.slot, buffers)

    def cancel(self) -> None:
        if not self.done:
            self.conn.long_polls -= 1
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        self.service.broker.stop_waiting(self.plogs, self._on_append)
        self.service._queue_waits.discard(self)


def _queue_target(header: dict[str, Any]) -> tuple[str, str, int]:
    return (_name(header, "subscription"), api._field(header, "topic", str),
            api._int(header, "partition", 0, api.MAX_PARTITIONS_PER_TOPIC - 1))


def _queue_ack(conn: Responder, service: CoordinationService, corr: int, header: dict[str, Any], payload: memoryview) -> None:
    subscription, topic, partition = _queue_target(header)
    offsets = _offsets(header)
    service.check_topic(topic)
    result = service.coordinator.ack(subscription, topic, partition, offsets)
    fields = {"acked": result.acked, "duplicates": result.duplicates}
    slot = conn.reserve()
    service.after_persist(service.coordinator.queues_for(topic),
                          lambda error: conn.complete(slot, [_result_frame(corr, fields, error)]))


def _queue_nack(conn: Responder, service: CoordinationService, corr: int, header: dict[str, Any], payload: memoryview) -> None:
    subscription, topic, partition = _queue_target(header)
    offsets = _offsets(header)
    delay_ms = api._int(header, "delay_ms", 0, 7 * 24 * 3600 * 1000, 0)
    reason = api._field(header, "reason", str, "nack")[:1024]
    service.check_topic(topic)
    durable = service.coordinator.queue_nack(_now_ms(), subscription, topic, partition, offsets, delay_ms, reason)
    fields = {"nacked": len(offsets)}
    service.wake_queues()
    service.reschedule()
    slot = conn.reserve()
    # A nack that dead-letters is answered once the dead letter and the done mark are durable.
    if not service.settle_dead_letters(lambda error: conn.complete(slot, [_result_frame(corr, fields, error)])):
        service.when_durable(durable, lambda error: conn.complete(slot, [_result_frame(corr, fields, error)]))


def _queue_extend(conn: Responder, service: CoordinationService, corr: int, header: dict[str, Any], payload: memoryview) -> None:
    subscription, topic, partition = _queue_target(header)
    offsets = _offsets(header)
    ack_wait_ms = api._int(header, "ack_wait_ms", 1, 12 * 3600 * 1000, None)
    service.check_topic(topic)
    extended = service.coordinator.queue_extend(_now_ms(), subscription, topic, partition, offsets, ack_wait_ms)
    service.reschedule()
    conn.ok(corr, {"extended": extended})


def _queue_configure(conn: Responder, service: CoordinationService, corr: int, header: dict[str, Any], payload: memoryview) -> None:
    """Per-subscription (or topic-wide) settings overrides, answered once journaled durably."""
    request = api.parse_queue_configure(header)
    service.check_topic(request.topic)
    described, durable = service.coordinator.configure_queue(
        _now_ms(), request.topic, request.subscription, request.values, request.reset)
    service.wake_queues()  # a larger max_in_flight or lookahead may make records available
    service.reschedule()
    _answer_durable(conn, service, corr, durable, described)


def _queue_describe(conn: Responder, service: CoordinationService, corr: int, header: dict[str, Any], payload: memoryview) -> None:
    topic, subscription = api.parse_queue_describe(header)
    service.check_topic(topic)
    conn.ok(corr, service.coordinator.describe_queue(topic, subscription))


def _dlq_replay(conn: Responder, service: CoordinationService, corr: int, header: dict[str, Any], payload: memoryview) -> None:
    """Re-produce dead letters (by DLQ offset) to their origin topic and partition, without the
    DLQ headers. Replaying the same offset twice produces it twice (the DLQ is not changed).

    Cluster mode: answered by the DLQ partition's leader (NOT_LEADER elsewhere: nothing was
    read or written), which reads below its high watermark and places each origin partition's
    batch on that partition's leader with acks=all (rustmq.replication.forward), answering once
    every batch is held by its in-sync replicas."""
    topic_name = api._field(header, "topic", str)
    partition = api._int(header, "partition", 0, api.MAX_PARTITIONS_PER_TOPIC - 1)
    offsets = _offsets(header, MAX_QUEUE_MESSAGES)
    broker = service.broker
    cluster = broker.cluster
    if cluster is None:
        plog = broker.partition_log(broker.topic(topic_name), partition)
        end = plog.end_offset
    else:
        role, end = cluster.consumer_limit(topic_name, partition)
        plog = role.plog
    now = _now_ms()
    groups: dict[tuple[str, int], list[list[object]]] = {}
    for offset in offsets:
        if not plog.start_offset <= offset < end:
            raise RequestError(ErrorCode.OFFSET_OUT_OF_RANGE, f"no dead letter at offset {offset} of {topic_name}/{partition}")
        dead = queue_log.read_record(plog, offset)
        headers = dead[3] or []
        origin_partition = next((int(bytes(v)) for n, v in headers if n == queue_mod.DLQ_PARTITION), 0)
        try:
            origin, clean = queue_mod.replay_record(dead)
        except queue_mod.QueueError as exc:
            raise RequestError(ErrorCode.INVALID_REQUEST, f"offset {offset}: {exc}") from None
        clean[0] = 0
        groups.setdefault((origin, origin_partition), []).append(clean)
    built = {key: record_batch.build_batch(records.encode_body(recs), record_count=len(recs),
                                           first_timestamp_ms=now, max_timestamp_ms=now)
             for key, recs in groups.items()}
    if cluster is not None:
        slot = conn.reserve()
        task = asyncio.get_running_loop().create_task(_place_replays(service, built, {k: len(v) for k, v in groups.items()}))
        service._placements.add(task)
        task.add_done_callback(service._placements.discard)
        task.add_done_callback(lambda done: conn.complete(slot, [_replay_frame(corr, len(offsets), done)]))
        return
    replayed = []
    for (origin, origin_partition), batch_bytes in built.items():
        count = len(groups[(origin, origin_partition)])
        target = broker.topic(origin)
        index = origin_partition if origin_partition < len(target.partitions) else 0
        produced = broker.produce(origin, index, None, batch_bytes, built_here=count)
        replayed.append([origin, index, produced.base_offset, produced.last_offset])
    conn.ok(corr, {"replayed": len(offsets), "to": replayed})


async def _place_replays(service: CoordinationService, built: dict[tuple[str, int], bytes],
                         counts: dict[tuple[str, int], int]) -> list[list[Any]]:
    roles = service.broker.cluster
    replayed = []
    for (origin, origin_partition), batch_bytes in built.items():
        state = roles.topics.get(origin)
        if state is None:
            raise RequestError(ErrorCode.UNKNOWN_TOPIC, f"the origin topic {origin!r} does not exist")
        index = origin_partition if origin_partition < len(state.partitions) else 0
        base = await roles.placer.place(origin, index, batch_bytes, counts[(origin, origin_partition)])
        replayed.append([origin, index, base, base + counts[(origin, origin_partition)] - 1])
    return replayed


def _replay_frame(corr: int, count: int, done: asyncio.Task[list[list[Any]]]) -> bytes:
    if done.cancelled():
        return frames.encode_frame(api.error_header(corr, ErrorCode.SHUTTING_DOWN, "the broker is stopping"))
    error = done.exception()
    if error is not None:
        translated = _translate(error)
        return frames.encode_frame(api.error_header(corr, error_code_for(translated), str(error)))
    return frames.encode_frame({"corr": corr, "error": 0, "replayed": count, "to": done.result()})
