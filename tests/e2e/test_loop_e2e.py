"""Real processes on the loop MESH_LOOP chooses: a plugin host on uvloop (when installed) and on
asyncio answers requests, and says at DEBUG which loop it runs; a wrong MESH_LOOP is one line."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from mesh import NatsServer, _loop
from plugin_sdk import PluginMessaging, PluginRegistry
from tests.conftest import ROOT, Mesh, child_env, start_registry

needs_uvloop = pytest.mark.skipif(not _loop.have_uvloop(), reason="uvloop not installed")


@pytest.mark.parametrize("loop", [pytest.param("uvloop", marks=needs_uvloop), "asyncio"])
async def test_a_host_answers_on_the_loop_asked_for(mesh: Mesh, messaging: PluginMessaging, loop: str) -> None:
    p = await mesh.spawn("examples.echo:Echo", env={"MESH_LOOP": loop, "MESH_LOG_LEVEL": "DEBUG"})
    assert (await messaging.send_message("echo", {"loop": loop}, timeout=10)).result == {"loop": loop}
    lines = [line for line in p.log_text().splitlines() if "mesh.loop" in line]
    assert len(lines) == 1 and " DEBUG mesh.loop: event loop: " in lines[0], p.log_text()
    assert lines[0].split("event loop: ")[1].split()[0] == loop


@needs_uvloop
async def test_uvloop_is_the_default_when_installed(mesh: Mesh, messaging: PluginMessaging) -> None:
    env = {"MESH_LOOP": "", "MESH_LOG_LEVEL": "DEBUG"}
    p = await mesh.spawn("examples.echo:Echo", env=env)
    assert (await messaging.send_message("echo", "hi", timeout=10)).result == "hi"
    assert "mesh.loop: event loop: uvloop" in p.log_text()


async def test_the_registry_says_its_loop_at_info(nats_server: NatsServer, prefix: str, client: PluginRegistry,
                                                  tmp_path: Path) -> None:
    log = tmp_path / "registry.log"
    proc = await start_registry(nats_server.url, prefix, log, client, env={"MESH_LOOP": "asyncio"})
    try:
        assert "INFO mesh.loop: event loop: asyncio" in log.read_text()
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)


@pytest.mark.parametrize("command", [["run", "examples.echo:Echo"], ["registry"]])
async def test_a_wrong_value_is_one_line(command: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", *command, "--nats", "nats://127.0.0.1:1", env=child_env(MESH_LOOP="trio"),
        cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert err.decode().strip() == ("error: MESH_LOOP='trio': use one of asyncio, uvloop (unset: uvloop when "
                                    "installed, else asyncio)")
