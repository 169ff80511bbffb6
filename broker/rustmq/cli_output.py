"""How the CLI prints records: shared by the plain commands (rustmq.cli) and the group and queue
commands (rustmq.cli_coordination), so that neither imports the other.

A record prints as JSON (``--json``: topic, partition, offset, timestamp, key, value, headers)
with keys and values as UTF-8 text where they are, base64 otherwise (named in ``"base64"``).
"""

from __future__ import annotations

import base64
from typing import Any


def text_or_base64(data: bytes | None) -> tuple[str | None, bool]:
    """UTF-8 text as it is, anything else base64-encoded; the flag says which."""
    if data is None:
        return None, False
    try:
        return data.decode(), False
    except UnicodeDecodeError:
        return base64.b64encode(data).decode(), True


def message_json(message: Any) -> dict[str, Any]:
    key, key_b64 = text_or_base64(message.key)
    value, value_b64 = text_or_base64(message.value)
    out: dict[str, Any] = {
        "topic": message.topic,
        "partition": message.partition,
        "offset": message.offset,
        "timestamp": message.timestamp_ms,
        "key": key,
        "value": value,
    }
    if message.headers:
        out["headers"] = {name: text_or_base64(raw)[0] for name, raw in message.headers}
    if key_b64 or value_b64:
        out["base64"] = [name for name, flag in (("key", key_b64), ("value", value_b64)) if flag]
    return out
