"""The producer and consumer listeners, the connection registry and graceful shutdown.

Both ports speak the full protocol; the producer port also accepts seed-style simple produce
messages. With TLS settings both ports speak TLS only (server.tls: certificates from files,
reloaded on change for new connections without touching open ones). Shutdown (SIGTERM) closes
the listening sockets first, then lets every connection finish the requests it has already
read (durable acks included; long-poll fetches answer with what they have), flushes their
output and closes them, all within ``shutdown_timeout_s``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
import time

from rustmq import tlsio
from rustmq.server.broker import Broker
from rustmq.server.connection import Connection, build_router
from rustmq.server.tls import ReloadingContext, TlsSettings

log = logging.getLogger(__name__)


class Listener:
    """Both TCP listeners of one broker and the set of their open connections."""

    def __init__(self, broker: Broker, tls: TlsSettings | ReloadingContext | None = None) -> None:
        self._broker = broker
        self.tls = ReloadingContext(tls) if isinstance(tls, TlsSettings) else tls
        self._tls_watch: asyncio.Task[None] | None = None
        self._settings = broker.settings
        self._servers: dict[str, asyncio.Server | _TlsPort] = {}
        self._connections: set[Connection] = set()
        self._drained: asyncio.Event | None = None
        self._sweep_timer: asyncio.TimerHandle | None = None
        self.router = build_router(broker)  # rebuilt in start(): the coordination service may come later

    async def start(self) -> dict[str, int]:
        """Bind both ports (0 picks a free one) and return the bound port numbers by name."""
        loop = asyncio.get_running_loop()
        self.router = build_router(self._broker)
        ports = {}
        for name, port, accept_simple in (
            ("producer", self._settings.producer_port, True),
            ("consumer", self._settings.consumer_port, False),
        ):
            if self.tls is not None:
                server: asyncio.Server | _TlsPort = _TlsPort(self, self._settings.host, port, accept_simple)
            else:
                server = await loop.create_server(
                    functools.partial(Connection, self, self._broker, accept_simple),
                    host=self._settings.host,
                    port=port,
                    reuse_address=True,
                    backlog=512,
                )
            self._servers[name] = server
            ports[name] = _bound_port(server)
            log.info("%s port listening on %s:%d%s", name, self._settings.host, ports[name],
                     " (TLS)" if self.tls is not None else "")
        if self.tls is not None:
            self._tls_watch = loop.create_task(self.tls.watch(), name="tls-reload")
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
        if self._tls_watch is not None:
            self._tls_watch.cancel()
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


class _TlsConnection(Connection):
    """TLS has no half-close: the TLS transport closes after the peer's EOF whatever
    eof_received answers (asyncio warns when it is asked to keep it open)."""

    def eof_received(self) -> bool:
        super().eof_received()
        return False


class _TlsPort:
    """A TLS port, shaped like the asyncio.Server of a plain one (``sockets``, ``close``,
    ``wait_closed``).

    It accepts TCP connections itself and hands each to ``tlsio.start_tls_thread`` (or, with
    ``tls_io: loop``, ``connect_accepted_socket``) with the context current at that moment,
    which does the handshake and raises when it fails: so a
    reloaded certificate applies to every later connection, and a refused client (no
    certificate, an untrusted one, a plaintext client that never sends a ClientHello) is logged
    with its address instead of vanishing inside the event loop."""

    def __init__(self, listener: Listener, host: str, port: int, accept_simple: bool) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, backlog=512)
        self._sock.setblocking(False)
        self.sockets = (self._sock,)
        self._listener = listener
        self._accept_simple = accept_simple
        self._handshakes: set[asyncio.Task[None]] = set()
        self._accepting = asyncio.get_running_loop().create_task(self._accept(), name=f"tls-accept-{port}")

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, address = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and friends: keep the port, try again shortly
                log.error("accepting a TLS connection failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if len(self._handshakes) >= self._listener._settings.max_connections:
                # Handshakes in progress are not connections yet; bound them by the same limit
                # so a flood of silent clients cannot pile up until their handshake timeout.
                self._listener.tls.handshake_failures += 1  # type: ignore[union-attr]
                client.close()
                continue
            task = loop.create_task(self._handshake(client, address))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, client: socket.socket, address: object) -> None:
        listener = self._listener
        assert listener.tls is not None
        try:
            if listener.tls.settings.io == "threads":
                await tlsio.start_tls_thread(
                    client, listener.tls.current,
                    lambda: _TlsConnection(listener, listener._broker, self._accept_simple),
                    server_side=True, handshake_timeout=listener.tls.settings.handshake_timeout_s)
            else:
                await asyncio.get_running_loop().connect_accepted_socket(
                    lambda: _TlsConnection(listener, listener._broker, self._accept_simple),
                    client,
                    ssl=listener.tls.current,
                    ssl_handshake_timeout=listener.tls.settings.handshake_timeout_s,
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            listener.tls.handshake_failures += 1
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            if isinstance(exc, ConnectionResetError):
                reason = "the client gave up during the handshake (does it trust this broker's certificate?)"
            log.warning("TLS handshake with %s failed: %s", _address(address), reason)
            if listener.tls.settings.io != "threads":
                client.close()  # (rustmq.tlsio owns the socket from the start and has closed it)

    def close(self) -> None:
        self._accepting.cancel()
        for task in list(self._handshakes):
            task.cancel()
        self._sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(self._accepting, *self._handshakes, return_exceptions=True)


def _address(peer: object) -> str:
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


def _bound_port(server: asyncio.Server | _TlsPort) -> int:
    for sock in server.sockets:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return int(sock.getsockname()[1])
    raise RuntimeError("listener has no inet socket")
