"""The broker's on-disk log: partitioned, memory-mapped, append-only, crash-safe.

Synchronous and framework-free on purpose (an import-linter contract keeps asyncio, msgpack and
the web and Kubernetes frameworks out), so it can be crash-tested on its own.
"""
