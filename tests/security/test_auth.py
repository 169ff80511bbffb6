"""Authentication, ACLs, admin API authorisation and quotas against real broker processes.

Each broker gets a token file (hashed lines made with rustmq.auth.tokens, as `rustmq token
create` makes them), an ACL file and mutual TLS with certificates made here (tlspki); the files
sit in a directory laid out like a mounted Kubernetes Secret, and rotations swap its `..data`
link as the kubelet does.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import yaml

import brokerproc
from rustmq.auth import tokens
from rustmq.client import Consumer, Producer
from rustmq.client.connection import Connection, tls_context, use_tls, use_token
from rustmq.client.errors import BrokerError, ConnectionClosedError
from rustmq.protocol import batch as record_batch
from rustmq.protocol import frames, records
from rustmq.protocol.api import ApiKey, ErrorCode
from tlspki import Authority, SecretVolume

RUSTMQ = [sys.executable, "-m", "rustmq"]
SECRETS = {"admin": "admin-secret", "app": "app-secret", "reader": "reader-secret", "slow": "slow-secret",
           "fast": "fast-secret", "broker": "broker-secret", "chatty": "chatty-secret", "drinker": "drinker-secret"}

ACL: dict[str, Any] = {
    "default": "deny",
    "super_users": ["admin"],
    "rules": [
        {"principal": "app", "topic": "orders.*", "allow": ["produce", "consume", "describe", "create", "alter"]},
        {"principal": "app", "topic": "orders.locked", "deny": ["alter"]},
        {"principal": "app", "group": "billing", "allow": ["consume", "describe"]},
        {"principal": "app", "subscription": "workers", "allow": ["consume"]},
        {"principal": "reader", "topic": "orders.*", "allow": ["consume", "describe"]},
        {"principal": "cert-app", "topic": "seed*", "allow": ["produce"]},
        {"principal": "*", "topic": "public", "allow": ["produce", "describe"]},
        {"principal": "slow", "topic": "*", "allow": ["produce", "create", "describe"]},
        {"principal": "fast", "topic": "*", "allow": ["produce", "create", "describe"]},
        {"principal": "chatty", "topic": "*", "allow": ["describe"]},
        {"principal": "drinker", "topic": "*", "allow": ["consume"]},
    ],
    "quotas": {"principals": {"slow": {"produce_bytes_per_s": 200_000}, "reader": {"connections": 2},
                              "chatty": {"requests_per_s": 20}, "drinker": {"fetch_bytes_per_s": 100_000}}},
}


def token(principal: str) -> str:
    return f"{principal}:{SECRETS[principal]}"


def token_lines(principals: dict[str, str]) -> bytes:
    return "".join(tokens.hash_line(p, s, log_n=10) + "\n" for p, s in principals.items()).encode()


@dataclass
class Env:
    broker: brokerproc.BrokerProcess
    volume: SecretVolume
    files: dict[str, bytes]
    ca: Authority
    ca_file: Path
    root: Path

    def write(self, **changes: bytes) -> None:
        self.files = {**self.files, **changes}
        self.volume.write(self.files)

    def context(self, cn: str | None) -> ssl.SSLContext:
        if cn is None:
            return tls_context(self.ca_file)
        issued = self.ca.issue(cn, server=False)
        (self.root / f"{cn}.crt").write_bytes(issued.cert)
        (self.root / f"{cn}.key").write_bytes(issued.key)
        return tls_context(self.ca_file, self.root / f"{cn}.crt", self.root / f"{cn}.key")


def start(tmp: Path, acl: dict[str, Any] | None = ACL, *, principals: dict[str, str] = SECRETS,
          extra: tuple[str, ...] = ()) -> Env:
    ca = Authority("auth test CA")
    server = ca.issue("localhost", server=True)
    volume = SecretVolume(tmp / "secret")
    files = {"tls.crt": server.cert, "tls.key": server.key, "ca.crt": ca.pem, "tokens": token_lines(principals)}
    if acl is not None:
        files["acl.yaml"] = yaml.safe_dump(acl).encode()
    volume.write(files)
    (tmp / "ca.crt").write_bytes(ca.pem)
    args = ["--tls-cert-file", str(volume.path("tls.crt")), "--tls-key-file", str(volume.path("tls.key")),
            "--tls-client-ca-file", str(volume.path("ca.crt")), "--tls-client-auth", "optional",
            "--auth-token-file", str(volume.path("tokens")), "--auth-reload-s", "0.2", "--partitions", "2", *extra]
    if acl is not None:
        args += ["--auth-acl-file", str(volume.path("acl.yaml"))]
    broker = brokerproc.BrokerProcess(tmp / "data", *args).start()
    return Env(broker, volume, files, ca, tmp / "ca.crt", tmp)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    started = start(tmp_path_factory.mktemp("auth"))
    try:
        yield started
    finally:
        assert started.broker.stop() == 0, started.broker.log()


async def connect(env: Env, who: str | None, *, cert: str | None = None) -> Connection:
    return await Connection.open("127.0.0.1", env.broker.producer_port, ssl=env.context(cert),
                                 token=token(who) if who else None)


async def close(*conns: Connection) -> None:
    """Close and let the TLS transports finish their shutdown before the test's loop ends."""
    for conn in conns:
        conn.close()
    for conn in conns:
        await conn.wait_closed()


