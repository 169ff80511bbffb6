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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realnode  # noqa: E402 - a sibling module; this file runs as a script before any venv exists

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tools" / "controlplane" / "build"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
LBIPAM_SCRIPT = REPO / "tools" / "controlplane" / "lbipam.py"
PROVISIONER_SCRIPT = REPO / "tools" / "controlplane" / "hostpath_provisioner.py"
# LoadBalancer addresses: never the machine's uplink (192.0.2.0/24 here) nor its proxy's range;
# on the real node this pool is routed into the node and bound on its bridge (realnode.py).
LB_POOL = str(realnode.LB_POOL)
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
# What runs per runtime, in start order (`down` stops them in reverse). The helpers are Python
# processes from the project's virtualenv: LB-IPAM (tools/controlplane/lbipam.py) gives
# LoadBalancer Services addresses, as kind's cloud provider does; the real node's volumes come
# from tools/controlplane/hostpath_provisioner.py.
RUNTIME_COMPONENTS = {
    "kwok": (*CONTROL_PLANE, "kwok", "lbipam"),
    "containerd": ("node-holder", *CONTROL_PLANE, "containerd", "kubelet", "kube-proxy", "provisioner", "lbipam"),
}
COMPONENTS = tuple(dict.fromkeys(c for names in RUNTIME_COMPONENTS.values() for c in names))
# Python helpers, recognised by the script they run (argv[1]) instead of argv[0].
SCRIPT_COMPONENTS = {"lbipam.py": "lbipam", "hostpath_provisioner.py": "provisioner"}
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


def component_of(argv: list[str]) -> str | None:
    """Which component a command line is: its program's name, or the helper script it runs."""
    name = Path(argv[0]).name
    if name in COMPONENTS or name == "containerd-shim-runc-v2":
        return name
    if len(argv) > 2 and Path(argv[1]).name == "localcluster.py" and argv[2] == "node-holder":
        return "node-holder"
    if len(argv) > 1:
        return SCRIPT_COMPONENTS.get(Path(argv[1]).name)
    return None


def owns(pid: int, state_dir: Path) -> bool:
    """True if `pid` is alive and is one of this cluster's processes (a shim of its node included)."""
    argv = proc_cmdline(pid)
    if argv is None:
        return False
    marker = str(state_dir) + os.sep
    return component_of(argv) is not None and any(marker in arg for arg in argv[1:])


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


