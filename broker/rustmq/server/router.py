"""Request routing: one table from API key to handler per listener, built once, not per connection.

A handler is a plain function ``handler(connection, corr, header, payload)``: Connection's own
request methods, taken unbound, and the coordination handlers (rustmq.server.coordination_handlers),
bound to the broker's CoordinationService once. The connection decodes the envelope, checks
draining and authorization, then calls the routed handler with itself as the responder
(rustmq.server.responder), so no handler needs another's internals and accepting a connection
builds no table of bound methods.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Handler = Callable[[Any, int, dict[str, Any], memoryview], None]


class Router:
    __slots__ = ("_routes",)

    def __init__(self, *tables: Mapping[int, Handler]) -> None:
        routes: dict[int, Handler] = {}
        for table in tables:
            overlap = set(routes) & set(table)
            if overlap:
                raise ValueError(f"API keys routed twice: {sorted(overlap)}")
            routes.update(table)
        self._routes = routes

    def route(self, api_key: int) -> Handler | None:
        """The handler of api_key (an IntEnum key is found by its int), or None."""
        return self._routes.get(api_key)
