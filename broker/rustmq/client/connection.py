"""One client connection: pipelined requests matched to responses by correlation id.

Requests are written immediately (many may be in flight); the broker answers in order, and
each response resolves the future of its correlation id. ``drain()`` waits while the socket's
write buffer is above its high-water mark, so a producer that outruns the broker slows down
instead of buffering without bound. Closing (or losing) the connection fails every pending
future with ConnectionClosedError.

TLS: ``open(..., ssl=context)`` speaks TLS on that connection; without it, the process-wide
default set by ``use_tls(context)`` applies (the CLI sets it from its --tls flags, and every
Producer, Consumer, Admin, group and queue client opens its connections here, so one call
makes all of them speak TLS). ``tls_context`` builds a client context that checks the broker's
certificate against a CA file and presents a client certificate for mutual TLS.

Tokens: ``open(..., token=...)``, or the process-wide ``use_token(token)``, or the environment
(``RUSTMQ_TOKEN``, or ``RUSTMQ_TOKEN_FILE`` naming a file that holds it) make every connection
send AUTHENTICATE right after connecting, before anything else; a refused token closes the
connection and raises BrokerError(AUTHENTICATION_FAILED). ``Connection.principal`` is who the
broker says the connection is.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import ssl as ssl_module
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, cast

from rustmq import tlsio
from rustmq.client.errors import BrokerError, ConnectionClosedError
from rustmq.protocol import frames
from rustmq.protocol.api import MAX_CORRELATION_ID, ApiKey, ErrorCode

MAX_RESPONSE_BYTES = 1 << 30
_MIN_READ = 256 << 10


_default_ssl: ssl_module.SSLContext | Callable[[], ssl_module.SSLContext] | None = None
_default_server_name: str | None = None
_default_token: str | Callable[[], str] | None = None


def use_token(token: str | Callable[[], str] | None) -> None:
    """Make every connection this process opens without an explicit ``token`` authenticate with
    this one (``<principal>:<secret>``), or with what the callable returns at each connect (a
    broker re-reading its token file); None: back to the environment's."""
    global _default_token
    _default_token = token


def default_token() -> str | None:
    """use_token's token, else $RUSTMQ_TOKEN, else the content of the file $RUSTMQ_TOKEN_FILE."""
    if _default_token is not None:
        return _default_token() if callable(_default_token) else _default_token
    token = os.environ.get("RUSTMQ_TOKEN")
    if token:
        return token.strip()
    path = os.environ.get("RUSTMQ_TOKEN_FILE")
    if path:
        with open(path) as file:
            return file.read().strip()
    return None


def use_tls(
    context: ssl_module.SSLContext | Callable[[], ssl_module.SSLContext] | None,
    *,
    server_hostname: str | None = None,
) -> None:
    """Make every connection this process opens without an explicit ``ssl`` speak TLS with
    ``context`` (None: plaintext again), or with what the callable returns at each connect (a
    broker's reloaded peer context). ``server_hostname``: the name the broker's certificate is
    checked for, when it is not the host dialled (an IP address, a port-forward)."""
    global _default_ssl, _default_server_name
    _default_ssl, _default_server_name = context, server_hostname


def default_tls() -> tuple[ssl_module.SSLContext | None, str | None]:
    """The process-wide TLS context and server name of ``use_tls`` (for raw streams)."""
    context = _default_ssl() if callable(_default_ssl) else _default_ssl
    return context, _default_server_name if context is not None else None


def tls_io() -> str:
    """Which TLS transport connections use: ``threads`` (the default; rustmq.tlsio, OpenSSL on a
    thread per connection, which takes the cipher and its copies off the event loop) or
    ``loop`` (the event loop's own TLS transport), from $RUSTMQ_TLS_IO."""
    chosen = os.environ.get("RUSTMQ_TLS_IO", "threads")
    if chosen not in ("threads", "loop"):
        raise ValueError(f"RUSTMQ_TLS_IO must be 'threads' or 'loop', not {chosen!r}")
    return chosen