async def call(conn: Connection, header: dict[str, Any], payload: bytes = b"") -> dict[str, Any]:
    future = conn.send(header, payload)
    assert future is not None
    return (await asyncio.wait_for(future, 10)).header


def one_batch(value: bytes = b"v") -> bytes:
    return record_batch.build_batch(records.encode_body([[0, None, value, None]]), record_count=1,
                                     first_timestamp_ms=1, max_timestamp_ms=1)


# -- authentication ------------------------------------------------------------------------------

async def test_token_and_certificate_principals(env: Env) -> None:
    conn = await connect(env, "app")
    assert conn.principal == "app"
    assert (await call(conn, {"api": ApiKey.AUTHENTICATE}))["principal"] == "app"
    by_cert = await connect(env, None, cert="cert-app")
    assert (await call(by_cert, {"api": ApiKey.AUTHENTICATE}))["principal"] == "cert-app"
    nobody = await connect(env, None)
    assert (await call(nobody, {"api": ApiKey.AUTHENTICATE}))["principal"] == "ANONYMOUS"
    await close(conn, by_cert, nobody)


@pytest.mark.parametrize("presented", ["app:wrong-secret", "ghost:app-secret", "no-colon"])
async def test_a_wrong_token_is_refused_clearly_and_the_connection_stays(env: Env, presented: str) -> None:
    with pytest.raises(BrokerError) as refused:
        await Connection.open("127.0.0.1", env.broker.producer_port, ssl=env.context(None), token=presented)
    assert refused.value.code == ErrorCode.AUTHENTICATION_FAILED
    assert "token refused" in refused.value.message
    conn = await connect(env, None)
    header = await call(conn, {"api": ApiKey.AUTHENTICATE, "token": presented})
    assert header["error"] == ErrorCode.AUTHENTICATION_FAILED
    header = await call(conn, {"api": ApiKey.AUTHENTICATE, "token": token("app")})
    assert header["error"] == 0 and header["principal"] == "app"
    await close(conn)


async def test_anonymous_is_denied_with_a_hint_and_keeps_its_connection(env: Env) -> None:
    conn = await connect(env, None)
    header = await call(conn, {"api": ApiKey.PRODUCE, "topic": "orders.a", "acks": 1}, one_batch())
    assert header["error"] == ErrorCode.AUTHORIZATION_FAILED
    assert header["message"] == ("principal ANONYMOUS may not produce topic 'orders.a' "
                                 "(authenticate with a token or a client certificate)")
    # the wildcard-principal rule lets everyone produce to "public"
    header = await call(conn, {"api": ApiKey.PRODUCE, "topic": "public", "acks": 1}, one_batch())
    assert header["error"] == 0, header
    await close(conn)


