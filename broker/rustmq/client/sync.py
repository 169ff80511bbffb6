"""A thin synchronous wrapper for scripts: the asyncio client driven by a private event loop.

Each call runs the corresponding coroutine to completion on an ``asyncio.Runner`` owned by the
wrapper, so it must not be used from inside a running event loop (use the asyncio classes
there)::

    with SyncProducer("localhost:9092") as producer:
        producer.send("orders", b"hello")
    with SyncConsumer("localhost:9092", "orders") as consumer:
        for message in consumer.poll(timeout_s=1.0):
            print(message.offset, message.value)
    with SyncAdmin("localhost:9092") as admin:
        admin.configure_queue("orders", "billing", max_deliveries=3)
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Coroutine, Iterator
from typing import Any, Self, TypeVar

from rustmq.client.admin import Admin
from rustmq.client.consumer import Consumer, Message
from rustmq.client.groups import GroupConsumer
from rustmq.client.producer import Producer, RecordMetadata

T = TypeVar("T")


class SyncClient:
    """One started asyncio client driven by a Runner: owned (closed with the client) or shared
    with the wrapper that handed it out (``SyncQueue.subscribe``)."""

    def __init__(self, client: Any, runner: asyncio.Runner | None = None) -> None:
        self._owns_runner = runner is None
        self._runner = runner if runner is not None else asyncio.Runner()
        self._client = client
        try:
            self._runner.run(client.start())
        except BaseException:
            if self._owns_runner:
                self._runner.close()
            raise

    def _run(self, awaitable: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(awaitable)

    def close(self) -> None:
        try:
            self._runner.run(self._client.close())
        finally:
            if self._owns_runner:
                self._runner.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SyncProducer(SyncClient):
    def __init__(self, bootstrap: str = "localhost:9092", **options: Any) -> None:
        super().__init__(Producer(bootstrap, **options))

    def send(self, topic: str, value: bytes | None, key: bytes | None = None, **options: Any) -> None:
        self._run(self._client.send(topic, value, key, **options))

    def send_and_wait(self, topic: str, value: bytes | None, key: bytes | None = None, **options: Any) -> RecordMetadata:
        return self._run(self._client.send_and_wait(topic, value, key, **options))

    def flush(self) -> None:
        self._run(self._client.flush())


class SyncConsumer(SyncClient):
    def __init__(self, bootstrap: str = "localhost:9092", topic: str = "default", **options: Any) -> None:
        super().__init__(Consumer(bootstrap, topic, **options))

    @property
    def positions(self) -> dict[int, int]:
        return self._client.positions

    def poll(self, max_messages: int = 10_000, timeout_s: float = 1.0) -> list[Message]:
        return self._run(self._client.getmany(max_messages, timeout_s))

    def __iter__(self) -> Iterator[Message]:
        while True:
            yield from self.poll()


class SyncAdmin(SyncClient):
    """Blocking `Admin`: the same methods, each run to completion (``admin.configure_queue(...)``)."""

    def __init__(self, bootstrap: str = "localhost:9092", **options: Any) -> None:
        super().__init__(Admin(bootstrap, **options))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        method = getattr(self._client, name)
        if not inspect.iscoroutinefunction(method):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._run(method(*args, **kwargs))

        return call


class SyncGroupConsumer(SyncClient):
    """Blocking GroupConsumer for scripts. Membership heartbeats run only while a call is in
    progress (the private event loop is idle otherwise), so call poll() at least every
    session_timeout_ms / 2."""

    def __init__(self, bootstrap: str = "localhost:9092", topic: str | list[str] = "default", **options: Any) -> None:
        super().__init__(GroupConsumer(bootstrap, topic, **options))

    @property
    def assignment(self) -> list[tuple[str, int]]:
        return self._client.assignment

    def poll(self, timeout_s: float | None = None) -> list[Message]:
        return self._run(self._client.getmany(timeout_s))

    def commit(self) -> None:
        self._run(self._client.commit())