def tls_context(
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
    *,
    check_hostname: bool = True,
) -> ssl_module.SSLContext:
    """A client context: the broker's certificate is checked against ``ca_file`` (the system's
    CAs when None) and, with ``check_hostname``, against the host dialled; ``cert_file`` and
    ``key_file`` are the client certificate presented for mutual TLS."""
    context = ssl_module.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl_module.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname
    if cert_file is not None:
        context.load_cert_chain(str(cert_file), str(key_file) if key_file is not None else None)
    return context


class Response(NamedTuple):
    header: dict[str, Any]
    payload: bytes | memoryview


def parse_address(address: str, default_port: int = 9092) -> tuple[str, int]:
    """'host:port', 'host' or ':port' (IPv6 as '[::1]:9092') to (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or "]" in port:
        host, port = address, str(default_port)
    host = host.strip("[]") or "localhost"
    return host, int(port)


class _Protocol(asyncio.BufferedProtocol):
    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._buf = bytearray(_MIN_READ * 4)
        self._rpos = 0
        self._wpos = 0
        self._frame_need = 0
        self._big: bytearray | None = None  # a large frame is received into its own buffer
        self._big_filled = 0
        self._big_length = 0
        self._spares: list[bytearray] = []  # large-frame buffers, reused once nothing views them

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big is not None:
            return memoryview(self._big)[self._big_filled : self._big_length]
        if len(self._buf) - self._wpos < _MIN_READ:
            unread = self._wpos - self._rpos
            if unread + _MIN_READ > len(self._buf):
                fresh = bytearray(max(len(self._buf) * 2, unread + _MIN_READ))
                fresh[:unread] = memoryview(self._buf)[self._rpos : self._wpos]
                self._buf = fresh
            else:
                self._buf[:unread] = self._buf[self._rpos : self._wpos]
            self._rpos, self._wpos = 0, unread
        return memoryview(self._buf)[self._wpos :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._big is not None:
            self._big_filled += nbytes
            if self._big_filled == self._big_length:
                body, self._big = self._big, None
                self._connection._on_frame(memoryview(body)[: self._big_length], owned=True)
            return
        self._wpos += nbytes
        buf = self._buf
        while self._wpos - self._rpos >= frames.LENGTH_SIZE:
            (length,) = frames.LENGTH.unpack_from(buf, self._rpos)
            if length > MAX_RESPONSE_BYTES:
                self._connection._abort(ConnectionClosedError(f"response frame of {length} bytes is too large"))
                return
            start = self._rpos + frames.LENGTH_SIZE
            end = start + length
            if end > self._wpos:
                if length > _MIN_READ:
                    # Receive the rest straight into a buffer the response can keep (no copy).
                    big = self._large_buffer(length)
                    have = self._wpos - start
                    big[:have] = memoryview(buf)[start : self._wpos]
                    self._big, self._big_filled, self._big_length = big, have, length
                    self._rpos = self._wpos = 0
                break
            self._rpos = end
            self._connection._on_frame(memoryview(buf)[start:end], owned=False)
        if self._rpos == self._wpos:
            self._rpos = self._wpos = 0

    def _large_buffer(self, length: int) -> bytearray:
        # Hazard: a response payload is a view of its buffer. A spare is reused only when no
        # view of it is alive: its references are then exactly the list, the loop variable and
        # getrefcount's argument. Reuse spares the page faults of a fresh multi-MiB buffer.
        for spare in self._spares:
            if len(spare) >= length and sys.getrefcount(spare) == 3:
                return spare
        fresh = bytearray(length)
        self._spares = [*self._spares[-2:], fresh]
        return fresh

    def pause_writing(self) -> None:
        self._connection._write_paused()

    def resume_writing(self) -> None:
        self._connection._write_resumed()

    def connection_lost(self, exc: Exception | None) -> None:
        lost = self._connection._lost
        if lost is not None and not lost.done():
            lost.set_result(None)
        if isinstance(exc, ssl_module.SSLError):
            # TLS 1.3: a broker that refuses the client certificate says so after the client
            # finished its handshake, in an alert that arrives on the first read.
            self._connection._abort(ConnectionClosedError(f"connection lost: {_tls_reason(exc)}"))
            return
        closed = exc is None or isinstance(exc, (ConnectionResetError, BrokenPipeError))
        if closed and self._connection._tls and not self._connection._answered:
            # The alert is often not surfaced (a plain close, or a reset when our request
            # crossed it): say what a close before any answer means on a TLS connection.
            self._connection._abort(ConnectionClosedError(
                "the broker closed the TLS connection before answering: it requires a client "
                "certificate (--tls-cert, --tls-key) or refused the one presented (not signed "
                "by a CA it trusts); its log says which"))
            return
        if closed and not self._connection._tls and not self._connection._answered:
            self._connection._abort(ConnectionClosedError(
                "connection closed by the broker before answering (if this port speaks TLS, "
                "use --tls and --tls-ca, or tls_context() in the library)"))
            return
        self._connection._abort(ConnectionClosedError(f"connection lost: {exc}" if exc else "connection closed by the broker"))


class Connection:
    """A connection to one broker port; use ``await Connection.open(host, port)``."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future[Response]] = {}
        self._ids = itertools.count(1)
        self._drain_waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._closed: BaseException | None = None
        self._tls = False
        self._answered = False  # a frame came back (a TLS close before that is a refusal)
        self.unsolicited_errors: list[dict[str, Any]] = []  # error responses nobody waited for
        self.principal: str | None = None  # set once AUTHENTICATE succeeded
        self._lost: asyncio.Future[None] | None = None  # done once the transport is gone

    @classmethod
    async def open(
        cls, host: str, port: int, *, timeout: float = 10.0, ssl: ssl_module.SSLContext | None = None,
        token: str | None = None,
    ) -> Connection:
        connection = cls()
        loop = asyncio.get_running_loop()
        extra: dict[str, Any] = {}
        if ssl is not None:
            context: ssl_module.SSLContext | None = ssl
        else:
            context, name = default_tls()
            if name:
                extra["server_hostname"] = name
        transport: asyncio.BaseTransport
        try:
            if context is not None and tls_io() == "threads":
                transport, _ = await asyncio.wait_for(tlsio.open_tls_connection(
                    host, port, context, lambda: _Protocol(connection), server_hostname=extra.get("server_hostname"),
                    handshake_timeout=timeout), timeout)
            else:
                transport, _ = await asyncio.wait_for(
                    loop.create_connection(lambda: _Protocol(connection), host, port, ssl=context, **extra), timeout
                )
        except ssl_module.SSLError as exc:
            raise ConnectionClosedError(f"TLS handshake with {host}:{port} failed: {_tls_reason(exc)}") from exc
        cast(asyncio.Transport, transport).set_write_buffer_limits(high=8 << 20)
        connection._lost = loop.create_future()
        connection._tls = context is not None
        connection._transport = cast(asyncio.Transport, transport)
        token = token if token is not None else default_token()
        if token:
            try:
                response = await connection.request({"api": ApiKey.AUTHENTICATE, "mechanism": "token", "token": token},
                                                    timeout=timeout)
            except BaseException:
                connection.close()
                await connection.wait_closed(timeout)
                raise
            connection.principal = response.header.get("principal")
        return connection

    async def wait_closed(self, timeout: float = 5.0) -> None:
        """Wait until the transport is gone (a TLS close waits for the broker's close_notify),
        at most ``timeout`` seconds; call after close()."""
        if self._lost is not None and not self._lost.done():
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self._lost)
            except TimeoutError:
                # The peer never finished the close (no TLS close_notify): drop the socket now,
                # or the transport outlives this connection unclosed.
                if self._transport is not None:
                    self._transport.abort()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def send(self, header: dict[str, Any], payload: bytes | memoryview = b"", *, expect_response: bool = True) -> asyncio.Future[Response] | None:
        """Write one request now; the future resolves to the raw response (errors included)."""
        if self._closed is not None:
            raise ConnectionClosedError(str(self._closed))
        corr = next(self._ids) & MAX_CORRELATION_ID
        header["corr"] = corr
        prefix = frames.encode_prefix(header, len(payload))
        assert self._transport is not None
        future: asyncio.Future[Response] | None = None
        if expect_response:
            future = asyncio.get_running_loop().create_future()
            self._pending[corr] = future
        if len(payload) < 64 << 10:
            self._transport.write(prefix + payload if payload else prefix)
        else:
            self._transport.write(prefix)
            self._transport.write(payload)
        return future

    async def request(self, header: dict[str, Any], payload: bytes | memoryview = b"", *, timeout: float | None = 30.0) -> Response:
        """Send a request and wait for its response; BrokerError if the broker reports an error."""
        future = self.send(header, payload)
        assert future is not None
        return check(await response_within(future, timeout))

    async def drain(self) -> None:
        """Wait while the socket write buffer is above its high-water mark."""
        if self._closed is not None:
            raise ConnectionClosedError(str(self._closed))
        if not self._paused:
            return
        if self._drain_waiter is None or self._drain_waiter.done():
            self._drain_waiter = asyncio.get_running_loop().create_future()
        await self._drain_waiter
        if self._closed is not None:
            raise ConnectionClosedError(str(self._closed))

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        self._abort(ConnectionClosedError("connection closed"))

    # -- protocol callbacks ------------------------------------------------------------------

    def _on_frame(self, body: memoryview, owned: bool) -> None:
        self._answered = True
        try:
            header, payload = frames.decode_body(body)
        except frames.FrameError as exc:
            self._abort(ConnectionClosedError(f"broker sent an unreadable frame: {exc}"))
            return
        corr = header.get("corr")
        if isinstance(corr, int):
            future = self._pending.pop(corr, None)
        elif header.get("error") and self._pending:
            # The broker could not read that request's correlation id (e.g. a header map with a
            # non-string key) and answered with corr nil. Responses come in request order, so it
            # is the answer to the oldest request still waiting; without this, that request
            # would wait out its whole timeout.
            future = self._pending.pop(next(iter(self._pending)))
        else:
            future = None
        if future is None:
            if header.get("error"):
                self.unsolicited_errors.append(header)
            return
        if not future.done():
            future.set_result(Response(header, payload if owned else bytes(payload)))

    def _write_paused(self) -> None:
        self._paused = True

    def _write_resumed(self) -> None:
        self._paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def _abort(self, error: BaseException) -> None:
        if self._closed is None:
            self._closed = error
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)  # drain() re-checks _closed after waking
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()


