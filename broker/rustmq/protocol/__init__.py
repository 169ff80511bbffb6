"""The RustMQ wire protocol, sans I/O: bytes in, validated values out, and back.

* ``rustmq.protocol.frames``: the length-prefixed frame (``u32`` length, ``u32`` header length,
  msgpack header map, raw payload) and its limits.
* ``rustmq.protocol.api``: API keys, error codes, acks levels and the field validation of every
  request, so the server and the client agree on one definition.
* ``rustmq.protocol.simple``: the seed-compatible single-message produce on the producer port.
* ``rustmq.protocol.batch``: the record batch, byte for byte the same on the wire and on disk (the
  storage engine stores it; the client builds and reads it, so it sits here, below both).
* ``rustmq.protocol.records``: how records are encoded inside a record batch body (the storage
  layer treats that body as opaque bytes) and the per-batch compression codecs.

Nothing here touches a socket or the event loop; the full byte-level specification is in
docs/protocol.md.
"""
