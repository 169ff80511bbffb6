"""Give LoadBalancer Services an address, the way Cilium's LB-IPAM does, for clusters without one.

Without a cloud controller a `type: LoadBalancer` Service never gets `status.loadBalancer.ingress`,
so the operator's external-address reporting could not be tested. This helper watches Services and
writes that status from an address pool, following LB-IPAM's rules:

- only Services of type LoadBalancer whose `spec.loadBalancerClass` is unset or one of the classes
  this instance serves (default: unset, `io.cilium/l2-announcer`, `io.cilium/bgp-control-plane`);
  a Service with another class belongs to another controller and is left alone;
- a requested address (annotation `lbipam.cilium.io/ips`, comma-separated, or the deprecated
  `spec.loadBalancerIP`) is honoured if it is in the pool and free; otherwise the Service gets no
  address and a `cilium.io/IPAMRequestSatisfied=False` condition saying why;
- otherwise the lowest free address of the pool; an address returns to the pool when its Service
  is deleted or stops being a LoadBalancer.

`scripts/local-cluster up` runs it (as kind's cloud provider gives kind clusters addresses), so a
local cluster hands out LoadBalancer addresses by itself. The default pool is 10.89.0.0/24: not
TEST-NET-1 (192.0.2.0/24), which is our machines' own uplink subnet, nor TEST-NET-3, where their
registry proxy answers. On the real node (`up --runtime containerd`) the pool is routed into the
node's network namespace and bound on its bridge, where kube-proxy answers for the addresses, so
traffic to them never leaves the machine; on kwok nothing answers there and nothing is sent. The
helper itself only writes Service status.

While it runs as a process it holds the Lease `kube-system/rustmq-lbipam` (renewed every 10 s),
so that tests find out that a cluster already has an allocator and do not start a second one
(`running_allocator`).

Use it as a background thread (`LBIPAM(api_client).start()` ... `.stop()`; the e2e fixture
`lb_ipam` does this where the cluster has none) or as a script against any kubeconfig:

    .venv/bin/python tools/controlplane/lbipam.py [--kubeconfig PATH] [--pool CIDR] [--class NAME ...]
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

DEFAULT_POOL = "10.89.0.0/24"
LEASE_NAMESPACE, LEASE_NAME = "kube-system", "rustmq-lbipam"
LEASE_SECONDS = 30
DEFAULT_CLASSES: frozenset[str | None] = frozenset({None, "io.cilium/l2-announcer", "io.cilium/bgp-control-plane"})
REQUEST_ANNOTATION = "lbipam.cilium.io/ips"
CONDITION_TYPE = "cilium.io/IPAMRequestSatisfied"

logger = logging.getLogger("lbipam")


def wanted(service: client.V1Service, classes: frozenset[str | None]) -> bool:
    """Whether this allocator is responsible for the Service's address."""
    spec = service.spec
    return spec is not None and spec.type == "LoadBalancer" and spec.load_balancer_class in classes


def requested_ips(service: client.V1Service) -> list[str]:
    annotation = (service.metadata.annotations or {}).get(REQUEST_ANNOTATION, "")
    ips = [part.strip() for part in annotation.split(",") if part.strip()]
    if not ips and service.spec.load_balancer_ip:
        ips = [service.spec.load_balancer_ip]
    return ips


def current_ips(service: client.V1Service) -> list[str]:
    lb = service.status.load_balancer if service.status else None
    return [ingress.ip for ingress in (lb.ingress or [])] if lb and lb.ingress else []


def reported_problem(service: client.V1Service) -> str | None:
    for condition in (service.status.conditions if service.status else None) or []:
        if condition.type == CONDITION_TYPE and condition.status == "False":
            return condition.message
    return None


