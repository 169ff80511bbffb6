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
from collections.abc import Iterator
from typing import Any

from rustmq.client.admin import Admin
from rustmq.client.consumer import Consumer, Message
from rustmq.client.producer import Producer, RecordMetadata


class SyncProducer:
    def __init__(self, bootstrap: str = "localhost:9092", **options: Any) -> None:
        self._runner = asyncio.Runner()
        self._producer = Producer(bootstrap, **options)
        self._runner.run(self._producer.start())

    def send(self, topic: str, value: bytes | None, key: bytes | None = None, **options: Any) -> None:
        self._runner.run(self._producer.send(topic, value, key, **options))

    def send_and_wait(self, topic: str, value: bytes | None, key: bytes | None = None, **options: Any) -> RecordMetadata:
        return self._runner.run(self._producer.send_and_wait(topic, value, key, **options))

    def flush(self) -> None:
        self._runner.run(self._producer.flush())

    def close(self) -> None:
        try:
            self._runner.run(self._producer.close())
        finally:
            self._runner.close()

    def __enter__(self) -> SyncProducer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SyncConsumer:
    def __init__(self, bootstrap: str = "localhost:9092", topic: str = "default", **options: Any) -> None:
        self._runner = asyncio.Runner()
        self._consumer = Consumer(bootstrap, topic, **options)
        self._runner.run(self._consumer.start())

    @property
    def positions(self) -> dict[int, int]:
        return self._consumer.positions

    def poll(self, max_messages: int = 10_000, timeout_s: float = 1.0) -> list[Message]:
        return self._runner.run(self._consumer.getmany(max_messages, timeout_s))

    def __iter__(self) -> Iterator[Message]:
        while True:
            yield from self.poll()

    def close(self) -> None:
        try:
            self._runner.run(self._consumer.close())
        finally:
            self._runner.close()

    def __enter__(self) -> SyncConsumer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SyncAdmin:
    """Blocking `Admin`: the same methods, each run to completion (``admin.configure_queue(...)``)."""

    def __init__(self, bootstrap: str = "localhost:9092", **options: Any) -> None:
        self._runner = asyncio.Runner()
        self._admin = Admin(bootstrap, **options)
        self._runner.run(self._admin.start())

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        method = getattr(self._admin, name)
        if not inspect.iscoroutinefunction(method):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._runner.run(method(*args, **kwargs))

        return call

    def close(self) -> None:
        try:
            self._runner.run(self._admin.close())
        finally:
            self._runner.close()

    def __enter__(self) -> SyncAdmin:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
