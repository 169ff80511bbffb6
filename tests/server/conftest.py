"""Fixtures of the server tests: raw protocol connections to the shared `broker` (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import brokerproc


@pytest.fixture
def raw() -> Iterator[object]:
    """Open RawClient connections (closed at teardown): raw(port) -> RawClient."""
    clients: list[brokerproc.RawClient] = []

    def connect(port: int) -> brokerproc.RawClient:
        client = brokerproc.RawClient(port)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()
