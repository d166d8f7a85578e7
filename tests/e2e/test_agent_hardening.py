"""The agent under bad conditions: long log lines, wedged children, secrets in URLs, start-up problems."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
from nats.aio.client import Client as NATS

from mesh import NatsServer, RegistryService, close, connect, free_port
from mesh._agent import MAX_LINE, Agent
from plugin_sdk import Health, PluginInfo, PluginMessaging, PluginRegistry, RequestTimeout
from plugin_sdk._natsd import find_binary
from tests.conftest import ROOT, TEST_PLUGINS, eventually, mesh_cli


def make_agent(nc: NATS, url: str, prefix: str, tmp_path: Path, *, name: str = "test-agent",
               unresponsive_after: float | None = None) -> Agent:
    return Agent(nc, nats_url=url, name=name, prefix=prefix, heartbeat_interval=0.3, restart_limit=2,
                 restart_window=30, backoff_base=0.05, backoff_max=0.2, cwd=tmp_path, data_dir=tmp_path / "agent",
                 unresponsive_after=unresponsive_after)


@pytest.fixture
def child_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # The children find the test plugins and the examples on their PYTHONPATH.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(TEST_PLUGINS)]))
    monkeypatch.syspath_prepend(str(TEST_PLUGINS))  # the agent imports a ref to check it first


@pytest.fixture
async def agent(nc: NATS, nats_server: NatsServer, prefix: str, tmp_path: Path, registry: RegistryService,
                child_path: None) -> AsyncIterator[Agent]:
    async with make_agent(nc, nats_server.url, prefix, tmp_path) as a:
        yield a


async def healthy(client: PluginRegistry, ident: str, **fields: object) -> PluginInfo:
    async def probe() -> PluginInfo | None:
        info = await client.get_plugin(ident)
        ok = info is not None and info.health == Health.HEALTHY
        return info if ok and all(getattr(info, k) == v for k, v in fields.items()) else None

    return await eventually(probe, timeout=30, what=f"{ident} healthy with {fields}")


# -- 1. output relay, unresponsive children -----------------------------------------------------


async def test_a_long_log_line_does_not_freeze_the_plugin(agent: Agent, client: PluginRegistry,
                                                          messaging: PluginMessaging,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    (ident,) = await agent.load("testplugins:Chatty")
    await healthy(client, ident)
    # One 100 KB line, then ~300 KB more: more than a stalled pipe and reader hold.
    assert (await messaging.send_message("chatty", None, operation="flood", timeout=30)).result == "flooded"
    assert (await messaging.send_message("chatty", "after", operation="mark", timeout=30)).result == "after"
    p = agent.placements[ident]

    async def relayed() -> bool:
        return any(line.endswith("mark after") for line in p.log_tail)

    await eventually(relayed, what="a line logged after the flood to be relayed")
    assert p.state == "running" and p.restarts == 0
    seen: list[str] = []

    async def cut_line_relayed() -> bool:
        seen.extend(capfd.readouterr().err.splitlines())
        return any("long line" in line and "bytes truncated]" in line for line in seen)

    await eventually(cut_line_relayed, what="the long line, cut, on the agent's stderr")
    (long_line,) = [line for line in seen if "long line" in line]
    assert len(long_line) < MAX_LINE + 200 and f"[{ident}] " in long_line
    assert any(line.startswith(f"[{ident}] ") and "line 2499 " in line for line in seen)


async def test_a_child_that_stops_heartbeating_is_killed_and_restarted(
        nc: NATS, nats_server: NatsServer, prefix: str, tmp_path: Path, registry: RegistryService,
        client: PluginRegistry, child_path: None) -> None:
    async with make_agent(nc, nats_server.url, prefix, tmp_path, name="watch-agent", unresponsive_after=2.0) as agent:
        (ident,) = await agent.load("examples.echo:Echo")
        first = await healthy(client, ident)
        os.kill(first.pid, signal.SIGSTOP)  # alive, but deaf: no heartbeats, no replies
        try:
            async def unhealthy() -> PluginInfo | None:
                info = await client.get_plugin(ident)
                ok = info is not None and info.health == Health.UNHEALTHY and info.pid == first.pid
                return info if ok else None

            info = await eventually(unhealthy, what="the registry to call the stopped child unhealthy")
            assert info.health_reason.startswith("no heartbeat")
            again = await healthy(client, ident, restarts=1)
        finally:
            if psutil.pid_exists(first.pid):
                os.kill(first.pid, signal.SIGCONT)
        assert again.id == ident and again.pid != first.pid
        assert not psutil.pid_exists(first.pid) or psutil.Process(first.pid).status() == psutil.STATUS_ZOMBIE
        p = agent.placements[ident]
        assert p.last_error.startswith("no heartbeat for ") and p.last_error.endswith("killed and restarted")
        assert again.last_error == p.last_error  # the restarted host reports why it was restarted


async def test_a_stopped_child_is_stopped_gracefully_not_killed(agent: Agent, client: PluginRegistry) -> None:
    (ident,) = await agent.load("examples.echo:Echo")
    info = await healthy(client, ident)
    proc = agent.placements[ident].proc
    assert proc is not None and proc.pid == info.pid
    os.kill(proc.pid, signal.SIGSTOP)
    # SIGTERM alone waits, pending, until the timeout and a SIGKILL; with SIGCONT the host drains and exits 0.
    assert await agent.unload(ident, timeout=15) == [ident]
    assert proc.returncode == 0
    assert await client.get_plugin(ident) is None


async def test_an_instance_that_says_it_is_unhealthy_is_not_restarted(
        nc: NATS, nats_server: NatsServer, prefix: str, tmp_path: Path, registry: RegistryService,
        client: PluginRegistry, messaging: PluginMessaging, child_path: None) -> None:
    async with make_agent(nc, nats_server.url, prefix, tmp_path, name="watch-agent", unresponsive_after=1.0) as agent:
        (ident,) = await agent.load("testplugins:Moody")
        first = await healthy(client, ident)
        await messaging.send_message("moody", {"status": "unhealthy", "reason": "sulking"}, operation="feel")

        async def sulking() -> PluginInfo | None:
            info = await client.get_plugin(ident)
            return info if info is not None and info.health_reason == "sulking" else None

        await eventually(sulking, what="the plugin's own verdict in the registry")
        # It keeps beating: no restart however long it sulks. Watch for several unresponsive_after.
        start = asyncio.get_running_loop().time()
        while asyncio.get_running_loop().time() - start < 4.0:
            info = await client.get_plugin(ident)
            assert info is not None and info.pid == first.pid and info.restarts == 0, info
            assert info.health == Health.UNHEALTHY and info.health_reason == "sulking"
            await asyncio.sleep(0.2)
        assert agent.placements[ident].restarts == 0


# -- 2. secrets ----------------------------------------------------------------------------------


@pytest.fixture
async def auth_server(tmp_path: Path) -> AsyncIterator[str]:
    """A nats-server (JetStream on) that wants user ``u``, password ``s3cret``; yields that URL."""
    port = free_port()
    conf = tmp_path / "auth.conf"
    conf.write_text(f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
                    'authorization { user: u, password: "s3cret" }\n')
    proc = await asyncio.create_subprocess_exec(find_binary(), "-c", str(conf), stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                                                start_new_session=True)
    try:
        yield f"nats://u:s3cret@127.0.0.1:{port}"
    finally:
        proc.terminate()
        await proc.wait()


async def test_the_nats_password_is_not_on_a_child_command_line(
        auth_server: str, prefix: str, tmp_path: Path, child_path: None, capfd: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    nc = await connect(auth_server, name="test", wait=10)
    try:
        async with RegistryService(nc, prefix=prefix, sweep_interval=0.2), \
                make_agent(nc, auth_server, prefix, tmp_path, name="auth-agent") as agent:
            (ident,) = await agent.load("examples.echo:Echo")
            info = await healthy(PluginRegistry(nc, prefix=prefix), ident)
            child = psutil.Process(info.pid)  # what anyone on the machine can read: /proc/<pid>/cmdline
            cmdline = " ".join(child.cmdline())
            assert "mesh run examples.echo:Echo" in cmdline and "s3cret" not in cmdline, cmdline
            assert child.environ()["MESH_NATS_URL"] == auth_server  # readable by its own user only
    finally:
        await close(nc)
    out, err = capfd.readouterr()
    assert "s3cret" not in out + err + caplog.text


async def test_mesh_agent_hides_the_password_of_a_url_it_cannot_reach(prefix: str) -> None:
    url = f"nats://u:s3cret@127.0.0.1:{free_port()}"
    r = await mesh_cli("agent", "--nats", url, "--name", "nowhere", url=url, prefix=prefix, timeout=60)
    assert r.code == 1 and "cannot reach NATS at nats://u:***@127.0.0.1" in r.err, r.err
    assert "s3cret" not in r.out + r.err


# -- 3. start-up problems are named --------------------------------------------------------------


async def test_load_of_a_missing_module_says_where_it_is_looked_for(agent: Agent, nats_server: NatsServer,
                                                                    prefix: str, tmp_path: Path) -> None:
    r = await mesh_cli("load", "shop.mod:Class", url=nats_server.url, prefix=prefix)
    assert r.code == 1 and "no module named 'shop'" in r.err, r.err
    hint = " ".join(r.err.split())  # rich wraps long lines
    assert "agent 'test-agent'" in hint and str(tmp_path) in hint and "importable there" in hint, hint
    assert agent.placements == {}


async def test_load_timeout_names_the_missing_dependency(agent: Agent, nats_server: NatsServer,
                                                         prefix: str) -> None:
    r = await mesh_cli("load", "testplugins:Needy", "--timeout", "3", url=nats_server.url, prefix=prefix)
    assert r.code == 1 and "not healthy within 3s: needy-" in r.err, r.err
    message = " ".join(r.err.split())
    assert "starting" in message and "tally" in message, message


async def test_wait_healthy_timeout_names_the_missing_dependency(agent: Agent) -> None:
    (ident,) = await agent.load("testplugins:Needy")
    with pytest.raises(RequestTimeout, match=rf"{ident} not healthy within 2s \(starting: .*tally"):
        await agent.wait_healthy(ident, timeout=2)


def test_unresponsive_after_defaults_to_five_beats_and_at_least_ten_seconds() -> None:
    nc = NATS()  # never connected: the constructor only keeps it
    assert Agent(nc, nats_url="nats://x", name="a", heartbeat_interval=2.0).unresponsive_after == 10.0
    assert Agent(nc, nats_url="nats://x", name="a", heartbeat_interval=4.0).unresponsive_after == 20.0
    assert Agent(nc, nats_url="nats://x", name="a", unresponsive_after=3).unresponsive_after == 3

