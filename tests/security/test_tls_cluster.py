"""Three real brokers in cluster mode (coordinating through the local control plane's API server)
serving mutual TLS only: the followers' replica fetches (and simple produce forwarded to a
partition's leader) dial the other brokers' TLS ports with the broker's own certificate, so a
replicated topic reaches a full in-sync set, acks=all produce works and every replica holds the log. Without that, a TLS cluster would never replicate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import clusterproc
from rustmq.client import Admin, Consumer, Producer
from rustmq.client.connection import tls_context, use_tls
from rustmq.protocol import simple
from tlspki import Authority, SecretVolume


def simple_message(value: bytes, key: bytes) -> bytes:
    return simple.encode_message(value, key=key, topic="secure")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kubeconfig() -> Iterator[Path]:
    with clusterproc.control_plane() as path:
        yield path


@pytest.mark.timeout(240)
async def test_a_mutual_tls_cluster_replicates_over_tls(tmp_path: Path, kubeconfig: Path) -> None:
    ca = Authority("rustmq cluster CA")
    volume = SecretVolume(tmp_path / "secret")
    broker_cert = ca.issue("localhost", server=True, client_too=True)
    volume.write({"tls.crt": broker_cert.cert, "tls.key": broker_cert.key, "ca.crt": ca.pem})
    client = ca.issue("app", server=False)
    (tmp_path / "client.crt").write_bytes(client.cert)
    (tmp_path / "client.key").write_bytes(client.key)
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    tls_flags = (
        "--tls-cert-file", str(volume.path("tls.crt")), "--tls-key-file", str(volume.path("tls.key")),
        "--tls-client-ca-file", str(volume.path("ca.crt")), "--tls-client-auth", "required",
        "--tls-peer-ca-file", str(volume.path("ca.crt")),
    )
    cluster = clusterproc.BrokerCluster(
        tmp_path / "brokers", kubeconfig, clusterproc.create_namespace(kubeconfig), 3, extra_args=tls_flags
    )
    (tmp_path / "brokers").mkdir()
    use_tls(tls_context(tmp_path / "ca.crt", tmp_path / "client.crt", tmp_path / "client.key"))
    try:
        for broker_id in range(3):
            cluster.start(broker_id)
        bootstrap = ",".join(p.bootstrap for p in cluster.brokers.values())

        async def metadata(condition: Any, what: str, topics: list[str] | None = None) -> None:
            """Wait until every broker's METADATA (over mutual TLS) satisfies ``condition``."""
            deadline = time.monotonic() + 60
            found: dict[str, Any] = {}
            for process in cluster.brokers.values():
                while True:
                    async with Admin(process.bootstrap) as admin:
                        found = await admin.metadata(topics)
                    if condition(found):
                        break
                    assert time.monotonic() < deadline, f"{what} never happened: {found}\n{cluster.logs()}"
                    await asyncio.sleep(0.2)

        await metadata(lambda m: len(m["brokers"]) == 3, "three brokers")
        async with Admin(cluster.brokers[1].bootstrap) as admin:
            created = await admin.create_topic("secure", 3)
        assert created["replication_factor"] == 3
        await metadata(
            lambda m: all(len(p["isr"]) == 3 and p["leader"] >= 0 for p in m["topics"][0]["partitions"]),
            "a full in-sync set over TLS", topics=["secure"],
        )
        async with Producer(bootstrap, acks="all") as producer:
            for i in range(200):
                await producer.send("secure", b"s%d" % i, key=b"k%d" % (i % 5))
        # A seed-style simple produce client on broker 0 only: keyed messages for the partitions
        # broker 0 does not lead are forwarded to their leaders over the brokers' mutual TLS.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", cluster.brokers[0].producer_port,
            ssl=tls_context(tmp_path / "ca.crt", tmp_path / "client.crt", tmp_path / "client.key"),
            server_hostname="localhost")
        writer.write(b"".join(simple_message(b"f%d" % i, b"fk%d" % i) for i in range(30)))
        replies = [simple.decode_reply(await asyncio.wait_for(reader.readexactly(8), 30)) for _ in range(30)]
        writer.close()
        await writer.wait_closed()
        assert all(offset >= 0 for offset in replies)
        seen: list[bytes] = []
        async with Consumer(bootstrap, "secure", start="earliest", max_wait_ms=100) as consumer:
            stream = consumer.batches()
            while len(seen) < 230:
                seen += [m.value for m in await asyncio.wait_for(stream.__anext__(), 20)]
        assert sorted(seen) == sorted([b"s%d" % i for i in range(200)] + [b"f%d" % i for i in range(30)])
        async with Admin(cluster.brokers[2].bootstrap) as admin:
            ends = [sum(p["end_offset"] for p in (await admin.describe_topic("secure"))["partitions"])]
        assert ends == [230]  # broker 2's own log holds every record: it replicated over TLS
        assert "TLS handshake" not in cluster.logs()
    finally:
        use_tls(None)
        cluster.stop_all()
