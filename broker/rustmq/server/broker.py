"""The broker's request logic over one ``rustmq.storage.log.Log``, free of sockets.

Everything here runs on the event loop thread, one call per request and one storage call per
batch run: produce validates the batches with ``scan_batches`` (header and CRC per batch, never
per record), appends them as they arrived and wakes long-polling fetches of that partition;
fetch returns memoryviews of the log without copying. Durable acks go through the storage
GroupCommitter, whose thread callbacks are bridged back with ``loop.call_soon_threadsafe``.

Topic auto-creation policy: a produce (framed or simple) to a topic that does not exist creates
it with ``default_partitions`` partitions when ``auto_create_topics`` is on (the default), and
fails with UNKNOWN_TOPIC when it is off. Fetch, list-offsets and describe never create topics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from rustmq.coordination import internal_topic
from rustmq.protocol import api
from rustmq.protocol import batch as record_batch
from rustmq.protocol.api import ErrorCode, RequestError
from rustmq.server import replicated
from rustmq.server.resources import ResourceGuard
from rustmq.server.settings import ServerSettings
from rustmq.server.stats import BrokerStats
from rustmq.storage import errors as storage_errors

if TYPE_CHECKING:
    from rustmq.storage.durability import FlushTarget, GroupCommitter
    from rustmq.storage.log import Log, Topic
    from rustmq.storage.partition import PartitionLog

log = logging.getLogger(__name__)

_STORAGE_ERROR_CODES: tuple[tuple[type[BaseException], ErrorCode], ...] = (
    (storage_errors.CorruptBatchError, ErrorCode.CORRUPT_BATCH),
    (storage_errors.BatchTooLargeError, ErrorCode.BATCH_TOO_LARGE),
    (storage_errors.OffsetOutOfRangeError, ErrorCode.OFFSET_OUT_OF_RANGE),
    (storage_errors.StorageFullError, ErrorCode.STORAGE_FULL),
    (storage_errors.UnknownTopicError, ErrorCode.UNKNOWN_TOPIC),
    (storage_errors.TopicExistsError, ErrorCode.TOPIC_EXISTS),
    (storage_errors.InvalidConfigError, ErrorCode.INVALID_CONFIG),
    (storage_errors.LogClosedError, ErrorCode.SHUTTING_DOWN),
    (storage_errors.PartitionBusyError, ErrorCode.LOAD_IN_PROGRESS),
    (storage_errors.StorageIOError, ErrorCode.STORAGE_ERROR),
    (storage_errors.StorageError, ErrorCode.STORAGE_ERROR),
)


def error_code_for(exc: BaseException) -> ErrorCode:
    """The wire error code for an exception raised while serving a request."""
    if isinstance(exc, RequestError):
        return exc.code
    for kind, code in _STORAGE_ERROR_CODES:
        if isinstance(exc, kind):
            return code
    return ErrorCode.INTERNAL_ERROR


class Produced(NamedTuple):
    partition: int
    base_offset: int
    last_offset: int
    log: PartitionLog  # the partition written to, for durable acks
    always_durable: bool  # the topic's flush mode is "always": every ack waits for the fsync
    role: Any = None  # cluster mode: the leader's rustmq.server.replicated.PartitionRole (acks=all)


class FetchedPartition(NamedTuple):
    header: dict[str, Any]
    views: list[memoryview]
    size: int


class Broker:
    """Request logic for one broker; construct once the log is open."""

    def __init__(self, storage_log: Log, committer: GroupCommitter, settings: ServerSettings, stats: BrokerStats,
                 resources: ResourceGuard | None = None) -> None:
        self.log = storage_log
        self.resources = resources or ResourceGuard(None, None, settings.fd_headroom, settings.map_headroom)
        self._background: set[asyncio.Task[None]] = set()  # file removals in worker threads
        self.write_failure: str | None = None  # the last failed write, until one succeeds (write_health)
        self._write_failure_sticky = False
        self.committer = committer
        self.settings = settings
        self.stats = stats
        self.ports: dict[str, int] = {}
        self.started_at = time.time()
        self.connections = 0
        self._next_partition: dict[str, int] = {}
        # partition -> its long-poll wake-ups, as an insertion-ordered set (dict keys): waiting
        # again is idempotent, so a waiter re-registering after each wake-up stays one entry.
        self._waiters: dict[PartitionLog, dict[Callable[[], None], None]] = {}
        self._loop = asyncio.get_running_loop()
        # rustmq.server.coordination_handlers.CoordinationService, attached by the app and read
        # by connection.build_router (typed loosely: that module builds on this one, not back)
        self.coordination: object | None = None
        # rustmq.server.replicated.ClusterRoles in cluster mode, attached by the app; None standalone
        self.cluster: Any = None

    # -- topics ---------------------------------------------------------------------------

    def topic(self, name: str) -> Topic:
        try:
            return self.log.topic(name)
        except storage_errors.UnknownTopicError:
            raise RequestError(ErrorCode.UNKNOWN_TOPIC, f"unknown topic {name!r}") from None

    def topic_for_produce(self, name: str) -> Topic:
        try:
            return self.log.topic(name)
        except storage_errors.UnknownTopicError:
            if self.cluster is not None:  # topics are created cluster-wide, through METADATA/CREATE_TOPIC
                raise RequestError(ErrorCode.UNKNOWN_TOPIC, f"unknown topic {name!r} on broker {self.settings.broker_id}") from None
            if not self.settings.auto_create_topics:
                raise RequestError(
                    ErrorCode.UNKNOWN_TOPIC, f"unknown topic {name!r} (auto-creation is off)"
                ) from None
        log.info("auto-creating topic %r with %d partitions", name, self.settings.default_partitions)
        return self.create_topic(name, self.settings.default_partitions, None)

    def create_topic(self, name: str, partitions: int | None, config: dict[str, Any] | None) -> Topic:
        count = partitions or self.settings.default_partitions
        self._check_topic_config(config or {})
        try:
            self.log.topic(name)
        except storage_errors.UnknownTopicError:
            pass
        else:
            raise RequestError(ErrorCode.TOPIC_EXISTS, f"topic {name!r} already exists")
        settings = self.settings
        if len(self.log.topics()) >= settings.max_topics:
            raise RequestError(ErrorCode.LIMIT_REACHED, f"the broker allows {settings.max_topics} topics (max_topics)")
        self._check_partition_counts(count, count)
        try:
            topic = self.log.create_topic(name, count, config or None)
        except (ValueError, TypeError) as exc:
            raise RequestError(ErrorCode.INVALID_CONFIG, str(exc)) from None
        self.resources.forget()
        return topic

    def _check_partition_counts(self, topic_total: int, added: int) -> None:
        """INVALID_CONFIG above max_partitions_per_topic; LIMIT_REACHED above max_partitions
        for all topics together, or without memory maps / descriptors for `added` segments."""
        settings = self.settings
        if topic_total > settings.max_partitions_per_topic:
            raise RequestError(ErrorCode.INVALID_CONFIG, f"a topic may have at most {settings.max_partitions_per_topic} "
                               f"partitions (max_partitions_per_topic), not {topic_total}")
        existing = sum(len(topic.partitions) for topic in self.log.topics())
        if existing + added > settings.max_partitions:
            raise RequestError(ErrorCode.LIMIT_REACHED, f"the broker allows {settings.max_partitions} partitions in "
                               f"all (max_partitions); {existing} exist, {added} more asked for")
        refusal = self.resources.segment_refusal(added)
        if refusal is not None:
            raise RequestError(ErrorCode.LIMIT_REACHED, f"no room for {added} more partitions: {refusal}")

    def _check_topic_config(self, config: dict[str, Any]) -> None:
        segment_bytes = config.get("segment_bytes")
        limit = self.settings.max_segment_bytes
        if isinstance(segment_bytes, int) and not isinstance(segment_bytes, bool) and segment_bytes > limit:
            raise RequestError(ErrorCode.INVALID_CONFIG,
                               f"segment_bytes may be at most {limit} (max_segment_bytes), not {segment_bytes}")

    def delete_topic(self, name: str) -> None:
        self.topic(name)
        topic = self.log.detach_topic(name)  # no I/O: the topic is gone for every later request
        for partition_log in topic.partitions:
            self._wake(partition_log)
        self.resources.forget()
        # Closing and removing a topic's files (GBs of segments) blocks: a worker thread does it.
        task = self._loop.create_task(asyncio.to_thread(self.log.destroy_topic, topic))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _not_in_cluster_mode(self, what: str) -> None:
        if self.cluster is not None:
            raise RequestError(ErrorCode.INVALID_REQUEST, f"{what} on one broker's log in cluster mode: the change "
                               f"goes through the cluster state (rustmq.server.topic_admin)")

    def alter_topic_config(self, name: str, changes: dict[str, Any], reset: list[str]) -> Topic:
        self._not_in_cluster_mode("ALTER_TOPIC_CONFIG")
        self.topic(name)
        self._check_topic_config(changes)
        try:
            return self.log.alter_topic_config(name, changes, reset)
        except (ValueError, TypeError) as exc:
            raise RequestError(ErrorCode.INVALID_CONFIG, str(exc)) from None

    def add_partitions(self, name: str, total: int) -> Topic:
        self._not_in_cluster_mode("ADD_PARTITIONS")
        topic = self.topic(name)
        if total > len(topic.partitions):
            self._check_partition_counts(total, total - len(topic.partitions))
        self.log.add_partitions(name, total)
        self.resources.forget()
        return self.log.topic(name)

    def partition_log(self, topic: Topic, partition: int) -> PartitionLog:
        partitions = topic.partitions
        if partition >= len(partitions):
            raise RequestError(
                ErrorCode.UNKNOWN_PARTITION,
                f"topic {topic.name!r} has {len(partitions)} partitions, no partition {partition}",
            )
        return partitions[partition]

    def describe(self, topic: Any) -> dict[str, Any]:
        return {
            "topic": topic.name,
            "config": topic.config.to_dict(),
            "partitions": [
                {
                    "partition": index,
                    "start_offset": plog.start_offset,
                    "end_offset": plog.end_offset,
                    "durable_offset": plog.durable_offset,
                    "size_bytes": plog.size_bytes,
                    "segment_count": plog.segment_count,
                }
                for index, plog in enumerate(topic.partitions)
            ],
        }

    def metadata(self, names: list[str] | None) -> dict[str, Any]:
        if self.cluster is not None:
            return self._cluster_metadata(names)
        topics = []
        chosen = self.log.topics() if names is None else []
        if names is not None:
            for name in names:
                try:
                    chosen.append(self.log.topic(name))
                except storage_errors.UnknownTopicError:
                    topics.append({"name": name, "error": int(ErrorCode.UNKNOWN_TOPIC), "partitions": []})
        for topic in chosen:
            topics.append(
                {
                    "name": topic.name,
                    "error": 0,
                    "partitions": [
                        {
                            "partition": index,
                            "leader": self.settings.broker_id,
                            "start_offset": plog.start_offset,
                            "end_offset": plog.end_offset,
                        }
                        for index, plog in enumerate(topic.partitions)
                    ],
                }
            )
        broker = {"id": self.settings.broker_id, "host": self.settings.advertised_host}
        broker.update({f"{name}_port": port for name, port in self.ports.items()})
        return {"brokers": [broker], "topics": topics}

    def _cluster_metadata(self, names: list[str] | None) -> dict[str, Any]:
        cluster = self.cluster
        states = cluster.topics
        topics: list[dict[str, Any]] = []
        for name in sorted(n for n in states if not internal_topic.is_internal(n)) if names is None else names:
            topic = states.get(name)
            if topic is None:
                topics.append({"name": name, "error": int(ErrorCode.UNKNOWN_TOPIC), "partitions": []})
                continue
            topics.append({
                "name": name,
                "error": 0,
                "replication_factor": topic.replication_factor,
                "min_insync_replicas": topic.min_insync,
                "partitions": [
                    {"partition": index, "leader": p.leader, "leader_epoch": p.leader_epoch,
                     "replicas": list(p.replicas), "isr": list(p.isr),
                     **({"target": list(p.target)} if p.target else {})}
                    for index, p in enumerate(topic.partitions)
                ],
            })
        answer = {"brokers": list(cluster.brokers), "controller": cluster.controller, "topics": topics, "cluster": True}
        if cluster.health is not None and cluster.controller == cluster.broker_id:
            answer["health"] = cluster.health  # the scaling report (docs/cluster.md); the controller has it
            if cluster.membership is not None:
                answer["membership"] = cluster.membership
        return answer

    def broker_stats(self) -> dict[str, Any]:
        return {
            "broker_id": self.settings.broker_id,
            "rss_bytes": current_rss_bytes(),
            "anon_rss_bytes": anon_rss_bytes(),
            "peak_rss_bytes": peak_rss_bytes(),
            "connections": self.connections,
            "uptime_s": round(time.time() - self.started_at, 3),
            "pid": os.getpid(),
        }

    # -- produce --------------------------------------------------------------------------

    def choose_partition(self, topic: Topic, partition: int | None, key: bytes | None) -> int:
        count = len(topic.partitions)
        if partition is not None:
            return partition
        if key is not None:
            return api.partition_for_key(key, count)
        if self.cluster is not None:
            # A client that cannot route (the seed's simple produce behind one load balancer):
            # keyless records go to the partitions this broker leads, round-robin.
            led = self.cluster.led_partitions(topic.name)
            if led:
                turn = self._next_partition.get(topic.name, 0)
                self._next_partition[topic.name] = turn + 1
                return led[turn % len(led)]
        chosen = self._next_partition.get(topic.name, 0) % count
        self._next_partition[topic.name] = chosen + 1
        return chosen

    def produce(
        self, topic_name: str, partition: int | None, key: bytes | None, batches: memoryview | bytes, *,
        built_here: int = 0, require_insync: bool = False,
    ) -> Produced:
        """Validate and append one or more concatenated record batches to one partition.

        built_here: the record count of a single batch the broker built itself (simple
        produce), whose CRC scan is skipped.
        """
        topic = self.topic_for_produce(topic_name)
        refusal = self.resources.segment_refusal()
        if refusal is not None:  # an append may roll a segment: one more map and descriptor
            raise RequestError(ErrorCode.LIMIT_REACHED, f"produce refused: {refusal}")
        index = self.choose_partition(topic, partition, key)
        plog = self.partition_log(topic, index)
        if built_here:
            record_count, batch_count = built_here, 1
        else:
            scan = record_batch.scan_batches(batches)
            record_count, batch_count = scan.record_count, scan.batch_count
        cluster = self.cluster
        role = None
        try:
            if cluster is None:
                result = plog.append(batches)
            else:
                role = cluster.leader_role(topic.name, index)
                if internal_topic.is_internal(topic.name):
                    raise RequestError(ErrorCode.INVALID_REQUEST, f"{topic.name!r} is written by the brokers only")
                if require_insync:
                    cluster.check_insync(role)
                result = plog.append(batches, role.leader_epoch)
        except storage_errors.StorageError as exc:
            self.note_write_failure(exc, f"{topic.name}/{index}")
            raise
        if self.write_failure is not None and not self._write_failure_sticky:
            self.write_failure = None
        stats = self.stats.topic(topic.name)
        stats.messages_in += record_count
        stats.bytes_in += result.size_bytes
        stats.batches_in += batch_count
        waiters = self._waiters.pop(plog, None)
        if waiters:
            for wake in waiters:
                wake()
        if role is not None:
            cluster.appended(role)
        return Produced(index, result.base_offset, result.last_offset, plog, topic.config.flush.mode == "always", role)

    def note_write_failure(self, error: BaseException, where: str, *, sticky: bool = False) -> None:
        """A write failed (produce, a journal); /readyz consults `write_health`. sticky: the
        failure lasts until a restart (a coordination journal that refuses writes)."""
        self.write_failure = f"write to {where} failed: {error}"
        self._write_failure_sticky = self._write_failure_sticky or sticky

    def write_health(self) -> str | None:
        """Why this broker cannot write now, or None (/readyz). After a failed write: a
        coordination journal refusing writes, or less than readiness_min_free_bytes free on the
        data directory's filesystem; a later successful append clears it."""
        failure = self.write_failure
        if failure is None:
            return None
        if self._write_failure_sticky:
            return failure
        try:
            stat = os.statvfs(self.log.data_dir)
        except OSError as exc:
            return f"{failure}; cannot stat the data directory: {exc}"
        free = stat.f_bavail * stat.f_frsize
        if free < self.settings.readiness_min_free_bytes:
            return f"{failure}; {free} bytes free on the data directory's filesystem"
        return None

    def when_durable(self, plog: FlushTarget, offset: int, done: Callable[[BaseException | None], None]) -> None:
        """Call done(error) on the loop thread once offset is fsynced (or the flush failed).
        An offset fsynced already (a retried batch answered as a duplicate) is answered at once,
        not after the group committer's next wait."""
        loop = self._loop
        if offset < plog.durable_offset:
            done(None)
            return

        def on_committer_thread(error: BaseException | None) -> None:
            try:
                loop.call_soon_threadsafe(done, error)
            except RuntimeError:  # the loop closed during shutdown; nobody is waiting any more
                pass

        self.committer.request(plog, offset, on_committer_thread)

    # -- fetch ----------------------------------------------------------------------------

    def read_partition(self, request: api.FetchPartition, budget: int, replica_id: int | None = None,
                       follower_read: bool = False) -> FetchedPartition:
        """One partition's part of a fetch response; errors become the entry's error code.

        Cluster mode: a consumer reads below the high watermark, from the leader, or with
        `follower_read` from an in-sync follower below the follower's high watermark (an offset
        above it gets an empty answer: the follower has not learnt yet that it is committed); a
        replica fetch (replica_id set) is checked for epochs and divergence and acknowledges
        the follower's log end (rustmq.server.replicated).
        """
        header: dict[str, Any] = {"topic": request.topic, "partition": request.partition, "error": 0}
        try:
            plog = self.partition_log(self.topic(request.topic), request.partition)
            limit = None
            cluster = self.cluster
            if cluster is None:
                header["high_watermark"] = plog.end_offset
            elif replica_id is None:
                _, limit = cluster.consumer_limit(request.topic, request.partition, follower_read)
                header["high_watermark"] = limit
            else:
                role, diverging = cluster.replica_fetch(replica_id, request)
                header["leader_epoch"] = role.leader_epoch
                if diverging is not None:
                    header.update(diverging={"epoch": diverging.epoch, "end_offset": diverging.end_offset},
                                  high_watermark=role.tracker.high_watermark, size=0)
                    return FetchedPartition(header, [], 0)
                cluster.replica_fetched(role, replica_id, request.offset)
                header["high_watermark"] = role.tracker.high_watermark
            header["log_start_offset"] = plog.start_offset
            if request.offset < 0:
                raise storage_errors.OffsetOutOfRangeError(request.offset, plog.start_offset, plog.end_offset)
            if follower_read and limit is not None and request.offset > limit:
                header["size"] = 0  # only the leader says an offset is out of range
                return FetchedPartition(header, [], 0)
            if budget <= 0:
                header["size"] = 0
                return FetchedPartition(header, [], 0)
            fetched = plog.read(request.offset, min(request.max_bytes, budget))
            if limit is not None and fetched.next_offset > limit:
                views, size, next_offset = replicated.clip_views(fetched.views, limit)
                fetched = fetched._replace(views=views, size_bytes=size, next_offset=max(next_offset, request.offset))
        except Exception as exc:
            code = error_code_for(exc)
            if code is ErrorCode.INTERNAL_ERROR:
                log.exception("fetch of %s/%d failed", request.topic, request.partition)
            header.update(error=int(code), message=str(exc), size=0)
            self.stats.request_errors[code.name] += 1
            return FetchedPartition(header, [], 0)
        header["size"] = fetched.size_bytes
        if fetched.size_bytes:
            stats = self.stats.topic(request.topic)
            stats.bytes_out += fetched.size_bytes
            stats.messages_out += max(0, fetched.next_offset - request.offset)
        return FetchedPartition(header, list(fetched.views), fetched.size_bytes)

    def read_fetch(self, request: api.FetchRequest) -> tuple[list[FetchedPartition], int]:
        parts, total = [], 0
        for partition_request in request.partitions:
            part = self.read_partition(partition_request, request.max_bytes - total, request.replica_id,
                                       request.follower_read)
            parts.append(part)
            total += part.size
        return parts, total

    def wait_for_data(self, plogs: list[PartitionLog], wake: Callable[[], None]) -> None:
        """Call wake() at the next append to each of plogs that it is registered for (a wake-up
        unregisters it from that partition only). Registering again is a no-op: O(len(plogs))."""
        waiters = self._waiters
        for plog in plogs:
            registered = waiters.get(plog)
            if registered is None:
                waiters[plog] = {wake: None}
            else:
                registered[wake] = None

    def stop_waiting(self, plogs: list[PartitionLog], wake: Callable[[], None]) -> None:
        waiters = self._waiters
        for plog in plogs:
            registered = waiters.get(plog)
            if registered is not None and registered.pop(wake, 0) is None and not registered:
                del waiters[plog]

    def fetch_logs(self, request: api.FetchRequest) -> list[PartitionLog]:
        plogs = []
        for partition_request in request.partitions:
            try:
                plogs.append(self.partition_log(self.topic(partition_request.topic), partition_request.partition))
            except RequestError:
                continue
        return plogs

    def wake_all(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for wakes in waiters.values():
            for wake in wakes:
                wake()

    def _wake(self, plog: PartitionLog) -> None:
        for wake in self._waiters.pop(plog, ()):
            wake()

    # -- offsets --------------------------------------------------------------------------

    def list_offset(self, request: api.ListOffsetsRequest) -> dict[str, Any]:
        plog = self.partition_log(self.topic(request.topic), request.partition)
        end = plog.end_offset
        if self.cluster is not None:  # consumers see the log up to the high watermark only
            _, end = self.cluster.consumer_limit(request.topic, request.partition)
        if request.at == api.EARLIEST:
            offset = plog.start_offset
        elif request.at == api.LATEST:
            offset = end
        else:
            found = plog.offset_for_timestamp(request.at)
            offset = end if found is None or found > end else found
        return {"offset": offset, "start_offset": plog.start_offset, "end_offset": end}


def current_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable).

    It includes the pages of mapped segments that were touched (page cache shared with the
    kernel); anon_rss_bytes() is the broker's own heap and buffers.
    """
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def anon_rss_bytes() -> int:
    """Anonymous resident memory (RssAnon: heap, buffers; no mapped files), 0 if unknown."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
