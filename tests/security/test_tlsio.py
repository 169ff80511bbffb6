"""rustmq.tlsio, the TLS transport that runs OpenSSL on a thread per connection, over real
loopback sockets with certificates made here: data both ways intact, bounded reading while the
protocol is paused and pause_writing for a peer that does not read, close() flushing before the
close, abort(), the principal's certificate, and handshakes that fail or never finish."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rustmq import tlsio
from tlspki import Authority


@dataclass
class Contexts:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> Contexts:
    root = tmp_path_factory.mktemp("tlsio-pki")
    ca = Authority("tlsio test CA")
    server, client = ca.issue("localhost", server=True), ca.issue("app", server=False)
    for name, data in (("ca.crt", ca.pem), ("server.crt", server.cert), ("server.key", server.key),
                       ("client.crt", client.cert), ("client.key", client.key)):
        (root / name).write_bytes(data)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(root / "server.crt", root / "server.key")
    server_context.load_verify_locations(cafile=root / "ca.crt")
    server_context.verify_mode = ssl.CERT_OPTIONAL
    client_context = ssl.create_default_context(cafile=str(root / "ca.crt"))
    client_context.load_cert_chain(root / "client.crt", root / "client.key")
    return Contexts(server_context, client_context)


class Recorder(asyncio.BufferedProtocol):
    """Keeps what it receives; pauses reading when told to."""

    def __init__(self, *, paused: bool = False) -> None:
        self.buffer = bytearray(64 << 10)
        self.received = bytearray()
        self.transport: asyncio.Transport | None = None
        self.start_paused = paused
        self.eof = asyncio.Event()
        self.arrived = asyncio.Event()
        self.lost = asyncio.get_running_loop().create_future()
        self.pauses = 0
        self.resumes = 0
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.start_paused:
            transport.pause_reading()  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self.received += self.buffer[:nbytes]
        self.arrived.set()

    def eof_received(self) -> bool:
        self.eof.set()
        return False

    def pause_writing(self) -> None:
        self.pauses += 1
        self.writable.clear()

    def resume_writing(self) -> None:
        self.resumes += 1
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    async def until(self, size: int, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while len(self.received) < size:
                self.arrived.clear()
                await self.arrived.wait()


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    try:
        yield server
    finally:
        server.close()


async def pair(listening: socket.socket, contexts: Contexts, *, server_paused: bool = False,
               ) -> tuple[tlsio.ThreadedTlsTransport, Recorder, tlsio.ThreadedTlsTransport, Recorder]:
    loop = asyncio.get_running_loop()
    port = listening.getsockname()[1]

    async def serve() -> tuple[tlsio.ThreadedTlsTransport, asyncio.BaseProtocol]:
        sock, _ = await loop.sock_accept(listening)
        return await tlsio.start_tls_thread(sock, contexts.server, lambda: Recorder(paused=server_paused), server_side=True)

    (server_transport, server), (client_transport, client) = await asyncio.gather(
        serve(), tlsio.open_tls_connection("127.0.0.1", port, contexts.client, Recorder, server_hostname="localhost"))
    return server_transport, server, client_transport, client  # type: ignore[return-value]


async def test_data_crosses_both_ways_intact_and_the_peer_certificate_is_seen(
        listening: socket.socket, contexts: Contexts) -> None:
    server_transport, server, client_transport, client = await pair(listening, contexts)
    assert server_transport.get_extra_info("peercert")["subject"] == ((("commonName", "app"),),)
    assert server_transport.get_extra_info("peername")[0] == "127.0.0.1"
    payload = os.urandom(3 << 20)
    view = memoryview(payload)
    for start in range(0, len(payload), 300_000):  # bytes, views and a bytearray the caller reuses
        client_transport.write(view[start : start + 300_000])
    scratch = bytearray(b"tail")
    client_transport.write(scratch)
    scratch[:] = b"XXXX"
    await server.until(len(payload) + 4)
    assert hashlib.sha256(server.received).digest() == hashlib.sha256(payload + b"tail").digest()
    server_transport.writelines([b"a" * 10, b"b" * 20_000, payload[:1000]])
    await client.until(21_000)
    assert client.received == b"a" * 10 + b"b" * 20_000 + payload[:1000]
    client_transport.close()
    await asyncio.wait_for(server.eof.wait(), 10)
    assert await asyncio.wait_for(server.lost, 10) is None
    assert await asyncio.wait_for(client.lost, 10) is None


async def test_a_paused_protocol_bounds_what_is_read_and_the_writer_is_paused(
        listening: socket.socket, contexts: Contexts) -> None:
    server_transport, server, client_transport, client = await pair(listening, contexts, server_paused=True)
    client_transport.set_write_buffer_limits(high=1 << 20)
    sent = 0
    block = os.urandom(256 << 10)
    while client.writable.is_set() and sent < 256 << 20:
        client_transport.write(block)
        sent += len(block)
        await asyncio.sleep(0)
    assert client.pauses == 1, "a peer that reads nothing must pause the writer"
    await asyncio.sleep(0.5)
    # The paused side has read at most its chunks ahead; the rest waits in the kernel and TCP.
    assert server.received == b""
    assert server_transport._chunks_made <= tlsio.CHUNKS
    assert client_transport.get_write_buffer_size() <= sent
    server_transport.resume_reading()
    await server.until(sent, timeout=60)
    assert await asyncio.wait_for(client.writable.wait(), 10) is True
    assert client.resumes == 1
    assert client_transport.get_write_buffer_size() == 0
    assert len(server.received) == sent
    client_transport.abort()
    server_transport.abort()
    await asyncio.wait_for(asyncio.gather(server.lost, client.lost), 10)


async def test_close_sends_what_is_queued_and_abort_does_not_wait(
        listening: socket.socket, contexts: Contexts) -> None:
    server_transport, server, client_transport, client = await pair(listening, contexts)
    data = os.urandom(5 << 20)
    server_transport.write(data)
    server_transport.close()
    assert server_transport.is_closing()
    server_transport.write(b"ignored after close")
    await client.until(len(data))
    await asyncio.wait_for(client.eof.wait(), 10)
    assert bytes(client.received) == data
    assert await asyncio.wait_for(server.lost, 10) is None
    assert await asyncio.wait_for(client.lost, 10) is None  # the client closed on the EOF

    server_transport, server, client_transport, client = await pair(listening, contexts, server_paused=True)
    client_transport.write(os.urandom(8 << 20))  # more than the paused server and TCP take
    await asyncio.sleep(0.2)
    assert client_transport.get_write_buffer_size() > 0
    client_transport.abort()
    assert await asyncio.wait_for(client.lost, 5) is None
    assert client_transport._thread is not None
    client_transport._thread.join(5)
    assert not client_transport._thread.is_alive()
    server_transport.resume_reading()
    await asyncio.wait_for(server.lost, 10)  # the server sees the connection end (reset or EOF)


async def test_a_handshake_that_never_finishes_times_out(listening: socket.socket, contexts: Contexts) -> None:
    loop = asyncio.get_running_loop()
    silent = socket.create_connection(listening.getsockname())
    try:
        sock, _ = await loop.sock_accept(listening)
        with pytest.raises(TimeoutError, match="did not finish within 0.3 s"):
            await tlsio.start_tls_thread(sock, contexts.server, Recorder, server_side=True, handshake_timeout=0.3)
        silent.settimeout(5)
        assert silent.recv(100) == b""  # the server closed it
    finally:
        silent.close()


async def test_a_plaintext_peer_fails_the_handshake_and_sees_a_close(
        listening: socket.socket, contexts: Contexts) -> None:
    loop = asyncio.get_running_loop()
    plain = socket.create_connection(listening.getsockname())
    try:
        plain.sendall(b"\x00\x00\x00\x10" + b"not a TLS hello!")
        sock, _ = await loop.sock_accept(listening)
        with pytest.raises(ssl.SSLError):
            await tlsio.start_tls_thread(sock, contexts.server, Recorder, server_side=True)
        plain.settimeout(5)
        assert plain.recv(100) == b""  # a close, not a reset: the request was read and dropped
    finally:
        plain.close()


async def test_an_untrusted_server_is_refused_by_the_client(listening: socket.socket, contexts: Contexts,
                                                            tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    other = Authority("someone else")
    (tmp_path / "other.crt").write_bytes(other.pem)
    stranger = ssl.create_default_context(cafile=str(tmp_path / "other.crt"))
    accepted = loop.create_task(loop.sock_accept(listening))
    client = loop.create_task(tlsio.open_tls_connection(
        "127.0.0.1", listening.getsockname()[1], stranger, Recorder, server_hostname="localhost"))
    sock, _ = await accepted
    server = loop.create_task(tlsio.start_tls_thread(sock, contexts.server, Recorder, server_side=True))
    with pytest.raises(ssl.SSLCertVerificationError):
        await client
    with pytest.raises((ssl.SSLError, OSError)):
        await server
