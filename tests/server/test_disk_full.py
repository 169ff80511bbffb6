"""A broker whose data directory fills up: produce gets STORAGE_FULL, nothing stored is lost,
reads keep working and the broker keeps serving. The data directory is a real 40 MiB tmpfs
(mounting needs root, which the project's machines give; elsewhere the test is skipped with
the reason)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rustmq.protocol import batch as record_batch
from rustmq.protocol import records
from rustmq.protocol.api import ApiKey, ErrorCode


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def make_batch(index: int) -> bytes:
    body = records.encode_body([[0, None, b"%04d" % index + b"." * 250_000, None]])
    return record_batch.build_batch(body, record_count=1, first_timestamp_ms=1, max_timestamp_ms=1)


@pytest.mark.timeout(120)
def test_a_full_disk_answers_storage_full_and_keeps_what_was_stored(tiny_dir, raw) -> None:
    from brokerproc import BrokerProcess

    broker = BrokerProcess(tiny_dir / "data", "--partitions", "1", "--log", json.dumps({"segment_bytes": 1 << 20})).start()
    try:
        client = raw(broker.producer_port)
        stored = 0
        for index in range(400):
            response, _ = client.call({"api": ApiKey.PRODUCE, "topic": "default", "partition": 0, "acks": 2}, make_batch(index))
            if response["error"]:
                assert response["error"] == ErrorCode.STORAGE_FULL, response
                assert "no space left" in response["message"]
                break
            assert response["base_offset"] == stored
            stored += 1
        else:
            pytest.fail("the 40 MiB disk never filled up")
        assert stored >= 3
        # Still serving: metadata, and every acknowledged record reads back intact.
        assert client.call({"api": ApiKey.LIST_TOPICS})[0]["error"] == 0
        consumer = raw(broker.consumer_port)
        seen, offset = [], 0
        while offset < stored:
            response, data = consumer.call({"api": ApiKey.FETCH, "max_wait_ms": 0,
                                            "partitions": [{"topic": "default", "partition": 0, "offset": offset}]})
            part = response["partitions"][0]
            assert part["error"] == 0 and part["high_watermark"] == stored
            pos = 0
            while pos < len(data):
                header = record_batch.read_header(data, pos)
                (entry,) = records.decode_body(data[pos + record_batch.HEADER_SIZE : pos + header.size], 0)
                seen.append(entry[2][:4])
                offset = header.base_offset + 1
                pos += header.size
        assert seen == [b"%04d" % index for index in range(stored)]
    finally:
        assert broker.stop() == 0


def _readyz(broker) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{broker.metrics_port}/readyz", timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.timeout(120)
def test_readyz_reports_a_broker_that_can_no_longer_write(tiny_dir, raw) -> None:
    from brokerproc import BrokerProcess

    broker = BrokerProcess(tiny_dir / "data", "--partitions", "1", "--log", json.dumps({"segment_bytes": 1 << 20}),
                           "--readiness-min-free-bytes", str(4 << 20)).start()
    try:
        assert _readyz(broker)[0] == 200
        client = raw(broker.producer_port)
        for index in range(400):
            response, _ = client.call({"api": ApiKey.PRODUCE, "topic": "default", "partition": 0, "acks": 2}, make_batch(index))
            if response["error"]:
                assert response["error"] == ErrorCode.STORAGE_FULL, response
                break
        else:
            pytest.fail("the 40 MiB disk never filled up")
        status, body = _readyz(broker)
        assert status == 503 and body["status"] == "cannot write", body
        assert "no space left" in body["reason"]
        # Space comes back (the topic holding it is deleted): ready again, writes work.
        assert client.call({"api": ApiKey.DELETE_TOPIC, "topic": "default"})[0]["error"] == 0
        deadline = time.monotonic() + 10  # the files are removed by a worker thread
        while _readyz(broker)[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _readyz(broker) == (200, {"status": "ready"})
        response, _ = client.call({"api": ApiKey.PRODUCE, "topic": "again", "acks": 2}, make_batch(0))
        assert response["error"] == 0
    finally:
        assert broker.stop() == 0
