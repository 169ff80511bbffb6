"""KubeStore: the cluster-mode ObjectStore over the Kubernetes API's REST interface (aiohttp).

Why plain aiohttp and not a client library: the broker already depends on aiohttp, the calls
are eight (get/list/create/replace of Leases and ConfigMaps), and the semantics that matter
(409 on a stale resourceVersion, a bound on every call) are clearer written out than hidden in
a generated client. It lives in the app layer: the broker core only sees
``rustmq.cluster.store.ObjectStore``.

Credentials: a kubeconfig (RUSTMQ_KUBECONFIG; its current context: server, CA, client
certificate or bearer token, inline ``-data`` variants included) or, without one, the pod's
in-cluster service account (KUBERNETES_SERVICE_HOST/PORT and
/var/run/secrets/kubernetes.io/serviceaccount). Every object written carries the labels
``app.kubernetes.io/instance: <cluster>`` and ``app.kubernetes.io/managed-by: rustmq-broker``.
Every request is bounded by ``api_timeout_s``; a timeout, a refused connection or a 5xx is
StoreUnavailable, 409 is Conflict.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from rustmq.cluster.store import Conflict, LeaseRecord, StoreUnavailable, Versioned

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
INSTANCE_LABEL = "app.kubernetes.io/instance"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "rustmq-broker"


class KubeConfigError(ValueError):
    """The kubeconfig or in-cluster credentials cannot be used."""


class _Credentials:
    def __init__(self, server: str, ssl_context: ssl.SSLContext | bool, token: str | None, token_file: Path | None) -> None:
        self.server = server.rstrip("/")
        self.ssl_context = ssl_context
        self._token = token
        self._token_file = token_file

    def headers(self) -> dict[str, str]:
        token = self._token
        if self._token_file is not None:
            token = self._token_file.read_text().strip()  # rotated by the kubelet: re-read
        return {"Authorization": f"Bearer {token}"} if token else {}


def _materialize(entry: dict[str, Any], key: str, scratch: Path) -> str | None:
    if entry.get(f"{key}-data"):
        path = scratch / key
        path.write_bytes(base64.b64decode(entry[f"{key}-data"]))
        return str(path)
    value = entry.get(key)
    return str(value) if value else None


def load_credentials(kubeconfig: Path | None) -> _Credentials:
    """Credentials from a kubeconfig file, or in-cluster ones when kubeconfig is None."""
    if kubeconfig is None:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise KubeConfigError("cluster_mode kubernetes needs RUSTMQ_KUBECONFIG or in-cluster credentials "
                                  "(KUBERNETES_SERVICE_HOST/PORT are not set)")
        context = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT_DIR / "ca.crt"))
        host = f"[{host}]" if ":" in host else host
        return _Credentials(f"https://{host}:{port}", context, None, SERVICE_ACCOUNT_DIR / "token")
    try:
        config = yaml.safe_load(kubeconfig.read_text())
        current = config.get("current-context")
        context_entry = next(c["context"] for c in config["contexts"] if c["name"] == current) if current else config["contexts"][0]["context"]
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context_entry["cluster"])
        user: dict[str, Any] = next((u["user"] for u in config.get("users", []) if u["name"] == context_entry.get("user")), {}) or {}
    except (OSError, yaml.YAMLError, KeyError, TypeError, StopIteration, IndexError) as exc:
        raise KubeConfigError(f"cannot use kubeconfig {kubeconfig}: {exc!r}") from None
    scratch = Path(tempfile.mkdtemp(prefix="rustmq-kube-"))
    server = cluster["server"]
    ssl_context: ssl.SSLContext | bool = True
    if server.startswith("https"):
        if cluster.get("insecure-skip-tls-verify"):
            ssl_context = False
        else:
            ssl_context = ssl.create_default_context(cafile=_materialize(cluster, "certificate-authority", scratch))
        cert = _materialize(user, "client-certificate", scratch)
        key = _materialize(user, "client-key", scratch)
        if cert and key:
            if ssl_context is False:
                ssl_context = ssl.create_default_context()
                ssl_context.check_hostname = False
                ssl_context.verify_mode = ssl.CERT_NONE
            assert isinstance(ssl_context, ssl.SSLContext)
            ssl_context.load_cert_chain(cert, key)
    token_file = Path(user["tokenFile"]) if user.get("tokenFile") else None
    return _Credentials(server, ssl_context, user.get("token"), token_file)


def _lease_from(obj: dict[str, Any]) -> Versioned[LeaseRecord]:
    spec = obj.get("spec") or {}
    meta = obj["metadata"]
    record = LeaseRecord(
        holder=spec.get("holderIdentity") or "",
        duration_s=int(spec.get("leaseDurationSeconds") or 0),
        renew_time=spec.get("renewTime") or "",
        transitions=int(spec.get("leaseTransitions") or 0),
        annotations=dict(meta.get("annotations") or {}),
    )
    return Versioned(record, meta["resourceVersion"])


def _map_from(obj: dict[str, Any]) -> Versioned[dict[str, str]]:
    return Versioned(dict(obj.get("data") or {}), obj["metadata"]["resourceVersion"])


class KubeStore:
    """ObjectStore over the API server; call ``close()`` when done."""

    def __init__(self, credentials: _Credentials, namespace: str, cluster: str, api_timeout_s: float) -> None:
        self._creds = credentials
        self._namespace = namespace
        self._cluster = cluster
        self._timeout = aiohttp.ClientTimeout(total=api_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_config(cls, kubeconfig: Path | None, namespace: str, cluster: str, api_timeout_s: float) -> KubeStore:
        return cls(load_credentials(kubeconfig), namespace, cluster, api_timeout_s)

    def _labels(self) -> dict[str, str]:
        return {INSTANCE_LABEL: self._cluster, MANAGED_BY_LABEL: MANAGED_BY}

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
                    params: dict[str, str] | None = None) -> dict[str, Any] | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.request(
                method, self._creds.server + path, json=body, params=params,
                headers=self._creds.headers(), ssl=self._creds.ssl_context,
            ) as response:
                if response.status == 404:
                    return None
                if response.status == 409:
                    raise Conflict(f"{method} {path}: {(await response.text())[:300]}")
                if response.status >= 300:
                    text = (await response.text())[:500]
                    raise StoreUnavailable(f"{method} {path}: HTTP {response.status}: {text}")
                return await response.json()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise StoreUnavailable(f"{method} {path}: {exc!r}") from None

    def _leases(self) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{self._namespace}/leases"

    def _maps(self) -> str:
        return f"/api/v1/namespaces/{self._namespace}/configmaps"

    def _lease_body(self, name: str, record: LeaseRecord, version: str | None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name, "labels": self._labels(), "annotations": record.annotations}
        if version is not None:
            meta["resourceVersion"] = version
        spec: dict[str, Any] = {"holderIdentity": record.holder or None, "leaseDurationSeconds": record.duration_s,
                                "leaseTransitions": record.transitions}
        if record.renew_time:
            spec["renewTime"] = record.renew_time
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}

    def _map_body(self, name: str, data: dict[str, str], version: str | None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name, "labels": self._labels()}
        if version is not None:
            meta["resourceVersion"] = version
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}

    async def get_lease(self, name: str) -> Versioned[LeaseRecord] | None:
        obj = await self._call("GET", f"{self._leases()}/{name}")
        return None if obj is None else _lease_from(obj)

    async def list_leases(self, prefix: str) -> dict[str, Versioned[LeaseRecord]]:
        obj = await self._call("GET", self._leases(), params={"labelSelector": f"{INSTANCE_LABEL}={self._cluster}"})
        items = (obj or {}).get("items") or []
        return {i["metadata"]["name"]: _lease_from(i) for i in items if i["metadata"]["name"].startswith(prefix)}

    async def create_lease(self, name: str, record: LeaseRecord) -> Versioned[LeaseRecord]:
        obj = await self._call("POST", self._leases(), self._lease_body(name, record, None))
        assert obj is not None
        return _lease_from(obj)

    async def replace_lease(self, name: str, record: LeaseRecord, version: str) -> Versioned[LeaseRecord]:
        obj = await self._call("PUT", f"{self._leases()}/{name}", self._lease_body(name, record, version))
        if obj is None:
            raise Conflict(f"lease {name} is gone")
        return _lease_from(obj)

    async def get_map(self, name: str) -> Versioned[dict[str, str]] | None:
        obj = await self._call("GET", f"{self._maps()}/{name}")
        return None if obj is None else _map_from(obj)

    async def list_maps(self, prefix: str) -> dict[str, Versioned[dict[str, str]]]:
        obj = await self._call("GET", self._maps(), params={"labelSelector": f"{INSTANCE_LABEL}={self._cluster}"})
        items = (obj or {}).get("items") or []
        return {i["metadata"]["name"]: _map_from(i) for i in items if i["metadata"]["name"].startswith(prefix)}

    async def create_map(self, name: str, data: dict[str, str]) -> Versioned[dict[str, str]]:
        obj = await self._call("POST", self._maps(), self._map_body(name, data, None))
        assert obj is not None
        return _map_from(obj)

    async def replace_map(self, name: str, data: dict[str, str], version: str) -> Versioned[dict[str, str]]:
        obj = await self._call("PUT", f"{self._maps()}/{name}", self._map_body(name, data, version))
        if obj is None:
            raise Conflict(f"configmap {name} is gone")
        return _map_from(obj)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
