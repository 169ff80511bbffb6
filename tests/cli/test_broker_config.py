"""Broker configuration: defaults of the seed, then file, then RUSTMQ_* variables, then flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from rustmq import config
from rustmq.cli import build_parser


def test_seed_defaults() -> None:
    settings = config.load({}, {})
    assert (settings.data_dir, settings.partitions) == (Path("/data/rustmq"), 12)
    assert (settings.producer_port, settings.consumer_port, settings.metrics_port) == (9092, 9093, 9094)
    assert settings.log_config().flush.mode == "interval"


def test_flags_override_environment_override_file(tmp_path: Path) -> None:
    file = tmp_path / "broker.yaml"
    file.write_text("partitions: 3\nproducer_port: 1000\nconsumer_port: 1001\nlog:\n  segment_bytes: 1048576\n")
    env = {"RUSTMQ_PRODUCER_PORT": "2000", "RUSTMQ_DATA_DIR": "/tmp/x", "RUSTMQ_AUTO_CREATE_TOPICS": "false", "UNRELATED": "1"}
    settings = config.load({"producer_port": 3000, "partitions": None}, env, file)
    assert settings.producer_port == 3000  # flag
    assert settings.consumer_port == 1001  # file
    assert settings.partitions == 3  # file (the flag was not given)
    assert settings.data_dir == Path("/tmp/x") and settings.auto_create_topics is False  # environment
    assert settings.log_config().segment_bytes == 1048576
    assert settings.log_config().flush.mode == "interval"  # the default flush survives a partial override
    assert settings.server_settings().default_partitions == 3


def test_the_log_setting_takes_json_from_the_environment() -> None:
    settings = config.load({}, {"RUSTMQ_LOG": '{"retention_ms": 60000, "flush": {"mode": "always"}}'})
    assert settings.log_config().retention_ms == 60000 and settings.log_config().flush.mode == "always"


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        ({"metrics_port": 70000}, {}, "metrics_port must be between 0 and 65535"),
        ({}, {"RUSTMQ_PARTITIONS": "many"}, "partitions from environment"),
        ({}, {"RUSTMQ_PARTITIONS": "0"}, "partitions must be at least 1"),
        ({}, {"RUSTMQ_AUTO_CREATE_TOPICS": "perhaps"}, "not a boolean"),
        ({}, {"RUSTMQ_LOG": "[1, 2]"}, "log from environment"),
        ({}, {"RUSTMQ_LOG": '{"segment_bytes": 1}'}, "log: segment_bytes"),
        ({"log": '{"nope": 1}'}, {}, "unknown config key(s): nope"),
    ],
)
def test_bad_values_name_the_setting(flags, env, message) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.load(flags, env)
    assert message in str(caught.value)


def test_unknown_keys_in_a_file_are_errors(tmp_path: Path) -> None:
    file = tmp_path / "broker.yaml"
    file.write_text("partitons: 3\n")
    with pytest.raises(config.ConfigError, match="unknown setting"):
        config.load({}, {}, file)
    file.write_text("- a list\n")
    with pytest.raises(config.ConfigError, match="must hold a mapping"):
        config.load({}, {}, file)


def test_every_setting_is_a_broker_flag() -> None:
    args = build_parser().parse_args(["broker", "--max-frame-bytes", "1024", "--no-auto-create-topics", "--no-uvloop"])
    flags = {name: getattr(args, name) for name in config.FIELDS}
    settings = config.load(flags, {})
    assert settings.max_frame_bytes == 1024 and settings.auto_create_topics is False and settings.uvloop is False
    assert config.load({}, {}).uvloop is True  # uvloop when installed, by default
    assert config.load({}, {"RUSTMQ_UVLOOP": "false"}).uvloop is False


def test_the_event_loop_falls_back_to_asyncio_without_uvloop(monkeypatch) -> None:
    """uvloop is an optional dependency: wanting it where it is not installed is not an error."""
    import sys

    from rustmq import eventloop

    async def which() -> str:
        return eventloop.name()

    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` raise ImportError
    assert eventloop.run(which(), uvloop_wanted=True) == "asyncio"
    monkeypatch.undo()
    assert eventloop.run(which(), uvloop_wanted=False) == "asyncio"
    assert eventloop.run(which(), uvloop_wanted=True) == "uvloop"  # the test venv installs it
