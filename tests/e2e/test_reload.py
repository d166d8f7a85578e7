"""`mesh run REF --reload`: new code on every save, same instance id, state kept."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import psutil

from mesh import NatsServer
from plugin_sdk import CommunicationError, PluginMessaging, PluginRegistry
from tests.conftest import child_env, eventually

SOURCE = '''
from plugin_sdk import Plugin

class Greeter(Plugin):
    name = "greeter"

    async def handle_message(self, message):
        assert self.context is not None
        n = await self.context.state.get("n", 0) + 1
        await self.context.state.put("n", n)
        return {"says": "GREETING", "n": n}
'''


async def test_reload_on_change_keeps_state_and_id(nats_server: NatsServer, prefix: str, tmp_path: Path,
                                                   registry: object, client: PluginRegistry,
                                                   messaging: PluginMessaging) -> None:
    pkg = tmp_path / "greet"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "plugin.py").write_text(SOURCE.replace("GREETING", "hello"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", "run", "greet.plugin:Greeter", "--reload", "--nats", nats_server.url,
        "--prefix", prefix, "--heartbeat-interval", "0.3", cwd=tmp_path, env=child_env(),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async def says(word: str) -> bool:
            try:
                reply = await messaging.send_message("greeter", timeout=1)
            except CommunicationError:  # between two processes
                return False
            return bool(reply.result["says"] == word)

        await eventually(lambda: says("hello"), timeout=30, what="the first version")
        (first,) = await client.list_plugins("greeter")
        (pkg / "plugin.py").write_text(SOURCE.replace("GREETING", "bonjour"))
        await eventually(lambda: says("bonjour"), timeout=30, what="the reloaded version")
        reply = await messaging.send_message("greeter")
        assert reply.result["n"] >= 3  # the count in KV survived the reload

        async def same_id_healthy() -> bool:
            infos = await client.list_plugins("greeter")
            return [(i.id, i.health) for i in infos] == [(first.id, "healthy")]

        await eventually(same_id_healthy, timeout=10, what="one healthy instance with the same id")
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        _, alive = await asyncio.to_thread(psutil.wait_procs, children, timeout=10)
        assert alive == []
        assert proc.stderr is not None
        assert b"reloaded greet.plugin:Greeter" in await proc.stderr.read()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
