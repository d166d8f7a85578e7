"""Load and unload a plugin 200 times in one agent: no growth in subscriptions, tasks, fds or memory."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
from nats.aio.client import Client as NATS

from mesh import NatsServer, RegistryService
from mesh._agent import Agent
from plugin_sdk import PluginRegistry, PluginRuntime
from tests.conftest import ROOT, TEST_PLUGINS
from tests.sdk.test_spec import SpecPlugin

CYCLES = 200


def server_subscriptions(server: NatsServer, client_name: str) -> int:
    """The live subscription count of our connection, as nats-server's /connz reports it."""
    url = f"http://127.0.0.1:{server.monitor_port}/connz?subs=1&limit=1000"
    with urllib.request.urlopen(url, timeout=5) as response:
        conns = json.load(response)["connections"]
    return sum(len(c.get("subscriptions_list", [])) for c in conns if c.get("name") == client_name)


async def count_subs(server: NatsServer, nc: NATS) -> int:
    await nc.flush()
    return await asyncio.to_thread(server_subscriptions, server, "test")


def snapshot() -> tuple[int, int, int]:
    gc.collect()
    me = psutil.Process()
    return len(asyncio.all_tasks()), me.num_fds(), me.memory_info().rss


@pytest.fixture
async def agent(nc: NATS, nats_server: NatsServer, prefix: str, tmp_path: Path, registry: RegistryService,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Agent]:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(TEST_PLUGINS)]))
    async with Agent(nc, nats_url=nats_server.url, name="leak-agent", prefix=prefix, data_dir=tmp_path,
                     heartbeat_interval=0.5, cwd=tmp_path) as a:
        yield a


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_200_loads_and_unloads_in_one_agent_leak_nothing(agent: Agent, nats_server: NatsServer, nc: NATS,
                                                               client: PluginRegistry) -> None:
    async def cycle() -> None:
        (ident,) = await agent.load("examples.echo:Echo")
        await agent.wait_healthy(ident, timeout=60)
        assert await agent.unload(ident) == [ident]

    for _ in range(5):  # warm-up: imports, caches, the first children
        await cycle()
    subs0, (tasks0, fds0, rss0) = await count_subs(nats_server, nc), snapshot()
    children0 = len(psutil.Process().children(recursive=True))
    for _ in range(CYCLES):
        await cycle()
    subs1, (tasks1, fds1, rss1) = await count_subs(nats_server, nc), snapshot()
    assert subs1 == subs0, (subs0, subs1)
    assert tasks1 <= tasks0, (tasks0, tasks1)
    assert fds1 <= fds0 + 2, (fds0, fds1)
    assert rss1 - rss0 < 20 * 2**20, (rss0, rss1)  # 20 MiB over 200 cycles: noise, not a leak
    assert len(psutil.Process().children(recursive=True)) == children0
    assert agent.placements == {} and await client.list_plugins("echo") == []


@pytest.mark.slow
async def test_200_runtime_starts_and_stops_on_one_connection(nats_server: NatsServer, nc: NATS,
                                                              prefix: str, registry: RegistryService) -> None:
    async def cycle() -> None:
        runtime = PluginRuntime(SpecPlugin(), nc, prefix=prefix, heartbeat_interval=0.5)
        await runtime.start()
        async with await runtime.messaging.subscribe_to_events("x.>"):  # the plugin's own subscription too
            pass
        await runtime.messaging.subscribe_to_events("y.*")  # left open: stop() must close it
        assert await runtime.stop()

    for _ in range(5):
        await cycle()
    subs0, (tasks0, fds0, rss0) = await count_subs(nats_server, nc), snapshot()
    for _ in range(CYCLES):
        await cycle()
    subs1, (tasks1, fds1, rss1) = await count_subs(nats_server, nc), snapshot()
    assert (subs1, tasks1) == (subs0, tasks0)
    assert fds1 <= fds0 + 2 and rss1 - rss0 < 20 * 2**20, (fds0, fds1, rss0, rss1)


class BrokenCleanup(SpecPlugin):
    async def cleanup(self) -> None:
        raise RuntimeError("cleanup exploded")


class BrokenInit(SpecPlugin):
    async def initialize(self, context: object) -> None:
        await self.context_opened_subscription(context)
        raise RuntimeError("initialize exploded")

    async def context_opened_subscription(self, context: object) -> None:
        from plugin_sdk import PluginContext

        assert isinstance(context, PluginContext)
        await context.messaging.subscribe_to_events("opened.in.initialize")


async def test_everything_is_released_when_initialize_or_cleanup_raise(nats_server: NatsServer, nc: NATS,
                                                                       prefix: str, registry: RegistryService) -> None:
    from plugin_sdk import InitializationError

    subs0, (tasks0, _, _) = await count_subs(nats_server, nc), snapshot()
    runtime = PluginRuntime(BrokenCleanup(), nc, prefix=prefix)
    await runtime.start()
    await runtime.messaging.subscribe_to_events("left.open")
    assert await count_subs(nats_server, nc) > subs0
    assert await runtime.stop() is False  # reported, not hidden
    with pytest.raises(InitializationError, match="initialize exploded"):
        await PluginRuntime(BrokenInit(), nc, prefix=prefix).start()
    assert await count_subs(nats_server, nc) == subs0
    assert snapshot()[0] == tasks0