def make_pki(pki: Path, extra_ips: tuple[str, ...] = ()) -> None:
    """A CA and one certificate that serves the apiserver and authenticates the admin.

    The admin is in system:masters, so it bypasses RBAC; the controller-manager, the scheduler
    and kwok use it too (tests that check RBAC impersonate or mint service-account tokens).
    `extra_ips` are more addresses the API server answers on (the real node's: the host end of
    its link and the `kubernetes` Service's ClusterIP).
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
        "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
        + "".join(f",IP:{ip}" for ip in extra_ips) + "\n"
    )
    run_openssl(
        "x509", "-req", "-in", "admin.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "30", "-extfile", "admin.ext", "-out", "admin.crt", cwd=pki,
    )
    run_openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    run_openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def client_cert(pki: Path, name: str, subject: str) -> None:
    """<name>.crt/.key signed by the cluster CA, for a client such as a kubelet or kube-proxy."""
    run_openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=pki)
    (pki / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
    )
    run_openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "30", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=pki)


def kubeconfig_text(api_port: int, pki: Path, host: str = "127.0.0.1") -> str:
    return (
        "apiVersion: v1\n"
        "kind: Config\n"
        "clusters:\n"
        "- name: rustmq-local\n"
        f"  cluster: {{server: 'https://{host}:{api_port}', certificate-authority: '{pki / 'ca.crt'}'}}\n"
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


# The real node's: tools/controlplane/hostpath_provisioner.py makes a directory per claim on the node.
NODE_STORAGE_CLASS = {
    "apiVersion": "storage.k8s.io/v1",
    "kind": "StorageClass",
    "metadata": {
        "name": "standard",
        "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
    },
    "provisioner": "rustmq.io/hostpath",
    "reclaimPolicy": "Delete",
    "volumeBindingMode": "WaitForFirstConsumer",
    "allowVolumeExpansion": True,
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

    def start(self, component: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
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
                # kwok reads ~/.kwok/kwok.yaml
                env={**os.environ, "HOME": str(self.state_dir), **(env or {})},
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
            f"https://{state.get('api_host', '127.0.0.1')}:{state['ports']['api']}{path}",
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

    @property
    def node_dir(self) -> Path:
        return self.state_dir / "node"

    def components(self) -> tuple[str, ...]:
        """This cluster's processes in start order: its runtime's, without LB-IPAM if it is off."""
        state = self.state() or {}
        names = RUNTIME_COMPONENTS[state.get("runtime", "kwok")]
        return tuple(c for c in names if c != "lbipam" or state.get("lb_ipam", True))

    def running(self) -> dict[str, int | None]:
        return {c: self.component_pid(c) for c in self.components()}

    def up(self, nodes: int = DEFAULT_NODES, build: bool = True, runtime: str = "kwok", lb_ipam: bool = True) -> None:
        bins = bin_dir(build=build)
        node_bins = None
        if runtime == "containerd":
            try:
                node_bins = realnode.node_bin_dir(build=build)
            except realnode.NodeError as err:
                raise ClusterError(str(err)) from err
        previous = self.state() or {}
        running = self.running()
        if all(running.values()) and self.api_ready() and previous.get("runtime", "kwok") == runtime:
            log(f"already up ({self.state_dir})")
            return
        if any(running.values()) or self.stray_pids() or self.state_dir.exists():
            dead = [c for c, pid in running.items() if pid is None]
            log(f"found a stale or broken cluster in {self.state_dir} (not running: {', '.join(dead)}); replacing it")
            self.down(quiet=True, grace=2.0)  # being replaced: no need to wait for a clean exit
        if (lb_ipam or runtime == "containerd") and not VENV_PYTHON.exists():
            if runtime == "containerd":
                raise ClusterError("the real node's volume provisioner runs from the project's venv: run scripts/setup")
            log("no .venv (scripts/setup): LoadBalancer Services will get no address")
            lb_ipam = False

        started = time.monotonic()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        ports = {"etcd": free_port(), "etcd_peer": free_port(), "api": free_port()}
        api_host = realnode.HOST_IP if runtime == "containerd" else "127.0.0.1"
        state = {
            "ports": ports, "bin_dir": str(bins), "nodes": nodes, "runtime": runtime, "api_host": api_host,
            "lb_ipam": lb_ipam, "lb_pool": LB_POOL,
        }
        if node_bins is not None:
            state.update(node_bin_dir=str(node_bins), shared_dirs=realnode.shared_dirs_before())
        (self.state_dir / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        procs: dict[str, subprocess.Popen] = {}
        try:
            if runtime == "containerd":
                realnode.preflight()
                realnode.OWNER_FILE.write_text(f"{self.state_dir}\n")
                self.node_dir.mkdir(parents=True, exist_ok=True)
                procs["node-holder"] = self.start("node-holder", self.holder_argv())
                self.wait("node-holder", procs, lambda: (self.node_dir / "holder.ready").exists())
                realnode.setup_network(procs["node-holder"].pid)
                realnode.create_cgroups()
                make_pki(self.pki, extra_ips=(realnode.HOST_IP, realnode.KUBERNETES_SERVICE_IP))
            else:
                make_pki(self.pki)
            self.kubeconfig.write_text(kubeconfig_text(ports["api"], self.pki, api_host))
            procs["etcd"] = self.start("etcd", self.etcd_argv(bins, ports))
            self.wait("etcd", procs, self.etcd_healthy)
            procs["kube-apiserver"] = self.start("kube-apiserver", self.apiserver_argv(bins, ports, runtime))
            self.wait("kube-apiserver", procs, self.api_ready)
            api_ready_after = time.monotonic() - started
            procs["kube-controller-manager"] = self.start("kube-controller-manager", self.kcm_argv(bins))
            procs["kube-scheduler"] = self.start("kube-scheduler", self.scheduler_argv(bins))
            if runtime == "kwok":
                procs["kwok"] = self.start("kwok", self.kwok_argv(bins))
                self.apply_objects(nodes, STORAGE_CLASS)
                self.wait("kube-controller-manager", procs, self.default_service_account_exists)
                self.wait("kwok", procs, lambda: self.nodes_ready(nodes))
            else:
                self.apply_objects(0, NODE_STORAGE_CLASS)
                self.wait("kube-controller-manager", procs, self.default_service_account_exists)
                self.start_node(node_bins, ports, procs)
            if lb_ipam:
                procs["lbipam"] = self.start("lbipam", [
                    str(VENV_PYTHON), str(LBIPAM_SCRIPT), "--kubeconfig", str(self.kubeconfig), "--pool", LB_POOL,
                ])
        except BaseException:
            self.down(quiet=True, keep_logs=True)
            raise
        log(
            f"up ({runtime}) in {time.monotonic() - started:.1f} s (API ready after {api_ready_after:.1f} s); "
            f"kubeconfig: {self.kubeconfig}"
        )

    def holder_argv(self) -> list[str]:
        """The process that owns the node's network and mount namespaces (see realnode.py)."""
        return [
            "unshare", "--net", "--mount", "--propagation", "slave", "--",
            sys.executable, str(Path(__file__).resolve()), "node-holder", "--dir", f"{self.state_dir}{os.sep}",
        ]

    def start_node(self, nb: Path, ports: dict, procs: dict[str, subprocess.Popen]) -> None:
        """containerd, kubelet and kube-proxy in the node's namespaces; then volumes and CoreDNS."""
        nd, pki = self.node_dir, self.pki
        holder = procs["node-holder"].pid
        enter = ["nsenter", f"--target={holder}", "--net", "--mount", "--"]
        env = {"PATH": f"{nb}:{realnode.SYSTEM_PATH}"}  # the shim is found on PATH, iptables too
        server = f"https://{realnode.HOST_IP}:{ports['api']}"
        client_cert(pki, "kubelet", f"/O=system:nodes/CN=system:node:{realnode.NODE_NAME}")
        client_cert(pki, "kube-proxy", "/CN=system:kube-proxy")
        (nd / "kubelet.kubeconfig").write_text(realnode.kubeconfig(server, pki / "ca.crt", pki / "kubelet.crt", pki / "kubelet.key"))
        (nd / "kube-proxy.kubeconfig").write_text(
            realnode.kubeconfig(server, pki / "ca.crt", pki / "kube-proxy.crt", pki / "kube-proxy.key"))
        (nd / "containerd.toml").write_text(realnode.containerd_config(nd, nb))
        (nd / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
        (nd / "cni" / "net.d" / "10-rustmq-node.conflist").write_text(json.dumps(realnode.cni_config(nd), indent=2))
        (nd / "resolv.conf").write_text("")
        (nd / "kubelet.yaml").write_text(json.dumps(realnode.kubelet_config(nd, pki / "ca.crt"), indent=2))
        (nd / "kube-proxy.yaml").write_text(json.dumps(realnode.kube_proxy_config(nd), indent=2))

        procs["containerd"] = self.start("containerd", [*enter, str(nb / "containerd"), "--config", str(nd / "containerd.toml")], env)
        self.wait("containerd", procs, lambda: realnode.ctr(nb, nd, "version", check=False).returncode == 0)
        for archive in realnode.base_images(nb, nd / "images"):
            realnode.import_archive(nb, nd, archive)
        procs["kubelet"] = self.start("kubelet", [
            *enter, str(nb / "kubelet"), f"--config={nd / 'kubelet.yaml'}", f"--kubeconfig={nd / 'kubelet.kubeconfig'}",
            f"--hostname-override={realnode.NODE_NAME}", f"--node-ip={realnode.NODE_IP}",
            f"--root-dir={nd / 'kubelet'}", "--v=1",
        ], env)
        procs["kube-proxy"] = self.start("kube-proxy", [
            *enter, str(nb / "kube-proxy"), f"--config={nd / 'kube-proxy.yaml'}", "--v=1",
        ], env)
        self.wait("kubelet", procs, self.real_node_ready, timeout=180)
        procs["provisioner"] = self.start("provisioner", [
            str(VENV_PYTHON), str(PROVISIONER_SCRIPT), "--kubeconfig", str(self.kubeconfig),
            "--root", f"{nd / 'volumes'}{os.sep}", "--node", realnode.NODE_NAME,
        ])
        for collection, body in realnode.coredns_objects():
            self.create(collection, body)
        self.wait("kubelet", procs, self.cluster_dns_ready, timeout=180)

    def real_node_ready(self) -> bool:
        try:
            node = self.api("GET", f"/api/v1/nodes/{realnode.NODE_NAME}")
        except (OSError, urllib.error.URLError, ValueError):
            return False
        conditions = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
        taints = [t for t in node.get("spec", {}).get("taints") or [] if t["key"].startswith("node.kubernetes.io/")]
        return conditions.get("Ready") == "True" and not taints

    def cluster_dns_ready(self) -> bool:
        try:
            deployment = self.api("GET", "/apis/apps/v1/namespaces/kube-system/deployments/coredns")
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return (deployment.get("status", {}).get("readyReplicas") or 0) >= 1

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

    def apply_objects(self, nodes: int, storage_class: dict) -> None:
        self.create("/apis/storage.k8s.io/v1/storageclasses", storage_class)
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

    def apiserver_argv(self, bins: Path, ports: dict, runtime: str = "kwok") -> list[str]:
        pki = self.pki
        if runtime == "containerd":
            # Pods reach the API through the `kubernetes` Service, whose endpoint may not be a
            # loopback address: listen on the host end of the node's link (realnode.py), let the
            # lease reconciler publish it; kubelets are Node-authorized, their API is reached with
            # the admin certificate (logs, exec).
            address = [
                f"--bind-address={realnode.HOST_IP}",
                f"--advertise-address={realnode.HOST_IP}",
                "--enable-admission-plugins=NodeRestriction",
                f"--kubelet-client-certificate={pki / 'admin.crt'}",
                f"--kubelet-client-key={pki / 'admin.key'}",
                # By address: the default tries the node's hostname first, a DNS query that
                # would go to the machine's resolver.
                "--kubelet-preferred-address-types=InternalIP",
            ]
        else:
            # A loopback address may not be published as the `kubernetes` Service's endpoint.
            address = ["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", "--endpoint-reconciler-type=none"]
        return [
            str(bins / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
            *address,
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
        state = self.state() or {}
        hostpath_dirs = self.provisioned_hostpath_dirs()
        node_owned = realnode.OWNER_FILE.exists() and realnode.OWNER_FILE.read_text().strip() == str(self.state_dir)
        # In reverse start order, one at a time: an apiserver whose etcd vanished first does not
        # exit on SIGTERM for tens of seconds, while in order the whole plane stops in ~2 s.
        # On the real node, kubelet goes before the containers (else it restarts them), the
        # containers (everything in the node's cgroup) before containerd and its shims.
        stopped = 0
        order = list(reversed(RUNTIME_COMPONENTS[state.get("runtime", "kwok")]))
        for component in order:
            if component == "containerd" and node_owned:
                realnode.kill_cgroup_processes()
            pid = self.component_pid(component)
            if pid is not None:
                stop_process(pid, self.state_dir, grace)
                stopped += 1
            if component == "containerd":  # the shims outlive containerd by design
                for stray in self.stray_pids():
                    if component_of(proc_cmdline(stray) or [""]) == "containerd-shim-runc-v2":
                        stop_process(stray, self.state_dir, 2.0)
                        stopped += 1
        for pid in self.stray_pids():
            stop_process(pid, self.state_dir, grace)
            stopped += 1
        problems: list[str] = []
        if node_owned:
            problems += realnode.teardown_host(self.node_dir, state.get("shared_dirs", {}))
        for directory in hostpath_dirs:
            shutil.rmtree(directory, ignore_errors=True)
        if keep_logs:
            for entry in self.state_dir.iterdir() if self.state_dir.exists() else []:
                if entry.name != "logs":
                    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        else:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        if state.get("runtime") == "containerd" or node_owned:
            problems += realnode.leftovers(self.state_dir)
        if problems:
            raise ClusterError("down left things behind:\n  " + "\n  ".join(problems))
        if not quiet:
            log(f"down: stopped {stopped} process(es), removed {self.state_dir}")

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
            try:
                cluster.down(quiet=True)
            except ClusterError as err:
                log(str(err))
            return
        except PermissionError:
            pass  # alive, owned by someone else
        time.sleep(1)


def node_holder(state_dir: Path) -> None:
    """Run by `unshare --net --mount`: own the node's namespaces until SIGTERM (see realnode.py).

    Makes / shared inside the new mount namespace (a slave of the host's, so nothing mounted
    here reaches the host): kubelet and pods that ask for mount propagation need it, as kind's
    entrypoint does for its node.
    """
    subprocess.run(["mount", "--make-rshared", "/"], check=True)
    (state_dir / "node" / "holder.ready").write_text(f"{os.getpid()}\n")
    while True:
        signal.pause()


def load_images(cluster: Cluster, images: list[str]) -> None:
    """Import images built by scripts/build-images into the real node's containerd (namespace k8s.io)."""
    state = cluster.state() or {}
    if state.get("runtime") != "containerd" or not cluster.running().get("containerd"):
        raise ClusterError("load-images needs a running real node (`scripts/local-cluster up --runtime containerd`)")
    node_bins = Path(state["node_bin_dir"])
    out = cluster.node_dir / "images"
    out.mkdir(parents=True, exist_ok=True)
    for image in images:
        started = time.monotonic()
        try:
            archive = realnode.export_engine_image(image, out)
            realnode.import_archive(node_bins, cluster.node_dir, archive)
        except realnode.NodeError as err:
            raise ClusterError(str(err)) from err
        archive.unlink(missing_ok=True)
        log(f"imported {image} into the node in {time.monotonic() - started:.1f} s")


def project_version() -> str:
    for line in (REPO / "pyproject.toml").read_text().splitlines():
        if line.startswith("version = "):
            return line.split('"')[1]
    raise ClusterError("no version in pyproject.toml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/local-cluster",
        description="A local Kubernetes cluster (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, "
        "and kwok fake nodes or one real containerd node), built from source and cached.",
    )
    parser.add_argument(
        "command", choices=["build", "build-node", "up", "env", "down", "status", "load-images", "watchdog", "node-holder"],
    )
    parser.add_argument("images", nargs="*", help="load-images: image references (default: rustmq/broker and "
                        "rustmq/operator at the project's version)")
    parser.add_argument("--dir", type=Path, default=None, help="state directory (default: $RUSTMQ_CLUSTER_DIR or $TMPDIR/rustmq-local-cluster)")
    parser.add_argument("--runtime", choices=["kwok", "containerd"], default="kwok",
                        help="up: kwok fake nodes (default, fast) or one real node (containerd, kubelet, kube-proxy; root)")
    parser.add_argument("--nodes", type=int, default=DEFAULT_NODES, help="number of kwok fake nodes (up)")
    parser.add_argument("--no-build", action="store_true", help="up: fail instead of building missing binaries")
    parser.add_argument("--no-lb-ipam", action="store_true", help="up: do not give LoadBalancer Services addresses")
    parser.add_argument(
        "--owner-pid", type=int, default=None,
        help="up: tear the cluster down when this process dies (the test session passes its pid)",
    )
    args = parser.parse_intermixed_args(argv)
    cluster = Cluster((args.dir or default_state_dir()).resolve())
    try:
        if args.command == "build":
            print(bin_dir(build=True))
        elif args.command == "build-node":
            print(realnode.node_bin_dir(build=True))
        elif args.command == "up":
            cluster.up(nodes=args.nodes, build=not args.no_build, runtime=args.runtime, lb_ipam=not args.no_lb_ipam)
            if args.owner_pid:
                start_watchdog(cluster, args.owner_pid)
            print(cluster.kubeconfig)
        elif args.command == "env":
            print("\n".join(cluster.env_lines()))
        elif args.command == "down":
            cluster.down()
        elif args.command == "status":
            return 0 if cluster.status() else 1
        elif args.command == "load-images":
            version = project_version()
            load_images(cluster, args.images or [f"rustmq/broker:{version}", f"rustmq/operator:{version}"])
        elif args.command == "watchdog":
            watchdog(cluster, args.owner_pid)
        elif args.command == "node-holder":
            node_holder(cluster.state_dir)
    except (ClusterError, realnode.NodeError) as err:
        log(str(err))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
