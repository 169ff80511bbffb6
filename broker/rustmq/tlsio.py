"""TLS connections whose OpenSSL work runs on a thread of their own, for the broker and the client.

Why: asyncio's and uvloop's TLS transports run OpenSSL inside the event loop over memory BIOs.
Every byte is then copied from the socket into a BIO (which zeroes its new space first), read
back by OpenSSL, and on the way out encrypted into a BIO and copied out again into a bytes
object: measured on the broker, those copies and the per-record Python calls cost as much CPU
as the cipher, all of it on the one thread that also runs the broker (docs/benchmarks.md, TLS).
Here each connection has a worker thread that drives an ``ssl.SSLSocket`` over the real socket
(OpenSSL's socket BIO: the kernel copies straight into OpenSSL's record buffer, and encrypted
records go straight to the kernel), with the GIL released while OpenSSL encrypts, decrypts and
waits. The event loop sees an ordinary ``asyncio.Transport``; the thread hands it plaintext in
chunks of up to CHUNK_BYTES (one loop call per chunk, not per 16 KiB record) and takes the
loop's writes, fetch answers' memoryviews of the log included, without copying them.

Shape of one connection: the loop thread owns the protocol and every protocol callback; the
worker owns the SSLSocket (an SSL object must not be used by two threads at once, so reading and
writing both happen on the worker, over a non-blocking socket and ``poll``). They share only a
few fields under ``_lock``: the output queue, the wanted reading state, the closing flags and
the free read chunks. The loop wakes the worker through an eventfd (a pipe where there is none);
the worker reaches the loop with ``call_soon_threadsafe``.

Bounds: at most CHUNKS read chunks of CHUNK_BYTES per connection (allocated at the first read,
dropped after IDLE_RELEASE_S quiet), which is also all the plaintext read ahead of the protocol:
when the protocol pauses reading, the worker stops reading once its chunks are full and TCP flow
control holds the peer. Output is bounded as asyncio's is: ``pause_writing`` above the high-water
mark, ``resume_writing`` once the worker has sent down to the low-water mark.

The handshake runs on the worker too, bounded by a deadline the loop enforces (it shuts the
socket down, which ends any blocking call); ``start_tls_thread`` raises its error (ssl.SSLError,
OSError, TimeoutError) so the caller can log or report it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import select
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

CHUNK_BYTES = 256 << 10  # plaintext handed to the loop per call, at most
CHUNKS = 2  # read chunks per connection: the worker fills one while the loop copies the other
IDLE_RELEASE_S = 5.0  # a connection quiet this long drops its read chunks
COALESCE_BELOW = 16 << 10  # queued writes smaller than this are joined into one TLS record
COALESCE_UP_TO = 64 << 10
DEFAULT_HIGH_WATER = 64 << 10
CLOSE_FLUSH_S = 30.0  # close() sends what is queued; a peer that does not read for this long is cut off


class _Waker:
    """Wakes the worker out of poll: an eventfd (one fd), or a pipe where there is none."""

    def __init__(self) -> None:
        if hasattr(os, "eventfd"):
            self.fd = self._write_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:  # pragma: no cover - not Linux
            self.fd, self._write_fd = os.pipe()
            os.set_blocking(self.fd, False)
            os.set_blocking(self._write_fd, False)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._write_fd, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self.fd, 4096)

    def close(self) -> None:
        os.close(self.fd)
        if self._write_fd != self.fd:
            os.close(self._write_fd)


def _nbytes(data: bytes | memoryview) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


class ThreadedTlsTransport(asyncio.Transport):
    """One TLS connection driven by its own thread; create it with ``start_tls_thread``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, context: ssl.SSLContext, *,
                 server_side: bool, server_hostname: str | None) -> None:
        super().__init__()
        self._loop = loop
        self._raw = sock
        self._context = context
        self._server_side = server_side
        self._server_hostname = server_hostname
        self._ssl: ssl.SSLSocket | None = None
        self._protocol: asyncio.BaseProtocol | None = None
        self._buffered = False
        self._extra: dict[str, Any] = {"socket": sock, "sslcontext": context}
        with contextlib.suppress(OSError):
            self._extra["peername"] = sock.getpeername()
            self._extra["sockname"] = sock.getsockname()
        self._fd = sock.fileno()
        self._fd_closed = False  # under _lock: the fd number may be reused once closed
        self._waker = _Waker()
        self._lock = threading.Lock()
        # Shared with the worker, under _lock.
        self._outq: collections.deque[bytes | memoryview] = collections.deque()
        self._want_reading = True
        self._closing_shared = False  # flush the output, then close
        self._aborted = False
        self._sleeping = False
        self._free_chunks: list[bytearray] = []
        self._chunks_made = 0
        self._started = threading.Event()  # the loop has called connection_made
        # Loop thread only.
        self._closing = False
        self._lost = False
        self._reading_paused = False
        self._backlog: collections.deque[tuple[bytearray, int, int]] = collections.deque()
        self._eof_pending = False
        self._queued = 0  # bytes written by the protocol and not yet sent by the worker
        self._high = DEFAULT_HIGH_WATER
        self._low = DEFAULT_HIGH_WATER // 4
        self._writing_paused = False
        self._thread: threading.Thread | None = None
        self._close_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Transport ----------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._closing

    def pause_reading(self) -> None:
        if self._closing or self._reading_paused:
            return
        self._reading_paused = True
        with self._lock:
            self._want_reading = False

    def resume_reading(self) -> None:
        if self._closing or not self._reading_paused:
            return
        self._reading_paused = False
        with self._lock:
            self._want_reading = True
            self._wake_locked()
        if self._backlog or self._eof_pending:
            self._loop.call_soon(self._deliver_backlog)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = DEFAULT_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._maybe_pause_writing()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        return self._queued

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._lost:
            return
        if isinstance(data, bytearray):
            data = bytes(data)  # the caller may reuse it; bytes and views of the log stay as they are
        size = _nbytes(data)
        if not size:
            return
        with self._lock:
            self._outq.append(data)
            self._wake_locked()
        self._queued += size
        self._maybe_pause_writing()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS connections do not half-close")

    def close(self) -> None:
        """Stop reading; send what is queued, then TLS close_notify, then close the socket."""
        if self._closing:
            return
        self._closing = True
        self._backlog.clear()
        with self._lock:
            self._closing_shared = True
            self._want_reading = False
            self._wake_locked()
        self._close_timer = self._loop.call_later(CLOSE_FLUSH_S, self.abort)

    def abort(self) -> None:
        """Close now: queued output is dropped."""
        self._closing = True
        self._backlog.clear()
        with self._lock:
            self._aborted = True
            self._closing_shared = True
            self._outq.clear()
            if not self._fd_closed:
                # Ends a blocking handshake or a poll at once. wrap_socket detached self._raw,
                # so shut the fd down through a socket object that does not own it.
                alias = socket.socket(fileno=self._fd)
                with contextlib.suppress(OSError):
                    alias.shutdown(socket.SHUT_RDWR)
                alias.detach()
                self._waker.wake()
        self._started.set()

    # -- loop side ------------------------------------------------------------------------------

    def _wake_locked(self) -> None:
        """Wake the worker if it sleeps in poll; call with _lock held (the fd closes under it)."""
        if self._sleeping and not self._fd_closed:
            self._waker.wake()

    def _maybe_pause_writing(self) -> None:
        if not self._writing_paused and self._queued > self._high and self._protocol is not None:
            self._writing_paused = True
            self._protocol.pause_writing()

    def _on_sent(self, nbytes: int) -> None:
        self._queued -= nbytes
        if self._writing_paused and self._queued <= self._low and not self._lost:
            self._writing_paused = False
            assert self._protocol is not None
            self._protocol.resume_writing()

    def _on_data(self, chunk: bytearray, length: int, eof: bool) -> None:
        if self._lost:
            return
        if length:
            self._backlog.append((chunk, 0, length))
        elif chunk:
            self._release_chunk(chunk)
        if eof:
            self._eof_pending = True
        if not self._reading_paused:
            self._deliver_backlog()

    def _deliver_backlog(self) -> None:
        try:
            self._deliver()
        except Exception as exc:  # noqa: BLE001 - a protocol that fails on its input: as asyncio does, log and cut
            self._loop.call_exception_handler({
                "message": "Fatal error: protocol failed on data from a TLS connection",
                "exception": exc, "transport": self, "protocol": self._protocol})
            self.abort()

    def _deliver(self) -> None:
        protocol = self._protocol
        assert protocol is not None
        while self._backlog and not self._reading_paused and not self._closing:
            chunk, start, end = self._backlog[0]
            view = memoryview(chunk)
            while start < end and not self._reading_paused and not self._closing:
                if self._buffered:
                    target = protocol.get_buffer(end - start)  # type: ignore[attr-defined]
                    count = min(len(target), end - start)
                    if count <= 0:
                        raise RuntimeError("get_buffer() returned an empty buffer")
                    target[:count] = view[start : start + count]
                    start += count
                    self._backlog[0] = (chunk, start, end)
                    protocol.buffer_updated(count)  # type: ignore[attr-defined]
                else:
                    data = bytes(view[start:end])
                    start = end
                    self._backlog[0] = (chunk, start, end)
                    protocol.data_received(data)  # type: ignore[attr-defined]
            view.release()
            if start >= end and self._backlog and self._backlog[0][0] is chunk:
                self._backlog.popleft()
                self._release_chunk(chunk)
        if self._eof_pending and not self._backlog and not self._reading_paused and not self._closing:
            self._eof_pending = False
            keep_open = protocol.eof_received()  # type: ignore[attr-defined]
            if not keep_open:
                self.close()

    def _release_chunk(self, chunk: bytearray) -> None:
        with self._lock:
            self._free_chunks.append(chunk)
            self._wake_locked()

    def _on_lost(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._backlog.clear()
        if self._close_timer is not None:
            self._close_timer.cancel()
        if self._protocol is not None and self._started.is_set():
            self._protocol.connection_lost(exc)  # type: ignore[arg-type]

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
            self._loop.call_soon_threadsafe(callback, *args)

    # -- worker thread --------------------------------------------------------------------------

    def _handshake(self, done: asyncio.Future[None]) -> bool:
        try:
            if self._raw.family in (socket.AF_INET, socket.AF_INET6):
                self._raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._raw.setblocking(True)
            self._ssl = self._context.wrap_socket(
                self._raw, server_side=self._server_side, server_hostname=self._server_hostname,
                do_handshake_on_connect=False)
            self._ssl.do_handshake()
            peercert = self._ssl.getpeercert()
            self._extra.update(peercert=peercert, cipher=self._ssl.cipher(), compression=self._ssl.compression(),
                               ssl_object=self._ssl)
            self._ssl.setblocking(False)
        except BaseException as exc:  # noqa: BLE001 - every failure goes to the awaiting caller
            self._discard_input()
            self._close_socket()
            self._post(_set_exception, done, exc)
            return False
        self._post(_set_result, done)
        return True

    def _discard_input(self) -> None:
        """Read and drop what the peer already sent (a plaintext request, say): closing a socket
        with unread input resets the connection, and the peer would see a reset instead of the
        close that tells it this port speaks TLS."""
        with self._lock:
            if self._fd_closed or self._aborted:
                return
            alias = socket.socket(fileno=self._fd)
        try:
            alias.setblocking(False)
            for _ in range(16):
                if not alias.recv(65536):
                    break
        except OSError:
            pass
        finally:
            alias.detach()

    def _close_socket(self) -> None:
        with self._lock:
            self._fd_closed = True
            with contextlib.suppress(OSError):
                (self._ssl or self._raw).close()
            with contextlib.suppress(OSError):
                self._raw.close()
            self._waker.close()

    def _run(self, done: asyncio.Future[None]) -> None:
        if not self._handshake(done):
            return
        self._started.wait()
        error: BaseException | None = None
        try:
            self._serve()
        except Exception as exc:  # noqa: BLE001 - OSError and SSLError mostly; the protocol hears of any
            error = exc
        finally:
            with self._lock:
                aborted = self._aborted
            if error is None and not aborted:
                self._say_goodbye()
            self._close_socket()
            self._post(self._on_lost, None if aborted else error)

    def _say_goodbye(self) -> None:
        """TLS close_notify, best effort (the peer may be gone or not reading)."""
        assert self._ssl is not None
        with contextlib.suppress(OSError, ValueError, ssl.SSLError):
            self._ssl.unwrap()

    def _serve(self) -> None:
        sock = self._ssl
        assert sock is not None
        fd = sock.fileno()
        # The C methods (ssl.SSLSocket's Python wrappers cost three frames per 16 KiB record).
        read, write, pending = sock._sslobj.read, sock._sslobj.write, sock._sslobj.pending  # type: ignore[attr-defined]
        poller = select.poll()
        poller.register(self._waker.fd, select.POLLIN)
        current: bytes | memoryview | None = None  # being written: an SSL_write retry needs the same buffer
        chunk: bytearray | None = None
        filled = 0
        eof = False
        write_blocked = False  # the last write wanted the socket writable
        read_blocked_on_write = False
        while True:
            sent = 0
            # Write everything queued, until the socket is full.
            while True:
                if current is None:
                    with self._lock:
                        if self._aborted:
                            return
                        if not self._outq:
                            break
                        current = self._outq.popleft()
                        if _nbytes(current) < COALESCE_BELOW and self._outq:
                            parts, size = [current], _nbytes(current)
                            while self._outq and size + _nbytes(self._outq[0]) <= COALESCE_UP_TO:
                                part = self._outq.popleft()
                                parts.append(part)
                                size += _nbytes(part)
                            current = b"".join(parts)
                try:
                    write(current)
                except ssl.SSLWantWriteError:
                    write_blocked = True
                    break
                except ssl.SSLWantReadError:
                    write_blocked = False
                    break
                write_blocked = False
                sent += _nbytes(current)
                current = None
            if sent:
                self._post(self._on_sent, sent)
            with self._lock:
                if self._aborted:
                    return
                closing = self._closing_shared
                reading = self._want_reading and not eof and not closing
                if reading and chunk is None and self._free_chunks:
                    chunk = self._free_chunks.pop()
                elif reading and chunk is None and self._chunks_made < CHUNKS:
                    self._chunks_made += 1
                    chunk = bytearray(CHUNK_BYTES)
            if closing and current is None and not self._outq_nonempty():
                return
            # Read what the socket (and OpenSSL's buffer) has, up to one chunk.
            if reading and chunk is not None:
                view = memoryview(chunk)
                read_blocked_on_write = False
                try:
                    while filled < CHUNK_BYTES:
                        count = read(CHUNK_BYTES - filled, view[filled:])
                        if count == 0:
                            eof = True
                            break
                        filled += count
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLWantWriteError:
                    read_blocked_on_write = True
                except ssl.SSLEOFError:  # a TCP close without close_notify: an EOF all the same
                    eof = True
                finally:
                    view.release()
                if filled or eof:
                    self._post(self._on_data, chunk, filled, eof)
                    chunk, filled = None, 0
                    continue  # another free chunk may take more right away
            # Nothing more to do now: sleep until the socket or the loop has something.
            events = 0
            if reading and chunk is not None and not eof:
                if pending():
                    continue
                events |= select.POLLIN
            if (current is not None and write_blocked) or read_blocked_on_write:
                events |= select.POLLOUT
            elif current is not None:  # a write that wants to read first (a TLS 1.2 renegotiation)
                events |= select.POLLIN
            with self._lock:
                if self._outq and current is None or self._aborted or (self._closing_shared and not closing):
                    continue
                if self._want_reading and not eof and not reading:
                    continue  # reading was resumed meanwhile
                if reading and chunk is None and self._free_chunks:
                    continue
                self._sleeping = True
            if events:
                poller.register(fd, events)
            else:
                with contextlib.suppress(KeyError):
                    poller.unregister(fd)
            idle = chunk is not None and filled == 0 and current is None
            ready = poller.poll(IDLE_RELEASE_S * 1000 if idle else None)
            with self._lock:
                self._sleeping = False
            if not ready:
                if chunk is not None:  # quiet: give the read chunks back
                    with self._lock:
                        self._chunks_made -= len(self._free_chunks) + 1
                        self._free_chunks.clear()
                    chunk = None
                continue
            for ready_fd, flags in ready:
                if ready_fd == self._waker.fd:
                    self._waker.drain()
                elif flags & (select.POLLERR | select.POLLNVAL) and not flags & select.POLLIN:
                    raise ConnectionResetError("the connection was reset")

    def _outq_nonempty(self) -> bool:
        with self._lock:
            return bool(self._outq)


def _set_result(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _set_exception(future: asyncio.Future[None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


async def start_tls_thread(
    sock: socket.socket,
    context: ssl.SSLContext,
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    *,
    server_side: bool,
    server_hostname: str | None = None,
    handshake_timeout: float = 10.0,
) -> tuple[ThreadedTlsTransport, asyncio.BaseProtocol]:
    """Shake hands over a connected TCP socket on a new worker thread and return the transport
    and the protocol it drives; raises the handshake's error (the socket is closed then)."""
    loop = asyncio.get_running_loop()
    transport = ThreadedTlsTransport(loop, sock, context, server_side=server_side, server_hostname=server_hostname)
    done: asyncio.Future[None] = loop.create_future()
    thread = threading.Thread(target=transport._run, args=(done,), name="tls-connection", daemon=True)
    transport._thread = thread
    thread.start()
    timed_out = False

    def expire() -> None:
        nonlocal timed_out
        timed_out = True
        transport.abort()

    deadline = loop.call_later(handshake_timeout, expire)
    try:
        await done
    except BaseException as exc:
        transport.abort()
        if timed_out:
            raise TimeoutError(f"the TLS handshake did not finish within {handshake_timeout:g} s") from exc
        raise
    finally:
        deadline.cancel()
    protocol = protocol_factory()
    transport.set_protocol(protocol)
    try:
        protocol.connection_made(transport)
    finally:
        transport._started.set()
    return transport, protocol


async def open_tls_connection(
    host: str,
    port: int,
    context: ssl.SSLContext,
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    *,
    server_hostname: str | None = None,
    handshake_timeout: float = 10.0,
) -> tuple[ThreadedTlsTransport, asyncio.BaseProtocol]:
    """The client side: a TCP connection to the first address of ``host`` that answers, then
    ``start_tls_thread`` (the certificate is checked for ``server_hostname``, default ``host``)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return await start_tls_thread(sock, context, protocol_factory, server_side=False,
                                      server_hostname=server_hostname or host, handshake_timeout=handshake_timeout)
    raise error or OSError(f"cannot resolve {host}")
