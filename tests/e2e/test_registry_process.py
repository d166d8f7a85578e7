"""`mesh registry` as its own process: restart it and nothing is lost; plugins keep beating."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from mesh import NatsServer
from plugin_sdk import PluginNotFound, PluginRegistry
from tests.conftest import Mesh, child_env, eventually


async def start_registry(url: str, prefix: str, log: Path, client: PluginRegistry) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh", "registry", "--nats", url, "--prefix", prefix,
            env=child_env(), stdout=out, stderr=out)

    async def serving() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"mesh registry exited with {proc.returncode}: see {log}")
        try:
            await client.list_plugins()
            return True
        except PluginNotFound:  # not subscribed yet
            return False

    await eventually(serving, timeout=20, what="mesh registry to serve")
    return proc


async def test_registry_process_restart_loses_nothing(nats_server: NatsServer, prefix: str, tmp_path: Path,
                                                      client: PluginRegistry) -> None:
    log = tmp_path / "registry.log"
    reg = await start_registry(nats_server.url, prefix, log, client)
    m = Mesh(nats_server.url, prefix, tmp_path, client)
    try:
        echo = await m.spawn("examples.echo:Echo")
        counter = await m.spawn("examples.counter:Counter")
        before = {i.id: (i.name, i.version) for i in await client.list_plugins()}
        assert set(before) == {echo.info.id, counter.info.id}  # type: ignore[union-attr]

        reg.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(reg.wait(), 20) == 0
        reg = await start_registry(nats_server.url, prefix, log, client)

        async def all_back_and_healthy() -> bool:
            infos = await client.list_plugins()
            return {i.id: (i.name, i.version) for i in infos} == before and all(
                i.health == "healthy" for i in infos)

        await eventually(all_back_and_healthy, timeout=20, what="the same instances after a registry restart")
        assert [r.name for r in await client.list_versions()] == ["counter", "echo"]
    finally:
        await m.close()
        if reg.returncode is None:
            reg.send_signal(signal.SIGTERM)
            await asyncio.wait_for(reg.wait(), 20)