def _tls_reason(exc: ssl_module.SSLError) -> str:
    if isinstance(exc, ssl_module.SSLCertVerificationError):
        return f"the broker's certificate is not trusted ({exc.verify_message}); check the CA file (--tls-ca)"
    text = str(exc)
    if "CERTIFICATE_REQUIRED" in text:
        return f"the broker requires a client certificate (--tls-cert, --tls-key) ({exc.reason})"
    if "UNKNOWN_CA" in text or "BAD_CERTIFICATE" in text or "CERTIFICATE_UNKNOWN" in text:
        return f"the broker refused the client certificate: it is not signed by a CA the broker trusts ({exc.reason})"
    if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
        return f"the broker does not speak TLS on this port ({exc.reason})"
    return str(exc.reason or exc)


async def response_within(future: asyncio.Future[Response], timeout: float | None) -> Response:
    """Await a response future, raising TimeoutError after `timeout` seconds (None: no limit).

    Not asyncio.wait_for: on Python 3.11 a task cancelled in the same loop pass in which the
    awaited future completes gets the result and loses the cancellation, so a loop such as the
    group heartbeat (whose held response is released by the rebalance that close() starts) would
    never stop. asyncio.timeout() keeps the cancellation.
    """
    async with asyncio.timeout(timeout):
        return await future


def check(response: Response) -> Response:
    code = response.header.get("error", 0)
    if code:
        raise BrokerError(code, str(response.header.get("message", "")))
    return response


def error_code(header: dict[str, Any]) -> ErrorCode | int:
    code = header.get("error", 0)
    try:
        return ErrorCode(code)
    except ValueError:
        return int(code)
