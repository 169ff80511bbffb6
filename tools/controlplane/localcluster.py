"""Run a local Kubernetes control plane on loopback for the e2e tests and for developers.

`scripts/local-cluster` is a thin wrapper around this module; the e2e fixtures call the script.
It starts, as plain processes, etcd, kube-apiserver (RBAC on, its own openssl PKI, an admin
kubeconfig), kube-controller-manager (all default controllers, including StatefulSet, garbage
collector, namespace, service-account, node-lifecycle and the PV binder with the in-tree host-path
provisioner behind a default StorageClass), kube-scheduler and kwok, which plays the kubelet for
fake nodes: scheduled pods go Running and Ready without running anything. No containers, no
cloud: LoadBalancer addresses come from tests/e2e/lbipam.py.

Everything a cluster owns lives under one state directory (default: $TMPDIR/rustmq-local-cluster,
or --dir / $RUSTMQ_CLUSTER_DIR), so several clusters can run side by side:

    pki/            CA, the admin/serving certificate, the service-account key
    etcd/           etcd data
    logs/<c>.log    one log per component
    run/<c>.pid     one pid file per component
    kubeconfig      admin kubeconfig (client certificate, system:masters)
    state.json      ports and binaries of the running cluster

Process identity is the hazard here: `down` stops a process only if its command line names this
cluster's state directory, so a stale pid file that now belongs to someone else's process is
never signalled, and processes whose pid files were lost are still found (by scanning /proc).
`up` on a cluster with a dead component tears the rest down and starts afresh: a half-alive
control plane is worse than a fresh one, and a fresh one takes seconds.

Only the standard library is used, so the script runs before the virtualenv exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tools" / "controlplane" / "build"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
HOSTPATH_PV_ROOT = "/tmp/hostpath_pv/"  # hard-coded in the in-tree host-path provisioner
DEFAULT_NODES = 3
READY_TIMEOUT = 120.0


class ClusterError(RuntimeError):
    """A control-plane operation failed; the message says what to look at."""


def default_state_dir() -> Path:
    env = os.environ.get("RUSTMQ_CLUSTER_DIR")
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / "rustmq-local-cluster"


def log(message: str) -> None:
    print(f"local-cluster: {message}", file=sys.stderr, flush=True)


# --- binaries -------------------------------------------------------------------------------


def bin_dir(build: bool) -> Path:
    """The cached control-plane binaries; builds them first if `build` (idempotent)."""
    args = [str(BUILD_SCRIPT)] if build else [str(BUILD_SCRIPT), "--print-dir"]
    result = subprocess.run(args, stdout=subprocess.PIPE, text=True)
    path = Path(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else None
    if result.returncode != 0 or path is None:
        if build or result.returncode == 3:
            raise ClusterError(
                "building the control plane failed (see above). It needs Go 1.26+ and the Go module "
                "proxy; run `scripts/local-cluster build` for the full log."
            )
        raise ClusterError(
            f"the control-plane binaries are not built yet (expected in {path}). "
            "Run `scripts/local-cluster build` (a cold build takes 13 to 34 min on 2 cores)."
        )
    return path


# --- small helpers --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None  # a zombie or a kernel thread
    return raw.rstrip(b"\0").decode(errors="replace").split("\0")


def owns(pid: int, state_dir: Path) -> bool:
    """True if `pid` is alive and is one of this cluster's components."""
    argv = proc_cmdline(pid)
    if argv is None:
        return False
    marker = str(state_dir) + os.sep
    return Path(argv[0]).name in COMPONENTS and any(marker in arg for arg in argv[1:])