class LBIPAM:
    """Allocates pool addresses to LoadBalancer Services and writes them into their status."""

    def __init__(
        self,
        api_client: client.ApiClient,
        pool: str = DEFAULT_POOL,
        classes: Iterable[str | None] = DEFAULT_CLASSES,
        namespace: str | None = None,
        announce: bool = False,
    ) -> None:
        self.core = client.CoreV1Api(api_client)
        self.coordination = client.CoordinationV1Api(api_client)
        self.announce = announce
        self._renewed = 0.0
        self.network = ipaddress.ip_network(pool)
        self.classes = frozenset(classes)
        self.namespace = namespace
        self.allocated: dict[str, tuple[str, ...]] = {}  # "ns/name" -> its addresses
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: watch.Watch | None = None

    # -- allocation (pure bookkeeping) --

    def _owner_of(self, ip: str) -> str | None:
        for key, ips in self.allocated.items():
            if ip in ips:
                return key
        return None

    def _choose(self, key: str, service: client.V1Service) -> tuple[list[str], str | None]:
        """Addresses for the Service, or ([], reason) when its request cannot be satisfied."""
        requested = requested_ips(service)
        if requested:
            for ip in requested:
                try:
                    address = ipaddress.ip_address(ip)
                except ValueError:
                    return [], f"requested address {ip!r} is not an IP address"
                if address not in self.network:
                    return [], f"requested address {ip} is outside the pool {self.network}"
                owner = self._owner_of(ip)
                if owner not in (None, key):
                    return [], f"requested address {ip} is already allocated to {owner}"
            return requested, None
        for address in self.network.hosts():
            if self._owner_of(str(address)) is None:
                return [str(address)], None
        return [], f"the pool {self.network} is exhausted"

    def assigned(self) -> dict[str, tuple[str, ...]]:
        with self._lock:
            return dict(self.allocated)

    # -- reconciliation --

    def reconcile(self, service: client.V1Service, deleted: bool = False) -> None:
        key = f"{service.metadata.namespace}/{service.metadata.name}"
        with self._lock:
            if deleted or not wanted(service, self.classes):
                self.allocated.pop(key, None)
                return
            have = current_ips(service)
            if have and all(ipaddress.ip_address(ip) in self.network for ip in have) and not any(
                self._owner_of(ip) not in (None, key) for ip in have
            ):
                if not requested_ips(service) or sorted(requested_ips(service)) == sorted(have):
                    self.allocated[key] = tuple(have)  # already done (possibly by an earlier run)
                    return
            self.allocated.pop(key, None)
            ips, problem = self._choose(key, service)
            if ips:
                self.allocated[key] = tuple(ips)
        if problem and not have and reported_problem(service) == problem:
            return  # already said so; writing again would only echo back as another event
        self._write_status(service, ips, problem)

    def _write_status(self, service: client.V1Service, ips: list[str], problem: str | None) -> None:
        condition = {
            "type": CONDITION_TYPE,
            "status": "False" if problem else "True",
            "reason": "RequestFailed" if problem else "Satisfied",
            "message": problem or f"allocated from {self.network}",
            "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "observedGeneration": service.metadata.generation or 0,
        }
        body = {
            "status": {
                "loadBalancer": {"ingress": [{"ip": ip} for ip in ips]} if ips else {},
                "conditions": [condition],
            }
        }
        try:
            self.core.patch_namespaced_service_status(service.metadata.name, service.metadata.namespace, body)
            logger.info("%s/%s: %s", service.metadata.namespace, service.metadata.name, ips or problem)
        except ApiException as err:
            if err.status != 404:  # deleted meanwhile: nothing to do
                raise

    def reconcile_all(self) -> str:
        """Reconcile every Service; returns the list's resourceVersion to watch from."""
        if self.namespace:
            listing = self.core.list_namespaced_service(self.namespace)
        else:
            listing = self.core.list_service_for_all_namespaces()
        with self._lock:
            self.allocated.clear()
            for service in listing.items:  # first learn what earlier runs allocated
                if wanted(service, self.classes) and current_ips(service):
                    self.allocated.setdefault(f"{service.metadata.namespace}/{service.metadata.name}", tuple(current_ips(service)))
        for service in listing.items:
            self.reconcile(service)
        return listing.metadata.resource_version

    # -- running --

    def renew_lease(self) -> None:
        """Say that this cluster has an allocator (see `running_allocator`); every 10 s at most."""
        if not self.announce or time.monotonic() - self._renewed < 10:
            return
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": LEASE_NAME, "namespace": LEASE_NAMESPACE},
            "spec": {"holderIdentity": f"lbipam {self.network}", "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now},
        }
        try:
            self.coordination.patch_namespaced_lease(LEASE_NAME, LEASE_NAMESPACE, body)
        except ApiException as err:
            if err.status != 404:
                raise
            self.coordination.create_namespaced_lease(LEASE_NAMESPACE, body)
        self._renewed = time.monotonic()

    def run(self) -> None:
        """Reconcile until stop(); errors are logged and retried, never raised into the thread."""
        resource_version = None
        while not self._stop.is_set():
            try:
                self.renew_lease()
                if resource_version is None:
                    resource_version = self.reconcile_all()
                self._watch = watch.Watch()
                if self.namespace:
                    stream = self._watch.stream(
                        self.core.list_namespaced_service, self.namespace,
                        resource_version=resource_version, timeout_seconds=2,
                    )
                else:
                    stream = self._watch.stream(
                        self.core.list_service_for_all_namespaces,
                        resource_version=resource_version, timeout_seconds=2,
                    )
                for event in stream:
                    if self._stop.is_set():
                        break
                    if event["type"] == "ERROR":
                        resource_version = None  # e.g. 410 Gone: relist
                        break
                    service = event["object"]
                    resource_version = service.metadata.resource_version
                    self.reconcile(service, deleted=event["type"] == "DELETED")
            except ApiException as err:
                if err.status == 410:
                    resource_version = None
                    continue
                logger.warning("LB-IPAM: API error %s, retrying", err.status)
                self._stop.wait(1)
            except Exception:  # noqa: BLE001 - a helper thread must survive a dropped connection
                if self._stop.is_set():  # stop() closed the watch connection under our feet
                    return
                logger.exception("LB-IPAM: unexpected error, relisting")
                resource_version = None
                self._stop.wait(1)

    def start(self) -> LBIPAM:
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="lbipam", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError("the LB-IPAM thread did not stop")
            self._thread = None


