"""One client connection: framing into a reusable buffer, dispatch, ordered responses, flow control.

The socket reads straight into the connection's bytearray (``asyncio.BufferedProtocol``), and a
complete frame is handled as a memoryview slice of it: produce payloads go from that slice into
the log without an intermediate bytes object. A frame length above ``max_frame_bytes`` is
refused as soon as its four bytes arrive. The buffer is allocated at the first read (an idle
connection holds none), grows with the bytes received rather than the length announced, and is
given back after IDLE_RELEASE_S of quiet; the listener closes connections idle for
``idle_timeout_s`` and this class those that leave a frame unfinished for ``frame_timeout_s``.

Responses leave in request order (clients may pipeline). Requests that finish later (durable
produce, long-poll fetch) hold a slot in ``_pending``; responses behind them wait in their slots.
Fetch responses are the encoded prefix followed by memoryviews of the log, written view by view
so the kernel copies from the mmap (on Python 3.11 ``writelines`` would join them into one copy).

Flow control, both ways: reading from the socket pauses while the transport's write buffer is
above its high-water mark (a consumer or producer not reading its responses) or while
``max_inflight_requests`` responses are outstanding, and resumes when the write buffer has
drained and at most half that many are outstanding (hysteresis: no pause/resume per response).
Responses completed later are written once per event-loop pass, not one send per response.
So one slow client pins at most about write_buffer_high_bytes + max_fetch_bytes of broker memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Protocol, cast

from rustmq.auth.acl import ANONYMOUS
from rustmq.protocol import api, frames, records, simple
from rustmq.protocol import batch as record_batch
from rustmq.protocol.api import ApiKey, ErrorCode, RequestError
from rustmq.server import coordination_handlers, topic_admin
from rustmq.server.authz import AuthState, ConnectionAuth, cert_principal
from rustmq.server.broker import Broker, error_code_for
from rustmq.server.responder import Slot
from rustmq.server.router import Handler, Router

log = logging.getLogger(__name__)


class ConnectionRegistry(Protocol):
    """What a connection needs of the listener that accepted it (rustmq.server.listener)."""

    router: Router

    def register(self, connection: Connection) -> bool: ...

    def unregister(self, connection: Connection) -> bool: ...

    def maybe_drained(self, connection: Connection) -> None: ...


MIN_READ_BYTES = 64 << 10
INITIAL_BUFFER_BYTES = MIN_READ_BYTES  # allocated at the first read, not at connect
IDLE_RELEASE_S = 5.0  # a connection quiet this long gives its read buffer back
SHRINK_ABOVE_BYTES = 4 << 20
SMALL_WRITE_BYTES = 64 << 10
_API_NAMES = {int(key): key.name for key in ApiKey}


class Connection(asyncio.BufferedProtocol):
    def __init__(self, listener: ConnectionRegistry, broker: Broker, accept_simple: bool) -> None:
        self._listener = listener
        self._broker = broker
        self._settings = broker.settings
        self._accept_simple = accept_simple
        self._simple_mode = False
        self._buf = bytearray()  # allocated by the first get_buffer: idle connections hold none
        self._rpos = 0
        self._wpos = 0
        self._frame_need = 0  # total bytes (prefix included) of the frame being received
        self._frame_started = 0.0
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._out: list[bytes | memoryview] = []
        self._pending: deque[Slot] = deque()
        self._write_paused = False
        self._reading = True
        self._closing = False
        self._draining = False  # shutdown: no new requests, finish the pending ones
        self._half_closed = False  # the client sent EOF while responses were still pending
        self._fetch_waits: set[_FetchWait] = set()
        self.long_polls = 0  # FETCH, QUEUE_FETCH and HEARTBEAT waits held now (max_long_polls_per_connection)
        # (topic, partition) -> (records, where each reply goes: (list, index) of a placeholder)
        self._simple_groups: dict[tuple[str, int], tuple[list[list[Any]], list[tuple[list[Any], int]]]] = {}
        self._simple_sticky: dict[str, int] = {}
        # cluster mode: (topic, partition) -> (records, the reserved reply slot of each)
        self._simple_routed: dict[tuple[str, int], tuple[list[list[Any]], list[Slot]]] = {}
        # Cluster mode: simple messages naming a topic not known here yet, waiting for a re-read.
        self._simple_unknown: list[tuple[bytes, Slot]] | None = [] if broker.cluster is not None else None
        self._timer: asyncio.TimerHandle | None = None
        self._completions_scheduled = False
        self._last_active = time.monotonic()  # last bytes received or response completed
        self._tasks: set[asyncio.Task[None]] = set()
        # Auth (server.authz): None on a broker without auth files, so the request path pays one
        # `is None` test. _hold stops reading while a token is checked or a quota delay runs.
        self._auth_state: AuthState | None = getattr(broker, "auth", None)
        self._auth: ConnectionAuth | None = None
        self._hold = False
        self._throttle_ms = 0
        self._router: Router = listener.router

    # -- the responder interface (rustmq.server.responder.Responder) for handlers outside -------

    @property
    def broker(self) -> Broker:
        return self._broker

    @property
    def draining(self) -> bool:
        return self._draining

    # -- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        cast(asyncio.Transport, transport).set_write_buffer_limits(high=self._settings.write_buffer_high_bytes)
        if not self._listener.register(self):
            self._broker.stats.connections_rejected += 1
            log.warning("refusing %s: %d connections already open", self._peer, self._settings.max_connections)
            self._fail(ErrorCode.TOO_MANY_CONNECTIONS, f"the broker allows {self._settings.max_connections} connections")
            return
        refusal = self._broker.resources.connection_refusal()
        if refusal is not None:
            self._listener.unregister(self)
            self._broker.stats.connections_rejected += 1
            log.warning("refusing %s: %s", self._peer, refusal)
            self._fail(ErrorCode.TOO_MANY_CONNECTIONS, f"the broker is out of file descriptors: {refusal}")
            return
        if self._auth_state is not None and not self._admit(transport):
            return
        self._broker.stats.connections_accepted += 1
        self._broker.connections += 1

    def _admit(self, transport: asyncio.BaseTransport) -> bool:
        """Auth at connect: the per-address limit, and the principal of a client certificate."""
        state = self._auth_state
        assert state is not None
        address = self._peer.rpartition(":")[0] or self._peer
        refusal = state.admit_address(address)
        auth = ConnectionAuth(state, address)
        if refusal is None:
            self._auth = auth
            principal = cert_principal(transport.get_extra_info("peercert"), state.settings.cert_principal)
            refusal = auth.become(principal or ANONYMOUS)
        if refusal is not None:
            self._listener.unregister(self)
            self._broker.stats.connections_rejected += 1
            log.warning("refusing %s: %s", self._peer, refusal)
            self._fail(ErrorCode.TOO_MANY_CONNECTIONS, refusal)
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._listener.unregister(self):
            self._broker.connections -= 1
        if self._auth is not None:
            self._auth.release()
            self._auth.state.release_address(self._auth.address)
            self._auth = None
        self._closing = True
        for wait in list(self._fetch_waits):
            wait.cancel()
        coordination_handlers.connection_lost(self)
        self._pending.clear()
        self._out.clear()
        if self._timer is not None:
            self._timer.cancel()
        self._buf = bytearray()

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self._buf) - self._wpos < MIN_READ_BYTES:
            self._make_room()
        return memoryview(self._buf)[self._wpos :]

    def buffer_updated(self, nbytes: int) -> None:
        self._wpos += nbytes
        self._last_active = time.monotonic()
        self._process()

    def eof_received(self) -> bool:
        unread = self._wpos - self._rpos
        if unread:
            need = self._frame_need or frames.LENGTH_SIZE
            log.warning("closing %s: connection ended mid-frame (%d of %d bytes received)", self._peer, unread, need)
            self._broker.stats.request_errors["TRUNCATED_FRAME"] += 1
        self._closing = True
        self._flush_out()
        if self._pending:
            # Half-closed with responses still owed (durable acks, long polls): keep the write
            # side open until they are sent, then close (see _complete).
            self._half_closed = True
            return True
        return False  # close our side once the output is flushed

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    # -- framing --------------------------------------------------------------------------------

    def _make_room(self) -> None:
        """At least MIN_READ_BYTES free after the unread bytes: compact, grow or shrink.

        Hazard: `_frame_need` is what the client announced, not what it sent. The buffer grows
        with the bytes that actually arrived (at most doubling per step, up to the frame's
        size), so a length prefix alone costs nothing and a frame sent slowly costs at most
        twice what was received."""
        unread = self._wpos - self._rpos
        size = len(self._buf)
        want = unread + MIN_READ_BYTES
        fresh_size = 0
        if want > size:
            cap = max(self._frame_need, unread) + MIN_READ_BYTES
            fresh_size = max(want, min(2 * size, cap), INITIAL_BUFFER_BYTES)
        elif size > SHRINK_ABOVE_BYTES and max(want, self._frame_need) < size // 4:
            fresh_size = max(want, INITIAL_BUFFER_BYTES)
        if fresh_size:
            fresh = bytearray(fresh_size)
            fresh[:unread] = memoryview(self._buf)[self._rpos : self._wpos]
            self._buf = fresh
        elif unread:
            # bytearray slice assignment memcpy's; the source must not overlap, hence the copy.
            self._buf[:unread] = self._buf[self._rpos : self._wpos]
        self._rpos, self._wpos = 0, unread

    def check_idle(self, now: float) -> None:
        """Called by the listener's sweep: close a connection idle for idle_timeout_s (nothing
        owed to it, no partial frame), and give back the read buffer of a quiet one."""
        if self._closing or self._pending or self._wpos != self._rpos:
            return
        quiet = now - self._last_active
        if quiet >= self._settings.idle_timeout_s:
            log.info("closing %s: idle for %.0f s", self._peer, quiet)
            self._broker.stats.connections_idle_closed += 1
            self._close()
        elif quiet >= IDLE_RELEASE_S and self._buf:
            self._buf = bytearray()
            self._rpos = self._wpos = 0

    def _process(self) -> None:
        buf = self._buf
        view = memoryview(buf)
        while not self._blocked():
            available = self._wpos - self._rpos
            if available < frames.LENGTH_SIZE:
                break
            (length,) = frames.LENGTH.unpack_from(buf, self._rpos)
            if length > self._settings.max_frame_bytes:
                self._fail(
                    ErrorCode.FRAME_TOO_LARGE,
                    f"frame of {length} bytes exceeds the limit of {self._settings.max_frame_bytes}",
                )
                return
            end = self._rpos + frames.LENGTH_SIZE + length
            if end > self._wpos:
                if not self._frame_need:
                    self._frame_started = time.monotonic()
                    self._arm_frame_timer()
                self._frame_need = frames.LENGTH_SIZE + length
                break
            body = view[self._rpos + frames.LENGTH_SIZE : end]
            self._rpos = end
            self._frame_need = 0
            self._handle_body(body)
        if self._rpos == self._wpos:
            self._rpos = self._wpos = 0
            if len(self._buf) > SHRINK_ABOVE_BYTES and not self._closing:
                self._buf = bytearray()  # the next get_buffer allocates a small one
        elif self._blocked():
            # Hazard: frames already buffered wait for a free slot; pausing here makes the
            # completing response resume reading and re-run _process (else they would wait for
            # more bytes from a client that may have sent everything: a pipelining deadlock).
            self._update_reading()
        self._flush_out()

    def _arm_frame_timer(self) -> None:
        if self._timer is None and self._transport is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._settings.frame_timeout_s, self._check_frame_timeout)

    def _check_frame_timeout(self) -> None:
        self._timer = None
        if self._closing or not self._frame_need:
            return
        waited = time.monotonic() - self._frame_started
        if waited >= self._settings.frame_timeout_s:
            log.warning(
                "closing %s: frame incomplete after %.1f s (%d of %d bytes)",
                self._peer, waited, self._wpos - self._rpos, self._frame_need,
            )
            self._broker.stats.request_errors["TRUNCATED_FRAME"] += 1
            self._close()
        else:
            self._arm_frame_timer()

    def _handle_body(self, body: memoryview) -> None:
        if body and body[0] == 0:
            self._handle_request(body)
        elif self._accept_simple and frames.is_simple_body(body):
            self._simple_mode = True
            self._handle_simple(body)
        else:
            first = f"0x{body[0]:02x}" if body else "nothing"
            expected = "a RustMQ header (0x00) or a simple produce map" if self._accept_simple else "a RustMQ header (0x00)"
            self._reply_error(None, ErrorCode.MALFORMED_FRAME, f"frame body starts with {first}, expected {expected}")

    def _handle_request(self, body: memoryview) -> None:
        corr: int | None = None
        try:
            header, payload = frames.decode_body(body)
            raw_corr = header.get("corr")
            if isinstance(raw_corr, int) and not isinstance(raw_corr, bool) and 0 <= raw_corr <= api.MAX_CORRELATION_ID:
                corr = raw_corr
            api_key, corr = api.parse_envelope(header)
            handler = self._router.route(api_key)
            if handler is None:
                raise RequestError(ErrorCode.UNKNOWN_API, f"unknown api {api_key}")
            if self._draining:
                raise RequestError(ErrorCode.SHUTTING_DOWN, "the broker is shutting down")
            self._broker.stats.requests[_API_NAMES[api_key]] += 1
            if self._auth is not None:
                self._throttle_ms = 0
                self._auth.check(api_key, header)
                if self._auth.limiter is not None:
                    self._charge_request(api_key, len(payload))
            handler(self, corr, header, payload)
        except frames.FrameError as exc:
            self._reply_error(None, ErrorCode(exc.code), exc.message)
        except Exception as exc:
            self._reply_exception(corr, exc)

    def _reply_exception(self, corr: int | None, exc: BaseException) -> None:
        code = error_code_for(exc)
        if code is ErrorCode.INTERNAL_ERROR:
            log.exception("request from %s failed", self._peer, exc_info=exc)
        self._reply_error(corr, code, str(exc) or code.name)

    # -- output ------------------------------------------------------------------------------

    def _reply_error(self, corr: int | None, code: ErrorCode, message: str) -> None:
        self._broker.stats.request_errors[code.name] += 1
        log.debug("error %s to %s: %s", code.name, self._peer, message)
        if self._simple_mode and corr is None:
            self.respond([simple.encode_error_reply(code)])
        else:
            self.respond([frames.encode_frame(api.error_header(corr, code, message))])

    def respond(self, buffers: list[bytes | memoryview]) -> None:
        if self._pending:
            slot = Slot()
            slot.buffers = buffers
            self._pending.append(slot)
        else:
            self._out.extend(buffers)

    def reserve(self) -> Slot:
        slot = Slot()
        self._pending.append(slot)
        return slot

    def complete(self, slot: Slot, buffers: list[bytes | memoryview]) -> None:
        if self._closing and not (self._draining or self._half_closed):
            return
        slot.buffers = buffers
        pending = self._pending
        while pending and pending[0].buffers is not None:
            self._out.extend(pending.popleft().buffers)  # type: ignore[arg-type]
        if not self._completions_scheduled:
            # One write and one flow-control decision per loop pass, however many responses
            # completed in it (a group commit completes hundreds at once).
            self._completions_scheduled = True
            asyncio.get_running_loop().call_soon(self._after_completions)

    def _after_completions(self) -> None:
        self._completions_scheduled = False
        self._last_active = time.monotonic()
        if self._closing and not (self._draining or self._half_closed):
            return
        self._flush_out()
        if self._half_closed and not self._pending and self._transport is not None:
            self._transport.close()
            return
        self._update_reading()
        self._listener.maybe_drained(self)

    def _flush_out(self) -> None:
        if self._simple_groups:
            self._append_simple_groups()
        if self._simple_routed:
            self._place_simple_groups()
        out = self._out
        transport = self._transport
        if not out or transport is None or transport.is_closing():
            out.clear()
            return
        self._out = []
        small: list[bytes] = []
        for buffer in out:
            if isinstance(buffer, bytes) and len(buffer) < SMALL_WRITE_BYTES:
                small.append(buffer)
                continue
            if small:
                transport.write(b"".join(small))
                small = []
            transport.write(buffer)
        if small:
            transport.write(small[0] if len(small) == 1 else b"".join(small))

    def _blocked(self) -> bool:
        return (self._closing or self._write_paused or self._hold
                or len(self._pending) >= self._settings.max_inflight_requests)

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._blocked() or self._draining:
            if self._reading:
                self._reading = False
                transport.pause_reading()
        elif not self._reading and len(self._pending) <= self._settings.max_inflight_requests // 2:
            # Hysteresis: resuming at every freed slot would pause and resume the socket (two
            # epoll syscalls) per response while a client pipelines more than the limit.
            self._reading = True
            transport.resume_reading()
            if self._wpos > self._rpos:
                self._process()

    def _fail(self, code: ErrorCode, message: str) -> None:
        """Answer a frame that cannot be delimited, then close: the stream cannot be resynced."""
        log.warning("closing %s: %s (%s)", self._peer, message, code.name)
        self._reply_error(None, code, message)
        while self._pending:  # the error goes last; unfinished responses are abandoned
            slot = self._pending.popleft()
            if slot.buffers is not None:
                self._out.extend(slot.buffers)
        self._close()

    def _close(self) -> None:
        self._closing = True
        self._flush_out()
        if self._transport is not None:
            self._transport.close()

    # -- shutdown ------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Stop taking requests; the pending ones still complete (listener shutdown)."""
        self._draining = True
        self._update_reading()
        for wait in list(self._fetch_waits):
            wait.finish()

    @property
    def idle(self) -> bool:
        return not self._pending

    def close(self) -> None:
        self._close()

    # -- request handlers ----------------------------------------------------------------------

    def _produce(self, corr: int, header: dict[str, Any], payload: memoryview) -> None:
        request = api.parse_produce(header)
        started = time.perf_counter()
        try:
            produced = self._broker.produce(request.topic, request.partition, request.key, payload,
                                            require_insync=request.acks is api.Acks.ALL)
        except Exception as exc:
            if request.acks is api.Acks.NONE:
                code = error_code_for(exc)
                self._broker.stats.request_errors[code.name] += 1
                log.warning("acks=none produce from %s to %r failed: %s", self._peer, request.topic, exc)
                return
            raise
        self._broker.stats.produce_latency.observe(time.perf_counter() - started)
        if request.acks is api.Acks.NONE:
            return
        response = {
            "corr": corr,
            "error": 0,
            "partition": produced.partition,
            "base_offset": produced.base_offset,
            "last_offset": produced.last_offset,
        }
        if self._throttle_ms:
            response["throttle_ms"] = self._throttle_ms
        if request.acks is api.Acks.ALL and produced.role is not None:
            self.when_replicated(corr, request, produced, response)
            return
        if request.acks is not api.Acks.DURABLE and not produced.always_durable:
            self.respond([frames.encode_frame(response)])
            return
        slot = self.reserve()
        appended = time.perf_counter()

        def durable(error: BaseException | None) -> None:
            self._broker.stats.durable_latency.observe(time.perf_counter() - appended)
            if error is None:
                self.complete(slot, [frames.encode_frame(response)])
            else:
                code = error_code_for(error)
                self._broker.stats.request_errors[code.name] += 1
                log.error("flush for produce to %s/%d failed: %s", request.topic, produced.partition, error)
                self.complete(slot, [frames.encode_frame(api.error_header(corr, code, f"flush failed: {error}"))])

        try:
            self._broker.when_durable(produced.log, produced.last_offset, durable)
        except Exception as exc:  # the committer is closed (shutdown): the slot must not hang
            code = error_code_for(exc)
            self._broker.stats.request_errors[code.name] += 1
            self.complete(slot, [frames.encode_frame(api.error_header(corr, code, str(exc)))])

    def when_replicated(self, corr: int, request: api.ProduceRequest, produced: Any, response: dict[str, Any]) -> None:
        """acks=all: answer once every in-sync replica has the batches (and, for a topic that
        flushes always, they are fsynced here too), or with the error that prevented it."""
        slot = self.reserve()
        cluster = self._broker.cluster
        loop = asyncio.get_running_loop()
        state = {"done": False}

        def finish(error: BaseException | None) -> None:
            if state["done"]:
                return
            state["done"] = True
            timer.cancel()
            if error is None:
                self.complete(slot, [frames.encode_frame(response)])
            else:
                code = error_code_for(error)
                self._broker.stats.request_errors[code.name] += 1
                self.complete(slot, [frames.encode_frame(api.error_header(corr, code, str(error) or code.name))])

        def replicated(error: BaseException | None) -> None:
            if error is None and produced.always_durable:
                try:
                    self._broker.when_durable(produced.log, produced.last_offset, finish)
                except Exception as exc:
                    finish(exc)
                return
            finish(error)

        timer = loop.call_later(
            request.timeout_ms / 1000, finish,
            RequestError(ErrorCode.REQUEST_TIMEOUT, f"not replicated to the in-sync replicas within {request.timeout_ms} ms"))
        cluster.when_replicated(produced.role, produced.last_offset + 1, replicated)

    def _later(self, corr: int, work: Any) -> None:
        """Answer from a coroutine (cluster-wide admin), in order, through a reserved slot."""
        slot = self.reserve()

        async def run() -> None:
            try:
                fields = await work
                buffers: list[bytes | memoryview] = [frames.encode_frame({"corr": corr, "error": 0, **fields})]
            except Exception as exc:
                code = error_code_for(exc)
                if code is ErrorCode.INTERNAL_ERROR:
                    log.exception("request from %s failed", self._peer)
                self._broker.stats.request_errors[code.name] += 1
                buffers = [frames.encode_frame(api.error_header(corr, code, str(exc) or code.name))]
            self.complete(slot, buffers)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _handle_simple(self, body: memoryview) -> None:
        # Simple messages read in one pass are grouped per partition and appended as one batch
        # per group when the pass ends; each reply keeps its place in the output through a
        # placeholder, so replies still leave in request order.
        self._broker.stats.requests["SIMPLE_PRODUCE"] += 1
        cluster = self._broker.cluster
        if cluster is not None:
            self._route_simple(cluster, body)
            return
        try:
            message = simple.decode_message(body)
            if self._auth is not None:
                self._simple_auth(message.topic or self._settings.default_topic, len(body))
            topic = self._broker.topic_for_produce(message.topic or self._settings.default_topic)
            if message.partition is None and message.key is None:
                partition = self._simple_sticky.get(topic.name)
                if partition is None:
                    partition = self._simple_sticky[topic.name] = self._broker.choose_partition(topic, None, None)
            else:
                partition = self._broker.choose_partition(topic, message.partition, message.key)
                self._broker.partition_log(topic, partition)
        except Exception as exc:
            self._simple_error(exc)
            return
        group = self._simple_groups.get((topic.name, partition))
        if group is None:
            group = self._simple_groups[(topic.name, partition)] = ([], [])
        group[0].append([0, message.key, message.value, message.headers])
        if self._pending:  # behind a response still being prepared: wait in a slot too
            slot = Slot()
            slot.buffers = [b""]
            self._pending.append(slot)
            group[1].append((slot.buffers, 0))
        else:
            group[1].append((self._out, len(self._out)))
            self._out.append(b"")  # placeholder for this message's reply

    def _route_simple(self, cluster: Any, body: memoryview) -> None:
        """Cluster mode: the partition comes from the cluster state, every reply waits in a slot,
        and each pass's messages go as one batch per partition to its leader, here or forwarded
        (rustmq.replication.forward), answered once the in-sync replicas have them."""
        try:
            message = simple.decode_message(body)
            name = message.topic or self._settings.default_topic
            if self._auth is not None:
                self._simple_auth(name, len(body))
            if message.partition is None and message.key is None:
                partition = self._simple_sticky.get(name)
                if partition is None:
                    partition = self._simple_sticky[name] = cluster.route(name, None, None)
            else:
                partition = cluster.route(name, message.partition, message.key)
        except RequestError as exc:
            if exc.code is ErrorCode.UNKNOWN_TOPIC and self._simple_unknown is not None:
                self._defer_simple(body)  # perhaps created elsewhere and not read here yet
                return
            self._simple_error(exc)
            return
        except Exception as exc:
            self._simple_error(exc)
            return
        group = self._simple_routed.get((name, partition))
        if group is None:
            group = self._simple_routed[(name, partition)] = ([], [])
        group[0].append([0, message.key, message.value, message.headers])
        group[1].append(self.reserve())

    def _defer_simple(self, body: memoryview) -> None:
        """A simple message for a topic this broker does not know (yet): its reply keeps its
        place in a slot; once per connection the cluster state is read again and the deferred
        messages are routed and placed in their order, one at a time (a topic made on another
        broker a moment ago; a topic that really does not exist gets UNKNOWN_TOPIC then)."""
        assert self._simple_unknown is not None
        self._simple_unknown.append((bytes(body), self.reserve()))
        if len(self._simple_unknown) == 1:
            task = asyncio.get_running_loop().create_task(self._place_deferred_simple())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _place_deferred_simple(self) -> None:
        cluster = self._broker.cluster
        assert cluster is not None and self._simple_unknown is not None
        try:
            await cluster.admin.refresh()
        except RequestError:
            pass  # the store did not answer: route with what is known
        deferred, self._simple_unknown = self._simple_unknown, []
        now = int(time.time() * 1000)
        for body, slot in deferred:
            try:
                message = simple.decode_message(body)
                name = message.topic or self._settings.default_topic
                partition = cluster.route(name, message.partition, message.key)
                batch = record_batch.build_batch(
                    records.encode_body([[0, message.key, message.value, message.headers]]),
                    record_count=1, first_timestamp_ms=now, max_timestamp_ms=now)
                offset = await cluster.placer.place(name, partition, batch, 1)
            except Exception as exc:
                code = error_code_for(exc)
                self._broker.stats.request_errors[code.name] += 1
                self.complete(slot, [simple.encode_error_reply(code)])
                continue
            self.complete(slot, [simple.REPLY.pack(offset)])

    def _place_simple_groups(self) -> None:
        groups, self._simple_routed = self._simple_routed, {}
        self._simple_sticky.clear()
        placer = self._broker.cluster.placer
        now = int(time.time() * 1000)
        loop = asyncio.get_running_loop()
        for (topic, partition), (entries, slots) in groups.items():
            batch = record_batch.build_batch(
                records.encode_body(entries), record_count=len(entries), first_timestamp_ms=now, max_timestamp_ms=now)
            task = loop.create_task(self._place_simple(placer.place(topic, partition, batch, len(entries)), slots))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _place_simple(self, placing: Any, slots: list[Slot]) -> None:
        try:
            base = await placing
        except Exception as exc:
            code = error_code_for(exc)
            if code is ErrorCode.INTERNAL_ERROR:
                log.error("simple produce from %s failed", self._peer, exc_info=exc)
            self._broker.stats.request_errors[code.name] += len(slots)
            reply = simple.encode_error_reply(code)
            for slot in slots:
                self.complete(slot, [reply])
            return
        pack = simple.REPLY.pack
        for offset, slot in enumerate(slots, base):
            self.complete(slot, [pack(offset)])

    def _simple_error(self, exc: BaseException) -> None:
        code = error_code_for(exc)
        if code is ErrorCode.INTERNAL_ERROR:
            log.error("simple produce from %s failed", self._peer, exc_info=exc)
        self._broker.stats.request_errors[code.name] += 1
        log.debug("simple produce error %s to %s: %s", code.name, self._peer, exc)
        self.respond([simple.encode_error_reply(code)])

    def _append_simple_groups(self) -> None:
        groups, self._simple_groups = self._simple_groups, {}
        self._simple_sticky.clear()
        now = int(time.time() * 1000)
        for (topic, partition), (entries, slots) in groups.items():
            try:
                batch = record_batch.build_batch(
                    records.encode_body(entries), record_count=len(entries), first_timestamp_ms=now, max_timestamp_ms=now
                )
                produced = self._broker.produce(topic, partition, None, batch, built_here=len(entries))
            except Exception as exc:
                code = error_code_for(exc)
                if code is ErrorCode.INTERNAL_ERROR:
                    log.error("simple produce from %s failed", self._peer, exc_info=exc)
                self._broker.stats.request_errors[code.name] += len(entries)
                reply = simple.encode_error_reply(code)
                for container, position in slots:
                    container[position] = reply
                continue
            pack = simple.REPLY.pack
            for offset, (container, position) in enumerate(slots, produced.base_offset):
                container[position] = pack(offset)

    def _fetch(self, corr: int, header: dict[str, Any], payload: memoryview) -> None:
        request = api.parse_fetch(header, self._settings.max_fetch_bytes)
        started = time.perf_counter()
        parts, total = self._broker.read_fetch(request)
        if self._auth is not None and self._auth.limiter is not None:
            self.charge_fetch(total)
        if (total >= request.min_bytes or request.max_wait_ms == 0 or self._draining
                or not self.long_poll_room()):
            self.respond(_fetch_response(corr, parts, total, self._throttle_ms))
            self._broker.stats.fetch_latency.observe(time.perf_counter() - started)
            if total >= SMALL_WRITE_BYTES:
                self._flush_out()  # lets pause_writing stop the next pipelined fetch early
            return
        for part in parts:  # views of an empty read are released before waiting
            part.views.clear()
        wait = _FetchWait(self, corr, request, self.reserve(), started)
        self._fetch_waits.add(wait)
        wait.start()

    def long_poll_room(self) -> bool:
        """Whether one more long poll may wait on this connection; beyond the limit it is
        answered at once with what there is (docs/protocol.md, Limits)."""
        return self.long_polls < self._settings.max_long_polls_per_connection

    def _list_offsets(self, corr: int, header: dict[str, Any], payload: memoryview) -> None:
        response = self._broker.list_offset(api.parse_list_offsets(header))
        self.ok(corr, response)

    def _metadata(self, corr: int, header: dict[str, Any], payload: memoryview) -> None:
        names = api.parse_topic_names(header)
        cluster = self._broker.cluster
        if cluster is not None:
            missing = [n for n in names or () if n not in cluster.topics]
            if header.get("create") is True and missing and self._settings.auto_create_topics:
                self._later(corr, self._create_then_describe(missing, names))
            elif missing:  # perhaps created on another broker a moment ago: read the state once
                self._later(corr, self._refresh_then_describe(names))
            else:
                response = self._broker.metadata(names)
                if self._auth is not None and names is None:
                    response["topics"] = [t for t in response["topics"]
                                          if self._auth.allowed("topic", t["name"], "describe")]
                self.ok(corr, response)
            return
        if header.get("create") is True and names and self._settings.auto_create_topics:
            for name in names:
                self._broker.topic_for_produce(name)
        response = self._broker.metadata(names)
        if self._auth is not None and names is None:
            response["topics"] = [t for t in response["topics"] if self._auth.allowed("topic", t["name"], "describe")]
        self.ok(corr, response)

    async def _refresh_then_describe(self, names: list[str] | None) -> dict[str, Any]:
        await self._broker.cluster.admin.refresh()
        return self._broker.metadata(names)

    async def _create_then_describe(self, missing: list[str], names: list[str] | None) -> dict[str, Any]:
        admin = self._broker.cluster.admin
        for name in missing:
            try:
                await admin.create_topic(name, None, {}, None, None)
            except RequestError as exc:
                if exc.code is not ErrorCode.TOPIC_EXISTS:
                    raise
                await admin.refresh()  # created elsewhere and not read here yet
        return self._broker.metadata(names)

    def _create_topic(self, corr: int, header: dict[str, Any], payload: memoryview) -> None:
        request = api.parse_create_topic(header)
        if topic_admin.clustered(self._broker):
            self._later(corr, topic_admin.create_in_cluster(self._broker, request))
        else:
            self.ok(corr, topic_admin.create_here(self._broker, request))

    def _delete_topic(self, corr: int, header: dict[str, Any], payload: memoryview) -> None:
        name = api.parse_topic(header)
        if topic_admin.clustered(self._broker):
            self._later(corr, topic_admin.delete_in_cluster(self._broker, name))
        else:
            self.ok(corr, topic_admin.delete_here(self._broker, name))

    def _describe_topic(self, corr: int, header: dict[str, Any], payload: memoryview) -> None:
        self.ok(corr, self._broker.describe(self._broker.topic(api.parse_topic(header))))

    def _list_topics(self, corr: int, header: dict[str, Any], payload: memoryview) -> None:
        names = topic_admin.names(self._broker)
        if self._auth is not None:
            auth = self._auth
            names = [name for name in names if auth.allowed("topic", name, "describe")]
        self.ok(corr, {"topics": sorted(names)})

    def _broker_stats(self, corr: int, header: dict[str, Any], payload: memoryview) -> None:
        loop = asyncio.get_running_loop()
        event_loop = "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
        self.ok(corr, {**self._broker.broker_stats(), "event_loop": event_loop})

    def _add_partitions(self, corr: int, header: dict[str, Any], payload: memoryview) -> None:
        name, total = api.parse_add_partitions(header)
        if topic_admin.clustered(self._broker):
            self._later(corr, topic_admin.add_partitions_in_cluster(self._broker, name, total))
        else:
            self.ok(corr, topic_admin.add_partitions_here(self._broker, name, total))

    def _alter_topic_config(self, corr: int, header: dict[str, Any], payload: memoryview) -> None:
        request = api.parse_alter_topic_config(header)
        if topic_admin.clustered(self._broker):
            self._later(corr, topic_admin.alter_config_in_cluster(self._broker, request))
        else:
            self.ok(corr, topic_admin.alter_config_here(self._broker, request))

    def ok(self, corr: int, fields: dict[str, Any]) -> None:
        if self._throttle_ms:
            fields["throttle_ms"] = self._throttle_ms
        self.respond([frames.encode_frame({"corr": corr, "error": 0, **fields})])

    # -- authentication and quotas (server.authz; only with auth configured) -------------------

    def _authenticate(self, corr: int, header: dict[str, Any], payload: memoryview) -> None:
        """AUTHENTICATE: without ``token`` it answers the current principal; with one, the
        connection reads nothing more until the token is checked (scrypt, off the loop)."""
        token = header.get("token")
        if token is None:
            self.ok(corr, {"principal": self._auth.principal if self._auth is not None else ANONYMOUS})
            return
        if not isinstance(token, str):
            raise RequestError(ErrorCode.INVALID_REQUEST, "'token' must be a string")
        mechanism = header.get("mechanism", "token")
        if mechanism != "token":
            raise RequestError(ErrorCode.AUTHENTICATION_FAILED, f"unknown mechanism {mechanism!r} (this broker knows 'token')")
        if self._auth is None or self._auth.state.settings.token_file is None:
            raise RequestError(ErrorCode.AUTHENTICATION_FAILED, "this broker has no token file (auth_token_file)")
        self._hold = True
        self._later(corr, self._check_token(self._auth, token))

    async def _check_token(self, auth: ConnectionAuth, token: str) -> dict[str, Any]:
        try:
            principal = await auth.state.authenticate(token)
            if principal is None:
                claimed = token.partition(":")[0]
                log.warning("authentication of %s as %r failed", self._peer, claimed[:64])
                raise RequestError(ErrorCode.AUTHENTICATION_FAILED,
                                   f"token refused for principal {claimed[:64]!r} (unknown principal or wrong secret)")
            refusal = auth.become(principal)
            if refusal is not None:
                raise RequestError(ErrorCode.AUTHENTICATION_FAILED, refusal)
            return {"principal": principal}
        finally:
            self._release_hold()

    def _release_hold(self) -> None:
        self._hold = False
        if self._closing:
            return
        self._update_reading()
        if self._reading and self._wpos > self._rpos:
            self._process()

    def _charge_request(self, api_key: int, payload_bytes: int) -> None:
        """Quotas before a request runs: its own produce bytes and request count, plus the debt
        earlier fetches left; a delay holds this answer and further reads (Kafka's throttling)."""
        limiter = self._auth.limiter  # type: ignore[union-attr]
        assert limiter is not None
        now = time.monotonic()
        delay = 0.0
        if limiter.requests is not None:
            delay = limiter.requests.charge(1, now)
        if limiter.produce is not None and api_key in (ApiKey.PRODUCE, ApiKey.PRODUCE_IDEMPOTENT):
            delay = max(delay, limiter.produce.charge(payload_bytes, now))
        if limiter.fetch is not None and api_key == ApiKey.FETCH:
            delay = max(delay, limiter.fetch.debt_delay(now))
        if delay > 0:
            self._throttle(delay)

    def charge_fetch(self, nbytes: int) -> None:
        """Fetched bytes go into the principal's fetch bucket; its debt delays the next fetch."""
        limiter = self._auth.limiter if self._auth is not None else None
        if limiter is not None and limiter.fetch is not None and nbytes:
            limiter.fetch.charge(nbytes, time.monotonic())

    def _simple_auth(self, topic: str, nbytes: int) -> None:
        auth = self._auth
        assert auth is not None
        if not auth.allowed("topic", topic, "produce"):
            auth.refuse("topic", topic, "produce")
        limiter = auth.limiter
        if limiter is not None:
            now = time.monotonic()
            delay = limiter.requests.charge(1, now) if limiter.requests is not None else 0.0
            if limiter.produce is not None:
                delay = max(delay, limiter.produce.charge(nbytes, now))
            if delay > 0:
                self._throttle(delay)

    def _throttle(self, delay: float) -> None:
        """Hold every answer from here on (the current request's included) for ``delay`` and
        read nothing meanwhile: a gate slot in the ordered output that opens when the time is up."""
        self._throttle_ms = max(1, round(delay * 1000))
        assert self._auth is not None
        self._auth.state.throttled_ms += self._throttle_ms
        if self._simple_groups:
            self._append_simple_groups()  # replies already placed leave before the gate
        gate = self.reserve()
        self._hold = True

        def open_gate() -> None:
            self.complete(gate, [])
            self._release_hold()

        asyncio.get_running_loop().call_later(delay, open_gate)


