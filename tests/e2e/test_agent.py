"""The agent: load / unload / reload over NATS, supervision with backoff, the failed state."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections import Counter as Tally
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
from nats.aio.client import Client as NATS

from mesh import NatsServer, RegistryService
from mesh._agent import Agent
from plugin_sdk import CommunicationError, Health, InitializationError, PluginInfo, PluginMessaging, PluginRegistry
from tests.conftest import ROOT, TEST_PLUGINS, eventually, mesh_cli


@pytest.fixture
async def agent(nc: NATS, nats_server: NatsServer, prefix: str, tmp_path: Path,
                registry: RegistryService, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Agent]:
    # The children find the test plugins and the examples on their PYTHONPATH.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(TEST_PLUGINS)]))
    monkeypatch.syspath_prepend(str(TEST_PLUGINS))  # the agent imports a ref to check it first
    async with Agent(nc, nats_url=nats_server.url, name="test-agent", prefix=prefix, data_dir=tmp_path / "agent",
                     heartbeat_interval=0.3, restart_limit=2, restart_window=30, backoff_base=0.05,
                     backoff_max=0.2, cwd=tmp_path) as a:
        yield a


async def healthy(client: PluginRegistry, ident: str) -> PluginInfo:
    async def probe() -> PluginInfo | None:
        info = await client.get_plugin(ident)
        return info if info is not None and info.health == Health.HEALTHY else None

    return await eventually(probe, timeout=30, what=f"{ident} healthy")


async def test_load_send_list_unload_through_the_cli(agent: Agent, nats_server: NatsServer, prefix: str,
                                                     client: PluginRegistry, messaging: PluginMessaging) -> None:
    r = await mesh_cli("load", "examples.echo:Echo", "--instances", "2", url=nats_server.url, prefix=prefix)
    assert r.code == 0, r.err
    loaded = json.loads(r.out)
    assert loaded["agent"] == "test-agent" and len(loaded["instances"]) == 2
    for ident in loaded["instances"]:
        info = await healthy(client, ident)
        assert info.agent == "test-agent" and info.restarts == 0
    assert (await messaging.send_message("echo", {"x": 1})).result == {"x": 1}

    r = await mesh_cli("agents", "--json", url=nats_server.url, prefix=prefix)
    (listed,) = json.loads(r.out)
    assert {x["id"] for x in listed["plugins"]} == set(loaded["instances"])
    pids = [x["pid"] for x in listed["plugins"]]

    r = await mesh_cli("unload", "echo", url=nats_server.url, prefix=prefix)
    assert r.code == 0, r.err
    assert sorted(json.loads(r.out)[0]["stopped"]) == sorted(loaded["instances"])
    assert await client.list_plugins("echo") == []
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert agent.placements == {}


async def test_refusals_are_typed_and_named(agent: Agent, nats_server: NatsServer, prefix: str) -> None:
    r = await mesh_cli("load", "nowhere:Nothing", url=nats_server.url, prefix=prefix)
    assert r.code == 1 and "InitializationError" in r.err and "no module named 'nowhere'" in r.err
    r = await mesh_cli("unload", "ghost", url=nats_server.url, prefix=prefix)
    assert r.code == 1 and "no agent runs a plugin or instance 'ghost'" in r.err
    r = await mesh_cli("load", "examples.echo:Echo", "--on", "elsewhere", url=nats_server.url, prefix=prefix)
    assert r.code == 1 and "no agent named 'elsewhere'" in r.err


async def test_killed_instance_is_restarted_with_the_same_id(agent: Agent, client: PluginRegistry,
                                                             messaging: PluginMessaging) -> None:
    (ident,) = await agent.load("examples.echo:Echo")
    await healthy(client, ident)
    first = agent.placements[ident].proc
    assert first is not None
    first.send_signal(signal.SIGKILL)

    async def restarted() -> PluginInfo | None:
        info = await client.get_plugin(ident)
        return info if info is not None and info.restarts == 1 and info.health == Health.HEALTHY else None

    info = await eventually(restarted, timeout=30, what="a restart after SIGKILL")
    assert info.last_error.startswith("killed by SIGKILL")
    assert agent.placements[ident].proc is not first
    assert (await messaging.send_message("echo", "still here")).result == "still here"


async def test_crash_loop_ends_failed_with_the_reason(agent: Agent, nats_server: NatsServer, prefix: str,
                                                      client: PluginRegistry) -> None:
    (ident,) = await agent.load("testplugins:Doomed")

    async def failed() -> PluginInfo | None:
        info = await client.get_plugin(ident)
        return info if info is not None and info.health == Health.FAILED else None

    info = await eventually(failed, timeout=60, what="the failed state")
    assert info.restarts == 2  # restart_limit
    assert "the database is unreachable" in info.last_error and "exit code 1" in info.last_error
    assert agent.placements[ident].state == "failed"
    r = await mesh_cli("ls", url=nats_server.url, prefix=prefix)
    assert "failed" in r.out and "restarts" in r.out


async def test_rolling_reload_under_traffic_loses_no_request(agent: Agent, client: PluginRegistry,
                                                             messaging: PluginMessaging) -> None:
    old = await agent.load("examples.echo:Echo", instances=2)
    for ident in old:
        await healthy(client, ident)
    outcome: Tally[str] = Tally()
    stop = asyncio.Event()

    async def traffic() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                reply = await messaging.send_message("echo", {"n": n}, timeout=5)
                outcome["ok" if reply.result == {"n": n} else "wrong"] += 1
            except CommunicationError as exc:  # typed, counted: the test asserts there are none
                outcome[type(exc).__name__] += 1

    workers = [asyncio.create_task(traffic()) for _ in range(4)]
    try:
        await eventually(lambda: _true(outcome["ok"] > 50), what="traffic to flow")
        replaced = await agent.reload("echo")
        sent_during = sum(outcome.values())
        await eventually(lambda: _true(sum(outcome.values()) > sent_during + 50), what="traffic after reload")
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert [pair[0] for pair in replaced] == old
    assert {i.id for i in await client.list_plugins("echo")} == {pair[1] for pair in replaced}
    assert set(outcome) == {"ok"}, outcome  # every request answered, none lost or failed


async def test_plugins_lists_installed_entry_points(tmp_path: Path, nats_server: NatsServer, prefix: str) -> None:
    dist = tmp_path / "hello_plugin-1.4.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hello-plugin\nVersion: 1.4.0\n")
    (dist / "entry_points.txt").write_text("[groundhog.plugins]\nhello = hello_plugin:Hello\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", "plugins", "--json", env={**os.environ, "PYTHONPATH": str(tmp_path)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    rows = json.loads(out)
    assert {"name": "hello", "ref": "hello_plugin:Hello", "distribution": "hello-plugin", "version": "1.4.0"} in rows


async def _true(value: bool) -> bool:
    return value


async def test_initialization_error_outside_a_request_restarts_the_instance(
        agent: Agent, client: PluginRegistry, messaging: PluginMessaging) -> None:
    (ident,) = await agent.load("testplugins:Licensed")
    await healthy(client, ident)
    await messaging.publish_event("license.revoked", {})

    async def restarted() -> PluginInfo | None:
        info = await client.get_plugin(ident)
        return info if info is not None and info.restarts == 1 and info.health == Health.HEALTHY else None

    info = await eventually(restarted, timeout=30, what="a restart requested by the plugin")
    assert info.last_error.startswith("exit code 75")
    assert (await messaging.send_message("licensed")).result == "licensed"


async def test_more_refusals_name_their_cause(agent: Agent, nc: NATS, nats_server: NatsServer, prefix: str,
                                              tmp_path: Path) -> None:
    # A second agent with the same name would split every command between two machines.
    with pytest.raises(InitializationError, match="an agent named 'test-agent' is already running"):
        await Agent(nc, nats_url=nats_server.url, name="test-agent", prefix=prefix, data_dir=tmp_path).start()
    # A plugin built for another protocol major is refused at load, not after a crash loop.
    r = await mesh_cli("load", "testplugins:FromTheFuture", url=nats_server.url, prefix=prefix)
    assert r.code == 1 and "built for mesh protocol 2; this host speaks 1" in r.err
    # A bad plugin.toml is named as the caller knows it, not by the agent's stored copy.
    bad = tmp_path / "mine.toml"
    bad.write_text('version = "v1"\n')
    r = await mesh_cli("load", "examples.echo:Echo", "--config", str(bad), url=nats_server.url, prefix=prefix)
    assert r.code == 1 and f"ConfigError: {bad}: version" in r.err
    assert agent.placements == {}


async def test_no_agent_running_is_one_line(nats_server: NatsServer, prefix: str) -> None:
    for args in (("agents",), ("load", "examples.echo:Echo"), ("unload", "echo"), ("reload", "echo")):
        r = await mesh_cli(*args, url=nats_server.url, prefix=prefix)
        assert "Traceback" not in r.err, (args, r.err)
    r = await mesh_cli("agents", url=nats_server.url, prefix=prefix)
    assert r.code == 0 and "no agent answered" in r.err
    r = await mesh_cli("load", "examples.echo:Echo", url=nats_server.url, prefix=prefix)
    assert r.code == 1 and "no agent is running" in r.err


async def test_failed_instances_stay_listed_until_unloaded(agent: Agent, nc: NATS, prefix: str,
                                                           client: PluginRegistry) -> None:
    async with RegistryService(nc, prefix=prefix, expire_after=0.5, sweep_interval=0.1):
        (ident,) = await agent.load("testplugins:Doomed")

        async def failed() -> PluginInfo | None:
            info = await client.get_plugin(ident)
            return info if info is not None and info.health == Health.FAILED else None

        await eventually(failed, timeout=60, what="the failed state")
        await asyncio.sleep(1.0)  # twice expire_after: a silent healthy instance would be gone by now
        assert await failed() is not None
        await agent.unload(ident)
        assert await client.get_plugin(ident) is None


async def test_slow_start_failures_still_end_failed(nc: NATS, nats_server: NatsServer, prefix: str, tmp_path: Path,
                                                    registry: RegistryService, client: PluginRegistry,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(TEST_PLUGINS)]))
    monkeypatch.syspath_prepend(str(TEST_PLUGINS))
    # Each run outlives stable_after, but never gets as far as serving: not "stable".
    async with Agent(nc, nats_url=nats_server.url, name="slow-agent", prefix=prefix, data_dir=tmp_path,
                     restart_limit=2, backoff_base=0.05, backoff_max=0.1, stable_after=0.3, cwd=tmp_path) as a:
        (ident,) = await a.load("testplugins:Lonely")

        async def failed() -> PluginInfo | None:
            info = await client.get_plugin(ident)
            return info if info is not None and info.health == Health.FAILED else None

        info = await eventually(failed, timeout=60, what="the failed state")
        assert info.restarts == 2 and "lonely -> nobody (no healthy instance)" in info.last_error
