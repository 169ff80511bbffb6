"""The least CPU that TLS through Python's ssl module costs per GB on this machine, per side.

    python benchmarks/tls_floor.py [--gb 1] [--repeat 3]

Prints one JSON object. A writer process sends 1 MiB buffers over a TLS 1.3 loopback connection
(``SSLSocket.sendall``: OpenSSL cuts 16 KiB records and writes each to the socket) and a reader
process reads them the way rustmq.tlsio's worker does (non-blocking, one ``SSL_read`` per record
into a 256 KiB chunk, ``poll`` when the socket is empty); nothing else runs in either, so their
CPU seconds are what the cipher, OpenSSL's record handling, the kernel's socket copies and
Python's call per record cost together: the floor under the TLS threads of the broker and of the
bench client in benchmarks/tls.py. Each repeat runs once with AES-128-GCM first (the reader,
the server whose order decides, started with an ``OPENSSL_CONF`` that orders the TLS 1.3
suites so: Python's ssl has no setter for them) and once with OpenSSL's default order
(AES-256-GCM first, what the broker uses), alternating. ``openssl speed`` figures for the two ciphers alone (16 KiB blocks,
one core) are added when the openssl command is there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tls import make_pki  # noqa: E402 - the bench's own certificates

BUFFER = 1 << 20
CHUNK = 256 << 10
AES_128_FIRST_CONF = """openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_section
[ssl_section]
system_default = system_default_section
[system_default_section]
Ciphersuites = TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256
"""


def reader(port_file: Path, pki: dict[str, Path], total: int) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["server"], pki["server_key"])
    listener = socket.create_server(("127.0.0.1", 0))
    port_file.write_text(str(listener.getsockname()[1]))
    raw, _ = listener.accept()
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock = context.wrap_socket(raw, server_side=True)
    sock.setblocking(False)
    read = sock._sslobj.read  # type: ignore[attr-defined]  # the C method, as tlsio calls it
    chunk = bytearray(CHUNK)
    view = memoryview(chunk)
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    got = records = 0
    started, cpu = time.perf_counter(), time.process_time()
    while got < total:
        filled = 0
        try:
            while filled < CHUNK:
                count = read(CHUNK - filled, view[filled:])
                records += 1
                if not count:
                    raise SystemExit("the writer closed early")
                filled += count
        except ssl.SSLWantReadError:
            pass
        got += filled
        if filled < CHUNK and got < total:
            poller.poll()
    result = {"cipher": sock.cipher()[0], "reader_cpu_s": time.process_time() - cpu,
              "reader_wall_s": time.perf_counter() - started, "records": records}
    sock.setblocking(True)
    sock.sendall(json.dumps(result).encode())
    sock.close()


def writer(port: int, pki: dict[str, Path], total: int) -> dict[str, object]:
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock = context.wrap_socket(raw, server_hostname="localhost")
    data = os.urandom(BUFFER)
    sent = 0
    cpu = time.process_time()
    while sent < total:
        sock.sendall(data)
        sent += BUFFER
    spent = time.process_time() - cpu
    answer = b""
    while not answer.endswith(b"}"):
        part = sock.recv(4096)
        if not part:
            break
        answer += part
    sock.close()
    return {**json.loads(answer), "writer_cpu_s": spent}


def one_run(root: Path, pki: dict[str, Path], total: int, fast: bool) -> dict[str, object]:
    port_file = root / f"port-{time.monotonic_ns()}"
    env = dict(os.environ)
    if fast:
        (root / "aes-128-first.cnf").write_text(AES_128_FIRST_CONF)
        env["OPENSSL_CONF"] = str(root / "aes-128-first.cnf")
    child = subprocess.Popen([sys.executable, __file__, "--reader", str(port_file), "--bytes", str(total),
                              "--pki", str(root)], env=env)
    try:
        while not port_file.exists() or not port_file.read_text():
            if child.poll() is not None:
                raise SystemExit("the reader did not start")
            time.sleep(0.01)
        return writer(int(port_file.read_text()), pki, total)
    finally:
        child.wait(120)


def openssl_speed() -> dict[str, float]:
    if shutil.which("openssl") is None:
        return {}
    speeds = {}
    for cipher in ("aes-128-gcm", "aes-256-gcm"):
        out = subprocess.run(["openssl", "speed", "-seconds", "2", "-bytes", "16384", "-evp", cipher],
                             capture_output=True, text=True, check=False).stdout
        found = re.search(r"^\S+\s+([\d.]+)k\s*$", out.strip().splitlines()[-1] if out.strip() else "")
        if found:
            speeds[f"openssl_speed_{cipher}_GB_per_s"] = round(float(found.group(1)) * 1000 / 1e9, 2)
    return speeds


def pki_files(root: Path) -> dict[str, Path]:
    return {name: root / file for name, file in (("ca", "ca.crt"), ("server", "server.crt"),
                                                 ("server_key", "server.key"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="GiB sent per run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--reader", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pki", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reader is not None:
        reader(args.reader, pki_files(args.pki), args.bytes)
        return
    total = int(args.gb * (1 << 30)) // BUFFER * BUFFER
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, object]]] = {"aes_128_first": [], "default_order": []}
    with tempfile.TemporaryDirectory(prefix="rustmq-tls-floor-") as tmp:
        root = Path(tmp)
        pki = make_pki(root)
        for repeat in range(args.repeat):
            for fast in ((True, False) if repeat % 2 == 0 else (False, True)):
                runs["aes_128_first" if fast else "default_order"].append(one_run(root, pki, total, fast))
    gib = total / (1 << 30)
    summary: dict[str, object] = {"gib_per_run": gib, "repeat": args.repeat, "python": sys.version.split()[0],
                                  "openssl": ssl.OPENSSL_VERSION, "load_average_before": load_before,
                                  "load_average_after": os.getloadavg()}
    for name, found in runs.items():
        summary[name] = {
            "cipher": sorted({str(run["cipher"]) for run in found}),
            "reader_cpu_s_per_gib": [round(float(run["reader_cpu_s"]) / gib, 3) for run in found],  # type: ignore[arg-type]
            "writer_cpu_s_per_gib": [round(float(run["writer_cpu_s"]) / gib, 3) for run in found],  # type: ignore[arg-type]
            "records_per_gib": round(statistics.median(int(run["records"]) for run in found) / gib),  # type: ignore[call-overload]
        }
    summary.update(openssl_speed())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
