"""Three real brokers in cluster mode (local control plane) with a default-deny ACL file: the
brokers authenticate to each other with their own token (``auth_broker_token_file``) as a
super-user principal, so replica fetches, which need ``cluster replicate``, keep the in-sync set
full; a client principal with topic rights only produces with acks=all and consumes."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import yaml

import clusterproc
from rustmq.auth import tokens
from rustmq.client import Admin, Consumer, Producer
from rustmq.client.connection import use_token
from rustmq.protocol.api import ErrorCode

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kubeconfig() -> Iterator[Path]:
    with clusterproc.control_plane() as path:
        yield path


@pytest.mark.timeout(240)
async def test_brokers_replicate_as_their_own_principal_under_default_deny(tmp_path: Path, kubeconfig: Path) -> None:
    (tmp_path / "tokens").write_text(
        tokens.hash_line("rustmq-broker", "broker-secret", log_n=10) + "\n"
        + tokens.hash_line("app", "app-secret", log_n=10) + "\n")
    (tmp_path / "broker-token").write_text("rustmq-broker:broker-secret\n")
    (tmp_path / "acl.yaml").write_text(yaml.safe_dump({
        "default": "deny",
        "super_users": ["rustmq-broker"],
        "rules": [{"principal": "app", "topic": "secure", "allow": ["produce", "consume", "describe", "create"]}],
    }))
    flags = ("--auth-token-file", str(tmp_path / "tokens"), "--auth-acl-file", str(tmp_path / "acl.yaml"),
             "--auth-broker-token-file", str(tmp_path / "broker-token"))
    (tmp_path / "brokers").mkdir()
    cluster = clusterproc.BrokerCluster(
        tmp_path / "brokers", kubeconfig, clusterproc.create_namespace(kubeconfig), 3, extra_args=flags)
    use_token("app:app-secret")
    try:
        for broker_id in range(3):
            cluster.start(broker_id)
        bootstrap = ",".join(p.bootstrap for p in cluster.brokers.values())

        async def metadata(condition: Any, what: str, topics: list[str] | None = None) -> None:
            deadline = time.monotonic() + 60
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
            "a full in-sync set with authenticated replica fetches", topics=["secure"])
        async with Producer(bootstrap, acks="all") as producer:
            for i in range(100):
                await producer.send("secure", b"s%d" % i, key=b"k%d" % (i % 5))
        seen: list[bytes] = []
        async with Consumer(bootstrap, "secure", start="earliest", max_wait_ms=100) as consumer:
            stream = consumer.batches()
            while len(seen) < 100:
                seen += [m.value for m in await asyncio.wait_for(stream.__anext__(), 20)]
        assert sorted(seen) == sorted(b"s%d" % i for i in range(100))
        # Seed-style simple produce carries no token: ANONYMOUS, refused under default deny on
        # every broker (cluster mode routes it, and checks it first).
        for process in cluster.brokers.values():
            reader, writer = await asyncio.open_connection("127.0.0.1", process.producer_port)
            body = msgpack.packb({"key": None, "value": b"x", "topic": "secure"})
            writer.write(struct.pack(">I", len(body)) + body)
            reply = struct.unpack(">Q", await asyncio.wait_for(reader.readexactly(8), 10))[0]
            writer.close()
            await writer.wait_closed()
            assert reply == (1 << 63) | ErrorCode.AUTHORIZATION_FAILED, hex(reply)
        assert "AUTHORIZATION_FAILED" not in cluster.logs() and "authentication of" not in cluster.logs()
    finally:
        use_token(None)
        cluster.stop_all()
