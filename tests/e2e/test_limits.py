"""[limits] applied by a real agent to real plugin hosts: each limit trips, is reported by name, and the
instance is restarted while another plugin keeps answering.

Figures behind the limits used (an idle host, Python 3.11 and 3.13): VmData ~32 MiB (what RLIMIT_DATA
counts), RSS ~46 MiB, VmSize ~53 MiB; 0.45 s of CPU to start; 7 open files. So memory = 64 MiB,
cpu_seconds = 2 and open_files = 64 leave an idle host room (twice its memory, four times its start-up
CPU, nine times its files), and a Hog goes past them within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from mesh import NatsServer, RegistryService
from mesh._agent import Agent, Placement
from mesh._limits import CPU_GRACE, cgroup_support
from plugin_sdk import HandlerError, Health, PluginError, PluginInfo, PluginMessaging, PluginRegistry
from tests.conftest import ROOT, TEST_PLUGINS, eventually, healthy, mesh_cli

PACKAGES = Path(__file__).resolve().parents[1] / "packages"

MEMORY = 64 * 1024 * 1024


@pytest.fixture
async def agent(nc: NATS, nats_server: NatsServer, prefix: str, tmp_path: Path, registry: RegistryService,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Agent]:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(TEST_PLUGINS)]))
    monkeypatch.syspath_prepend(str(TEST_PLUGINS))
    async with Agent(nc, nats_url=nats_server.url, name="test-agent", prefix=prefix, data_dir=tmp_path / "agent",
                     heartbeat_interval=0.3, restart_limit=2, restart_window=30, backoff_base=0.05,
                     backoff_max=0.2, cwd=tmp_path) as a:
        yield a



async def load_hog(agent: Agent, client: PluginRegistry, limits: str, settings: str = "") -> tuple[str, Placement]:
    toml = f"[limits]\n{limits}\n" + (f"[settings]\n{settings}\n" if settings else "")
    (ident,) = await agent.load("testplugins:Hog", config_toml=toml, config_name="hog.toml")
    if not settings:
        await healthy(client, ident)
    return ident, agent.placements[ident]


async def restarted_for(client: PluginRegistry, messaging: PluginMessaging, agent: Agent, ident: str,
                        reason: str) -> PluginInfo:
    """Until ``ident`` is healthy again after one restart whose recorded reason starts with ``reason``;
    meanwhile echo (another plugin) must answer every time we ask."""
    async def probe() -> PluginInfo | None:
        assert (await messaging.send_message("echo", "still here", timeout=5)).result == "still here"
        info = await client.get_plugin(ident)
        ok = info is not None and info.health == Health.HEALTHY and info.restarts == 1
        return info if ok and info.last_error.startswith(reason) else None

    info = await eventually(probe, timeout=60, what=f"{ident} restarted after {reason!r}")
    assert agent.placements[ident].last_error == info.last_error
    assert agent.placements[ident].restarts == 1
    return info


@pytest.fixture
async def echo(agent: Agent, client: PluginRegistry) -> str:
    (ident,) = await agent.load("examples.echo:Echo")
    await healthy(client, ident)
    return ident


async def test_a_memory_leak_is_stopped_reported_and_restarted(agent: Agent, client: PluginRegistry,
                                                               messaging: PluginMessaging, echo: str) -> None:
    ident, p = await load_hog(agent, client, 'memory = "64MiB"')
    first = p.proc
    with pytest.raises(PluginError) as caught:  # the handler's MemoryError is the caller's typed error
        await messaging.send_message("hog", None, operation="leak", timeout=10)
    assert isinstance(caught.value, HandlerError) and caught.value.remote_type == "MemoryError"

    info = await restarted_for(client, messaging, agent, ident, f"ResourceError: memory limit of {MEMORY} bytes "
                               "exceeded (RLIMIT_DATA: MemoryError with ")
    assert "stopped by the agent" in info.last_error
    assert agent.placements[ident].proc is not first
    assert (await messaging.send_message("hog", None, operation="ping")).result["restarts"] == "1"


async def test_one_too_big_allocation_fails_only_that_request(agent: Agent, client: PluginRegistry,
                                                              messaging: PluginMessaging) -> None:
    _, p = await load_hog(agent, client, 'memory = "64MiB"')
    pid = (await messaging.send_message("hog", None, operation="ping")).result["pid"]
    with pytest.raises(HandlerError, match="MemoryError"):
        await messaging.send_message("hog", None, operation="spike", timeout=10)
    watch = p.watch
    assert watch is not None

    async def seen() -> bool:
        return watch.signs.get("memory", 0) > 0

    await eventually(seen, what="the agent to see the MemoryError in the output")
    # The memory is free again: the instance is not at its limit, so it is left serving.
    assert watch.exceeded == "" and p.restarts == 0 and p.state == "running"
    assert (await messaging.send_message("hog", None, operation="ping")).result["pid"] == pid


async def test_a_memory_error_escaping_to_the_host_exits_non_zero_and_is_reported(
        agent: Agent, client: PluginRegistry, messaging: PluginMessaging, echo: str) -> None:
    # initialize() fails with MemoryError in the first run only; the host exits 1 by itself.
    ident, _ = await load_hog(agent, client, 'memory = "64MiB"', 'at_start = "spike"\nruns = 1')
    info = await restarted_for(client, messaging, agent, ident, f"ResourceError: memory limit of {MEMORY} bytes "
                               "exceeded (RLIMIT_DATA: MemoryError, then exit code 1)")
    assert info.health == Health.HEALTHY


async def test_an_instance_over_its_memory_at_every_start_ends_failed(
        agent: Agent, client: PluginRegistry, nats_server: NatsServer, prefix: str) -> None:
    ident, _ = await load_hog(agent, client, 'memory = "64MiB"', 'at_start = "leak"')

    async def failed() -> PluginInfo | None:
        info = await client.get_plugin(ident)
        return info if info is not None and info.health == Health.FAILED else None

    info = await eventually(failed, timeout=60, what="the failed state")
    reason = f"ResourceError: memory limit of {MEMORY} bytes exceeded"
    assert info.restarts == 2 and info.last_error.startswith(reason)  # restart_limit
    r = await mesh_cli("ls", url=nats_server.url, prefix=prefix)
    assert r.code == 0 and "failed" in r.out and "ResourceError" in r.out
    r = await mesh_cli("agents", "--json", url=nats_server.url, prefix=prefix)
    (listed,) = json.loads(r.out)
    (row,) = [x for x in listed["plugins"] if x["id"] == ident]
    assert row["state"] == "failed" and row["last_error"].startswith(reason)


async def test_the_cpu_limit_kills_with_sigxcpu_and_is_reported(agent: Agent, client: PluginRegistry,
                                                                messaging: PluginMessaging, echo: str) -> None:
    ident, _ = await load_hog(agent, client, "cpu_seconds = 2")
    spin = asyncio.create_task(messaging.send_message("hog", None, operation="spin", timeout=60))
    try:
        info = await restarted_for(client, messaging, agent, ident,
                                   "ResourceError: cpu_seconds limit of 2 s exceeded (RLIMIT_CPU: killed by SIGXCPU)")
        assert info.restarts == 1 and info.health == Health.HEALTHY
    finally:
        spin.cancel()
        with contextlib.suppress(asyncio.CancelledError, PluginError):
            await spin


async def test_sigxcpu_ignored_still_ends_at_the_hard_limit(agent: Agent, client: PluginRegistry,
                                                             messaging: PluginMessaging, echo: str) -> None:
    ident, _ = await load_hog(agent, client, "cpu_seconds = 2")  # (a host takes ~0.45 s of CPU to start)
    spin = asyncio.create_task(messaging.send_message("hog", {"ignore_sigxcpu": True}, operation="spin",
                                                      timeout=60))
    try:
        info = await restarted_for(client, messaging, agent, ident,
                                   "ResourceError: cpu_seconds limit of 2 s exceeded (RLIMIT_CPU: SIGXCPU not "
                                   f"heeded; killed by SIGKILL at {2 + CPU_GRACE} s")
    finally:
        spin.cancel()
        with contextlib.suppress(asyncio.CancelledError, PluginError):
            await spin
    assert "of CPU time last seen" in info.last_error


async def test_the_open_files_limit_is_stopped_reported_and_restarted(agent: Agent, client: PluginRegistry,
                                                                      messaging: PluginMessaging, echo: str) -> None:
    ident, _ = await load_hog(agent, client, "open_files = 64")
    with pytest.raises(HandlerError, match="Too many open files"):
        await messaging.send_message("hog", None, operation="hoard", timeout=10)
    info = await restarted_for(client, messaging, agent, ident,
                               "ResourceError: open_files limit of 64 exceeded (RLIMIT_NOFILE: Too many open files, ")
    assert "stopped by the agent" in info.last_error


def proc_limits(pid: int | str) -> dict[str, list[str]]:
    """/proc/PID/limits: {"Max data size": [soft, hard], ...}."""
    lines = Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]
    return {cols[0]: cols[1:3] for line in lines if (cols := re.split(r"\s{2,}", line.strip()))}


async def test_without_limits_nothing_is_applied(agent: Agent, client: PluginRegistry,
                                                 messaging: PluginMessaging) -> None:
    (ident,) = await agent.load("testplugins:Hog")
    await healthy(client, ident)
    p = agent.placements[ident]
    assert p.watch is None and p.proc is not None
    assert proc_limits(p.proc.pid) == proc_limits("self")


async def test_the_limits_are_the_childs_rlimits(agent: Agent, client: PluginRegistry) -> None:
    _, p = await load_hog(agent, client, 'memory = "64MiB"\ncpu_seconds = 30\nopen_files = 64')
    assert p.proc is not None
    rows = proc_limits(p.proc.pid)
    assert rows["Max data size"] == [str(MEMORY), str(MEMORY)]
    assert rows["Max cpu time"] == ["30", str(30 + CPU_GRACE)]
    assert rows["Max open files"] == ["64", "64"]


async def test_a_packages_limits_apply_without_its_code_running_in_the_agent(
        agent: Agent, client: PluginRegistry, tmp_path: Path, nats_server: NatsServer, prefix: str) -> None:
    pkg = Path(shutil.copytree(PACKAGES / "signed_greeter", tmp_path / "greeter"))
    with (pkg / "plugin.toml").open("a") as f:
        f.write('\n[limits]\nopen_files = 64\nmemory = "64MiB"\n')
    r = await mesh_cli("load", str(pkg), url=nats_server.url, prefix=prefix)  # unsigned: this agent allows it
    assert r.code == 0, r.err
    (ident,) = json.loads(r.out)["instances"]
    await healthy(client, ident)
    p = agent.placements[ident]
    assert p.proc is not None and p.watch is not None
    rows = proc_limits(p.proc.pid)
    assert rows["Max open files"] == ["64", "64"] and rows["Max data size"] == [str(MEMORY)] * 2
    assert "signed_greeter_pkg" not in sys.modules


@pytest.mark.skipif(cgroup_support().parent is None, reason=f"no cgroup v2 memory here: {cgroup_support().reason}")
async def test_with_cgroup_v2_each_child_has_a_group_with_memory_max(agent: Agent, client: PluginRegistry) -> None:
    ident, p = await load_hog(agent, client, 'memory = "64MiB"')
    watch = p.watch
    assert watch is not None and watch.group is not None and p.proc is not None
    assert (watch.group.path / "memory.max").read_text().strip() == str(MEMORY)
    assert watch.group.holds(p.proc.pid)
    path = watch.group.path
    await agent.unload(ident)
    assert not path.exists()
