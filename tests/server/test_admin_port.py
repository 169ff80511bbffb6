"""The admin port of a real broker process: probes, Prometheus metrics and the JSON topic API."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from rustmq.protocol.api import ApiKey


def http(broker, method: str, path: str, body: dict | None = None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{broker.metrics_port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode()

def test_probes(broker) -> None:
    assert http(broker, "GET", "/healthz") == (200, '{"status": "ok"}')
    assert http(broker, "GET", "/readyz") == (200, '{"status": "ready"}')

def test_metrics_count_per_batch_and_compute_gauges_at_scrape_time(broker, raw) -> None:
    client = raw(broker.producer_port)
    from rustmq.protocol import batch as record_batch
    from rustmq.protocol import records

    body = records.encode_body([[0, None, b"m", None]] * 10)
    batch = record_batch.build_batch(body, record_count=10, first_timestamp_ms=1, max_timestamp_ms=1)
    client.call({"api": ApiKey.PRODUCE, "topic": "metered", "partition": 1}, batch)
    client.call({"api": ApiKey.FETCH, "max_wait_ms": 0, "partitions": [{"topic": "metered", "partition": 1, "offset": 0}]})
    client.call({"api": 999})
    status, text = http(broker, "GET", "/metrics")
    assert status == 200
    lines = set(text.splitlines())
    assert 'rustmq_messages_in_total{topic="metered"} 10.0' in lines
    assert f'rustmq_bytes_in_total{{topic="metered"}} {float(len(batch))}' in lines
    assert 'rustmq_messages_out_total{topic="metered"} 10.0' in lines
    assert 'rustmq_log_end_offset{partition="1",topic="metered"} 10.0' in lines
    assert 'rustmq_request_errors_total{code="UNKNOWN_API"} 1.0' in lines
    assert 'rustmq_ready 1.0' in lines
    assert any(line.startswith("rustmq_produce_latency_seconds_bucket") for line in lines)
    assert any(line.startswith("rustmq_connections ") for line in lines)
    assert any(line.startswith("rustmq_durable_ack_latency_seconds_count") for line in lines)
    assert any(line.startswith("rustmq_group_commit_flushes_total") for line in lines)
    assert any(line.startswith("process_resident_memory_bytes") for line in lines)

def test_topic_json_api(broker) -> None:
    status, body = http(broker, "POST", "/v1/topics", {"name": "api-topic", "partitions": 2, "config": {"retention_ms": 1000}})
    assert status == 201 and json.loads(body)["config"]["retention_ms"] == 1000
    assert http(broker, "POST", "/v1/topics", {"name": "api-topic"})[0] == 409
    assert http(broker, "POST", "/v1/topics", {"name": 7})[0] == 400
    assert http(broker, "POST", "/v1/topics", {"name": "x", "config": {"bogus": 1}})[0] == 400
    status, body = http(broker, "GET", "/v1/topics")
    assert status == 200 and {t["topic"] for t in json.loads(body)["topics"]} == {"default", "api-topic"}
    status, body = http(broker, "POST", "/v1/topics/api-topic/partitions", {"partitions": 5})
    assert status == 200 and len(json.loads(body)["partitions"]) == 5
    assert http(broker, "GET", "/v1/topics/api-topic")[0] == 200
    assert http(broker, "DELETE", "/v1/topics/api-topic") == (200, '{"deleted": "api-topic"}')
    status, body = http(broker, "GET", "/v1/topics/api-topic")
    assert status == 404 and json.loads(body)["error"] == "UNKNOWN_TOPIC"
    status, body = http(broker, "GET", "/v1/broker")
    assert status == 200 and json.loads(body)["ports"]["producer"] == broker.producer_port


def test_topic_config_changes_over_http(broker) -> None:
    assert http(broker, "POST", "/v1/topics", {"name": "tuned", "partitions": 1})[0] == 201
    status, body = http(broker, "PATCH", "/v1/topics/tuned/config", {"set": {"retention_ms": 5000}})
    assert status == 200 and json.loads(body)["config"]["retention_ms"] == 5000
    status, body = http(broker, "PATCH", "/v1/topics/tuned/config", {"reset": ["retention_ms"]})
    assert status == 200 and json.loads(body)["config"]["retention_ms"] != 5000
    assert http(broker, "PATCH", "/v1/topics/tuned/config", {})[0] == 400
    assert http(broker, "PATCH", "/v1/topics/tuned/config", {"set": {"retention_ms": -1}})[0] == 400
    assert http(broker, "PATCH", "/v1/topics/missing/config", {"set": {"retention_ms": 1}})[0] == 404