def running_allocator(api_client: client.ApiClient) -> str | None:
    """The pool of an LB-IPAM process that serves this cluster now (its Lease is fresh), or None."""
    try:
        lease = client.CoordinationV1Api(api_client).read_namespaced_lease(LEASE_NAME, LEASE_NAMESPACE)
    except ApiException as err:
        if err.status == 404:
            return None
        raise
    renewed = lease.spec.renew_time
    if renewed is None or (datetime.now(UTC) - renewed).total_seconds() > (lease.spec.lease_duration_seconds or 0):
        return None
    return (lease.spec.holder_identity or "").removeprefix("lbipam ") or DEFAULT_POOL


class ObservedLBIPAM:
    """Stands in for LBIPAM where the cluster runs its own allocator: reads what it assigned."""

    def __init__(self, api_client: client.ApiClient, pool: str, classes: Iterable[str | None] = DEFAULT_CLASSES) -> None:
        self.core = client.CoreV1Api(api_client)
        self.network = ipaddress.ip_network(pool)
        self.classes = frozenset(classes)

    def assigned(self) -> dict[str, tuple[str, ...]]:
        result = {}
        for service in self.core.list_service_for_all_namespaces().items:
            ips = current_ips(service)
            if wanted(service, self.classes) and ips and all(ipaddress.ip_address(ip) in self.network for ip in ips):
                result[f"{service.metadata.namespace}/{service.metadata.name}"] = tuple(ips)
        return result

    def start(self) -> ObservedLBIPAM:
        return self

    def stop(self, timeout: float = 10.0) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG or ~/.kube/config")
    parser.add_argument("--pool", default=DEFAULT_POOL, help=f"address pool (default {DEFAULT_POOL})")
    parser.add_argument(
        "--class", dest="classes", action="append", default=None,
        help="loadBalancerClass to serve besides unset ones (repeatable; default: Cilium's two)",
    )
    parser.add_argument("--namespace", default=None, help="only this namespace (default: all)")
    parser.add_argument("--unless-running", action="store_true",
                        help="exit at once if the cluster already has an LB-IPAM (e.g. the one `scripts/local-cluster up` starts)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    api_client = config.new_client_from_config(config_file=args.kubeconfig)
    if args.unless_running and (pool := running_allocator(api_client)) is not None:
        logger.info("the cluster already has an LB-IPAM (pool %s); not starting another", pool)
        api_client.close()
        return 0
    classes = DEFAULT_CLASSES if args.classes is None else frozenset([None, *args.classes])
    ipam = LBIPAM(api_client, pool=args.pool, classes=classes, namespace=args.namespace, announce=args.namespace is None)
    try:
        ipam.run()
    except KeyboardInterrupt:
        pass
    finally:
        api_client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
