"""RustMQ broker: a partitioned, memory-mapped, append-only log served over a msgpack TCP protocol.

Subpackages, from the bottom up:

* ``rustmq.storage``: the on-disk log (segments, indexes, recovery, retention). Synchronous and
  free of any framework, so it can be reasoned about and crash-tested on its own.
* ``rustmq.protocol``: sans-IO frame and message encoding.
* ``rustmq.server``: the asyncio TCP server that binds the two.
* ``rustmq.admin``: the aiohttp admin and Prometheus port wrapped around the server.
"""

__version__ = "0.1.0"
