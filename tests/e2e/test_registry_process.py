"""`mesh registry` as its own process: restart it and nothing is lost; plugins keep beating."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from mesh import NatsServer
from plugin_sdk import PluginRegistry
from tests.conftest import Mesh, eventually, start_registry


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
