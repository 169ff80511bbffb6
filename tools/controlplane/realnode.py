"""One real Kubernetes node for the local control plane: containerd, runc, CNI, kubelet, kube-proxy, CoreDNS.

`scripts/local-cluster up --runtime containerd` uses this module instead of kwok's fake nodes, so
the broker image runs as real pods under the operator. Everything the node changes on the machine
is kept in places it creates itself, because the machine is shared and its network must not be
disturbed:

- **Its own network and mount namespaces.** A holder process (`localcluster.py node-holder`,
  started under `unshare --net --mount --propagation slave`) owns them; containerd, kubelet and
  kube-proxy are started inside with `nsenter`. kube-proxy's and the CNI plugins' iptables rules,
  the pod bridge, the sysctls they set (ip_forward, bridge-nf-call-iptables) and every mount
  kubelet and containerd make exist only there, and vanish when the last process in them exits.
  The host's iptables, sysctls and mount table are never touched.
- **One veth pair to the host** (`rmq-host0` 10.87.0.1/30 on the host, `rmq-node0` 10.87.0.2/30
  in the node). The API server listens on 10.87.0.1 (pods must reach it, and the `kubernetes`
  Service may not point at loopback); kubelet serves on 10.87.0.2. The host gets two routes
  through the pair: the pod network 10.88.0.0/24 and the LoadBalancer pool 10.89.0.0/24, which
  the node binds on its pod bridge `rmq-br0`. The node netns has no default route and the host
  does not forward (its ip_forward stays as it is, 0 here), so nothing a pod sends can leave the
  machine, and traffic from the host to a LoadBalancer address stays on the machine too.
  `preflight` refuses to start when any of these ranges is already routed more specifically than
  by the default route, or holds the machine's DNS server: our VMs' uplink is 192.0.2.0/24 and
  their registry proxy answers in 203.0.113.0/24, so neither TEST-NET may serve as a pool here.
- **cgroups under `/rustmq-node`** in every mounted hierarchy (kubelet's `cgroupRoot`): on
  teardown every process still in that subtree (the containers) is killed, then the directories
  are removed. The daemons themselves stay in the caller's cgroup.
- **A few fixed host paths** that kubelet, containerd and libcni do not let us move
  (`/var/log/containers`, `/var/lib/cni`, `/run/containerd`): only entries that name this
  cluster are removed, and a directory only if `up` created it.

Only one real node runs per machine (the link and cgroup names are fixed); `up` says whose it is.
Images come from archives imported with `ctr`: the pause and CoreDNS images are made here from
the static binaries of tools/controlplane/build-node (tools/controlplane/ociarchive.py); the
project's images come from scripts/build-images through `load-images`.

Standard library only, like localcluster.py.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_NODE = HERE / "build-node"

NODE_NAME = "rustmq-node"
HOST_LINK, NODE_LINK, BRIDGE = "rmq-host0", "rmq-node0", "rmq-br0"
TRANSIT = ipaddress.ip_network("10.87.0.0/30")
HOST_IP, NODE_IP = "10.87.0.1", "10.87.0.2"
POD_CIDR = ipaddress.ip_network("10.88.0.0/24")
POD_GATEWAY = "10.88.0.1"
LB_POOL = ipaddress.ip_network("10.89.0.0/24")
SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/16")
KUBERNETES_SERVICE_IP = "10.96.0.1"
DNS_SERVICE_IP = "10.96.0.10"
CGROUP_ROOT = "rustmq-node"
CNI_NETWORK = "rustmq-node"
OWNER_FILE = Path("/run/rustmq-node.owner")
SHARED_HOST_DIRS = (Path("/var/log/containers"), Path("/var/lib/cni"), Path("/run/containerd"))
NODE_COMPONENTS = ("containerd", "kubelet", "kube-proxy", "containerd-shim-runc-v2")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class NodeError(RuntimeError):
    """Setting up or tearing down the real node failed; the message says what to look at."""


def versions() -> dict[str, str]:
    result = {}
    for line in (HERE / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            result[key] = value
    return result


def pause_image() -> str:
    return f"registry.k8s.io/pause:{versions()['PAUSE_VERSION']}"


def coredns_image() -> str:
    return f"rustmq.local/coredns:{versions()['COREDNS_VERSION']}"


def node_bin_dir(build: bool) -> Path:
    args = [str(BUILD_NODE)] if build else [str(BUILD_NODE), "--print-dir"]
    result = subprocess.run(args, stdout=subprocess.PIPE, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        if build or result.returncode == 3:
            raise NodeError("building the node (tools/controlplane/build-node) failed; see above")
        raise NodeError(
            f"the node binaries are not built yet (expected in {lines[-1] if lines else '?'}). "
            "Run tools/controlplane/build-node (about 10 min cold on 2 cores with the control plane cached)."
        )
    return Path(lines[-1])


def run(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), capture_output=True, text=True, input=input)
    if check and result.returncode != 0:
        raise NodeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    return result


def in_node(holder: int, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in the node's network namespace (and mount namespace)."""
    return run("nsenter", f"--target={holder}", "--net", "--mount", "--", *argv, check=check)


