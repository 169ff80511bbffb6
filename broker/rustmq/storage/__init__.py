"""The broker's on-disk log: partitioned, memory-mapped, append-only, crash-safe.

Synchronous and framework-free on purpose (an import-linter contract keeps asyncio, msgpack and
the web and Kubernetes frameworks out), so it can be crash-tested on its own.

Modules, bottom up: `errors`, `batch` (the record batch byte format, shared with the wire),
`config` (LogConfig, FlushPolicy), `index` (sparse offset and time indexes), `segment` (one
mmapped file, allocated in steps), `partition` (PartitionLog: append, read, flush, recovery,
retention), `durability` (GroupCommitter, BackgroundFlusher) and `log` (Log: topics).
docs/storage.md describes the design as a whole.
"""
