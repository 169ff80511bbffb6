"""The producer and consumer listeners, the connection registry and graceful shutdown.

Both ports speak the full protocol; the producer port also accepts seed-style simple produce
messages. Shutdown (SIGTERM) closes the listening sockets first, then lets every connection
finish the requests it has already read (durable acks included; long-poll fetches answer with
what they have), flushes their output and closes them, all within ``shutdown_timeout_s``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time

from rustmq.server.broker import Broker
from rustmq.server.connection import Connection

log = logging.getLogger(__name__)


class Listener:
    """Both TCP listeners of one broker and the set of their open connections."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._settings = broker.settings
        self._servers: dict[str, asyncio.Server] = {}
        self._connections: set[Connection] = set()
        self._drained: asyncio.Event | None = None
        self._sweep_timer: asyncio.TimerHandle | None = None

    async def start(self) -> dict[str, int]:
        """Bind both ports (0 picks a free one) and return the bound port numbers by name."""
        loop = asyncio.get_running_loop()
        ports = {}
        for name, port, accept_simple in (
            ("producer", self._settings.producer_port, True),
            ("consumer", self._settings.consumer_port, False),
        ):
            server = await loop.create_server(
                functools.partial(Connection, self, self._broker, accept_simple),
                host=self._settings.host,
                port=port,
                reuse_address=True,
                backlog=512,
            )
            self._servers[name] = server
            ports[name] = _bound_port(server)
            log.info("%s port listening on %s:%d", name, self._settings.host, ports[name])
        self._broker.ports.update(ports)
        self._schedule_sweep()
        return ports

    def _schedule_sweep(self) -> None:
        interval = min(1.0, max(0.05, self._settings.idle_timeout_s / 4))
        self._sweep_timer = asyncio.get_running_loop().call_later(interval, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for idle_timeout_s; quiet ones give back their read buffer.
        One timer for all connections instead of one per connection."""
        now = time.monotonic()
        for connection in list(self._connections):
            connection.check_idle(now)
        self._schedule_sweep()

    def register(self, connection: Connection) -> bool:
        if len(self._connections) >= self._settings.max_connections:
            return False
        self._connections.add(connection)
        return True

    def unregister(self, connection: Connection) -> bool:
        if connection in self._connections:
            self._connections.discard(connection)
            self.maybe_drained(connection)
            return True
        return False

    def maybe_drained(self, connection: Connection) -> None:
        if self._drained is not None and all(conn.idle for conn in self._connections):
            self._drained.set()

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def shutdown(self) -> None:
        """Stop accepting, finish in-flight requests (bounded by shutdown_timeout_s), close."""
        for server in self._servers.values():
            server.close()
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
        self._drained = asyncio.Event()
        for connection in list(self._connections):
            connection.begin_drain()
        self._broker.wake_all()
        self.maybe_drained(next(iter(self._connections), None))  # type: ignore[arg-type]
        try:
            await asyncio.wait_for(self._drained.wait(), self._settings.shutdown_timeout_s)
        except TimeoutError:
            busy = sum(1 for conn in self._connections if not conn.idle)
            log.warning("shutdown: %d connections still had requests in flight after %.1f s", busy, self._settings.shutdown_timeout_s)
        for connection in list(self._connections):
            connection.close()
        for server in self._servers.values():
            await server.wait_closed()
        # Give the transports one loop pass to hand their buffered output to the kernel.
        await asyncio.sleep(0)


def _bound_port(server: asyncio.Server) -> int:
    for sock in server.sockets:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return int(sock.getsockname()[1])
    raise RuntimeError("listener has no inet socket")