def link_exists(name: str) -> bool:
    return run("ip", "link", "show", "dev", name, check=False).returncode == 0


# --- preflight ------------------------------------------------------------------------------


def cgroup_hierarchies() -> list[Path]:
    """Mount points of every cgroup (v1) and cgroup2 hierarchy, from /proc/self/mountinfo."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype = right.split()[0] if right else ""
        if fstype in ("cgroup", "cgroup2"):
            found.append(Path(left.split()[4]))
    return found


def preflight() -> None:
    if os.geteuid() != 0:
        raise NodeError("the real node needs root (kubelet, containerd, namespaces, cgroups)")
    for tool in ("ip", "nsenter", "unshare", "mount", "iptables", "iptables-restore", "iptables-save"):
        if shutil.which(tool, path=SYSTEM_PATH) is None:
            raise NodeError(f"{tool} is missing (apt-get install iproute2 util-linux iptables)")
    if not any(h.name not in ("unified",) for h in cgroup_hierarchies()):
        raise NodeError("no cgroup hierarchy is mounted")
    if OWNER_FILE.exists() or link_exists(HOST_LINK):
        owner = OWNER_FILE.read_text().strip() if OWNER_FILE.exists() else "unknown"
        if owner != "unknown" and not Path(owner).exists():
            raise NodeError(
                f"a real node's leftovers are on this machine (link {HOST_LINK} or {OWNER_FILE}; its state "
                f"directory {owner} is gone). Remove them with `scripts/local-cluster down --dir {owner}`."
            )
        raise NodeError(f"another real node runs on this machine (state directory {owner}); only one can")
    routes = json.loads(run("ip", "-j", "route", "show").stdout or "[]")
    nameservers = [
        parts[1] for parts in (line.split() for line in Path("/etc/resolv.conf").read_text().splitlines())
        if len(parts) >= 2 and parts[0] == "nameserver"
    ]
    problems = range_conflicts(routes, nameservers)
    if problems:
        raise NodeError("; ".join(problems) + "; the node's address ranges would capture them")


NODE_RANGES = (TRANSIT, POD_CIDR, LB_POOL, SERVICE_CIDR)


def range_conflicts(routes: list[dict], nameservers: list[str]) -> list[str]:
    """Routes (`ip -j route` objects) more specific than the default one, and DNS servers, that
    fall in the node's ranges: traffic to them would end up in the node instead. Pure."""
    problems = []
    for route in routes:
        dst = route.get("dst", "")
        if dst in ("default", ""):
            continue
        network = ipaddress.ip_network(dst if "/" in dst else dst + "/32", strict=False)
        for wanted in NODE_RANGES:
            if network.version == wanted.version and network.overlaps(wanted):
                problems.append(f"{wanted} overlaps the machine's route {dst} ({route.get('dev')})")
    for server in nameservers:
        try:
            address = ipaddress.ip_address(server)
        except ValueError:
            continue
        if any(address in net for net in NODE_RANGES):
            problems.append(f"the machine's DNS server {address} is inside the node's ranges")
    return problems


# --- namespaces, network, cgroups -------------------------------------------------------------


