"""Cluster mode figures: replicated produce against one broker, failover time, follower catch-up.

    python benchmarks/cluster.py [--messages 300000] [--kills 10] [--catchup-mib 1024] [--drain-mib 1024]
                                 [--reassign-bytes-per-s N] [--skip ...]

Prints one JSON object. Uses the local control plane (`scripts/local-cluster up`, or $KUBECONFIG
when it names a file) and real broker processes on 127.0.0.1 with the DEFAULT cluster timing
(6 s lease, 1 s renew, 2 s API timeout, 0.5 s poll, 5 s replica lag):

- produce: `rustmq bench produce --acks all` (1 KiB values, batched) against three brokers, one
  topic with replication factor 3 and three partitions (one leader per broker, one producer
  connection per partition), against `rustmq bench produce --acks leader` on a single standalone
  broker in the same run with the same partitions and connections; runs alternate so the shared
  machine's drifts hit both; `ratio` = cluster median / single median (issue 12's goal: >= 0.4).
- failover: --kills times, kill -9 the leader of partition 0 of an RF 3 topic and time until
  METADATA (from a surviving broker) names a new leader; the killed broker is restarted and
  rejoins the ISR before the next kill. Median and worst (goal: < 10 s).
- catch-up: stop one broker, write --catchup-mib MiB with acks=all to an RF 3 topic, start the
  broker again and time until it is back in the ISR of every partition.
- drain: write --drain-mib MiB with acks=all to an RF 3 topic of 3 partitions (each broker
  holds all of it), start a 4th broker, write the membership without broker 2 (as the operator
  does for a scale-down) and time until the controller's health report says broker 2 holds no
  replica and nothing is being reassigned; the catch-up throttle is the brokers' default
  (50 MiB/s) unless --reassign-bytes-per-s says otherwise (0: unthrottled).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))

import clusterproc  # noqa: E402
from brokerproc import BrokerProcess  # noqa: E402

RUSTMQ = [sys.executable, "-m", "rustmq"]
DEFAULT_TIMING = {"RUSTMQ_LEASE_DURATION_S": "6", "RUSTMQ_LEASE_RENEW_S": "1", "RUSTMQ_API_TIMEOUT_S": "2",
                  "RUSTMQ_REPLICA_LAG_S": "5", "RUSTMQ_CLUSTER_POLL_S": "0.5"}


def bench(bootstrap: str, acks: str, messages: int, topic: str, partitions: int) -> dict:
    out = subprocess.run(
        [*RUSTMQ, "bench", "produce", "--acks", acks, "--messages", str(messages), "--size", "1024",
         "--partitions", str(partitions), "--concurrency", str(partitions), "--topic", topic,
         "--bootstrap", bootstrap, "--json"],
        capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout)


def full_isr(metadata: dict) -> bool:
    parts = metadata["topics"][0]["partitions"]
    return bool(parts) and all(len(p["isr"]) == 3 and p["leader"] >= 0 for p in parts)


def create(cluster: clusterproc.BrokerCluster, topic: str, partitions: int) -> None:
    subprocess.run([*RUSTMQ, "topic", "create", topic, "--partitions", str(partitions), "--replication-factor", "3",
                    "--bootstrap", cluster.bootstrap], check=True, capture_output=True, timeout=60)
    cluster.wait_for(full_isr, "full ISR", 60, [topic])


def produce(cluster: clusterproc.BrokerCluster, args: argparse.Namespace, root: Path) -> dict:
    single = BrokerProcess(root / "single").start()
    runs: dict[str, list[float]] = {"cluster": [], "single": []}
    details: dict[str, list[dict]] = {"cluster": [], "single": []}
    try:
        for _ in range(args.repeat):
            for name in ("single", "cluster"):
                if name == "single":
                    result = bench(single.bootstrap, "leader", args.messages, "bench-single", 3)
                else:
                    result = bench(cluster.bootstrap, "all", args.messages, "bench-cluster", 3)
                runs[name].append(result["msg_per_s"])
                details[name].append({k: result.get(k) for k in ("msg_per_s", "mb_per_s", "p50_ms", "p99_ms")})
    finally:
        single.stop()
    return {
        "single_msg_per_s": runs["single"], "cluster_msg_per_s": runs["cluster"],
        "ratio": round(statistics.median(runs["cluster"]) / statistics.median(runs["single"]), 3),
        "details": details,
    }


def failover(cluster: clusterproc.BrokerCluster, kills: int) -> dict:
    create(cluster, "failover", 3)
    times = []
    for _ in range(kills):
        before = cluster.partition("failover", 0)
        victim = before["leader"]
        killed = time.monotonic()
        cluster.kill(victim)
        cluster.wait_for(lambda m, v=victim: m["topics"][0]["partitions"][0]["leader"] not in (-1, v), "new leader", 30, ["failover"])
        times.append(round(time.monotonic() - killed, 2))
        cluster.start(victim)
        cluster.wait_for(full_isr, "rejoin", 90, ["failover"])
    return {"failover_s": times, "median_s": statistics.median(times), "worst_s": max(times)}


def catch_up(cluster: clusterproc.BrokerCluster, mib: int) -> dict:
    create(cluster, "catchup", 3)
    cluster.brokers[2].stop()
    cluster.wait_for(lambda m: all(2 not in p["isr"] for p in m["topics"][0]["partitions"]), "ISR shrink", 60, ["catchup"])
    messages = mib * 1024  # 1 KiB values
    started = time.monotonic()
    subprocess.run([*RUSTMQ, "bench", "produce", "--acks", "all", "--messages", str(messages), "--size", "1024",
                    "--partitions", "3", "--concurrency", "3", "--topic", "catchup", "--keep-topic",
                    "--bootstrap", cluster.bootstrap, "--json"], check=True, capture_output=True, timeout=1800)
    produced_s = time.monotonic() - started
    restarted = time.monotonic()
    cluster.start(2)
    cluster.wait_for(full_isr, "caught up", 1800, ["catchup"])
    return {"mib": mib, "produce_s": round(produced_s, 1), "catch_up_s": round(time.monotonic() - restarted, 1)}


def drain(cluster: clusterproc.BrokerCluster, mib: int) -> dict:
    create(cluster, "drain", 3)
    started = time.monotonic()
    subprocess.run([*RUSTMQ, "bench", "produce", "--acks", "all", "--messages", str(mib * 1024), "--size", "1024",
                    "--partitions", "3", "--concurrency", "3", "--topic", "drain", "--keep-topic",
                    "--bootstrap", cluster.bootstrap, "--json"], check=True, capture_output=True, timeout=1800)
    produced_s = time.monotonic() - started
    cluster.size = 4
    cluster.start(3)
    cluster.wait_until_sees_all(3, timeout=60)
    deadline = time.monotonic() + 120
    while True:  # wait for the controller's report of broker 2's bytes (Lease annotation)
        health = clusterproc.read_health(cluster)
        if health is not None and health["brokers"].get("2", {}).get("bytes", 0) >= mib << 20:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"no health report with broker 2's bytes: {health}")
        time.sleep(0.5)
    held = health["brokers"]["2"]["bytes"]
    started = time.monotonic()
    clusterproc.write_membership(cluster, [0, 1, 3], generation=1)
    peak_to_move = 0
    while True:
        health = clusterproc.read_health(cluster)
        assert health is not None
        peak_to_move = max(peak_to_move, health["bytesToMove"])
        if (health["observedMembershipGeneration"] == 1 and health["reassigning"] == 0
                and health["brokers"].get("2", {}).get("replicas", 0) == 0):
            break
        if time.monotonic() - started > 1800:
            raise RuntimeError(f"drain not done in 1800 s: {health}")
        time.sleep(0.25)
    drain_s = time.monotonic() - started
    return {"mib": mib, "produce_s": round(produced_s, 1), "broker_2_log_bytes": held, "drain_s": round(drain_s, 1),
            "peak_bytes_to_move": peak_to_move, "mb_per_s": round(held / drain_s / 1e6, 1),
            "broker_3_replicas": health["brokers"]["3"]["replicas"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=300_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--catchup-mib", type=int, default=1024)
    parser.add_argument("--drain-mib", type=int, default=1024)
    parser.add_argument("--reassign-bytes-per-s", type=int, default=None,
                        help="RUSTMQ_REASSIGN_BYTES_PER_S for the drain (default: the brokers' default)")
    parser.add_argument("--skip", action="append", default=[], choices=["produce", "failover", "catchup", "drain"])
    args = parser.parse_args()
    report: dict = {"machine": {"cpus": len(__import__("os").sched_getaffinity(0)), "python": platform.python_version()},
                    "timing": DEFAULT_TIMING}
    with clusterproc.control_plane() as kubeconfig, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for part in ("produce", "failover", "catchup", "drain"):
            if part in args.skip:
                continue
            (root / part).mkdir()
            namespace = clusterproc.create_namespace(kubeconfig)
            env = dict(DEFAULT_TIMING)
            if part == "drain" and args.reassign_bytes_per_s is not None:
                env["RUSTMQ_REASSIGN_BYTES_PER_S"] = str(args.reassign_bytes_per_s)
                report["reassign_bytes_per_s"] = args.reassign_bytes_per_s
            cluster = clusterproc.BrokerCluster(root / part, kubeconfig, namespace, 3, env=env).start_all()
            try:
                if part == "produce":
                    report["produce"] = produce(cluster, args, root)
                elif part == "failover":
                    report["failover"] = failover(cluster, args.kills)
                elif part == "drain":
                    report["drain"] = drain(cluster, args.drain_mib)
                else:
                    report["catch_up"] = catch_up(cluster, args.catchup_mib)
            finally:
                cluster.stop_all()
            print(json.dumps({part: report.get(part if part != "catchup" else "catch_up")}), file=sys.stderr, flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
