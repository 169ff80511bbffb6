"""The aiohttp application of the admin port: probes, metrics and the JSON topic API.

Routes (all JSON except /metrics):

* ``GET /healthz``: 200 while the process serves HTTP at all (liveness).
* ``GET /readyz``: 200 once every partition is recovered and both TCP ports listen, else 503;
  also 503 (``"cannot write"`` with the reason) after a failed write while the disk stays full or
  a coordination journal refuses writes (``Broker.write_health``)
  (also 503 again from the start of a shutdown).
* ``GET /metrics``: Prometheus text exposition from the broker's own registry.
* ``GET /v1/broker``: broker id, bound ports, RSS, connection count.
* ``GET /v1/topics``: every topic with its partitions; ``POST /v1/topics`` with
  ``{"name", "partitions"?, "config"?}`` creates one (201).
* ``GET /v1/topics/{name}``, ``DELETE /v1/topics/{name}``,
  ``POST /v1/topics/{name}/partitions`` with ``{"partitions": total}`` to grow a topic, and
  ``PATCH /v1/topics/{name}/config`` with ``{"set"?, "reset"?}`` to change its config.

The topic routes share rustmq.server.topic_admin with the binary protocol, so in cluster mode
they change the cluster state (every broker) and describe the cluster's view (docs/protocol.md).

Errors are ``{"error": <ErrorCode name>, "message": ...}`` with 400 (bad input), 404 (unknown
topic), 409 (topic exists), 503 (not ready) or 500.

With auth configured (``auth_token_file``/``auth_acl_file``), the ``_authorize`` middleware asks
for ``Authorization: Bearer <principal>:<secret>`` (a token of the token file): every write
(POST, PATCH, DELETE) needs an authenticated principal the policy allows ``cluster alter`` (401
without a token or with a wrong one, 403 for a principal without it); with ``admin_auth: all``
``/metrics`` and the GET routes need ``cluster describe`` too. ``/healthz`` and ``/readyz``
stay open (the kubelet's probes carry no token). With ``admin_tls`` the port speaks HTTPS (the
broker's certificate, reloaded with it) and a request without a bearer token runs as the
principal of its verified client certificate, if it presented one.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from rustmq.admin import metrics
from rustmq.auth.acl import ANONYMOUS
from rustmq.protocol import api
from rustmq.protocol.api import ErrorCode, RequestError
from rustmq.server import topic_admin
from rustmq.server.authz import AuthState, cert_principal
from rustmq.server.broker import Broker, error_code_for
from rustmq.server.stats import BrokerStats

_STATUS = {
    ErrorCode.UNKNOWN_TOPIC: 404,
    ErrorCode.UNKNOWN_PARTITION: 404,
    ErrorCode.TOPIC_EXISTS: 409,
    ErrorCode.INVALID_CONFIG: 400,
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.STORAGE_FULL: 507,
    ErrorCode.AUTHENTICATION_FAILED: 401,
    ErrorCode.AUTHORIZATION_FAILED: 403,
}
_OPEN_PATHS = frozenset({"/healthz", "/readyz"})
# POST /v1/topics: the JSON body's fields besides "name", checked as CREATE_TOPIC's are.
_CREATE_FIELDS = ("partitions", "config", "replication_factor", "min_insync_replicas")


@dataclasses.dataclass
class AdminState:
    """What the admin port can see; the composition root fills broker in once the log is open."""

    stats: BrokerStats
    broker: Broker | None = None
    ready: bool = False
    auth: AuthState | None = None  # None: no auth configured, every route open
    admin_auth: str = "writes"  # writes | all (reads and /metrics need cluster describe too)


STATE = web.AppKey("state", AdminState)


def make_admin_app(state: AdminState) -> web.Application:
    app = web.Application(middlewares=[_errors, _authorize])
    app[STATE] = state
    registry = metrics.make_registry(state.stats, lambda: state.broker, lambda: state.ready)
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/broker", broker_info)
    app.router.add_get("/v1/topics", list_topics)
    app.router.add_post("/v1/topics", create_topic)
    app.router.add_get("/v1/topics/{name}", describe_topic)
    app.router.add_delete("/v1/topics/{name}", delete_topic)
    app.router.add_post("/v1/topics/{name}/partitions", add_partitions)
    app.router.add_patch("/v1/topics/{name}/config", alter_topic_config)
    return app


def _error(code: ErrorCode, message: str) -> web.Response:
    return web.json_response({"error": code.name, "message": message}, status=_STATUS.get(code, 500))


def _broker(request: web.Request) -> Broker:
    state = request.app[STATE]
    if state.broker is None or not state.ready:
        raise RequestError(ErrorCode.SHUTTING_DOWN, "the broker is not ready")
    return state.broker


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(ErrorCode.INVALID_REQUEST, f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(ErrorCode.INVALID_REQUEST, "body must be a JSON object")
    return body


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:
        return _error(error_code_for(exc), str(exc))


@web.middleware
async def _authorize(request: web.Request, handler: Any) -> web.StreamResponse:
    state = request.app[STATE]
    auth = state.auth
    if auth is None or request.path in _OPEN_PATHS:
        return await handler(request)
    write = request.method not in ("GET", "HEAD", "OPTIONS")
    if not write and state.admin_auth != "all":
        return await handler(request)
    principal = ANONYMOUS
    header = request.headers.get("Authorization", "")
    certified = _certificate_principal(request, auth)
    if certified is not None and not header:
        principal = certified  # admin_tls with a client certificate from tls_client_ca_file
    elif header:
        scheme, _, token = header.partition(" ")
        found = await auth.authenticate(token.strip()) if scheme.lower() == "bearer" else None
        if found is None:
            return _unauthenticated("the bearer token was refused (unknown principal or wrong secret)")
        principal = found
    elif write:
        return _unauthenticated("this endpoint needs an admin principal: send Authorization: Bearer <token>"
                                " (or, with admin_tls, a client certificate)")
    verb = "alter" if write else "describe"
    if not auth.policy.allowed(principal, "cluster", "*", verb):
        auth.authorization_failures += 1
        return _error(ErrorCode.AUTHORIZATION_FAILED, f"principal {principal} may not {verb} the cluster")
    return await handler(request)


def _certificate_principal(request: web.Request, auth: AuthState) -> str | None:
    transport = request.transport
    peercert = transport.get_extra_info("peercert") if transport is not None else None
    return cert_principal(peercert, auth.settings.cert_principal)


def _unauthenticated(message: str) -> web.Response:
    response = _error(ErrorCode.AUTHENTICATION_FAILED, message)
    response.headers["WWW-Authenticate"] = 'Bearer realm="rustmq"'
    return response


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not state.ready:
        return web.json_response({"status": "not ready"}, status=503)
    cannot_write = state.broker.write_health() if state.broker is not None else None
    if cannot_write is not None:
        return web.json_response({"status": "cannot write", "reason": cannot_write}, status=503)
    return web.json_response({"status": "ready"})


async def broker_info(request: web.Request) -> web.Response:
    broker = _broker(request)
    return web.json_response({**broker.broker_stats(), "ports": broker.ports})


async def list_topics(request: web.Request) -> web.Response:
    broker = _broker(request)
    return web.json_response({"topics": [topic_admin.describe(broker, name) for name in topic_admin.names(broker)]})


async def create_topic(request: web.Request) -> web.Response:
    broker = _broker(request)
    body = await _body(request)
    if not isinstance(body.get("name"), str):
        raise RequestError(ErrorCode.INVALID_REQUEST, "'name' must be a string")
    fields = {"topic": body["name"], **{key: body[key] for key in _CREATE_FIELDS if key in body}}
    creation = api.parse_create_topic(fields)
    await topic_admin.create(broker, creation)
    return web.json_response(topic_admin.describe(broker, creation.topic), status=201)


async def describe_topic(request: web.Request) -> web.Response:
    return web.json_response(topic_admin.describe(_broker(request), request.match_info["name"]))


async def delete_topic(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await topic_admin.delete(_broker(request), name)
    return web.json_response({"deleted": name})


async def add_partitions(request: web.Request) -> web.Response:
    broker = _broker(request)
    body = await _body(request)
    name, total = api.parse_add_partitions({"topic": request.match_info["name"], "partitions": body.get("partitions")})
    await topic_admin.add_partitions(broker, name, total)
    return web.json_response(topic_admin.describe(broker, name))


async def alter_topic_config(request: web.Request) -> web.Response:
    broker = _broker(request)
    body = await _body(request)
    name = request.match_info["name"]
    change = api.parse_alter_topic_config({"topic": name, **{key: body[key] for key in ("set", "reset") if key in body}})
    await topic_admin.alter_config(broker, change)
    return web.json_response(topic_admin.describe(broker, name))