def setup_network(holder: int) -> None:
    run("ip", "link", "add", HOST_LINK, "type", "veth", "peer", "name", NODE_LINK, "netns", str(holder))
    run("ip", "addr", "add", f"{HOST_IP}/{TRANSIT.prefixlen}", "dev", HOST_LINK)
    run("ip", "link", "set", HOST_LINK, "up")
    for net in (POD_CIDR, LB_POOL):
        run("ip", "route", "add", str(net), "via", NODE_IP, "dev", HOST_LINK)
    steps = [
        ("ip", "link", "set", "lo", "up"),
        ("ip", "addr", "add", f"{NODE_IP}/{TRANSIT.prefixlen}", "dev", NODE_LINK),
        ("ip", "link", "set", NODE_LINK, "up"),
        ("ip", "link", "add", BRIDGE, "type", "bridge"),
        ("ip", "addr", "add", f"{POD_GATEWAY}/{POD_CIDR.prefixlen}", "dev", BRIDGE),
        ("ip", "link", "set", BRIDGE, "up"),
        # The pool and the Service range are bound on the bridge: inside the node they route
        # there (kube-proxy's DNAT picks the pod), never anywhere else.
        ("ip", "route", "add", str(LB_POOL), "dev", BRIDGE),
        ("ip", "route", "add", str(SERVICE_CIDR), "dev", BRIDGE),
        # Per network namespace: these change the node's namespace, not the host's.
        ("sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"),
        ("sh", "-c", "echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables"),
    ]
    for step in steps:
        in_node(holder, *step)


def create_cgroups() -> None:
    for hierarchy in cgroup_hierarchies():
        path = hierarchy / CGROUP_ROOT
        path.mkdir(exist_ok=True)
        if (hierarchy / "cpuset.cpus").exists():  # v1 cpuset: a child starts with no cpus/mems
            for name in ("cpuset.cpus", "cpuset.mems"):
                (path / name).write_text((hierarchy / name).read_text())


def cgroup_pids() -> set[int]:
    pids: set[int] = set()
    for hierarchy in cgroup_hierarchies():
        root = hierarchy / CGROUP_ROOT
        if not root.is_dir():
            continue
        for dirpath, _dirs, files in os.walk(root):
            if "cgroup.procs" in files:
                try:
                    pids.update(int(p) for p in (Path(dirpath) / "cgroup.procs").read_text().split())
                except OSError:
                    pass
    return pids


def kill_cgroup_processes() -> None:
    """SIGKILL everything in /rustmq-node: the containers (the daemons are not in it)."""
    for _ in range(50):
        pids = cgroup_pids()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def remove_cgroups() -> list[str]:
    """Kill what is left in /rustmq-node (containers), then remove the directories bottom-up."""
    problems = []
    kill_cgroup_processes()
    for hierarchy in cgroup_hierarchies():
        root = hierarchy / CGROUP_ROOT
        if not root.is_dir():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda entry: -len(entry[0])):
            for attempt in range(20):
                try:
                    os.rmdir(dirpath)
                    break
                except FileNotFoundError:
                    break
                except OSError as err:
                    if attempt == 19:
                        problems.append(f"cgroup {dirpath}: {err}")
                    time.sleep(0.1)
    return problems


# --- configuration files ----------------------------------------------------------------------


def containerd_config(node_dir: Path, bins: Path) -> str:
    return f"""version = 3
root = '{node_dir}/containerd/root'
state = '{node_dir}/containerd/state'

[grpc]
  address = '{node_dir}/containerd/containerd.sock'

[plugins.'io.containerd.internal.v1.opt']
  path = '{node_dir}/containerd/opt'

[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = '{pause_image()}'

[plugins.'io.containerd.cri.v1.runtime']
  netns_mounts_under_state_dir = true
  # Our VMs drop CAP_SYS_RESOURCE from every process, so nothing may lower oom_score_adj below
  # containerd's own (0): kubelet's -998 for sandboxes would make runc fail. Clamp instead, as
  # rootless setups do.
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = 'runc'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = 'io.containerd.runc.v2'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = '{bins}/runc'
        Root = '{node_dir}/runc'
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ['{bins}/cni']
    conf_dir = '{node_dir}/cni/net.d'
    max_conf_num = 1
"""


def cni_config(node_dir: Path) -> dict:
    return {
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(POD_CIDR), "gateway": POD_GATEWAY}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(node_dir / "cni" / "ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(node_dir: Path, ca: Path) -> dict:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # These machines run the cgroup v1 hybrid layout, which kubelet 1.35+ refuses by default.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{CGROUP_ROOT}",
        "containerRuntimeEndpoint": f"unix://{node_dir}/containerd/containerd.sock",
        "address": NODE_IP,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "Webhook"},
        "clusterDomain": "cluster.local",
        "clusterDNS": [DNS_SERVICE_IP],
        # No nameserver of the machine's: pods with dnsPolicy Default must not ask anything outside.
        "resolvConf": str(node_dir / "resolv.conf"),
        "podLogsDir": str(node_dir / "pod-logs"),
        "volumePluginDir": str(node_dir / "volume-plugins"),
        "failSwapOn": False,
        "serializeImagePulls": False,
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "evictionHard": {"memory.available": "200Mi", "nodefs.available": "5%", "imagefs.available": "5%"},
        "imageGCHighThresholdPercent": 95,
        "imageGCLowThresholdPercent": 90,
        "maxPods": 60,
        # Fast enough feedback for tests, slow enough for 2 busy cores.
        "nodeStatusUpdateFrequency": "10s",
        "syncFrequency": "10s",
    }


