"""The interface request handlers answer through, so they need nothing of a connection's insides.

``Connection`` (rustmq.server.connection) implements ``Responder``; handlers that live outside it
(rustmq.server.coordination_handlers: groups, offsets, queues, idempotent produce) are written
against this Protocol only. Responses leave in request order, so a handler either answers at
once (``ok``, ``respond``) or takes its place in line with ``reserve`` and fills it later with
``complete`` (a durable commit, a long poll, a replicated produce); ``complete`` on a connection
that closed meanwhile does nothing, so late completions need no guard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from rustmq.protocol import api
    from rustmq.server.broker import Broker


class Slot:
    """A response position in a connection's ordered output; buffers is None until it is ready."""

    __slots__ = ("buffers",)

    def __init__(self) -> None:
        self.buffers: list[bytes | memoryview] | None = None


class Responder(Protocol):
    long_polls: int  # long polls held now on this connection (FETCH, QUEUE_FETCH, HEARTBEAT waits)

    @property
    def broker(self) -> Broker: ...

    @property
    def draining(self) -> bool:
        """The broker is shutting down: answer long polls at once."""
        ...

    def ok(self, corr: int, fields: dict[str, Any]) -> None:
        """Answer now with error 0 and fields."""

    def respond(self, buffers: list[bytes | memoryview]) -> None:
        """Answer now with these encoded buffers (after any earlier response still pending)."""

    def reserve(self) -> Slot:
        """Hold this request's place in the output until ``complete``."""
        ...

    def complete(self, slot: Slot, buffers: list[bytes | memoryview]) -> None:
        """Fill a reserved place; responses behind it leave once it is filled."""

    def long_poll_room(self) -> bool:
        """Whether one more long poll may wait on this connection."""
        ...

    def when_replicated(self, corr: int, request: api.ProduceRequest, produced: Any, response: dict[str, Any]) -> None:
        """acks=all: answer ``response`` once the in-sync replicas hold ``produced`` (cluster mode)."""
