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
from pathlib import Path
from typing import Any

from aiohttp import web

from rustmq.admin.app import AdminState, make_admin_app
from rustmq.config import BrokerConfig
from rustmq.coordination.service import Coordinator
from rustmq.server import coordination_handlers
from rustmq.server.broker import Broker
from rustmq.server.listener import Listener
from rustmq.server.stats import BrokerStats
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
    state = AdminState(stats=stats)
    runner = web.AppRunner(make_admin_app(state), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.metrics_port, reuse_address=True)
    await site.start()
    metrics_port = _site_port(runner)
    log.info("admin port listening on %s:%d", config.host, metrics_port)

    config.data_dir.mkdir(parents=True, exist_ok=True)
    opened = await asyncio.to_thread(storage_log.Log.open, config.data_dir, config.log_config())
    committer = durability.GroupCommitter(max_wait_ms=config.group_commit_ms)
    listener: Listener | None = None
    coordinator: Coordinator | None = None
    coordination: coordination_handlers.CoordinationService | None = None
    try:
        settings = config.server_settings()
        broker = Broker(opened, committer, settings, stats)
        # Groups, offsets, queues, producer ids (issue 4): journals under <data_dir>/coordination.
        coordinator = Coordinator.open(config.data_dir, opened, incarnation=secrets.token_hex(4))
        coordination = broker.coordination = coordination_handlers.CoordinationService(broker, coordinator)
        coordination.reschedule()
        _ensure_default_topic(opened, config)
        listener = Listener(broker)
        ports = await listener.start()
        broker.ports["metrics"] = metrics_port
        state.broker = broker
        state.ready = True
        _report_ready(config, {**ports, "metrics": metrics_port})
        retention = asyncio.get_running_loop().create_task(_enforce_retention(opened, config.retention_check_s))
        await stop.wait()
        retention.cancel()
        log.info("shutting down")
        state.ready = False
        if coordination is not None:
            coordination.begin_drain()
        await listener.shutdown()
    finally:
        state.ready = False
        if coordination is not None:
            coordination.close()
        committer.close()
        if coordinator is not None:
            coordinator.close(True)
        await asyncio.to_thread(opened.close, True)
        await runner.cleanup()
        log.info("stopped cleanly")


async def _enforce_retention(opened: Any, interval_s: float) -> None:
    """Delete expired segments every interval_s, on the loop thread (the log's owner thread)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            deleted = opened.enforce_retention(int(time.time() * 1000))
        except Exception:
            log.exception("retention check failed")
            continue
        if deleted:
            log.info("retention deleted %d segment(s)", deleted)


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
    """Blocking entry point used by ``rustmq broker``; the only place that may pick uvloop."""
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if config.uvloop:
        import uvloop

        uvloop.run(serve(config))
    else:
        asyncio.run(serve(config))