# Connection's own requests, routed to its methods (the connection is the responder).
_CONNECTION_ROUTES: dict[int, Handler] = {
    ApiKey.AUTHENTICATE: Connection._authenticate,
    ApiKey.PRODUCE: Connection._produce,
    ApiKey.FETCH: Connection._fetch,
    ApiKey.LIST_OFFSETS: Connection._list_offsets,
    ApiKey.METADATA: Connection._metadata,
    ApiKey.CREATE_TOPIC: Connection._create_topic,
    ApiKey.DELETE_TOPIC: Connection._delete_topic,
    ApiKey.DESCRIBE_TOPIC: Connection._describe_topic,
    ApiKey.LIST_TOPICS: Connection._list_topics,
    ApiKey.BROKER_STATS: Connection._broker_stats,
    ApiKey.ADD_PARTITIONS: Connection._add_partitions,
    ApiKey.ALTER_TOPIC_CONFIG: Connection._alter_topic_config,
}


def build_router(broker: Broker) -> Router:
    """The routes of one broker's connections: its own requests and, when the broker runs them,
    the coordination requests (groups, offsets, queues, idempotent produce)."""
    return Router(_CONNECTION_ROUTES, coordination_handlers.routes(getattr(broker, "coordination", None)))


def _fetch_response(corr: int, parts: list[Any], total: int, throttle_ms: int = 0) -> list[bytes | memoryview]:
    header: dict[str, Any] = {"corr": corr, "error": 0, "partitions": [part.header for part in parts]}
    if throttle_ms:
        header["throttle_ms"] = throttle_ms
    buffers: list[bytes | memoryview] = [frames.encode_prefix(header, total)]
    for part in parts:
        buffers.extend(part.views)
    return buffers


