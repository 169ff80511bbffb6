"""The only module that talks to the Kubernetes API server (kopf's own watching aside).

It speaks plain JSON over the official client's authenticated HTTP connection rather than the
generated typed models: children are rendered as dicts and go back as dicts, server-side apply
needs the ``application/apply-patch+yaml`` content type the typed patch methods do not offer,
and a small table of resource paths covers every kind the operator touches. Every call carries a
timeout, so a hung connection fails a reconcile pass (which is retried) instead of stalling it.

Calls are synchronous; the reconciler runs them in a worker thread.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import quote, urlencode

import kubernetes
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from rustmq_operator import naming
from rustmq_operator import spec as specs

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT: Final = 30.0

# apiVersion, kind -> (path prefix, plural, namespaced)
RESOURCES: Final[dict[tuple[str, str], tuple[str, str, bool]]] = {
    ("v1", "ConfigMap"): ("/api/v1", "configmaps", True),
    ("v1", "Service"): ("/api/v1", "services", True),
    ("v1", "Pod"): ("/api/v1", "pods", True),
    ("v1", "PersistentVolumeClaim"): ("/api/v1", "persistentvolumeclaims", True),
    ("v1", "Event"): ("/api/v1", "events", True),
    ("v1", "ServiceAccount"): ("/api/v1", "serviceaccounts", True),
    ("rbac.authorization.k8s.io/v1", "Role"): ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): (
        "/apis/rbac.authorization.k8s.io/v1",
        "rolebindings",
        True,
    ),
    ("apps/v1", "StatefulSet"): ("/apis/apps/v1", "statefulsets", True),
    ("policy/v1", "PodDisruptionBudget"): ("/apis/policy/v1", "poddisruptionbudgets", True),
    ("networking.k8s.io/v1", "NetworkPolicy"): ("/apis/networking.k8s.io/v1", "networkpolicies", True),
    ("storage.k8s.io/v1", "StorageClass"): ("/apis/storage.k8s.io/v1", "storageclasses", False),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): (
        "/apis/monitoring.coreos.com/v1",
        "servicemonitors",
        True,
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): (
        "/apis/monitoring.coreos.com/v1",
        "prometheusrules",
        True,
    ),
    ("cert-manager.io/v1", "Certificate"): ("/apis/cert-manager.io/v1", "certificates", True),
    (specs.API_VERSION, specs.KIND): (f"/apis/{specs.API_VERSION}", specs.PLURAL, True),
}


class KubeError(Exception):
    """An API call failed; ``status`` is the HTTP status and ``reason`` the API's message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"HTTP {status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def load_client(kubeconfig: str | None = None) -> ApiClient:
    """An ApiClient for the in-cluster service account, or the given (or default) kubeconfig."""
    if kubeconfig is None:
        try:
            kubernetes.config.load_incluster_config()
            return ApiClient()
        except kubernetes.config.ConfigException:
            pass
    return kubernetes.config.new_client_from_config(config_file=kubeconfig)


def path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    prefix, plural, namespaced = RESOURCES[(api_version, kind)]
    parts = [prefix]
    if namespaced and namespace is not None:
        parts.append(f"namespaces/{quote(namespace, safe='')}")
    parts.append(plural)
    if name is not None:
        parts.append(quote(name, safe=""))
    return "/".join(parts)


