"""The admin and metrics port (aiohttp): Prometheus /metrics, /healthz, /readyz, a JSON topic API.

The only part of the broker that imports aiohttp or prometheus_client; it reads the core's
plain counters (``rustmq.server.stats``) and live objects at request time and changes topics
through ``rustmq.server.broker.Broker``, so nothing here sits on the produce or fetch path.
"""
