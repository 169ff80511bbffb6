"""What authentication and ACLs cost, and that a broker without them pays nothing.

    python benchmarks/auth.py [--messages 500000] [--repeat 3] [--base REV]

Prints one JSON object. Three broker processes start side by side (port 0, temporary data
directories, default settings, plaintext): ``base``, the broker code of git revision REV (default
the parent of the commit that added rustmq.auth, run from a `git archive` of it), ``no_auth``, this
tree without auth files, and ``auth``, this tree with a token file and a default-deny ACL file
whose rules let every principal do everything on every topic (so every request and,
for simple produce, every message goes through the decision cache). The same `rustmq bench` of
this tree runs against each, in rotating order so the shared machine's drifts hit all alike:
batched produce (acks leader, 1 KiB values), consume of that backlog, and seed-style simple
produce. Every run is kept with the broker's CPU seconds; ``ratio`` is a median over the base
median, ``cpu_ratio`` base CPU over this broker's CPU (1.0 = same cost).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUSTMQ = [sys.executable, "-m", "rustmq"]
MODES = ("base", "no_auth", "auth")


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


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench(scenario: str, port: int, messages: int, broker_pid: int, env: dict[str, str]) -> tuple[int, float]:
    kind = "consume" if scenario == "consume" else "produce"
    command = [*RUSTMQ, "bench", kind, "--messages", str(messages), "--bootstrap", f"127.0.0.1:{port}", "--json"]
    if scenario == "produce":
        command += ["--acks", "leader"]
    if scenario == "simple":
        command += ["--simple", "--messages", str(messages // 2)]
    before = process_cpu_s(broker_pid)
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    found = json.loads(result.stdout.strip().splitlines()[-1])
    return int(found["msg_per_s"]), round(process_cpu_s(broker_pid) - before, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=500_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--base", help="git revision of the base broker (default: before rustmq.auth)")
    args = parser.parse_args()
    base = args.base or subprocess.run(
        ["git", "-C", str(ROOT), "log", "--format=%H", "--diff-filter=A", "--", "broker/rustmq/auth/__init__.py"],
        capture_output=True, text=True, check=True).stdout.split()[-1] + "^"
    sys.path.insert(0, str(ROOT / "broker"))
    from rustmq.auth import tokens

    with tempfile.TemporaryDirectory(prefix="rustmq-auth-bench-") as tmp:
        root = Path(tmp)
        (root / "base-src").mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", base, "broker"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root / "base-src")], input=archive, check=True)
        (root / "tokens").write_text(tokens.hash_line("bench", "bench-secret") + "\n")
        # "*": the bench's raw simple-produce and fetch streams carry no token (ANONYMOUS).
        (root / "acl.yaml").write_text('default: deny\nrules:\n  - {principal: "*", topic: "*", allow: "*"}\n'
                                       '  - {principal: "*", cluster: "*", allow: [describe]}\n')
        plain_env = {k: v for k, v in os.environ.items() if not k.startswith("RUSTMQ_TOKEN")}
        broker_env = {"base": {**plain_env, "PYTHONPATH": str(root / "base-src" / "broker")}, "no_auth": plain_env,
                      "auth": plain_env}
        client_env = {"base": plain_env, "no_auth": plain_env, "auth": {**plain_env, "RUSTMQ_TOKEN": "bench:bench-secret"}}
        flags = {"base": [], "no_auth": [],
                 "auth": ["--auth-token-file", str(root / "tokens"), "--auth-acl-file", str(root / "acl.yaml")]}
        brokers = {}
        for mode in MODES:
            (root / mode).mkdir()
            brokers[mode] = start_broker(root / mode, flags[mode], broker_env[mode])
        scenarios = ("produce", "consume", "simple")
        runs = {s: {m: [] for m in MODES} for s in scenarios}  # type: dict[str, dict[str, list[int]]]
        cpu = {s: {m: [] for m in MODES} for s in scenarios}  # type: dict[str, dict[str, list[float]]]
        try:
            for repeat in range(args.repeat):
                order = MODES[repeat % 3:] + MODES[:repeat % 3]
                for scenario in scenarios:
                    for mode in order:
                        rate, spent = bench(scenario, brokers[mode][1]["producer_port"], args.messages,
                                            brokers[mode][0].pid, client_env[mode])
                        runs[scenario][mode].append(rate)
                        cpu[scenario][mode].append(spent)
        finally:
            for process, _ in brokers.values():
                process.terminate()
                process.wait(60)
    summary: dict[str, object] = {"messages": args.messages, "value_bytes": 1024, "repeat": args.repeat, "base": base,
                                  "python": platform.python_version(), "load_average": os.getloadavg()}
    for scenario in scenarios:
        base_rate = statistics.median(runs[scenario]["base"])
        base_cpu = statistics.median(cpu[scenario]["base"])
        summary[scenario] = {
            **{f"{mode}_msg_per_s": runs[scenario][mode] for mode in MODES},
            **{f"{mode}_cpu_s": cpu[scenario][mode] for mode in MODES},
            **{f"{mode}_ratio": round(statistics.median(runs[scenario][mode]) / base_rate, 3) for mode in MODES[1:]},
            **{f"{mode}_cpu_ratio": round(base_cpu / statistics.median(cpu[scenario][mode]), 3) for mode in MODES[1:]},
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
