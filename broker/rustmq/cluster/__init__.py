"""Cluster mode, sans-IO: the state model, placement, leader election, lease timing and ISR rules.

Nothing here performs I/O or imports asyncio: the rules that decide who leads, who is in sync and
when a lease has expired are pure functions and small state machines over explicit clocks, so
they are tested exhaustively without sockets. The runtime that drives them (rustmq.replication)
talks to the Kubernetes API through the ``ObjectStore`` interface defined in
``rustmq.cluster.store``; the aiohttp implementation lives in the app layer (rustmq.kube).
"""
