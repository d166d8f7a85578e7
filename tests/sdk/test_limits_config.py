"""The [limits] table of a plugin's config: parsing, units, which value wins, refusals that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from plugin_sdk import (
    ConfigError,
    Message,
    PayloadTooLarge,
    Plugin,
    PluginConfig,
    PluginMessaging,
    PluginRuntime,
    ResourceLimits,
    command,
    load_config_file,
)
from plugin_sdk.host import load_config_text

BASE = PluginConfig(name="demo")


def config(text: str, base: PluginConfig = BASE) -> PluginConfig:
    return load_config_text(text, base=base, source="plugin.toml")


def test_no_limits_by_default() -> None:
    assert BASE.limits == ResourceLimits()
    assert BASE.limits.os_limits() == {}
    assert (BASE.max_concurrency, BASE.handler_timeout, BASE.max_payload) == (64, 30.0, 1024 * 1024)


def test_the_limits_table_in_a_file(tmp_path: Path) -> None:
    f = tmp_path / "plugin.toml"
    f.write_text('[plugin]\nversion = "1.0.0"\n\n[plugin.limits]\nmemory = "256MiB"\ncpu_seconds = 60\n'
                 "open_files = 128\n")
    c = load_config_file(f, base=BASE)
    assert c.limits.os_limits() == {"memory": 256 * 1024 * 1024, "cpu_seconds": 60, "open_files": 128}
    flat = config('[limits]\nmemory = 268435456\n')
    assert flat.limits.memory == 268435456


@pytest.mark.parametrize(("given", "size"), [
    (268435456, 268435456),
    ("268435456", 268435456),
    ("256MiB", 256 << 20),
    ("256 MiB", 256 << 20),
    ("256Mi", 256 << 20),
    ("512M", 512 << 20),
    ("512m", 512 << 20),
    ("1G", 1 << 30),
    ("1.5GiB", 3 << 29),
    ("20000K", 20000 << 10),
    ("1GB", 10**9),
    ("300MB", 300 * 10**6),
    ("20000kB", 20000 * 1000),
    ("1TiB", 1 << 40),
    (float(1 << 30), 1 << 30),
])
def test_memory_sizes(given: Any, size: int) -> None:
    assert ResourceLimits(memory=given).memory == size
    assert PluginConfig(name="demo", limits={"memory": given}).limits.memory == size


@pytest.mark.parametrize(("text", "expected"), [
    ("memory = 256", "limits.memory: Value error, 256 bytes is below the smallest memory limit, 16777216 bytes"),
    ('memory = "1k"', "limits.memory: Value error, '1k' (1024 bytes) is below the smallest memory limit"),
    ("memory = -5", "limits.memory: Value error, -5 bytes is below"),
    ('memory = "lots"', "limits.memory: Value error, 'lots' is not a size: expected e.g. 268435456, '256MiB'"),
    ('memory = "5XB"', "limits.memory: Value error, unknown unit 'XB' in '5XB'"),
    ('memory = "-5MiB"', "limits.memory: Value error, '-5MiB' is not a size"),
    ("memory = 1.5", "limits.memory: Value error, 1.5 is not a whole number of bytes"),
    ("memory = true", "limits.memory: Value error, expected a number of bytes or a size"),
    ('memory = "9999999TiB"', "limits.memory: Value error, '9999999TiB' ("),
    ("cpu_seconds = 0", "limits.cpu_seconds: Input should be greater than or equal to 1"),
    ("cpu_seconds = 1.5", "limits.cpu_seconds: Input should be a valid integer"),
    ('cpu_seconds = "60"', "limits.cpu_seconds: Input should be a valid integer"),
    ("cpu_seconds = true", "limits.cpu_seconds: Input should be a valid integer"),
    ("open_files = 3", "limits.open_files: Input should be greater than or equal to 16"),
    ("open_files = 2000000", "limits.open_files: Input should be less than or equal to 1048576"),
    ("max_concurrency = 0", "limits.max_concurrency: Input should be greater than or equal to 1"),
    ("handler_timeout = 0", "limits.handler_timeout: Input should be greater than 0"),
    ('max_payload = "big"', "limits.max_payload: Input should be a valid integer"),
    ("swap = 1", "limits.swap: Extra inputs are not permitted"),
])
def test_bad_limits_are_refused_naming_the_field(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        config(f"[limits]\n{text}\n")
    assert str(info.value).startswith("plugin.toml: ") and expected in str(info.value), str(info.value)
    assert str(info.value).count("limits.") == 1  # named once, not also at the top level


def test_limits_must_be_a_table() -> None:
    with pytest.raises(ConfigError) as info:
        config("limits = 3\n")
    assert str(info.value).startswith("plugin.toml: limits: Input should be a valid dictionary"), str(info.value)


def test_runtime_limits_in_the_table_win_over_the_top_level_ones() -> None:
    c = config("max_concurrency = 4\nhandler_timeout = 5.0\n\n[limits]\nmax_concurrency = 8\nmax_payload = 4096\n")
    # The top-level fields are what the runtime reads: they carry the winning values.
    assert (c.max_concurrency, c.handler_timeout, c.max_payload) == (8, 5.0, 4096)
    assert (c.limits.max_concurrency, c.limits.handler_timeout, c.limits.max_payload) == (8, None, 4096)
    assert PluginConfig(name="demo", max_concurrency=4, limits=ResourceLimits(max_concurrency=8)).max_concurrency == 8
    # The old top-level place keeps working alone.
    assert config("max_concurrency = 4\n").max_concurrency == 4


def test_a_later_source_overrides_an_earlier_one_whichever_place_it_uses() -> None:
    cls_config = PluginConfig(name="demo", limits={"max_concurrency": 8, "memory": "128MiB"})
    # A file's top-level value beats the class's [limits] one...
    c = config("max_concurrency = 16\n", base=cls_config)
    assert c.max_concurrency == 16 and c.limits.max_concurrency is None
    # ...and its [limits] merges key by key: memory stays, cpu_seconds is added.
    c = config("[limits]\ncpu_seconds = 60\n", base=cls_config)
    assert (c.max_concurrency, c.limits.memory, c.limits.cpu_seconds) == (8, 128 << 20, 60)
    c = config("[limits]\nmax_concurrency = 2\nmemory = \"1GiB\"\n", base=cls_config)
    assert (c.max_concurrency, c.limits.memory) == (2, 1 << 30)
    # merged() round-trips: nothing is lost or doubled on the way through model_dump.
    assert cls_config.merged({}) == cls_config


class Small(Plugin):
    name = "small"

    @command("take")
    async def take(self, message: Message) -> Any:
        return len(message.payload)


async def test_the_runtime_enforces_max_payload_given_in_limits(nc: NATS, prefix: str, registry: object,
                                                               messaging: PluginMessaging) -> None:
    c = Small.default_config().merged({"limits": {"max_payload": 4096}})
    async with PluginRuntime(Small(), nc, prefix=prefix, config=c):
        assert (await messaging.send_message("small", "x" * 100, operation="take")).result == 100
        with pytest.raises(PayloadTooLarge, match="4096"):
            await messaging.send_message("small", "x" * 10_000, operation="take")
