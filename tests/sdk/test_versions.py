"""Protocol and version compatibility, version-range routing, dependency waits and errors."""

from __future__ import annotations

import asyncio
from collections import Counter as Tally
from typing import Any, ClassVar

import pytest
from nats.aio.client import Client as NATS

from mesh._deps import Planned, start_levels
from plugin_sdk import (
    Dependency,
    DependencyError,
    InitializationError,
    Message,
    Plugin,
    PluginConfig,
    PluginMessaging,
    PluginNotFound,
    PluginRegistry,
    PluginRuntime,
    PluginState,
)
from tests.conftest import eventually


class Auth(Plugin):
    name = "auth"

    async def handle_message(self, message: Message) -> Any:
        assert self.context is not None
        return self.context.config.version


def auth(version: str) -> PluginConfig:
    return PluginConfig(name="auth", version=version)


class Future(Plugin):
    name = "future"
    protocol = "2"


async def test_a_plugin_for_another_protocol_major_is_refused(nc: NATS, prefix: str) -> None:
    plugin = Future()
    with pytest.raises(InitializationError, match="built for mesh protocol 2; this host speaks 1"):
        await PluginRuntime(plugin, nc, prefix=prefix).start()
    assert plugin.state is PluginState.FAILED


async def test_routing_to_a_range_picks_only_matching_instances(nc: NATS, prefix: str, registry: object,
                                                                messaging: PluginMessaging,
                                                                client: PluginRegistry) -> None:
    async with PluginRuntime(Auth(), nc, prefix=prefix, config=auth("1.4.0")), \
            PluginRuntime(Auth(), nc, prefix=prefix, config=auth("2.1.0")), \
            PluginRuntime(Auth(), nc, prefix=prefix, config=auth("2.2.0-rc.1")):
        seen = Tally([(await messaging.send_message("auth", version=">=2")).result for _ in range(30)])
        assert set(seen) == {"2.1.0", "2.2.0-rc.1"} and min(seen.values()) >= 10  # round-robin
        assert {(await messaging.send_message("auth", version=">=1.2,<2")).result for _ in range(5)} == {"1.4.0"}
        with pytest.raises(PluginNotFound, match=r"no healthy instance of 'auth' has a version in '>=3'.*"
                                                 r"running: 1\.4\.0, 2\.1\.0, 2\.2\.0-rc\.1"):
            await messaging.send_message("auth", version=">=3")
        assert [i.version for i in await client.list_plugins("auth", version="<2")] == ["1.4.0"]
        found = await client.get_plugin("auth", version="~=2.1.0")
        assert found is not None and found.version == "2.1.0"
        assert await client.get_plugin("auth", version=">=9") is None


class Billing(Plugin):
    name = "billing"
    dependencies: ClassVar[list[Dependency | dict[str, Any] | str]] = [{"name": "auth", "version": ">=1.2,<2"}]

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()
        self.health: list[tuple[str, str]] = []

    async def start(self) -> None:
        self.started.set()

    async def on_dependency_health(self, dependency: str, health: str, event: Message) -> None:
        self.health.append((dependency, health))


async def test_start_waits_for_a_healthy_dependency_in_range(nc: NATS, prefix: str, registry: object,
                                                            client: PluginRegistry) -> None:
    billing = Billing()
    runtime = PluginRuntime(billing, nc, prefix=prefix, heartbeat_interval=0.1)
    starting = asyncio.create_task(runtime.start())
    try:
        async with PluginRuntime(Auth(), nc, prefix=prefix, config=auth("2.0.0")):  # out of range: still waits
            async def seen_and_refused() -> bool:  # it looked, saw 2.0.0 running, and still waits
                info = await client.get_plugin(runtime.instance_id)
                return info is not None and "running: 2.0.0; none in range" in info.health_reason

            await eventually(seen_and_refused, what="billing to see auth 2.0.0 and keep waiting")
            assert billing.state is PluginState.INITIALIZED and not billing.started.is_set()
            async with PluginRuntime(Auth(), nc, prefix=prefix, config=auth("1.5.0")):
                await asyncio.wait_for(starting, 10)
                assert billing.state is PluginState.RUNNING
    finally:
        await asyncio.gather(starting, return_exceptions=True)
        await runtime.stop()
    # The last auth in range stopped: the dependant was told, and keeps running.
    assert ("auth", "stopping") in billing.health


async def test_a_missing_dependency_fails_naming_it(nc: NATS, prefix: str, registry: object) -> None:
    config = Billing.default_config().merged({"dependency_timeout": 0.5})
    plugin = Billing()
    with pytest.raises(DependencyError, match=r"billing -> auth >=1\.2,<2 \(no healthy instance\)"):
        await PluginRuntime(plugin, nc, prefix=prefix, config=config).start()
    assert plugin.state is PluginState.FAILED
    async with PluginRuntime(Auth(), nc, prefix=prefix, config=auth("3.0.0")):
        with pytest.raises(DependencyError, match=r"billing -> auth >=1\.2,<2 \(running: 3\.0\.0; none in range\)"):
            await PluginRuntime(Billing(), nc, prefix=prefix, config=config).start()


def planned(name: str, *deps: str | dict[str, str], version: str = "1.0.0") -> Planned:
    return Planned(f"x:{name}", PluginConfig.model_validate(
        {"name": name, "version": version,
         "dependencies": [d if isinstance(d, dict) else {"name": d} for d in deps]}))


def test_start_levels_order_and_parallelism() -> None:
    levels = start_levels([planned("web", "api", "auth"), planned("api", "db"), planned("db"), planned("auth"),
                           planned("cron", "external")])
    assert [[p.config.name for p in level] for level in levels] == [["auth", "cron", "db"], ["api"], ["web"]]


def test_cycles_and_unsatisfiable_ranges_name_the_chain() -> None:
    with pytest.raises(DependencyError, match=r"dependency cycle a -> b -> c -> a"):
        start_levels([planned("a", "b"), planned("b", "c"), planned("c", "a"), planned("d")])
    with pytest.raises(DependencyError, match=r"web -> api >=2: unsatisfiable, the file runs api 1\.0\.0"):
        start_levels([planned("web", {"name": "api", "version": ">=2"}), planned("api")])
