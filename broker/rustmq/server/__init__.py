"""The asyncio TCP server that binds the wire protocol to the storage engine.

* ``rustmq.server.settings``: the server's explicit limits and policies (one frozen dataclass).
* ``rustmq.server.stats``: plain counters and histograms, updated once per batch or request and
  read at scrape time by the admin layer (no prometheus_client import here).
* ``rustmq.server.broker``: request logic over ``rustmq.storage.log.Log`` (topic resolution and
  auto-creation, partitioning, append, zero-copy reads, long-poll wake-ups, durable acks).
* ``rustmq.server.connection``: the per-connection ``asyncio.BufferedProtocol`` (framing into a
  reusable buffer, ordered pipelined responses, flow control both ways).
* ``rustmq.server.listener``: the producer and consumer listeners and graceful shutdown.
"""
