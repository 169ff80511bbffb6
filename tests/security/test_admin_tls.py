"""HTTPS on the admin/metrics port (``admin_tls``), against a real broker process: the probes and
/metrics over TLS with the broker's certificate, plain HTTP refused, admin writes by the principal
of a client certificate (optional there: a request without one needs a bearer token as before),
a certificate from another CA refused, and a certificate rotation that new connections see while
a connection opened before keeps working."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509

import brokerproc
from tlspki import Authority, SecretVolume


def https(port: int, context: ssl.SSLContext) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)


def call(connection: http.client.HTTPConnection, method: str, path: str, body: dict[str, object] | None = None,
         ) -> tuple[int, bytes]:
    connection.request(method, path, body=json.dumps(body) if body is not None else None,
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, response.read()


def served_serial(port: int, context: ssl.SSLContext) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.mark.slow
def test_the_admin_port_speaks_https_and_follows_certificate_reloads(tmp_path: Path) -> None:
    ca, rogue = Authority("rustmq test CA"), Authority("someone else's CA")
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    for name, authority in (("admin", ca), ("stranger", rogue)):
        issued = authority.issue(name, server=False)
        (tmp_path / f"{name}.crt").write_bytes(issued.cert)
        (tmp_path / f"{name}.key").write_bytes(issued.key)
    (tmp_path / "acl.yaml").write_text("default: deny\nsuper_users: [admin]\n")
    volume = SecretVolume(tmp_path / "secret")
    first = ca.issue("localhost", server=True)
    volume.write({"tls.crt": first.cert, "tls.key": first.key, "ca.crt": ca.pem})
    broker = brokerproc.BrokerProcess(
        tmp_path / "data",
        "--tls-cert-file", str(volume.path("tls.crt")), "--tls-key-file", str(volume.path("tls.key")),
        "--tls-client-ca-file", str(volume.path("ca.crt")), "--tls-client-auth", "required",
        "--tls-reload-s", "0.2", "--admin-tls", "--auth-acl-file", str(tmp_path / "acl.yaml"),
    ).start()
    try:
        port = broker.metrics_port
        anonymous = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        admin = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        admin.load_cert_chain(tmp_path / "admin.crt", tmp_path / "admin.key")
        stranger = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        stranger.load_cert_chain(tmp_path / "stranger.crt", tmp_path / "stranger.key")

        # Probes and metrics need no client certificate (the kubelet and scrapers have none).
        kept = https(port, anonymous)
        assert call(kept, "GET", "/readyz")[0] == 200
        status, metrics = call(kept, "GET", "/metrics")
        assert status == 200 and b"rustmq_" in metrics
        # Plain HTTP gets no answer from an HTTPS port.
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            call(plain, "GET", "/healthz")
        plain.close()

        # Writes: no certificate and no token is 401; the admin certificate's principal may.
        status, body = call(kept, "POST", "/v1/topics", {"name": "by-cert", "partitions": 1})
        assert status == 401 and b"client certificate" in body
        as_admin = https(port, admin)
        status, body = call(as_admin, "POST", "/v1/topics", {"name": "by-cert", "partitions": 1})
        assert status == 201, body
        as_admin.close()
        # A certificate from another CA fails the handshake (presented, so it is checked).
        with pytest.raises((ssl.SSLError, ConnectionError)):
            rogue = https(port, stranger)
            call(rogue, "GET", "/v1/topics")

        # Rotation: new connections get the new certificate; the one opened before keeps going.
        assert served_serial(port, anonymous) == first.serial
        fresh = ca.issue("localhost", server=True)
        volume.write({"tls.crt": fresh.cert, "tls.key": fresh.key, "ca.crt": ca.pem})
        deadline = time.monotonic() + 20
        while served_serial(port, anonymous) != fresh.serial:
            assert time.monotonic() < deadline, "the admin port never served the new certificate"
            time.sleep(0.1)
        assert call(kept, "GET", "/healthz")[0] == 200
        kept.close()
    finally:
        assert broker.stop() == 0, broker.log()
