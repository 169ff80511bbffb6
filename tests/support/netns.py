"""Brokers in network namespaces of their own, for network-partition tests (root only).

Layout, created per cluster and torn down whole (``NetnsCluster.stop_all``)::

    host: bridge rmq<tag>b 10.213.N.1/24 ---- veth ---- netns rmq<tag>n<i>: 10.213.N.(10+i)/24
          TCP proxy 10.213.N.1:P -> 127.0.0.1:<API server port>

Each broker runs under ``ip netns exec`` (which execs, so the pid is the broker's) and listens on
its namespace's address. The local control plane's API server listens on 127.0.0.1 only, so a
small TCP proxy on the bridge address carries the brokers' API calls to it; inside each
namespace ``/etc/netns/<ns>/hosts`` (bind-mounted over /etc/hosts by ``ip netns exec``) maps
``kubernetes``, a name in the API server's certificate, to the bridge address, and the brokers'
kubeconfig points at ``https://kubernetes:P``: TLS is verified as usual. The test process stays in
the host namespace and reaches every broker through the bridge.

Cuts are iptables DROP rules *inside* one broker's namespace (nothing is changed in the host's
tables): ``cut_peers`` drops its traffic with the other brokers, ``cut_api`` its traffic with the
proxy, ``heal`` flushes them. Dropped, not refused: connections hang as in a real partition.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from clusterproc import BrokerCluster

PROXY = Path(__file__).with_name("tcpproxy.py")


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=30)


def _free_subnet() -> int:
    used = _run("ip", "-4", "-o", "addr").stdout
    for _ in range(50):
        n = 1 + secrets.randbelow(250)
        if f" 10.213.{n}." not in used:
            return n
    raise RuntimeError("no free 10.213.N.0/24 subnet for the test network")


class NetnsCluster(BrokerCluster):
    def __init__(self, root: Path, kubeconfig: Path, namespace: str, size: int, **options: Any) -> None:
        self.tag = secrets.token_hex(2)
        self.subnet = _free_subnet()
        self.bridge = f"rmq{self.tag}b"
        self.gateway = f"10.213.{self.subnet}.1"
        self.netns = [f"rmq{self.tag}n{i}" for i in range(size)]
        self._proxy: subprocess.Popen[str] | None = None
        self.proxy_port = 0
        super().__init__(root, kubeconfig, namespace, size, **options)
        try:
            self._build_network()
            self.kubeconfig = self._proxied_kubeconfig(kubeconfig)
        except BaseException:
            self.teardown_network()
            raise

    # -- BrokerCluster hooks ------------------------------------------------------------------

    def broker_host(self, broker_id: int) -> str:
        return f"10.213.{self.subnet}.{10 + broker_id}"

    def command_prefix(self, broker_id: int) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.netns[broker_id])

    # -- network ------------------------------------------------------------------------------

    def _build_network(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for i, ns in enumerate(self.netns):
            host_end, ns_end = f"rmq{self.tag}h{i}", f"rmq{self.tag}p{i}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            _run("ip", "link", "set", host_end, "master", self.bridge, "up")
            _run("ip", "link", "set", ns_end, "netns", ns)
            _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.broker_host(i)}/24", "dev", ns_end)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", ns_end, "up")
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{self.gateway} kubernetes\n")

    def _proxied_kubeconfig(self, kubeconfig: Path) -> Path:
        text = kubeconfig.read_text()
        match = re.search(r"https://127\.0\.0\.1:(\d+)", text)
        if match is None:
            raise RuntimeError(f"{kubeconfig}: no https://127.0.0.1:<port> server to proxy")
        self._proxy = subprocess.Popen([sys.executable, str(PROXY), self.gateway, "127.0.0.1", match.group(1)],
                                       stdout=subprocess.PIPE, text=True)
        assert self._proxy.stdout is not None
        self.proxy_port = int(self._proxy.stdout.readline())
        proxied = self.root / "netns-kubeconfig"
        proxied.write_text(text.replace(match.group(0), f"https://kubernetes:{self.proxy_port}"))
        return proxied

    def _iptables(self, broker_id: int, *rule: str) -> None:
        _run("ip", "netns", "exec", self.netns[broker_id], "iptables", *rule)

    def cut_peers(self, broker_id: int) -> None:
        """broker_id can no longer exchange packets with the other brokers (the API server and
        the test's clients still reach it)."""
        for other in range(self.size):
            if other != broker_id:
                self._iptables(broker_id, "-I", "INPUT", "-s", self.broker_host(other), "-j", "DROP")
                self._iptables(broker_id, "-I", "OUTPUT", "-d", self.broker_host(other), "-j", "DROP")

    def cut_api(self, broker_id: int) -> None:
        """broker_id can no longer reach the API server (the other brokers and clients still can)."""
        port = str(self.proxy_port)
        self._iptables(broker_id, "-I", "OUTPUT", "-p", "tcp", "-d", self.gateway, "--dport", port, "-j", "DROP")
        self._iptables(broker_id, "-I", "INPUT", "-p", "tcp", "-s", self.gateway, "--sport", port, "-j", "DROP")

    def heal(self, broker_id: int) -> None:
        self._iptables(broker_id, "-F", "INPUT")
        self._iptables(broker_id, "-F", "OUTPUT")

    def stop_all(self) -> None:
        try:
            super().stop_all()
        finally:
            self.teardown_network()

    def teardown_network(self) -> None:
        """Remove every namespace, link and file this cluster made (also after a partial build)."""
        if self._proxy is not None:
            self._proxy.kill()
            self._proxy.wait()
            if self._proxy.stdout is not None:
                self._proxy.stdout.close()
            self._proxy = None
        for i, ns in enumerate(self.netns):
            _run("ip", "link", "del", f"rmq{self.tag}h{i}", check=False)  # the pair: both ends at once
            _run("ip", "netns", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        _run("ip", "link", "del", self.bridge, check=False)

    def leftovers(self) -> list[str]:
        """Namespaces and links of this cluster still present (empty after teardown)."""
        names = _run("ip", "netns", "list").stdout + _run("ip", "-o", "link").stdout
        return sorted(set(re.findall(rf"rmq{self.tag}[a-z]\d*", names)))
