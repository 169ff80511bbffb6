"""The one interface through which cluster mode reaches its coordination store.

The store holds two kinds of objects, exactly the Kubernetes ones the brokers use
(docs/cluster.md): Leases (membership, liveness, the controller) and ConfigMaps (the sharded
partition state). Every write is a compare-and-swap: ``replace`` sends the version it read and
fails with ``Conflict`` when the object changed meanwhile (HTTP 409 on a stale resourceVersion),
``create`` fails with ``Conflict`` when the object exists. Versions are opaque strings, used for
nothing but CAS (never compared, never an epoch).

``StoreUnavailable`` is every other failure (timeout, connection refused, 5xx): the outcome of
a write that raised it is unknown, so callers re-read before deciding again.

The implementation used by the broker is ``rustmq.kube.KubeStore`` (aiohttp against the API
server's REST interface), injected by ``rustmq.app``; the core never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class Conflict(Exception):
    """The CAS lost: the object changed (or already exists). Re-read, re-decide, retry."""


class StoreUnavailable(Exception):
    """The store did not answer usefully (timeout, refused, 5xx); a write's outcome is unknown."""


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """The fields of a coordination.k8s.io/v1 Lease that cluster mode uses."""

    holder: str  # "" when released
    duration_s: int
    renew_time: str = ""  # RFC 3339 MicroTime as written; informative only (expiry is local)
    transitions: int = 0
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Versioned(Generic[T]):
    value: T
    version: str


class ObjectStore(Protocol):
    """Leases and ConfigMaps in one namespace, every object labelled as this cluster's."""

    async def get_lease(self, name: str) -> Versioned[LeaseRecord] | None: ...

    async def list_leases(self, prefix: str) -> dict[str, Versioned[LeaseRecord]]: ...

    async def create_lease(self, name: str, record: LeaseRecord) -> Versioned[LeaseRecord]: ...

    async def replace_lease(self, name: str, record: LeaseRecord, version: str) -> Versioned[LeaseRecord]: ...

    async def get_map(self, name: str) -> Versioned[dict[str, str]] | None: ...

    async def list_maps(self, prefix: str) -> dict[str, Versioned[dict[str, str]]]: ...

    async def create_map(self, name: str, data: dict[str, str]) -> Versioned[dict[str, str]]: ...

    async def replace_map(self, name: str, data: dict[str, str], version: str) -> Versioned[dict[str, str]]: ...

    async def close(self) -> None: ...
