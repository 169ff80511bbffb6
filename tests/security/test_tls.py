"""TLS and mutual TLS on the producer and consumer ports, against real broker processes with
certificates made here (the `cryptography` package): produce and consume through the library
and the CLI, seed-style simple produce over TLS, clear errors for a missing, untrusted or
plaintext client, a broken certificate at start-up, and certificate rotation under load.

The certificate files are laid out as a Kubernetes Secret volume is (the kubelet's atomic
writer): `tls.crt` -> `..data/tls.crt`, `..data` -> a timestamped directory; a rotation writes a
new directory and swaps the `..data` symlink in one rename, which is what cert-manager's
renewals look like from inside the pod.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
from cryptography import x509

import brokerproc
from rustmq.client import Consumer, Producer
from rustmq.client.connection import tls_context, use_tls
from tlspki import Authority, Issued, SecretVolume

RUSTMQ = [sys.executable, "-m", "rustmq"]


@dataclass
class Pki:
    ca: Authority
    rogue: Authority
    dir: Path
    ca_file: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca, rogue = Authority("rustmq test CA"), Authority("someone else's CA")
    (root / "ca.crt").write_bytes(ca.pem)
    client = ca.issue("app", server=False)
    stranger = rogue.issue("app", server=False)
    for name, issued in (("client", client), ("rogue", stranger)):
        (root / f"{name}.crt").write_bytes(issued.cert)
        (root / f"{name}.key").write_bytes(issued.key)
    return Pki(ca, rogue, root, root / "ca.crt", root / "client.crt", root / "client.key", root / "rogue.crt", root / "rogue.key")


def start_broker(tmp_path: Path, pki: Pki, *, client_auth: str = "required") -> tuple[brokerproc.BrokerProcess, SecretVolume, Issued]:
    volume = SecretVolume(tmp_path / "secret")
    server = pki.ca.issue("localhost", server=True)
    volume.write({"tls.crt": server.cert, "tls.key": server.key, "ca.crt": pki.ca.pem})
    broker = brokerproc.BrokerProcess(
        tmp_path / "data",
        "--tls-cert-file", str(volume.path("tls.crt")),
        "--tls-key-file", str(volume.path("tls.key")),
        "--tls-client-ca-file", str(volume.path("ca.crt")),
        "--tls-client-auth", client_auth,
        "--tls-reload-s", "0.2",
    ).start()
    return broker, volume, server


@pytest.fixture
def tls_broker(tmp_path: Path, pki: Pki) -> Iterator[tuple[brokerproc.BrokerProcess, SecretVolume, Issued]]:
    broker, volume, server = start_broker(tmp_path, pki)
    try:
        yield broker, volume, server
    finally:
        assert broker.stop() == 0, broker.log()


@pytest.fixture
def mutual_tls(pki: Pki) -> Iterator[ssl.SSLContext]:
    """The library's process-wide TLS default, for Producer and Consumer."""
    context = tls_context(pki.ca_file, pki.client_cert, pki.client_key)
    use_tls(context)
    try:
        yield context
    finally:
        use_tls(None)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RUSTMQ, *args], capture_output=True, text=True, timeout=60)


def tls_flags(pki: Pki, *, cert: Path | None = None, key: Path | None = None, ca: Path | None = None) -> list[str]:
    flags = ["--tls-ca", str(ca or pki.ca_file)]
    if cert is not None:
        flags += ["--tls-cert", str(cert), "--tls-key", str(key)]
    return flags


def peer_serial(port: int, pki: Pki) -> int:
    context = tls_context(pki.ca_file, pki.client_cert, pki.client_key)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(raw, server_hostname="localhost") as sock:
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.mark.slow
def test_cli_produces_and_consumes_over_mutual_tls(tls_broker: tuple[brokerproc.BrokerProcess, SecretVolume, Issued], pki: Pki) -> None:
    broker, _, _ = tls_broker
    flags = ["--bootstrap", broker.bootstrap, *tls_flags(pki, cert=pki.client_cert, key=pki.client_key)]
    produced = cli("produce", "orders", "one", "two", "--key", "k", *flags)
    assert produced.returncode == 0, produced.stderr
    consume = ["consume", "orders", "--timeout", "2", "--json", "--bootstrap", f"127.0.0.1:{broker.consumer_port}",
               *tls_flags(pki, cert=pki.client_cert, key=pki.client_key)]
    consumed = cli(*consume)
    assert consumed.returncode == 0, consumed.stderr
    values = [json.loads(line)["value"] for line in consumed.stdout.splitlines()]
    assert values == ["one", "two"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        # TLS 1.3 ends the client's handshake before the broker has checked its certificate: the
        # broker's alert then arrives either as a readable TLS error or as a plain close, and the
        # client words each clearly (either wording below is right for both cases).
        ("no client certificate", ("requires a client certificate",)),
        ("client certificate of another CA", ("refused the one presented", "refused the client certificate")),
        ("broker not trusted", ("the broker's certificate is not trusted",)),
        ("plaintext", ("if this port speaks TLS, use --tls",)),
    ],
)
def test_clients_the_broker_must_refuse_get_a_clear_error(
    case: str, expected: tuple[str, ...], tls_broker: tuple[brokerproc.BrokerProcess, SecretVolume, Issued], pki: Pki
) -> None:
    broker, _, _ = tls_broker
    flags = {
        "no client certificate": tls_flags(pki),
        "client certificate of another CA": tls_flags(pki, cert=pki.rogue_cert, key=pki.rogue_key),
        "broker not trusted": ["--tls-ca", str(pki.rogue_cert), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)],
        "plaintext": [],
    }[case]
    refused = cli("topic", "list", "--bootstrap", broker.bootstrap, *flags)
    assert refused.returncode == 1, refused.stdout
    assert any(text in refused.stderr for text in expected), refused.stderr
    assert "Traceback" not in refused.stderr
    # The broker keeps serving the others.
    fine = cli("topic", "list", "--bootstrap", broker.bootstrap, *tls_flags(pki, cert=pki.client_cert, key=pki.client_key))
    assert fine.returncode == 0, fine.stderr


