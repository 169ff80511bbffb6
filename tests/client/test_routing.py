"""Retry rules and backoff of the cluster-aware client (rustmq.client.routing)."""

from __future__ import annotations

from rustmq.client.errors import BrokerError, ConnectionClosedError
from rustmq.client.routing import BACKOFF_MAX_S, BACKOFF_START_S, Routes, backoff, retriable
from rustmq.protocol.api import ErrorCode


def test_backoff_is_jittered_exponential_and_capped() -> None:
    for attempt in range(30):
        ceiling = min(BACKOFF_MAX_S, BACKOFF_START_S * 2**attempt)
        values = {backoff(attempt) for _ in range(50)}
        assert all(ceiling / 2 <= v <= ceiling for v in values)
        assert len(values) > 1  # jittered


def test_what_is_retried() -> None:
    assert retriable(BrokerError(ErrorCode.NOT_LEADER, ""), clustered=True)
    assert retriable(ConnectionClosedError("gone"), clustered=False)
    assert retriable(TimeoutError(), clustered=False)
    assert retriable(BrokerError(ErrorCode.UNKNOWN_TOPIC, ""), clustered=True)
    assert not retriable(BrokerError(ErrorCode.UNKNOWN_TOPIC, ""), clustered=False)
    assert not retriable(BrokerError(ErrorCode.CORRUPT_BATCH, ""), clustered=True)
    assert not retriable(ValueError(), clustered=True)


def test_bootstrap_list_parsing() -> None:
    routes = Routes("a:1, b:2,[::1]:3")
    assert routes.bootstrap == [("a", 1), ("b", 2), ("::1", 3)]