def kube_proxy_config(node_dir: Path) -> dict:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",  # no IPVS here (no kernel modules load)
        "clusterCIDR": str(POD_CIDR),
        "hostnameOverride": NODE_NAME,
        "bindAddress": NODE_IP,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "nodePortAddresses": [f"{NODE_IP}/32"],
        "clientConnection": {"kubeconfig": str(node_dir / "kube-proxy.kubeconfig")},
        # 0: leave the conntrack table and timeouts alone (as k3s does); not per network namespace.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }


def kubeconfig(server: str, ca: Path, cert: Path, key: Path) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority": str(ca)}}],
            "users": [{"name": "user", "user": {"client-certificate": str(cert), "client-key": str(key)}}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": "user"}}],
            "current-context": "local",
        },
        indent=2,
    )


# --- CoreDNS ----------------------------------------------------------------------------------

COREFILE = """.:1053 {
    errors
    health :8080
    ready :8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 30
}
"""


def coredns_objects() -> list[tuple[str, dict]]:
    """(collection path, object): CoreDNS as a pod behind the kube-dns Service at 10.96.0.10.

    No `forward`: nothing outside the cluster is resolvable, on purpose (nothing may leave).
    It listens on 1053 as a non-root user; the Service maps port 53 to it.
    """
    labels = {"k8s-app": "kube-dns"}
    return [
        ("/api/v1/namespaces/kube-system/serviceaccounts", {
            "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coredns", "namespace": "kube-system"},
        }),
        ("/apis/rbac.authorization.k8s.io/v1/clusterroles", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "rustmq:coredns"},
            "rules": [
                {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"], "verbs": ["list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
            ],
        }),
        ("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "rustmq:coredns"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "rustmq:coredns"},
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}],
        }),
        ("/api/v1/namespaces/kube-system/configmaps", {
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "coredns", "namespace": "kube-system"},
            "data": {"Corefile": COREFILE},
        }),
        ("/apis/apps/v1/namespaces/kube-system/deployments", {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "coredns", "namespace": "kube-system", "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "coredns",
                        "dnsPolicy": "Default",
                        "priorityClassName": "system-cluster-critical",
                        "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "runAsNonRoot": True},
                        "containers": [{
                            "name": "coredns",
                            "image": coredns_image(),
                            "imagePullPolicy": "Never",
                            "args": ["-conf", "/etc/coredns/Corefile"],
                            "ports": [
                                {"name": "dns", "containerPort": 1053, "protocol": "UDP"},
                                {"name": "dns-tcp", "containerPort": 1053, "protocol": "TCP"},
                            ],
                            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
                            "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 10},
                            "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
                            "securityContext": {
                                "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
                        }],
                        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                    },
                },
            },
        }),
        ("/api/v1/namespaces/kube-system/services", {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
            "spec": {
                "selector": labels,
                "clusterIP": DNS_SERVICE_IP,
                "ports": [
                    {"name": "dns", "port": 53, "targetPort": 1053, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "targetPort": 1053, "protocol": "TCP"},
                ],
            },
        }),
    ]


# --- images -----------------------------------------------------------------------------------


def base_images(bins: Path, out: Path) -> list[Path]:
    """Archives of the sandbox (pause) and CoreDNS images, made from the built binaries."""
    sys.path.insert(0, str(HERE))
    import ociarchive  # noqa: PLC0415 - a sibling script, not a package

    out.mkdir(parents=True, exist_ok=True)
    pause = ociarchive.write_image_archive(
        out / "pause.tar", pause_image(),
        [ociarchive.File("pause", (bins / "pause").read_bytes())],
        {"Entrypoint": ["/pause"], "User": "65535:65535"},
    )
    coredns = ociarchive.write_image_archive(
        out / "coredns.tar", coredns_image(),
        [ociarchive.File("coredns", (bins / "coredns").read_bytes())],
        {"Entrypoint": ["/coredns"], "User": "65532:65532", "ExposedPorts": {"1053/udp": {}, "1053/tcp": {}}},
    )
    return [pause, coredns]