@pytest.mark.slow
def test_seed_style_simple_produce_over_tls(tls_broker: tuple[brokerproc.BrokerProcess, SecretVolume, Issued], pki: Pki) -> None:
    broker, _, _ = tls_broker
    context = tls_context(pki.ca_file, pki.client_cert, pki.client_key)
    with socket.create_connection(("127.0.0.1", broker.producer_port), timeout=10) as raw, context.wrap_socket(raw, server_hostname="localhost") as sock:
        offsets = []
        for value in (b"first", b"second"):
            message = msgpack.packb({"key": None, "value": value, "topic": "seed", "partition": 0})
            sock.sendall(struct.pack(">I", len(message)) + message)
            reply = b""
            while len(reply) < 8:
                chunk = sock.recv(8 - len(reply))
                assert chunk, "broker closed the connection"
                reply += chunk
            offsets.append(struct.unpack(">Q", reply)[0])
    assert offsets == [0, 1]


@pytest.mark.slow
def test_a_certificate_that_does_not_load_stops_the_broker_with_a_clear_error(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "broken.crt").write_text("not a certificate")
    result = subprocess.run(
        [*RUSTMQ, "broker", "--data-dir", str(tmp_path / "data"), "--producer-port", "0", "--consumer-port", "0",
         "--metrics-port", "0", "--tls-cert-file", str(tmp_path / "broken.crt"), "--tls-key-file", str(pki.client_key)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "cannot load the TLS certificate" in result.stderr and "broken.crt" in result.stderr
    assert "Traceback" not in result.stderr
    missing_ca = cli("broker", "--tls-cert-file", str(pki.client_cert), "--tls-key-file", str(pki.client_key), "--tls-client-auth", "required")
    assert missing_ca.returncode == 2 and "need a CA file" in missing_ca.stderr


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_rotation_under_load_loses_nothing_and_drops_no_connection(
    tls_broker: tuple[brokerproc.BrokerProcess, SecretVolume, Issued], pki: Pki, mutual_tls: ssl.SSLContext
) -> None:
    broker, volume, first = tls_broker
    assert await asyncio.to_thread(peer_serial, broker.producer_port, pki) == first.serial
    acked: list[int] = []
    stop = asyncio.Event()

    async with Producer(broker.bootstrap, acks="leader", linger_ms=1) as producer:

        async def load() -> None:
            number = 0
            while not stop.is_set():
                for i in range(50):
                    await producer.send("rotating", str(number + i).encode(), partition=0)
                await producer.flush()  # ProduceError if any batch failed
                acked.extend(range(number, number + 50))
                number += 50

        running = asyncio.create_task(load())
        await asyncio.sleep(0.5)
        rotations = []
        for _ in range(3):
            fresh = pki.ca.issue("localhost", server=True)
            volume.write({"tls.crt": fresh.cert, "tls.key": fresh.key, "ca.crt": pki.ca.pem})
            deadline = time.monotonic() + 10
            while await asyncio.to_thread(peer_serial, broker.producer_port, pki) != fresh.serial:
                assert time.monotonic() < deadline, "the broker never served the rotated certificate"
                await asyncio.sleep(0.1)
            rotations.append(fresh.serial)
            await asyncio.sleep(0.3)
        # A half-written or mismatched pair is not taken: the last good certificate stays.
        volume.write({"tls.crt": pki.ca.issue("localhost", server=True).cert, "tls.key": first.key, "ca.crt": pki.ca.pem})
        await asyncio.sleep(1.0)
        assert await asyncio.to_thread(peer_serial, broker.producer_port, pki) == rotations[-1]
        stop.set()
        await running  # raises if the producer's connection failed at any point
    assert len(acked) > 300 and len(rotations) == 3
    assert "do not load" in broker.log()

    seen: list[int] = []
    async with Consumer(f"127.0.0.1:{broker.consumer_port}", "rotating", start="earliest") as consumer:
        async for message in consumer:
            seen.append(int(message.value))
            if len(seen) >= len(acked):
                break
    assert seen == acked  # nothing lost, nothing duplicated, in order


@pytest.mark.slow
def test_silent_clients_cannot_pile_up_handshakes(tmp_path: Path, pki: Pki) -> None:
    volume = SecretVolume(tmp_path / "secret")
    server = pki.ca.issue("localhost", server=True)
    volume.write({"tls.crt": server.cert, "tls.key": server.key})
    broker = brokerproc.BrokerProcess(
        tmp_path / "data", "--tls-cert-file", str(volume.path("tls.crt")),
        "--tls-key-file", str(volume.path("tls.key")), "--max-connections", "2",
    ).start()
    try:
        silent = [socket.create_connection(("127.0.0.1", broker.producer_port), timeout=5) for _ in range(2)]
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", broker.producer_port), timeout=5)
        assert extra.recv(1) == b""  # closed at once: two handshakes already wait
        extra.close()
        for sock in silent:
            sock.close()
        time.sleep(0.3)
        fine = cli("topic", "list", "--bootstrap", broker.bootstrap, "--tls-ca", str(pki.ca_file))
        assert fine.returncode == 0, fine.stderr
    finally:
        assert broker.stop() == 0, broker.log()
