"""Composition root of the broker process: open the log, start the ports, serve until SIGTERM.

Start-up order: the admin port first (so /healthz answers and /readyz says 503 during
recovery), then the log is opened and recovered in a worker thread, the default topic is
created if missing, the producer and consumer ports start listening, and only then /readyz
turns 200 and the bound ports are reported (a JSON line on stdout and, if configured, a JSON
file written atomically), which is how tests find brokers started on port 0.

Shutdown (SIGTERM or SIGINT) runs the reverse: /readyz 503, listeners closed, in-flight requests
finished (bounded by shutdown_timeout_s), group committer stopped, the log flushed and closed
with its clean-shutdown marker, the admin port closed last.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from rustmq import compaction, eventloop
from rustmq.admin.app import AdminState, make_admin_app
from rustmq.auth import tokens
from rustmq.client import connection
from rustmq.config import BrokerConfig
from rustmq.coordination.service import CoordinationLimits, Coordinator
from rustmq.kube import KubeStore
from rustmq.replication.holds import RetentionHolds
from rustmq.replication.node import ClusterNode, ClusterSettings
from rustmq.server import coordination_handlers
from rustmq.server.authz import AuthError, AuthState
from rustmq.server.broker import Broker
from rustmq.server.listener import Listener
from rustmq.server.resources import ResourceGuard
from rustmq.server.stats import BrokerStats, MaintenanceStats
from rustmq.server.tls import ReloadingContext
from rustmq.storage import durability
from rustmq.storage import errors as storage_errors
from rustmq.storage import log as storage_log

log = logging.getLogger("rustmq.app")


async def serve(config: BrokerConfig, stop: asyncio.Event | None = None) -> None:
    """Run one broker until stop is set (or SIGTERM/SIGINT when stop is None)."""
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    stats = BrokerStats()
    auth_settings = config.auth_settings()
    auth = AuthState(auth_settings) if auth_settings is not None else None  # AuthError: bad files, exit 2
    state = AdminState(stats=stats, auth=auth, admin_auth=config.admin_auth)
    tls_settings = config.tls_settings()
    tls = ReloadingContext(tls_settings) if tls_settings is not None else None  # TlsError: exit 2
    runner = web.AppRunner(make_admin_app(state), access_log=None, handle_signals=False)
    await runner.setup()
    admin_context = tls.admin_listener_context() if tls is not None and config.admin_tls else None
    site = web.TCPSite(runner, config.host, config.metrics_port, reuse_address=True, ssl_context=admin_context)
    await site.start()
    metrics_port = _site_port(runner)
    log.info("admin port listening on %s:%d%s", config.host, metrics_port, " (HTTPS)" if admin_context else "")

    config.data_dir.mkdir(parents=True, exist_ok=True)
    # Before any segment is opened: the soft open-files limit up to the hard one.
    resources = ResourceGuard.for_process(config.fd_headroom, config.map_headroom)
    opened = await asyncio.to_thread(storage_log.Log.open, config.data_dir, config.log_config())
    committer = durability.GroupCommitter(max_wait_ms=config.group_commit_ms)
    listener: Listener | None = None
    node: ClusterNode | None = None
    auth_watch: asyncio.Task[None] | None = None
    coordinator: Coordinator | None = None
    coordination: coordination_handlers.CoordinationService | None = None
    try:
        settings = config.server_settings()
        broker = Broker(opened, committer, settings, stats, resources)
        broker.auth = auth  # type: ignore[attr-defined]  # read by server.connection (None: no auth)
        if auth is not None:
            auth_watch = asyncio.get_running_loop().create_task(auth.watch(), name="auth-reload")
        if config.auth_broker_token_file is not None:
            # This broker's connections to its peers (replica fetches) present its own token,
            # re-read at every connect so a rotated Secret applies without a restart.
            token_file = config.auth_broker_token_file
            try:
                tokens.split_token(token_file.read_text().strip())
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise AuthError(f"cannot use the broker token file {token_file}: {exc}") from None
            connection.use_token(lambda: token_file.read_text().strip())
        # Groups, offsets, queues, producer ids (issue 4): journals under <data_dir>/coordination.
        coordinator = Coordinator.open(config.data_dir, opened, incarnation=secrets.token_hex(4),
                                       limits=CoordinationLimits(config.max_groups, config.max_subscriptions))
        coordination = broker.coordination = coordination_handlers.CoordinationService(broker, coordinator)
        coordination.reschedule()
        if config.cluster_mode == "standalone":
            _ensure_default_topic(opened, config)
        listener = Listener(broker, tls=tls)
        ports = await listener.start()
        broker.ports["metrics"] = metrics_port
        if config.cluster_mode == "kubernetes":
            if listener.tls is not None:
                # Replica fetches dial the other brokers' TLS ports: as a client with this
                # broker's own certificate, re-read on every connect since it reloads.
                tls_state = listener.tls
                connection.use_tls(lambda: tls_state.peer)
            node = await _start_cluster_node(config, broker)
        state.broker = broker
        state.ready = True
        _report_ready(config, {**ports, "metrics": metrics_port})
        holds = RetentionHolds(broker.cluster, opened) if broker.cluster is not None else None
        retention = asyncio.get_running_loop().create_task(
            _enforce_retention(opened, coordinator, config.retention_check_s, broker.stats.maintenance, holds))
        await stop.wait()
        retention.cancel()
        if holds is not None:
            holds.close()
        log.info("shutting down")
        state.ready = False
        if coordination is not None:
            coordination.begin_drain()
        if node is not None:
            await node.stop()
        await listener.shutdown()
    finally:
        state.ready = False
        if auth_watch is not None:
            auth_watch.cancel()
        if coordination is not None:
            coordination.close()
        committer.close()
        if coordinator is not None:
            coordinator.close(True)
        await asyncio.to_thread(opened.close, True)
        await runner.cleanup()
        log.info("stopped cleanly")


async def _start_cluster_node(config: BrokerConfig, broker: Broker) -> ClusterNode:
    """Join the cluster: the Kubernetes API store (RUSTMQ_KUBECONFIG or in-cluster), then the node."""
    timing = config.lease_timing()
    store = KubeStore.from_config(config.kubeconfig, config.cluster_namespace, config.cluster_name, timing.api_timeout_s)
    settings = ClusterSettings(
        cluster_name=config.cluster_name,
        namespace=config.cluster_namespace,
        broker_id=config.broker_id,
        internal_host=config.internal_host or config.advertised_host or config.host,
        timing=timing,
        poll_s=config.cluster_poll_s,
        replica_lag_s=config.replica_lag_s,
        unclean_leader_election=config.unclean_leader_election,
        forward_timeout_s=config.forward_timeout_s,
        reassign_bytes_per_s=config.reassign_bytes_per_s,
        max_reassignments=config.max_reassignments,
        controlled_shutdown_s=config.controlled_shutdown_s,
        preferred_leader_delay_s=config.preferred_leader_delay_s,
        rack=config.rack,
    )
    node = ClusterNode(broker, store, settings, incarnation=secrets.token_hex(8))
    await node.start()
    log.info("broker %d joined cluster %s/%s", config.broker_id, config.cluster_namespace, config.cluster_name)
    return node


async def _enforce_retention(opened: storage_log.Log, coordinator: Coordinator, interval_s: float,
                             stats: MaintenanceStats, holds: RetentionHolds | None = None) -> None:
    """Every interval_s: delete expired segments, then compact the topics that ask for it.

    Runs on the loop thread (the log's owner thread). Retention respects each topic's "keep
    until consumed" floor from the coordinator (cluster mode: `holds`, the floors the partition
    leaders learn from the groups' coordinators before each pass; rustmq.replication.holds). Compaction decides and writes the new segment
    files on a worker thread (sealed segments never change) and swaps them in here, one
    partition at a time.
    """
    states: dict[tuple[str, int], compaction.CompactionState] = {}
    floor = _retention_floor(coordinator) if holds is None else holds.floor
    while True:
        await asyncio.sleep(interval_s)
        if holds is not None:  # cluster mode: the held partitions' floors from their groups' coordinators
            try:
                await holds.refresh()
            except Exception:
                log.exception("asking the coordinators for retention holds failed; holding")
                holds.floors = {}
        try:
            deleted = opened.enforce_retention(int(time.time() * 1000), floor)
        except Exception:
            log.exception("retention check failed")
            deleted = 0
        if deleted:
            stats.retention_segments_deleted += deleted
            log.info("retention deleted %d segment(s)", deleted)
        await _compact_topics(opened, states, stats)


def _retention_floor(coordinator: Coordinator) -> Callable[[storage_log.Topic, int], int | None]:
    """The offset from which a partition must be kept for its topic's named groups and, with
    retain_until_settled, its queue subscriptions (a group that never committed: 0)."""

    def floor(topic: storage_log.Topic, partition: int) -> int | None:
        config = topic.config
        floors: list[int] = []
        if config.retain_until_consumed_by:
            committed = coordinator.offsets.min_committed(
                config.retain_until_consumed_by, (topic.name, partition))
            if committed is not None:
                floors.append(committed)
        if config.retain_until_settled:
            settled = coordinator.queues.min_floor(topic.name, partition)
            if settled is not None:
                floors.append(settled)
        return min(floors, default=None)

    return floor


async def _compact_topics(opened: storage_log.Log,
                          states: dict[tuple[str, int], compaction.CompactionState],
                          stats: MaintenanceStats) -> None:
    live = set()
    for topic in opened.topics():
        if not topic.config.compacted:
            continue
        for index, partition in enumerate(topic.partitions):
            key = (topic.name, index)
            live.add(key)
            state = states.setdefault(key, compaction.CompactionState())
            try:
                job = compaction.prepare(partition, int(time.time() * 1000), state,
                                         f"{topic.name}/{index}")
                if job is None:
                    continue
                try:
                    decided, written = await asyncio.to_thread(job.write)
                    if partition.closed:  # the topic was deleted meanwhile
                        if written is not None:
                            written.discard()
                        continue
                    done = compaction.install(job, decided, written, state)
                    if done is not None:
                        stats.compactions += 1
                        stats.compaction_bytes_reclaimed += done.replace.bytes_before - done.replace.bytes_after
                        stats.compaction_records_removed += done.records_before - done.records_after
                except Exception:
                    # Retry once more segments are sealed, not on every pass (no log flood).
                    state.cleaned_until = job.sealed[-1].next_offset
                    raise
                finally:
                    job.release()
            except Exception:
                stats.compaction_failures += 1
                log.exception("compaction of %s/%d failed", topic.name, index)
    for key in set(states) - live:
        del states[key]


def _ensure_default_topic(opened: Any, config: BrokerConfig) -> None:
    try:
        opened.topic(config.default_topic)
    except storage_errors.UnknownTopicError:
        opened.create_topic(config.default_topic, config.partitions)
        log.info("created default topic %r with %d partitions", config.default_topic, config.partitions)


def _site_port(runner: web.AppRunner) -> int:
    address = runner.addresses[0]
    return int(address[1])


def _report_ready(config: BrokerConfig, ports: dict[str, int]) -> None:
    report = {
        "event": "ready",
        "pid": os.getpid(),
        "host": config.host,
        "producer_port": ports["producer"],
        "consumer_port": ports["consumer"],
        "metrics_port": ports["metrics"],
        "data_dir": str(config.data_dir),
    }
    line = json.dumps(report)
    if config.ports_file is not None:
        path = Path(config.ports_file)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(line + "\n")
        os.replace(temporary, path)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run(config: BrokerConfig) -> None:
    """Blocking entry point used by ``rustmq broker``: uvloop when installed and not disabled."""
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    eventloop.run(serve(config), uvloop_wanted=config.uvloop)