def stop_process(pid: int, state_dir: Path, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; only while the pid is still this cluster's."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline, killed = time.monotonic() + grace, False
    while owns(pid, state_dir):
        if time.monotonic() > deadline:
            if killed:
                raise ClusterError(f"pid {pid} survived SIGKILL for 5 s")
            os.kill(pid, signal.SIGKILL)
            deadline, killed = time.monotonic() + 5, True
        time.sleep(0.02)


def run_openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")


def make_pki(pki: Path) -> None:
    """A CA and one certificate that serves the apiserver and authenticates the admin.

    The admin is in system:masters, so it bypasses RBAC; the controller-manager, the scheduler
    and kwok use it too (tests that check RBAC impersonate or mint service-account tokens).
    """
    if shutil.which("openssl") is None:
        raise ClusterError("openssl is required for the cluster PKI (apt-get install openssl)")
    pki.mkdir(parents=True, exist_ok=True)
    run_openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", "/CN=rustmq-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        "-keyout", "ca.key", "-out", "ca.crt", cwd=pki,
    )
    run_openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/O=system:masters/CN=rustmq-admin",
        "-keyout", "admin.key", "-out", "admin.csr", cwd=pki,
    )
    (pki / "admin.ext").write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
    )
    run_openssl(
        "x509", "-req", "-in", "admin.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "30", "-extfile", "admin.ext", "-out", "admin.crt", cwd=pki,
    )
    run_openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    run_openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def kubeconfig_text(api_port: int, pki: Path) -> str:
    return (
        "apiVersion: v1\n"
        "kind: Config\n"
        "clusters:\n"
        "- name: rustmq-local\n"
        f"  cluster: {{server: 'https://127.0.0.1:{api_port}', certificate-authority: '{pki / 'ca.crt'}'}}\n"
        "users:\n"
        "- name: rustmq-admin\n"
        f"  user: {{client-certificate: '{pki / 'admin.crt'}', client-key: '{pki / 'admin.key'}'}}\n"
        "contexts:\n"
        "- name: rustmq-local\n"
        "  context: {cluster: rustmq-local, user: rustmq-admin}\n"
        "current-context: rustmq-local\n"
    )


def node_manifest(index: int) -> dict:
    """A kwok-managed fake node, untainted so workloads schedule without tolerations."""
    name = f"kwok-node-{index}"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "topology.kubernetes.io/zone": f"zone-{'abc'[index % 3]}",
            },
        },
        "status": {
            "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
            "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"},
        },
    }


STORAGE_CLASS = {
    "apiVersion": "storage.k8s.io/v1",
    "kind": "StorageClass",
    "metadata": {
        "name": "standard",
        "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
    },
    "provisioner": "kubernetes.io/host-path",
    "reclaimPolicy": "Delete",
    "volumeBindingMode": "Immediate",
}


# --- the cluster ----------------------------------------------------------------------------