class Kube:
    """Thin JSON client: each method is one API request."""

    def __init__(self, client: ApiClient) -> None:
        self._client = client

    def request(
        self,
        method: str,
        url_path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        if query:
            url_path = f"{url_path}?{urlencode(query)}"
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method, url, headers, serialized, _ = self._client.param_serialize(
            method=method,
            resource_path=url_path,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self._client.call_api(
                method, url, header_params=headers, body=serialized,
                _request_timeout=REQUEST_TIMEOUT,
            )
            response.read()
        except ApiException as error:
            raise _kube_error(error) from None
        data = response.data or b""
        if not 200 <= response.status <= 299:
            raise _kube_error_from(response.status, data)
        return json.loads(data) if data else {}

    # -- reads -----------------------------------------------------------------------------

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path(api_version, kind, namespace, name))
        except KubeError as error:
            if error.status == 404:
                return None
            raise

    def list(
        self, api_version: str, kind: str, namespace: str, selector: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        label_selector = ",".join(f"{key}={value}" for key, value in sorted(selector.items()))
        found = self.request(
            "GET", path(api_version, kind, namespace), query={"labelSelector": label_selector}
        )
        return list(found.get("items", []))

    def served(self, group_version: str) -> frozenset[str]:
        """Resource names the API server serves in ``group_version`` (empty if none: CRD absent)."""
        try:
            found = self.request("GET", f"/apis/{group_version}")
        except KubeError as error:
            if error.status in (404, 503):
                return frozenset()
            raise
        return frozenset(str(resource.get("name")) for resource in found.get("resources", []))

    def storage_class_expandable(self, name: str | None) -> tuple[str | None, bool | None]:
        """(class name, allowVolumeExpansion) for ``name`` or the default class; None if unknown."""
        try:
            if name:
                found = self.get("storage.k8s.io/v1", "StorageClass", None, name)
                if found is None:
                    return name, None
                return name, bool(found.get("allowVolumeExpansion", False))
            classes = self.request("GET", path("storage.k8s.io/v1", "StorageClass", None))
        except KubeError as error:
            if error.status == 403:
                return name, None
            raise
        for item in classes.get("items", []):
            annotations = item.get("metadata", {}).get("annotations") or {}
            if annotations.get("storageclass.kubernetes.io/is-default-class") == "true":
                return item["metadata"]["name"], bool(item.get("allowVolumeExpansion", False))
        return None, None

    # -- writes ----------------------------------------------------------------------------

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply ``obj`` under the operator's field manager, taking over conflicts."""
        metadata = obj["metadata"]
        url_path = path(obj["apiVersion"], obj["kind"], metadata.get("namespace"), metadata["name"])
        return self.request(
            "PATCH",
            url_path,
            query={"fieldManager": naming.FIELD_MANAGER, "force": "true"},
            body=obj,
            content_type="application/apply-patch+yaml",
        )

    def replace_spec(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Merge-patch ``obj``'s spec (or data) onto the live object: lists are replaced whole.

        Used when server-side apply fails because a hand edit left list entries owned by another
        field manager that clash with ours (a Service port renumbered by ``kubectl edit`` keeps
        its name, so applying the original port again duplicates the name). The Service API
        keeps allocated values (clusterIP, nodePorts) that the patch leaves out.
        """
        metadata = obj["metadata"]
        body = {key: obj[key] for key in ("spec", "data") if key in obj}
        return self.request(
            "PATCH",
            path(obj["apiVersion"], obj["kind"], metadata.get("namespace"), metadata["name"]),
            body=body,
            content_type="application/merge-patch+json",
        )

    def delete(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        *,
        propagation: str = "Background",
        uid: str | None = None,
    ) -> bool:
        """Delete an object (only the one with ``uid`` if given); False if it was already gone."""
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "propagationPolicy": propagation,
        }
        if uid is not None:
            body["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", path(api_version, kind, namespace, name), body=body)
        except KubeError as error:
            if error.status == 404:
                return False
            raise
        return True

    def evict(self, namespace: str, pod: str) -> bool:
        """Evict a pod through the Eviction API; False when a PodDisruptionBudget refuses (429)."""
        body = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": pod, "namespace": namespace},
        }
        try:
            self.request("POST", path("v1", "Pod", namespace, pod) + "/eviction", body=body)
        except KubeError as error:
            if error.status == 429:
                return False
            if error.status == 404:
                return True
            raise
        return True

    def resize_claim(self, namespace: str, claim: str, size: str) -> None:
        body = {"spec": {"resources": {"requests": {"storage": size}}}}
        self.request(
            "PATCH",
            path("v1", "PersistentVolumeClaim", namespace, claim),
            body=body,
            content_type="application/merge-patch+json",
        )

    def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return self.request(
            "PATCH",
            path(specs.API_VERSION, specs.KIND, namespace, name) + "/status",
            body={"status": patch},
            content_type="application/merge-patch+json",
        )

    def post_event(
        self, owner: Mapping[str, Any], type_: str, reason: str, message: str
    ) -> None:
        """Record a core/v1 Event on the RustMQCluster (shown by ``kubectl describe rmq``)."""
        metadata = owner["metadata"]
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{metadata['name']}.", "namespace": metadata["namespace"]},
            "involvedObject": {
                "apiVersion": specs.API_VERSION,
                "kind": specs.KIND,
                "name": metadata["name"],
                "namespace": metadata["namespace"],
                "uid": metadata["uid"],
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": naming.MANAGED_BY},
            "reportingComponent": naming.MANAGED_BY,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.request("POST", path("v1", "Event", metadata["namespace"]), body=body)
        except KubeError as error:  # an event is never worth failing a reconcile pass for
            logger.warning("could not record event %s on %s: %s", reason, metadata["name"], error)


def _kube_error(error: ApiException) -> KubeError:
    body = error.body if isinstance(error.body, (bytes, str)) else b""
    return _kube_error_from(int(error.status or 0), body)


def _kube_error_from(status: int, data: bytes | str) -> KubeError:
    try:
        parsed = json.loads(data or b"{}")
    except ValueError:
        parsed = {}
    if not isinstance(parsed, dict):
        parsed = {}
    text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
    return KubeError(status, str(parsed.get("reason", "")), str(parsed.get("message", text))[:2000])