class _FetchWait:
    """A long-poll fetch: re-read on every append to its partitions until min_bytes or max_wait."""

    __slots__ = ("_conn", "_corr", "_done", "_plogs", "_request", "_scheduled", "_slot", "_started", "_timer")

    def __init__(self, conn: Connection, corr: int, request: api.FetchRequest, slot: Slot, started: float) -> None:
        self._conn = conn
        self._corr = corr
        self._request = request
        self._slot = slot
        self._started = started
        self._plogs = conn._broker.fetch_logs(request)
        self._timer: asyncio.TimerHandle | None = None
        self._done = False
        self._scheduled = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._conn.long_polls += 1
        self._timer = loop.call_later(self._request.max_wait_ms / 1000, self.finish)
        self._conn._broker.wait_for_data(self._plogs, self._on_append)

    def _on_append(self) -> None:
        if self._done or self._scheduled:
            return
        # Called from inside the producer's append: answer on the next loop pass instead, so
        # the producer's own response is not delayed by this fetch's read and write. Appends to
        # many of its partitions in one pass cost one re-read, not one each.
        self._scheduled = True
        asyncio.get_running_loop().call_soon(self._recheck)

    def _recheck(self) -> None:
        self._scheduled = False
        if self._done:
            return
        parts, total = self._conn._broker.read_fetch(self._request)
        if total >= self._request.min_bytes:
            self._answer(parts, total)
        else:
            self._conn._broker.wait_for_data(self._plogs, self._on_append)

    def finish(self) -> None:
        if self._done:
            return
        parts, total = self._conn._broker.read_fetch(self._request)
        self._answer(parts, total)

    def _answer(self, parts: list[Any], total: int) -> None:
        self._stop()
        conn = self._conn
        conn._broker.stats.fetch_latency.observe(time.perf_counter() - self._started)
        conn.charge_fetch(total)
        conn.complete(self._slot, _fetch_response(self._corr, parts, total))

    def cancel(self) -> None:
        self._stop()

    def _stop(self) -> None:
        if not self._done:
            self._conn.long_polls -= 1
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        self._conn._broker.stop_waiting(self._plogs, self._on_append)
        self._conn._fetch_waits.discard(self)
