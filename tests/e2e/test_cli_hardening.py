"""Hardening of the `mesh` command line, each against a real nats-server and real processes."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import psutil

from mesh import NatsServer
from plugin_sdk import PluginRegistry
from tests.conftest import Mesh, child_env, eventually, mesh_cli


def one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


async def test_state_put_over_the_payload_limit_is_one_typed_line(nats_server: NatsServer, prefix: str,
                                                                  tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_text('"' + "x" * 5_000_000 + '"')
    r = await mesh_cli("state", "put", "demo", "big", f"@{big}", url=nats_server.url, prefix=prefix)
    assert r.code == 1 and r.out == "" and one_line(r.err), r.err
    assert "StateTooLarge" in r.err and f"{prefix}_state_demo" in r.err and "'big'" in r.err, r.err
    assert "5000002 bytes" in r.err and "1048576" in r.err, r.err


async def test_version() -> None:
    r = await mesh_cli("--version", url="", prefix="mesh")
    assert r.code == 0 and r.out.startswith("groundhog-mesh 0.1.0 (Python 3.") and r.err == "", r


async def test_the_generated_project_tests_without_warnings(tmp_path: Path) -> None:
    target = tmp_path / "hello"
    r = await mesh_cli("new", "plugin", "hello", "--dir", str(target), url="", prefix="mesh")
    assert r.code == 0, r.err
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=target, env=child_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode()
    assert proc.returncode == 0 and "2 passed" in text, text
    assert "Warning" not in text and "warnings" not in text, text


async def test_a_dead_instances_uptime_stops_at_last_seen(mesh: Mesh, nats_server: NatsServer, prefix: str) -> None:
    p = await mesh.spawn("examples.echo:Echo")
    await mesh.stop(p, signal.SIGKILL)  # no unregistration, no more heartbeats

    async def unhealthy() -> list[dict[str, Any]]:
        r = await mesh_cli("ls", "--json", url=nats_server.url, prefix=prefix)
        rows = json.loads(r.out) if r.code == 0 else []
        return rows if rows and rows[0]["health"] == "unhealthy" else []

    (row,) = await eventually(unhealthy, timeout=30, what="the killed instance to be unhealthy")
    assert row["uptime"] == round(row["last_seen"] - row["started_at"], 3), row


async def test_a_named_plugin_without_instances_is_one_error(registry: object, nats_server: NatsServer,
                                                             prefix: str) -> None:
    for args in (("ls", "ghost"), ("ls", "ghost", "--json"), ("stats", "ghost"), ("stats", "ghost", "--json")):
        r = await mesh_cli(*args, url=nats_server.url, prefix=prefix)
        assert r.code == 1 and r.out == "" and one_line(r.err), (args, r)
        assert "no instance of 'ghost' is registered" in r.err, (args, r.err)
    r = await mesh_cli("ls", url=nats_server.url, prefix=prefix)  # nothing at all is not an error
    assert r.code == 0 and "no plugin instances registered" in r.err, r


GREETER = '''
from plugin_sdk import Plugin

class Greeter(Plugin):
    name = "greeter"

    async def handle_message(self, message):
        return "GREETING"
'''


async def test_reload_says_when_it_failed_and_keeps_the_url_off_the_command_line(
        nats_server: NatsServer, prefix: str, tmp_path: Path, registry: object, client: PluginRegistry) -> None:
    pkg = tmp_path / "greet"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "plugin.py").write_text(GREETER.replace("GREETING", "hello"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", "run", "greet.plugin:Greeter", "--reload", "--nats", nats_server.url,
        "--prefix", prefix, "--heartbeat-interval", "0.3", cwd=tmp_path, env=child_env(),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    said: list[str] = []

    async def next_reload_line() -> str:
        """The watcher's next line about a (re)load; the child's own log lines are skipped."""
        assert proc.stderr is not None
        while True:
            try:
                raw = await asyncio.wait_for(proc.stderr.readline(), 60)
            except TimeoutError:
                raise AssertionError(f"no (re)load line within 60s: {said}") from None
            if not raw:
                raise AssertionError(f"mesh run --reload exited: {said}")
            line = raw.decode().rstrip()
            said.append(line)
            if line.startswith("mesh ") and not line.startswith("mesh watching"):
                return line

    try:
        async def one_healthy() -> bool:
            return [i.health for i in await client.list_plugins("greeter")] == ["healthy"]

        await eventually(one_healthy, timeout=30, what="the first version to register")
        for child in psutil.Process(proc.pid).children(recursive=True):
            cmdline = " ".join(child.cmdline())
            assert nats_server.url not in cmdline and "--nats" not in cmdline, cmdline

        (pkg / "plugin.py").write_text("raise RuntimeError('broken on purpose')\n")
        line = await next_reload_line()
        while line.startswith("mesh serving"):  # the first start's report
            line = await next_reload_line()
        assert "failed" in line and "reloaded" not in line and "still watching" in line, said

        (pkg / "plugin.py").write_text(GREETER.replace("GREETING", "bonjour"))
        line = await next_reload_line()
        assert line.startswith("mesh reloaded greet.plugin:Greeter"), said
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
