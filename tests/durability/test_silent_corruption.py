"""A bit flipped in a sealed segment's payload: the broker restarts and serves the batch as it is
(sealed, fsynced segments are trusted without a CRC pass; reads never verify), and a consumer
gets a clear CorruptBatchError naming the topic, partition and offset, never wrong records.
The other batches and partitions stay readable. docs/storage.md, "What is verified when".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from brokerproc import BrokerProcess, RawClient
from rustmq.client.consumer import Consumer
from rustmq.protocol import batch, records
from rustmq.protocol.api import ApiKey
from rustmq.storage import errors

TOPIC = "bits"
PER_BATCH = 8


def produce(port: int, partition: int, batches: int) -> None:
    client = RawClient(port)
    try:
        for number in range(batches):
            values = [b"%d-%d-" % (number, i) + bytes(1000) for i in range(PER_BATCH)]
            body = records.encode_body([[0, None, value, None] for value in values])
            raw = batch.build_batch(body, record_count=PER_BATCH, first_timestamp_ms=1,
                                    max_timestamp_ms=1)
            response, _ = client.call({"api": ApiKey.PRODUCE, "topic": TOPIC,
                                       "partition": partition, "acks": 2}, raw)
            assert response["error"] == 0, response
    finally:
        client.close()


def flip_a_payload_bit(segment: Path, batch_number: int) -> int:
    """Flip one bit inside the body of the `batch_number`-th batch; return its base offset."""
    data = bytearray(segment.read_bytes())
    for number, (position, header) in enumerate(batch.iter_batches(memoryview(data))):
        if number == batch_number:
            data[position + batch.HEADER_SIZE + 40] ^= 0x10
            segment.write_bytes(bytes(data))
            return header.base_offset
    raise AssertionError(f"{segment} has fewer than {batch_number + 1} batches")


async def consume(port: int, partition: int, start: int | str, count: int) -> list[bytes | None]:
    async with Consumer(f"127.0.0.1:{port}", TOPIC, partitions=[partition], start=start,
                        max_bytes=16 * 1024) as consumer:
        out: list[bytes | None] = []
        while len(out) < count:
            out += [message.value for message in await consumer.getmany(timeout_s=5)]
        return out


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_flipped_bit_in_a_sealed_segment_is_reported_to_the_consumer(tmp_path: Path
                                                                            ) -> None:
    data_dir = tmp_path / "data"
    broker = BrokerProcess(data_dir, "--partitions", "1").start()
    try:
        admin = RawClient(broker.producer_port)
        response, _ = admin.call({"api": ApiKey.CREATE_TOPIC, "topic": TOPIC, "partitions": 2,
                                  "config": {"segment_bytes": 64 * 1024}})
        admin.close()
        assert response["error"] == 0, response
        produce(broker.producer_port, 0, 40)  # about 330 KiB: several sealed segments
        produce(broker.producer_port, 1, 5)
        assert broker.stop() == 0
        segments = sorted((data_dir / "topics" / TOPIC / "0").glob("*.log"))
        assert len(segments) > 2
        damaged = flip_a_payload_bit(segments[0], 2)
        assert damaged == 2 * PER_BATCH

        for stop in ("clean", "kill"):  # a clean restart, then a crash and an unclean one
            broker = BrokerProcess(data_dir, "--partitions", "1").start()
            port = broker.consumer_port
            before = await consume(port, 0, "earliest", damaged)  # the batches before it
            assert before[:damaged] == [b"%d-%d-" % (n // PER_BATCH, n % PER_BATCH) + bytes(1000)
                                        for n in range(damaged)]
            with pytest.raises(errors.CorruptBatchError,
                               match=rf"{TOPIC}/0: batch at offset {damaged}: CRC32C mismatch"):
                await consume(port, 0, damaged, PER_BATCH)
            after = await consume(port, 0, damaged + PER_BATCH, 10)  # skipping it works
            assert after[0] == b"3-0-" + bytes(1000)
            assert len(await consume(port, 1, "earliest", 5 * PER_BATCH)) == 5 * PER_BATCH
            client = RawClient(port)
            response, _ = client.call({"api": ApiKey.LIST_OFFSETS, "topic": TOPIC,
                                       "partition": 0, "at": -1})
            client.close()
            assert response["offset"] == 40 * PER_BATCH  # nothing was cut at the restart
            if stop == "clean":
                broker.kill()
                broker.stop()
            else:
                assert broker.stop() == 0
    finally:
        broker.kill()
        broker.stop()  # closes its log file