@dataclass
class Cluster:
    state_dir: Path

    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    def pid_file(self, component: str) -> Path:
        return self.state_dir / "run" / f"{component}.pid"

    def log_file(self, component: str) -> Path:
        return self.state_dir / "logs" / f"{component}.log"

    def state(self) -> dict | None:
        try:
            return json.loads((self.state_dir / "state.json").read_text())
        except (OSError, ValueError):
            return None

    # -- processes --

    def component_pid(self, component: str) -> int | None:
        try:
            pid = int(self.pid_file(component).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if owns(pid, self.state_dir) else None

    def stray_pids(self) -> list[int]:
        """Every live process that belongs to this cluster, pid files or not."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and owns(int(entry.name), self.state_dir):
                found.append(int(entry.name))
        return found

    def start(self, component: str, argv: list[str]) -> subprocess.Popen:
        self.log_file(component).parent.mkdir(parents=True, exist_ok=True)
        self.pid_file(component).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file(component), "ab") as logfile:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                start_new_session=True,  # outlives this script and ignores the terminal's Ctrl-C
                env={**os.environ, "HOME": str(self.state_dir)},  # kwok reads ~/.kwok/kwok.yaml
            )
        self.pid_file(component).write_text(f"{proc.pid}\n")
        return proc

    def log_tail(self, component: str, lines: int = 15) -> str:
        try:
            text = self.log_file(component).read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    # -- API access without a client library --

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        context.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return context

    def api(self, method: str, path: str, body: dict | None = None, timeout: float = 5.0) -> dict:
        state = self.state()
        if state is None:
            raise ClusterError(f"no cluster state in {self.state_dir}")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"https://127.0.0.1:{state['ports']['api']}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        with urllib.request.urlopen(request, context=self._ssl_context(), timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw[:1] in (b"{", b"[") else {"raw": raw.decode(errors="replace")}

    def api_ready(self) -> bool:
        try:
            return self.api("GET", "/readyz").get("raw", "").strip() == "ok"
        except (OSError, urllib.error.URLError, ClusterError, ValueError):
            return False

    # -- lifecycle --

    def running(self) -> dict[str, int | None]:
        return {c: self.component_pid(c) for c in COMPONENTS}

    def up(self, nodes: int = DEFAULT_NODES, build: bool = True) -> None:
        bins = bin_dir(build=build)
        running = self.running()
        if all(running.values()) and self.api_ready():
            log(f"already up ({self.state_dir})")
            return
        if any(running.values()) or self.stray_pids() or self.state_dir.exists():
            dead = [c for c, pid in running.items() if pid is None]
            log(f"found a stale or broken cluster in {self.state_dir} (not running: {', '.join(dead)}); replacing it")
            self.down(quiet=True, grace=2.0)  # being replaced: no need to wait for a clean exit

        started = time.monotonic()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        ports = {"etcd": free_port(), "etcd_peer": free_port(), "api": free_port()}
        (self.state_dir / "state.json").write_text(
            json.dumps({"ports": ports, "bin_dir": str(bins), "nodes": nodes}, indent=2) + "\n"
        )
        make_pki(self.pki)
        self.kubeconfig.write_text(kubeconfig_text(ports["api"], self.pki))
        procs: dict[str, subprocess.Popen] = {}
        try:
            procs["etcd"] = self.start("etcd", self.etcd_argv(bins, ports))
            self.wait("etcd", procs, self.etcd_healthy)
            procs["kube-apiserver"] = self.start("kube-apiserver", self.apiserver_argv(bins, ports))
            self.wait("kube-apiserver", procs, self.api_ready)
            api_ready_after = time.monotonic() - started
            procs["kube-controller-manager"] = self.start("kube-controller-manager", self.kcm_argv(bins))
            procs["kube-scheduler"] = self.start("kube-scheduler", self.scheduler_argv(bins))
            procs["kwok"] = self.start("kwok", self.kwok_argv(bins))
            self.apply_objects(nodes)
            self.wait("kube-controller-manager", procs, self.default_service_account_exists)
            self.wait("kwok", procs, lambda: self.nodes_ready(nodes))
        except BaseException:
            self.down(quiet=True, keep_logs=True)
            raise
        log(
            f"up in {time.monotonic() - started:.1f} s (API ready after {api_ready_after:.1f} s); "
            f"kubeconfig: {self.kubeconfig}"
        )

    def wait(self, component: str, procs: dict[str, subprocess.Popen], ready, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise ClusterError(
                        f"{name} exited with status {proc.returncode} while starting; "
                        f"last lines of {self.log_file(name)}:\n{self.log_tail(name)}"
                    )
            if ready():
                return
            time.sleep(0.2)
        raise ClusterError(
            f"{component} was not ready within {timeout:.0f} s; last lines of "
            f"{self.log_file(component)}:\n{self.log_tail(component)}"
        )

    def etcd_healthy(self) -> bool:
        port = self.state()["ports"]["etcd"]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                return json.loads(resp.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def default_service_account_exists(self) -> bool:
        try:
            self.api("GET", "/api/v1/namespaces/default/serviceaccounts/default")
            return True
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def nodes_ready(self, count: int) -> bool:
        """All fake nodes report Ready and the node-lifecycle controller has lifted their taints."""
        try:
            items = self.api("GET", "/api/v1/nodes?labelSelector=type%3Dkwok")["items"]
        except (OSError, urllib.error.URLError, ValueError, KeyError):
            return False
        ready = 0
        for node in items:
            conditions = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
            taints = node.get("spec", {}).get("taints") or []
            if conditions.get("Ready") == "True" and not taints:
                ready += 1
        return ready >= count

    def apply_objects(self, nodes: int) -> None:
        self.create("/apis/storage.k8s.io/v1/storageclasses", STORAGE_CLASS)
        for index in range(nodes):
            self.create("/api/v1/nodes", node_manifest(index))

    def create(self, collection: str, body: dict) -> None:
        try:
            self.api("POST", collection, body)
        except urllib.error.HTTPError as err:
            if err.code != 409:  # already exists
                raise ClusterError(f"creating {body['kind']} {body['metadata']['name']} failed: {err.read()!r}") from err

    # -- component command lines --

    def etcd_argv(self, bins: Path, ports: dict) -> list[str]:
        client = f"http://127.0.0.1:{ports['etcd']}"
        peer = f"http://127.0.0.1:{ports['etcd_peer']}"
        return [
            str(bins / "etcd"),
            "--name=node0",
            f"--data-dir={self.state_dir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=node0={peer}",
            "--unsafe-no-fsync=true",  # test data: durability is not the point, speed is
            "--quota-backend-bytes=2147483648",
            "--auto-compaction-retention=1",
            "--log-level=warn",
        ]

    def apiserver_argv(self, bins: Path, ports: dict) -> list[str]:
        pki = self.pki
        return [
            str(bins / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports['api']}",
            f"--cert-dir={self.state_dir / 'apiserver'}",
            f"--tls-cert-file={pki / 'admin.crt'}",
            f"--tls-private-key-file={pki / 'admin.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",
            # A loopback address may not be published as the `kubernetes` Service's endpoint.
            "--endpoint-reconciler-type=none",
        ]

    def kcm_argv(self, bins: Path) -> list[str]:
        pki = self.pki
        return [
            str(bins / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--secure-port=0",
            "--controllers=*",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--enable-hostpath-provisioner=true",
            # No client-side throttling (as kwokctl's --disable-qps-limits): the default 20 QPS
            # slows the namespace and garbage-collector controllers when tests churn objects.
            "--kube-api-qps=1000",
            "--kube-api-burst=2000",
            # kwok's node heartbeat is coarse; do not flap fake nodes NotReady under load.
            "--node-monitor-period=25s",
            "--node-monitor-grace-period=3m20s",
        ]

    def scheduler_argv(self, bins: Path) -> list[str]:
        config = self.state_dir / "kube-scheduler.yaml"
        config.write_text(
            "apiVersion: kubescheduler.config.k8s.io/v1\n"
            "kind: KubeSchedulerConfiguration\n"
            f"clientConnection: {{kubeconfig: '{self.kubeconfig}'}}\n"
            "leaderElection: {leaderElect: false}\n"
        )
        return [str(bins / "kube-scheduler"), f"--config={config}", "--secure-port=0"]

    def kwok_argv(self, bins: Path) -> list[str]:
        config = self.state_dir / "kwok.yaml"
        config.write_text(
            "apiVersion: config.kwok.x-k8s.io/v1alpha1\n"
            "kind: KwokConfiguration\n"
            "options: {}\n"
        )
        return [
            str(bins / "kwok"),
            f"--config={config}",
            f"--kubeconfig={self.kubeconfig}",
            "--manage-nodes-with-label-selector=type=kwok",
            "--cidr=10.244.0.0/16",
            "--node-ip=127.0.0.1",  # the nodes' InternalIP: NodePorts are "reachable" on loopback
            # Non-zero: kwok keeps node leases and the status heartbeat (with 0, v0.7.0 picks
            # the lease-only heartbeat stage but keeps no lease, and nodes go NotReady).
            "--node-lease-duration-seconds=200",
        ]

    def down(self, quiet: bool = False, keep_logs: bool = False, grace: float = 10.0) -> None:
        hostpath_dirs = self.provisioned_hostpath_dirs()
        # In reverse start order, one at a time: an apiserver whose etcd vanished first does not
        # exit on SIGTERM for tens of seconds, while in order the whole plane stops in ~2 s.
        targets = [pid for pid in (self.component_pid(c) for c in reversed(COMPONENTS)) if pid is not None]
        targets += [pid for pid in self.stray_pids() if pid not in targets]
        for pid in targets:
            stop_process(pid, self.state_dir, grace)
        for directory in hostpath_dirs:
            shutil.rmtree(directory, ignore_errors=True)
        if keep_logs:
            for entry in self.state_dir.iterdir() if self.state_dir.exists() else []:
                if entry.name != "logs":
                    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        else:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        if not quiet:
            log(f"down: stopped {len(targets)} process(es), removed {self.state_dir}")

    def provisioned_hostpath_dirs(self) -> list[str]:
        """Directories the host-path provisioner made for this cluster's PVs (it ignores TMPDIR)."""
        if not self.api_ready():
            return []
        try:
            items = self.api("GET", "/api/v1/persistentvolumes")["items"]
        except (OSError, urllib.error.URLError, ValueError, KeyError):
            return []
        paths = [(pv["spec"].get("hostPath") or {}).get("path", "") for pv in items]
        return [p for p in paths if p.startswith(HOSTPATH_PV_ROOT) and ".." not in p]

    def status(self) -> bool:
        running = self.running()
        for component, pid in running.items():
            print(f"{component:24} {'running, pid ' + str(pid) if pid else 'not running'}")
        ready = self.api_ready()
        print(f"{'API':24} {'ready' if ready else 'not ready'}")
        if ready:
            print(f"{'kubeconfig':24} {self.kubeconfig}")
        return ready and all(running.values())

    def env_lines(self) -> list[str]:
        state = self.state()
        if state is None:
            raise ClusterError(f"no cluster in {self.state_dir}; run `scripts/local-cluster up` first")
        return [
            f"export KUBECONFIG={self.kubeconfig}",
            f"export PATH={state['bin_dir']}:$PATH",
        ]


def start_watchdog(cluster: Cluster, owner_pid: int) -> None:
    """A detached process that runs `down` when the owner (a pytest session) dies, even by SIGKILL."""
    subprocess.Popen(
        [sys.executable, __file__, "watchdog", "--dir", str(cluster.state_dir), "--owner-pid", str(owner_pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def watchdog(cluster: Cluster, owner_pid: int | None) -> None:
    if owner_pid is None:
        raise ClusterError("watchdog needs --owner-pid")
    while cluster.state_dir.exists():
        try:
            os.kill(owner_pid, 0)
        except ProcessLookupError:
            cluster.down(quiet=True)
            return
        except PermissionError:
            pass  # alive, owned by someone else
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/local-cluster",
        description="A local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, "
        "kube-scheduler, kwok fake nodes) on 127.0.0.1, built from source and cached.",
    )
    parser.add_argument("command", choices=["build", "up", "env", "down", "status", "watchdog"])
    parser.add_argument("--dir", type=Path, default=None, help="state directory (default: $RUSTMQ_CLUSTER_DIR or $TMPDIR/rustmq-local-cluster)")
    parser.add_argument("--nodes", type=int, default=DEFAULT_NODES, help="number of kwok fake nodes (up)")
    parser.add_argument("--no-build", action="store_true", help="up: fail instead of building missing binaries")
    parser.add_argument(
        "--owner-pid", type=int, default=None,
        help="up: tear the cluster down when this process dies (the test session passes its pid)",
    )
    args = parser.parse_args(argv)
    cluster = Cluster((args.dir or default_state_dir()).resolve())
    try:
        if args.command == "build":
            print(bin_dir(build=True))
        elif args.command == "up":
            cluster.up(nodes=args.nodes, build=not args.no_build)
            if args.owner_pid:
                start_watchdog(cluster, args.owner_pid)
            print(cluster.kubeconfig)
        elif args.command == "env":
            print("\n".join(cluster.env_lines()))
        elif args.command == "down":
            cluster.down()
        elif args.command == "status":
            return 0 if cluster.status() else 1
        elif args.command == "watchdog":
            watchdog(cluster, args.owner_pid)
    except ClusterError as err:
        log(str(err))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