def test_simple_produce_authenticates_by_certificate(env: Env) -> None:
    def simple(context: ssl.SSLContext, topic: str) -> int:
        with socket.create_connection(("127.0.0.1", env.broker.producer_port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as sock:
            message = msgpack.packb({"key": None, "value": b"x", "topic": topic})
            sock.sendall(struct.pack(">I", len(message)) + message)
            reply = b""
            while len(reply) < 8:
                chunk = sock.recv(8 - len(reply))
                assert chunk
                reply += chunk
            return int(struct.unpack(">Q", reply)[0])

    assert simple(env.context("cert-app"), "seed") < 1 << 63
    refused = simple(env.context(None), "seed")
    assert refused == (1 << 63) | ErrorCode.AUTHORIZATION_FAILED
    assert simple(env.context("someone-else"), "seed") == (1 << 63) | ErrorCode.AUTHORIZATION_FAILED


# -- authorisation: every verb allowed and denied -----------------------------------------------

VERB_CASES: list[tuple[str, str, dict[str, Any], bytes, bool]] = [
    # (case, principal, request, payload, allowed)
    ("topic create allowed", "app", {"api": ApiKey.CREATE_TOPIC, "topic": "orders.a", "partitions": 2}, b"", True),
    ("topic create denied", "reader", {"api": ApiKey.CREATE_TOPIC, "topic": "orders.b"}, b"", False),
    ("topic produce allowed", "app", {"api": ApiKey.PRODUCE, "topic": "orders.a", "partition": 0}, b"B", True),
    ("topic produce denied", "reader", {"api": ApiKey.PRODUCE, "topic": "orders.a", "partition": 0}, b"B", False),
    ("topic produce outside the prefix", "app", {"api": ApiKey.PRODUCE, "topic": "payments", "partition": 0}, b"B", False),
    ("topic consume allowed", "reader", {"api": ApiKey.FETCH, "partitions": [{"topic": "orders.a", "partition": 0, "offset": 0}], "max_wait_ms": 0}, b"", True),
    ("topic consume denied", "slow", {"api": ApiKey.FETCH, "partitions": [{"topic": "orders.a", "partition": 0, "offset": 0}], "max_wait_ms": 0}, b"", False),
    ("topic describe allowed", "reader", {"api": ApiKey.DESCRIBE_TOPIC, "topic": "orders.a"}, b"", True),
    ("topic describe denied", "reader", {"api": ApiKey.DESCRIBE_TOPIC, "topic": "payments"}, b"", False),
    ("topic alter allowed", "app", {"api": ApiKey.ALTER_TOPIC_CONFIG, "topic": "orders.a", "set": {"retention_ms": 60000}}, b"", True),
    ("topic alter denied", "reader", {"api": ApiKey.ALTER_TOPIC_CONFIG, "topic": "orders.a", "set": {"retention_ms": 0}}, b"", False),
    ("topic alter denied by a deny rule", "app", {"api": ApiKey.ADD_PARTITIONS, "topic": "orders.locked", "partitions": 5}, b"", False),
    ("topic delete denied", "app", {"api": ApiKey.DELETE_TOPIC, "topic": "orders.a"}, b"", False),
    ("topic delete by a super-user", "admin", {"api": ApiKey.DELETE_TOPIC, "topic": "orders.gone"}, b"", True),
    ("group consume allowed", "app", {"api": ApiKey.JOIN_GROUP, "group": "billing", "topics": ["orders.a"]}, b"", True),
    ("group consume denied", "app", {"api": ApiKey.JOIN_GROUP, "group": "fraud", "topics": ["orders.a"]}, b"", False),
    ("group describe allowed", "app", {"api": ApiKey.DESCRIBE_GROUP, "group": "billing"}, b"", True),
    ("group coordinator lookup allowed (consume implies describe)", "app", {"api": ApiKey.FIND_COORDINATOR, "group": "billing"}, b"", True),
    ("group coordinator lookup denied", "app", {"api": ApiKey.FIND_COORDINATOR, "group": "fraud"}, b"", False),
    ("group describe denied", "reader", {"api": ApiKey.DESCRIBE_GROUP, "group": "billing"}, b"", False),
    ("group reset (alter) denied", "app", {"api": ApiKey.COMMIT_OFFSETS, "group": "billing", "offsets": [["orders.a", 0, 0]]}, b"", False),
    ("subscription consume allowed", "app", {"api": ApiKey.QUEUE_FETCH, "subscription": "workers", "topic": "orders.a", "max_wait_ms": 0}, b"", True),
    ("subscription consume denied", "app", {"api": ApiKey.QUEUE_FETCH, "subscription": "others", "topic": "orders.a", "max_wait_ms": 0}, b"", False),
    ("subscription alter denied", "app", {"api": ApiKey.QUEUE_CONFIGURE, "subscription": "workers", "topic": "orders.a", "set": {"max_deliveries": 2}}, b"", False),
    ("replica fetch denied to a client", "app", {"api": ApiKey.FETCH, "replica_id": 1, "partitions": [{"topic": "orders.a", "partition": 0, "offset": 0}]}, b"", False),
    ("cluster describe denied", "app", {"api": ApiKey.BROKER_STATS}, b"", False),
]


async def test_each_verb_allowed_and_denied(env: Env) -> None:
    admin = await connect(env, "admin")
    for name in ("orders.locked", "orders.gone"):
        assert (await call(admin, {"api": ApiKey.CREATE_TOPIC, "topic": name}))["error"] == 0
    connections = {who: await connect(env, who) for who in ("app", "reader", "slow", "admin")}
    failures = []
    for case, who, request, payload, allowed in VERB_CASES:
        header = await call(connections[who], dict(request), one_batch() if payload else b"")
        if allowed and header["error"] == ErrorCode.AUTHORIZATION_FAILED:
            failures.append(f"{case}: refused: {header}")
        if allowed and header["error"] != 0:
            failures.append(f"{case}: failed: {header}")
        if not allowed and header["error"] != ErrorCode.AUTHORIZATION_FAILED:
            failures.append(f"{case}: not refused: {header}")
    assert not failures, "\n".join(failures)
    # Listings are filtered to what the principal may describe.
    listed = await call(connections["reader"], {"api": ApiKey.LIST_TOPICS})
    assert "orders.a" in listed["topics"] and "default" not in listed["topics"]
    assert all(name.startswith("orders.") or name == "public" for name in listed["topics"])
    metadata = await call(connections["reader"], {"api": ApiKey.METADATA, "topics": None})
    assert {t["name"] for t in metadata["topics"]} == set(listed["topics"])
    # Denials leave the connection usable.
    assert (await call(connections["app"], {"api": ApiKey.DESCRIBE_TOPIC, "topic": "orders.a"}))["error"] == 0
    await close(admin, *connections.values())


async def test_the_library_producer_and_consumer_with_a_token(env: Env) -> None:
    use_tls(env.context(None))
    use_token(token("app"))
    try:
        async with Producer(env.broker.bootstrap) as producer:
            await producer.send("orders.lib", b"hello", partition=0)
        async with Consumer(env.broker.bootstrap, "orders.lib", start="earliest") as consumer:
            got = await consumer.getmany(timeout_s=3)
        assert [m.value for m in got] == [b"hello"]
        use_token(token("reader"))
        with pytest.raises(BrokerError) as refused:
            async with Producer(env.broker.bootstrap) as producer:
                await producer.send("orders.lib", b"nope", partition=0)
        assert "AUTHORIZATION_FAILED" in str(refused.value) or "may not produce" in str(refused.value)
    finally:
        use_tls(None)
        use_token(None)


def test_cli_presents_a_token_from_a_flag_a_file_or_the_environment(env: Env, tmp_path: Path) -> None:
    base = ["--bootstrap", env.broker.bootstrap, "--tls-ca", str(env.ca_file)]
    ok = subprocess.run([*RUSTMQ, "produce", "orders.cli", "x", *base, "--token", token("app")],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "token").write_text(token("reader") + "\n")
    listed = subprocess.run([*RUSTMQ, "topic", "list", "--json", *base, "--token-file", str(tmp_path / "token")],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    refused = subprocess.run([*RUSTMQ, "produce", "orders.cli", "y", *base], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "RUSTMQ_TOKEN": "app:wrong"})
    assert refused.returncode == 1 and "AUTHENTICATION_FAILED" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr


# -- admin HTTP API --------------------------------------------------------------------------------

def http(env: Env, method: str, path: str, body: Any = None, bearer: str | None = None) -> tuple[int, dict[str, Any] | str]:
    request = urllib.request.Request(f"http://127.0.0.1:{env.broker.metrics_port}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
    if bearer:
        request.add_header("Authorization", f"Bearer {bearer}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as exc:
        text, status = exc.read().decode(), exc.code
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def test_admin_writes_need_an_admin_principal(env: Env) -> None:
    status, body = http(env, "POST", "/v1/topics", {"name": "by-http"})
    assert status == 401 and body["error"] == "AUTHENTICATION_FAILED", body  # type: ignore[index]
    status, body = http(env, "POST", "/v1/topics", {"name": "by-http"}, bearer="admin:wrong")
    assert status == 401, body
    status, body = http(env, "POST", "/v1/topics", {"name": "by-http"}, bearer=token("app"))
    assert status == 403 and "may not alter the cluster" in body["message"], body  # type: ignore[index]
    status, body = http(env, "DELETE", "/v1/topics/public", bearer=token("app"))
    assert status == 403
    status, body = http(env, "POST", "/v1/topics", {"name": "by-http"}, bearer=token("admin"))
    assert status == 201, body
    # Reads, metrics and probes stay open by default.
    assert http(env, "GET", "/metrics")[0] == 200
    assert http(env, "GET", "/healthz")[0] == 200
    assert http(env, "GET", "/readyz")[0] == 200
    assert http(env, "GET", "/v1/topics/by-http")[0] == 200


def test_admin_auth_all_closes_reads_but_not_probes(tmp_path: Path) -> None:
    closed = start(tmp_path, extra=("--admin-auth", "all"))
    try:
        assert http(closed, "GET", "/metrics")[0] == 403
        assert http(closed, "GET", "/metrics", bearer=token("admin"))[0] == 200
        assert http(closed, "GET", "/v1/topics", bearer=token("app"))[0] == 403
        assert http(closed, "GET", "/healthz")[0] == 200 and http(closed, "GET", "/readyz")[0] == 200
    finally:
        assert closed.broker.stop() == 0


# -- files: bad at start-up, reloaded under load --------------------------------------------------

def test_auth_files_that_do_not_load_stop_the_broker_with_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text("app:plaintext-secret\n")
    result = subprocess.run([*RUSTMQ, "broker", "--data-dir", str(tmp_path / "d"), "--producer-port", "0",
                             "--consumer-port", "0", "--metrics-port", "0", "--auth-token-file", str(tmp_path / "tokens")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "cannot load the token file" in result.stderr and "plaintext" in result.stderr
    (tmp_path / "acl.yaml").write_text("rules: [{principal: app, topic: x, allow: [fly]}]\n")
    result = subprocess.run([*RUSTMQ, "broker", "--data-dir", str(tmp_path / "d"), "--producer-port", "0",
                             "--consumer-port", "0", "--metrics-port", "0", "--auth-acl-file", str(tmp_path / "acl.yaml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "has no verb(s) fly" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.1)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_rotating_tokens_and_acl_under_load_loses_nothing(tmp_path: Path) -> None:
    env = start(tmp_path, principals={"admin": SECRETS["admin"], "app": "old-secret"})
    try:
        producer_conn = await Connection.open("127.0.0.1", env.broker.producer_port, ssl=env.context(None),
                                              token="app:old-secret")
        acked: list[int] = []
        stop = asyncio.Event()

        async def produce() -> None:
            n = 0
            while not stop.is_set():
                header = await call(producer_conn, {"api": ApiKey.PRODUCE, "topic": "orders.rot", "partition": 0, "acks": 1},
                                    one_batch(str(n).encode()))
                assert header["error"] == 0, header
                acked.append(n)
                n += 1
                await asyncio.sleep(0.002)

        task = asyncio.create_task(produce())
        await asyncio.sleep(0.5)
        # Rotate the token: the new one in, the old one out (the file swapped like a Secret update).
        env.write(tokens=token_lines({"admin": SECRETS["admin"], "app": "new-secret"}))

        async def new_token_works() -> bool:
            try:
                conn = await Connection.open("127.0.0.1", env.broker.producer_port, ssl=env.context(None),
                                             token="app:new-secret")
            except BrokerError:
                return False
            await close(conn)
            return True

        await wait_until(new_token_works)
        with pytest.raises(BrokerError):
            await Connection.open("127.0.0.1", env.broker.producer_port, ssl=env.context(None), token="app:old-secret")
        # Rewrite the ACL file (same grants, one more rule) while producing.
        acl = {**ACL, "rules": [*ACL["rules"], {"principal": "app", "topic": "extra", "allow": ["produce"]}]}
        env.write(**{"acl.yaml": yaml.safe_dump(acl).encode()})
        extra_conn = await Connection.open("127.0.0.1", env.broker.producer_port, ssl=env.context(None),
                                           token="app:new-secret")

        async def extra_allowed() -> bool:
            return (await call(extra_conn, {"api": ApiKey.PRODUCE, "topic": "extra", "partition": 0}, one_batch()))["error"] == 0

        await wait_until(extra_allowed)
        await asyncio.sleep(0.3)
        stop.set()
        await task
        assert not producer_conn.closed  # the open connection kept its principal and was never dropped
        admin = await connect(env, "admin")
        fetched = await call(admin, {"api": ApiKey.LIST_OFFSETS, "topic": "orders.rot", "partition": 0, "at": -1})
        assert fetched["offset"] == len(acked) > 50
        await close(producer_conn, extra_conn, admin)
    finally:
        assert env.broker.stop() == 0, env.broker.log()


# -- quotas ----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_quota_throttles_without_disconnecting_and_a_neighbour_keeps_its_rate(env: Env) -> None:
    payload = one_batch(b"x" * 20_000)  # ~20 kB a request; "slow" may produce 200 kB/s
    slow = await connect(env, "slow")
    fast = await connect(env, "fast")
    duration = 3.0

    async def run(conn: Connection, topic: str) -> tuple[int, int]:
        sent = throttled = 0
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            futures = [conn.send({"api": ApiKey.PRODUCE, "topic": topic, "partition": 0, "acks": 1}, payload)
                       for _ in range(4)]
            for future in futures:
                assert future is not None
                header = (await asyncio.wait_for(future, 30)).header
                assert header["error"] == 0, header
                sent += len(payload)
                throttled = max(throttled, header.get("throttle_ms", 0))
        return sent, throttled

    (slow_bytes, slow_throttle), (fast_bytes, fast_throttle) = await asyncio.gather(run(slow, "q-slow"), run(fast, "q-fast"))
    slow_rate, fast_rate = slow_bytes / duration, fast_bytes / duration
    # one second of burst plus the rate; a little slack for the last in-flight window
    assert slow_rate <= (200_000 * (duration + 1) + 4 * len(payload)) / duration, slow_rate
    assert slow_throttle > 0 and fast_throttle == 0
    assert fast_rate > 4 * slow_rate, (fast_rate, slow_rate)
    assert not slow.closed and not fast.closed
    assert (await call(slow, {"api": ApiKey.DESCRIBE_TOPIC, "topic": "q-slow"}))["error"] == 0
    await close(slow, fast)


async def test_request_rate_and_fetch_byte_rate_quotas_throttle(env: Env) -> None:
    chatty = await connect(env, "chatty")
    started = time.monotonic()
    throttled = 0
    for _ in range(60):  # one second of burst (20), then 40 more at 20 a second
        header = await call(chatty, {"api": ApiKey.LIST_TOPICS})
        assert header["error"] == 0
        throttled = max(throttled, header.get("throttle_ms", 0))
    elapsed = time.monotonic() - started
    assert 1.5 <= elapsed <= 8, elapsed
    assert throttled > 0 and not chatty.closed

    admin = await connect(env, "admin")
    for i in range(10):  # a backlog of about 100 kB in ten batches
        header = await call(admin, {"api": ApiKey.PRODUCE, "topic": "backlog", "partition": 0}, one_batch(b"%d" % i * 10_000))
        assert header["error"] == 0, header
    drinker = await connect(env, "drinker")
    started = time.monotonic()
    fetched, offset = 0, 0
    while offset < 10:
        header = await call(drinker, {"api": ApiKey.FETCH, "max_wait_ms": 0, "max_bytes": 20_000,
                                      "partitions": [{"topic": "backlog", "partition": 0, "offset": offset, "max_bytes": 20_000}]})
        assert header["error"] == 0, header
        fetched += header["partitions"][0]["size"]
        offset += 1  # one ~10 kB batch per fetch at most 20 kB: read each batch from its own offset
    for _ in range(20):  # the same data again: 200 kB more against a 100 kB/s quota
        header = await call(drinker, {"api": ApiKey.FETCH, "max_wait_ms": 0,
                                      "partitions": [{"topic": "backlog", "partition": 0, "offset": 0, "max_bytes": 10_000}]})
        fetched += header["partitions"][0]["size"]
    elapsed = time.monotonic() - started
    assert fetched > 250_000
    assert elapsed >= (fetched - 100_000) / 100_000 - 0.5, (fetched, elapsed)  # one second of burst
    assert not drinker.closed
    await close(chatty, admin, drinker)


async def test_connections_per_address_are_limited(tmp_path: Path) -> None:
    limited = start(tmp_path, {**ACL, "quotas": {"connections_per_address": 3}})
    try:
        open_ = [await connect(limited, "app") for _ in range(3)]
        with pytest.raises((BrokerError, ConnectionClosedError, OSError)) as refused:
            extra = await connect(limited, "app")
            await call(extra, {"api": ApiKey.AUTHENTICATE})
        assert "connection" in str(refused.value).lower()
        assert "127.0.0.1 already has 3 connections" in limited.broker.log()
        await close(open_[0])
        await asyncio.sleep(0.3)
        again = await connect(limited, "app")
        await close(again, *open_[1:])
    finally:
        assert limited.broker.stop() == 0, limited.broker.log()


async def test_connections_per_principal_are_limited(env: Env) -> None:
    first, second = await connect(env, "reader"), await connect(env, "reader")
    with pytest.raises((BrokerError, ConnectionClosedError)) as refused:
        await connect(env, "reader")
    assert "already has 2 connections" in str(refused.value)
    await close(first)
    third = await connect(env, "reader")  # a slot is free again
    await close(second, third)


async def test_a_broker_without_a_token_file_refuses_tokens(tmp_path: Path) -> None:
    plain = brokerproc.BrokerProcess(tmp_path / "data").start()
    try:
        with pytest.raises(BrokerError) as refused:
            await Connection.open("127.0.0.1", plain.producer_port, token="app:x")
        assert refused.value.code == ErrorCode.AUTHENTICATION_FAILED and "no token file" in refused.value.message
        conn = await Connection.open("127.0.0.1", plain.producer_port)
        assert (await call(conn, {"api": ApiKey.AUTHENTICATE}))["principal"] == "ANONYMOUS"
        assert (await call(conn, {"api": ApiKey.BROKER_STATS}))["error"] == 0  # no auth: everything allowed
        await close(conn)
    finally:
        assert plain.stop() == 0


async def test_a_throttled_connection_is_not_closed_for_a_frame_left_incomplete_during_the_hold(tmp_path: Path) -> None:
    """The broker stops reading while it holds a throttled answer, so a frame the client half
    sends meanwhile waits in the socket and does not count against frame_timeout_s (1 s here,
    the hold about 2 s): a throttled client is slowed, never closed."""
    acl = {**ACL, "quotas": {"principals": {"slow": {"produce_bytes_per_s": 10_000}}}}
    held = start(tmp_path, acl, extra=("--frame-timeout-s", "1"))
    try:
        conn = await connect(held, "slow")
        first = conn.send({"api": ApiKey.PRODUCE, "topic": "held", "partition": 0}, one_batch(b"x" * 30_000))
        await asyncio.sleep(0.3)  # the broker has read it and holds its answer for about 2 s
        frame = frames.encode_prefix({"api": int(ApiKey.DESCRIBE_TOPIC), "corr": 999_999, "topic": "held"}, 0)
        transport = conn._transport
        assert transport is not None and first is not None
        transport.write(frame[:6])  # half a frame, then nothing for longer than frame_timeout_s
        await asyncio.sleep(1.5)
        transport.write(frame[6:])
        header = (await asyncio.wait_for(first, 10)).header
        assert header["error"] == 0 and header["throttle_ms"] >= 1000, header
        await asyncio.sleep(1.0)
        assert not conn.closed, held.broker.log()
        assert "frame incomplete" not in held.broker.log()
        await close(conn)
    finally:
        assert held.broker.stop() == 0, held.broker.log()
