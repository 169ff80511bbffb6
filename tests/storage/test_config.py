"""LogConfig and FlushPolicy: validation, JSON round trip and merging of overrides."""

from __future__ import annotations

import json

import pytest

from rustmq.storage import config, errors


def test_defaults_round_trip_through_json() -> None:
    default = config.LogConfig()
    assert config.LogConfig.from_dict(json.loads(json.dumps(default.to_dict()))) == default


def test_merged_overrides_only_the_given_keys_including_nested_flush() -> None:
    base = config.LogConfig(segment_bytes=1 << 20, flush=config.FlushPolicy("interval", 50))
    merged = base.merged({"retention_ms": None, "flush": {"bytes": 4096}})
    assert merged.segment_bytes == 1 << 20 and merged.retention_ms is None
    assert merged.flush == config.FlushPolicy("interval", 50, 4096)
    assert base.merged(None) is base


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"segment_bytes": 10}, "segment_bytes must be between"),
        ({"segment_bytes": "big"}, "segment_bytes must be an integer"),
        ({"segment_bytes": True}, "must be an integer"),
        ({"retention_ms": -1}, "retention_ms must be >= 0"),
        ({"index_interval_bytes": 0}, "index_interval_bytes"),
        ({"flush": {"mode": "sometimes"}}, "flush.mode must be one of"),
        ({"flush": {"interval_ms": 0}}, "flush.interval_ms"),
        ({"flush": {"every": 1}}, "unknown flush key"),
        ({"flush": "always"}, "flush must be a mapping"),
        ({"segment_size": 1}, "unknown config key"),
    ],
)
def test_bad_values_raise_invalid_config_naming_the_key(overrides, message) -> None:
    with pytest.raises(errors.InvalidConfigError, match=message):
        config.LogConfig.from_dict(overrides)
