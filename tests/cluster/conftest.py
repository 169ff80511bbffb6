"""Fixtures for the cluster tests: the local control plane (once per session) and a namespace
per test in which three real broker processes form one cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import clusterproc


@pytest.fixture(scope="session")
def kubeconfig() -> Iterator[Path]:
    with clusterproc.control_plane() as path:
        yield path


@pytest.fixture
def three_brokers(tmp_path: Path, kubeconfig: Path) -> Iterator[clusterproc.BrokerCluster]:
    cluster = clusterproc.BrokerCluster(tmp_path, kubeconfig, clusterproc.create_namespace(kubeconfig), 3)
    try:
        yield cluster.start_all()
    finally:
        cluster.stop_all()
