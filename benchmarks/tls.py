"""What TLS costs on the producer and consumer ports: the same `rustmq bench` against two brokers.

    python benchmarks/tls.py [--messages 1000000] [--repeat 3] [--mutual] [--no-loop]

Prints one JSON object. Three broker processes start side by side with default settings (port 0,
temporary data directories): one plaintext, two serving TLS with an ECDSA P-256 certificate made
here (with --mutual they also require a client certificate, and the bench presents one): `tls`
with the default TLS transport (`tls_io: threads`, rustmq.tlsio: OpenSSL on a thread per
connection, in the broker and in the bench client) and `tls_loop` with the event loop's own TLS
transport (`--tls-io loop`, and RUSTMQ_TLS_IO=loop for the bench client); --no-loop leaves the
latter out. Then `rustmq bench produce --acks leader` (1 KiB values, batched) and `rustmq bench
consume` (a backlog of the same size) run against each, in an order that alternates so that the
shared machine's drifts hit all alike; every run is kept. `ratio` is a TLS median over the
plaintext median (1.0 = free; issue 15's goal for batched produce: at least 0.75). On a loaded
machine wall time exaggerates any extra CPU, so each run also records the CPU seconds the broker
and the bench client spent (from /proc and getrusage, all threads): `cpu_ratio` is plaintext CPU
over TLS CPU, the throughput ratio a run bound by the CPU of one core would see;
`*_broker_cpu_s` is the broker's share of it (the rest is the client's) and `*_broker_loop_cpu_s`
the broker's event-loop thread alone (with `tls` the TLS work runs on other threads).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

RUSTMQ = [sys.executable, "-m", "rustmq"]


def _certificate(name: str, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey | None, *, ca: bool,
                 client: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if ca else issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca and not client:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    return builder.sign(signer or key, hashes.SHA256()), key


def make_pki(directory: Path) -> dict[str, Path]:
    ca, ca_key = _certificate("rustmq bench CA", x509.Name([]), None, ca=True)
    files = {"ca": directory / "ca.crt"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, client in (("server", False), ("client", True)):
        cert, key = _certificate("localhost" if not client else "bench", ca.subject, ca_key, ca=False, client=client)
        files[name] = directory / f"{name}.crt"
        files[f"{name}_key"] = directory / f"{name}.key"
        files[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{name}_key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return files


def start_broker(directory: Path, extra: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ports_file = directory / "ports.json"
    process = subprocess.Popen(
        [*RUSTMQ, "broker", "--data-dir", str(directory / "data"), "--host", "127.0.0.1", "--producer-port", "0",
         "--consumer-port", "0", "--metrics-port", "0", "--ports-file", str(ports_file), *extra],
        stdout=subprocess.DEVNULL, stderr=(directory / "broker.log").open("wb"), env=env,
    )
    deadline = time.monotonic() + 60
    while not ports_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"broker did not start:\n{(directory / 'broker.log').read_text()}")
        time.sleep(0.05)
    return process, json.loads(ports_file.read_text())


def process_cpu_s(pid: int, thread: int | None = None) -> float:
    """CPU seconds of a process, all threads (those that have ended too), or of one of its threads."""
    stat = Path(f"/proc/{pid}/task/{thread}/stat" if thread is not None else f"/proc/{pid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bench(kind: str, port: int, messages: int, tls: list[str], broker_pid: int,
          env: dict[str, str]) -> tuple[dict[str, object], float, float, float]:
    """One `rustmq bench` run: its JSON, the CPU seconds it and the broker spent, those of the
    broker alone and those of the broker's event-loop thread (its main thread) alone."""
    command = [*RUSTMQ, "bench", kind, "--messages", str(messages), "--bootstrap", f"localhost:{port}", "--json", *tls]
    if kind == "produce":
        command += ["--acks", "leader"]
    broker_before, client_before = process_cpu_s(broker_pid), children_cpu_s()
    loop_before = process_cpu_s(broker_pid, broker_pid)
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    broker_spent = process_cpu_s(broker_pid) - broker_before
    spent = broker_spent + children_cpu_s() - client_before
    loop_spent = process_cpu_s(broker_pid, broker_pid) - loop_before
    return json.loads(result.stdout.strip().splitlines()[-1]), spent, broker_spent, loop_spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--mutual", action="store_true", help="require and present client certificates")
    parser.add_argument("--no-loop", action="store_true", help="leave out the event loop's TLS transport")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rustmq-tls-bench-") as tmp:
        root = Path(tmp)
        pki = make_pki(root)
        tls_broker_flags = ["--tls-cert-file", str(pki["server"]), "--tls-key-file", str(pki["server_key"])]
        tls_client_flags = ["--tls-ca", str(pki["ca"])]
        if args.mutual:
            tls_broker_flags += ["--tls-client-ca-file", str(pki["ca"]), "--tls-client-auth", "required"]
            tls_client_flags += ["--tls-cert", str(pki["client"]), "--tls-key", str(pki["client_key"])]
        modes = {
            "plaintext": ([], [], {}),
            "tls": (tls_broker_flags, tls_client_flags, {"RUSTMQ_TLS_IO": "threads"}),
            "tls_loop": ([*tls_broker_flags, "--tls-io", "loop"], tls_client_flags, {"RUSTMQ_TLS_IO": "loop"}),
        }
        if args.no_loop:
            del modes["tls_loop"]
        brokers = {}
        for mode, (broker_flags, _, env) in modes.items():
            (root / mode).mkdir()
            brokers[mode] = start_broker(root / mode, broker_flags, {**os.environ, **env})
        runs: dict[str, dict[str, list[int]]] = {kind: {mode: [] for mode in modes} for kind in ("produce", "consume")}
        cpu: dict[str, dict[str, list[float]]] = {kind: {mode: [] for mode in modes} for kind in ("produce", "consume")}
        loop_cpu: dict[str, dict[str, list[float]]] = {kind: {mode: [] for mode in modes} for kind in ("produce", "consume")}
        broker_cpu: dict[str, dict[str, list[float]]] = {kind: {mode: [] for mode in modes} for kind in ("produce", "consume")}
        try:
            for repeat in range(args.repeat):
                order = list(modes) if repeat % 2 == 0 else list(reversed(modes))
                for kind in ("produce", "consume"):
                    for mode in order:
                        port = brokers[mode][1]["producer_port"]  # bench consume fills its backlog first
                        _, client_flags, env = modes[mode]
                        found, spent, broker_spent, loop_spent = bench(kind, port, args.messages, client_flags, brokers[mode][0].pid,
                                             {**os.environ, **env})
                        runs[kind][mode].append(int(found["msg_per_s"]))  # type: ignore[call-overload]
                        cpu[kind][mode].append(round(spent, 2))
                        loop_cpu[kind][mode].append(round(loop_spent, 2))
                        broker_cpu[kind][mode].append(round(broker_spent, 2))
        finally:
            for process, _ in brokers.values():
                process.terminate()
                process.wait(60)
    summary: dict[str, object] = {
        "messages": args.messages,
        "value_bytes": 1024,
        "mutual_tls": args.mutual,
        "repeat": args.repeat,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }
    for kind, by_mode in runs.items():
        plain = statistics.median(by_mode["plaintext"])
        plain_cpu = statistics.median(cpu[kind]["plaintext"])
        found: dict[str, object] = {"plaintext_msg_per_s": by_mode["plaintext"], "plaintext_median": round(plain),
                                    "plaintext_cpu_s": cpu[kind]["plaintext"],
                                    "plaintext_broker_cpu_s": broker_cpu[kind]["plaintext"],
                                    "plaintext_broker_loop_cpu_s": loop_cpu[kind]["plaintext"]}
        for mode in by_mode:
            if mode == "plaintext":
                continue
            secured = statistics.median(by_mode[mode])
            found.update({
                f"{mode}_msg_per_s": by_mode[mode],
                f"{mode}_median": round(secured),
                f"{mode}_ratio": round(secured / plain, 3) if plain else None,
                f"{mode}_cpu_s": cpu[kind][mode],
                f"{mode}_cpu_ratio": round(plain_cpu / statistics.median(cpu[kind][mode]), 3),
                f"{mode}_broker_cpu_s": broker_cpu[kind][mode],
                f"{mode}_broker_loop_cpu_s": loop_cpu[kind][mode],
            })
        summary[kind] = found
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
