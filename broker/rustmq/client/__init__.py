"""The asyncio RustMQ client: Producer, Consumer, Admin, and a thin synchronous wrapper.

Typical use::

    async with Producer("localhost:9092", acks="leader") as producer:
        await producer.send("orders", b"hello", key=b"user-1")

    async with Consumer("localhost:9092", "orders", start="earliest") as consumer:
        async for message in consumer:
            print(message.offset, message.value)

Records are batched per partition (by bytes and linger time), encoded with one msgpack call
per batch and optionally compressed per batch; consumers decode one batch per msgpack call.
See docs/client.md.
"""

from rustmq.client.admin import Admin
from rustmq.client.consumer import Consumer, Message
from rustmq.client.errors import BrokerError, ProduceError
from rustmq.client.groups import GroupConsumer
from rustmq.client.producer import Producer, RecordMetadata
from rustmq.client.queues import Queue, QueueConsumer, QueueMessage, SyncQueue
from rustmq.client.sync import SyncAdmin, SyncConsumer, SyncGroupConsumer, SyncProducer

__all__ = [
    "Admin",
    "BrokerError",
    "Consumer",
    "GroupConsumer",
    "Message",
    "ProduceError",
    "Producer",
    "Queue",
    "QueueConsumer",
    "QueueMessage",
    "RecordMetadata",
    "SyncAdmin",
    "SyncGroupConsumer",
    "SyncQueue",
    "SyncConsumer",
    "SyncProducer",
]