def ctr(bins: Path, node_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(str(bins / "ctr"), "--address", str(node_dir / "containerd" / "containerd.sock"), "--namespace", "k8s.io",
               *args, check=check)


def import_archive(bins: Path, node_dir: Path, archive: Path) -> str:
    result = ctr(bins, node_dir, "images", "import", "--no-unpack=false", str(archive), check=False)
    if result.returncode != 0:
        result = ctr(bins, node_dir, "images", "import", str(archive))
    return result.stdout.strip()


def export_engine_image(image: str, out: Path) -> Path:
    """An image built by scripts/build-images (buildah's vfs storage, or docker) as a docker-archive."""
    archive = out / (image.replace("/", "_").replace(":", "_") + ".tar")
    archive.unlink(missing_ok=True)
    if shutil.which("docker") and run("docker", "info", check=False).returncode == 0:
        run("docker", "save", "-o", str(archive), image)
        return archive
    if shutil.which("buildah") is None:
        raise NodeError("neither docker nor buildah is installed: run scripts/build-images first")
    storage = os.environ.get("STORAGE_DRIVER", "vfs")
    result = run("buildah", "--storage-driver", storage, "push", "--quiet", image, f"docker-archive:{archive}:{image}", check=False)
    if result.returncode != 0:
        raise NodeError(f"exporting {image} from buildah failed (was it built by scripts/build-images?): {result.stderr.strip()}")
    return archive


# --- shared host paths ------------------------------------------------------------------------


def shared_dirs_before() -> dict[str, bool]:
    return {str(path): path.exists() for path in SHARED_HOST_DIRS}


def clean_shared_dirs(node_dir: Path, existed: dict[str, bool]) -> list[str]:
    """Remove what this node left in the host paths it cannot relocate; report what remains."""
    problems = []
    logs = Path("/var/log/containers")
    if logs.is_dir():
        for entry in logs.iterdir():
            try:
                if entry.is_symlink() and str(node_dir) in os.readlink(entry):
                    entry.unlink()
            except OSError as err:
                problems.append(f"{entry}: {err}")
    cni = Path("/var/lib/cni")
    for sub in ("results", "cache"):
        directory = cni / sub
        if directory.is_dir():
            for entry in directory.iterdir():
                if entry.name.startswith(CNI_NETWORK + "-"):
                    entry.unlink(missing_ok=True)
    for path in SHARED_HOST_DIRS:
        if not existed.get(str(path), True) and path.exists():
            shutil.rmtree(path, ignore_errors=True)
    return problems


def teardown_host(node_dir: Path, shared_dirs: dict[str, bool]) -> list[str]:
    """After every process is gone: the host end of the link, cgroups, shared paths, the owner file.

    The node's namespaces (its iptables rules, bridge, routes, mounts) died with their last
    process; the veth pair goes with the namespace, waited for briefly and removed if it stays.
    """
    problems = []
    deadline = time.monotonic() + 5
    while link_exists(HOST_LINK) and time.monotonic() < deadline:
        time.sleep(0.1)
    if link_exists(HOST_LINK):
        result = run("ip", "link", "del", HOST_LINK, check=False)
        if result.returncode != 0:
            problems.append(f"link {HOST_LINK}: {result.stderr.strip()}")
    problems += remove_cgroups()
    problems += clean_shared_dirs(node_dir, shared_dirs)
    OWNER_FILE.unlink(missing_ok=True)
    return problems


# --- teardown check ---------------------------------------------------------------------------


def leftovers(state_dir: Path) -> list[str]:
    """Anything of a real node still on the machine: links, routes, cgroups, mounts, processes."""
    found = []
    if link_exists(HOST_LINK):
        found.append(f"link {HOST_LINK}")
    routes = run("ip", "route", "show", check=False).stdout
    for net in (POD_CIDR, LB_POOL):
        if str(net) in routes:
            found.append(f"route {net}")
    for hierarchy in cgroup_hierarchies():
        if (hierarchy / CGROUP_ROOT).exists():
            found.append(f"cgroup {hierarchy / CGROUP_ROOT}")
    marker = str(state_dir) + os.sep
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            mounts = (entry / "mountinfo").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline.replace("\0", " "):
            found.append(f"process {entry.name}: {cmdline.replace(chr(0), ' ')[:120]}")
        elif marker in mounts:
            found.append(f"mounts of {state_dir} seen by process {entry.name}")
    if OWNER_FILE.exists() and OWNER_FILE.read_text().strip() == str(state_dir):
        found.append(str(OWNER_FILE))
    return found
