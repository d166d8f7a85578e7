"""The `mesh` command line, run as a real subprocess against real plugins."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import psutil

from mesh import NatsServer
from plugin_sdk import PluginMessaging
from tests.conftest import ROOT, Mesh, child_env, eventually, mesh_cli


async def test_send_ls_broadcast_state(mesh: Mesh, nats_server: NatsServer, prefix: str) -> None:
    echo = await mesh.spawn("examples.echo:Echo")
    await mesh.spawn("examples.counter:Counter")
    url = nats_server.url

    r = await mesh_cli("send", "echo", '{"text": "hi"}', url=url, prefix=prefix)
    assert (r.code, json.loads(r.out)) == (0, {"text": "hi"})

    r = await mesh_cli("send", "counter", "--op", "increment", '{"by": 4}', url=url, prefix=prefix)
    assert json.loads(r.out) == {"total": 4}
    r = await mesh_cli("state", "get", "counter", "total", url=url, prefix=prefix)
    assert (r.code, json.loads(r.out)) == (0, 4)
    r = await mesh_cli("state", "keys", "counter", url=url, prefix=prefix)
    assert json.loads(r.out) == ["total"]

    r = await mesh_cli("ls", "--json", url=url, prefix=prefix)
    rows = json.loads(r.out)
    assert {row["name"] for row in rows} == {"echo", "counter"}
    for row in rows:
        assert {"id", "name", "version", "capabilities", "dependencies", "health"} <= set(row)
        assert row["health"] == "healthy"
    r = await mesh_cli("ls", url=url, prefix=prefix)
    assert r.code == 0 and echo.info.id in r.out and "healthy" in r.out  # type: ignore[union-attr]

    r = await mesh_cli("broadcast", '{"ping": true}', "--json", url=url, prefix=prefix)
    result = json.loads(r.out)
    assert r.code == 0 and result["missing"] == [] and len(result["replies"]) == 2

    r = await mesh_cli("send", "echo", "-", url=url, prefix=prefix, stdin=b'{"from": "stdin"}')
    assert json.loads(r.out) == {"from": "stdin"}


async def test_events_and_publish(mesh: Mesh, nats_server: NatsServer, prefix: str,
                                  messaging: PluginMessaging) -> None:
    url = nats_server.url
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", "events", "orders.>", "--count", "2", "--timeout", "20",
        env=child_env(MESH_NATS_URL=url, MESH_PREFIX=prefix), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    assert b"listening" in await asyncio.wait_for(proc.stderr.readline(), 20)  # subscribed: now publish
    r = await mesh_cli("publish", "orders.created", '{"id": 7}', url=url, prefix=prefix)
    assert r.code == 0
    await messaging.publish_event("users.created", {"id": 8})  # not matched
    await messaging.publish_event("orders.eu.shipped", {"id": 9})
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert [(e["type"], e["payload"], e["source"]) for e in lines] == [
        ("orders.created", {"id": 7}, "cli"), ("orders.eu.shipped", {"id": 9}, "test")]


async def test_cli_errors_are_one_clear_line(mesh: Mesh, nats_server: NatsServer, prefix: str) -> None:
    await mesh.spawn("testplugins:Faulty")
    url = nats_server.url
    cases = [
        (("send", "ghost", "{}"), "PluginNotFound: no plugin instance serves 'ghost'"),
        (("send", "faulty", "{not json"), "payload is not valid JSON"),
        (("send", "faulty", "--op", "boom"), "HandlerError: ValueError: kaboom"),
        (("send", "faulty", "--op", "full"), "ResourceError: disk full"),
        (("send", "faulty", "--op", "hang", "--timeout", "0.3"), "RequestTimeout: no reply from 'faulty' within 0.3s"),
        (("state", "get", "nobody", "k"), "plugin 'nobody' has no state"),
        (("events", "bad pattern!"), "invalid event pattern"),
        (("send", "faulty", "@/nonexistent.json"), "cannot read payload file"),
    ]
    for args, expected in cases:
        r = await mesh_cli(*args, url=url, prefix=prefix)
        assert r.code == 1, (args, r)
        assert r.out == "", (args, r.out)
        assert expected in r.err, (args, r.err)
        assert "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1, (args, r.err)


async def test_no_server_reachable(prefix: str) -> None:
    r = await mesh_cli("ls", url="nats://127.0.0.1:1", prefix=prefix)
    assert r.code == 1
    assert "cannot reach NATS at nats://127.0.0.1:1" in r.err and "Traceback" not in r.err


async def test_run_refuses_invalid_config_and_bad_refs(nats_server: NatsServer, prefix: str, tmp_path: Path) -> None:
    bad = tmp_path / "plugin.toml"
    bad.write_text('version = "one"\nspeed = 3\n')
    r = await mesh_cli("run", "examples.echo:Echo", "--config", str(bad), url=nats_server.url, prefix=prefix)
    assert r.code == 1
    assert str(bad) in r.err and "version" in r.err and "speed" in r.err and "Traceback" not in r.err
    for ref, expected in [("nowhere:Thing", "no module named 'nowhere'"),
                          ("examples.echo:Nope", "has no attribute 'Nope'"),
                          ("no-such-entry-point", "no entry point of that name")]:
        r = await mesh_cli("run", ref, url=nats_server.url, prefix=prefix)
        assert r.code == 1 and expected in r.err and "Traceback" not in r.err, r.err


async def test_run_by_entry_point_name(mesh: Mesh, tmp_path: Path, messaging: PluginMessaging) -> None:
    # A real installed-distribution entry point, found through importlib.metadata.
    site = tmp_path / "site"
    dist = site / "hello_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hello-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[groundhog.plugins]\nhello = hello_plugin:Hello\n")
    (site / "hello_plugin.py").write_text(
        "from plugin_sdk import Plugin\n\nclass Hello(Plugin):\n    name = 'hello'\n    version = '3.0.0'\n\n"
        "    async def handle_message(self, message):\n        return 'hello ' + message.payload\n")
    await mesh.spawn("hello", env={"PYTHONPATH": f"{site}:{child_env()['PYTHONPATH']}"})
    assert (await messaging.send_message("hello", "world")).result == "hello world"


async def test_mesh_up_runs_everything_and_ctrl_c_stops_it_all(tmp_path: Path, prefix: str) -> None:
    from mesh import free_port

    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", "up", "--port", str(port), "--data-dir", str(tmp_path / "data"),
        cwd=ROOT, env=child_env(MESH_PREFIX=prefix, MESH_HEARTBEAT_INTERVAL="0.3"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async def three_healthy() -> list[dict[str, object]]:
            if proc.returncode is not None:
                raise AssertionError(f"mesh up exited with {proc.returncode}")
            r = await mesh_cli("ls", "--json", url=url, prefix=prefix)
            rows = json.loads(r.out) if r.code == 0 else []
            return rows if sorted(str(x["name"]) for x in rows if x["health"] == "healthy") == [
                "counter", "echo", "listener"] else []

        rows = await eventually(three_healthy, timeout=60, what="mesh up's three plugins")
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) == 4  # nats-server + three plugin hosts
        r = await mesh_cli("send", "echo", '{"text": "hi"}', url=url, prefix=prefix)
        assert json.loads(r.out) == {"text": "hi"}
        assert {int(str(x["pid"])) for x in rows} <= {c.pid for c in children}

        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        _, alive = await asyncio.to_thread(psutil.wait_procs, children, timeout=10)
        assert alive == [], f"left running: {alive}"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_mesh_up_refusals_are_one_line(tmp_path: Path, prefix: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[mesh]\nprefix = "no spaces allowed"\n')
    r = await mesh_cli("up", "--file", str(bad), "--data-dir", str(tmp_path / "d"), url="", prefix=prefix)
    assert r.code == 1 and "invalid mesh prefix" in r.err and str(bad) in r.err and "Traceback" not in r.err
    bad.write_text('[[plugins]]\nref = "examples.echo:Echo"\ncount = 2\n')
    r = await mesh_cli("up", "--file", str(bad), "--data-dir", str(tmp_path / "d"), url="", prefix=prefix)
    assert r.code == 1 and "plugins.0.count" in r.err and "Traceback" not in r.err
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", "up", "--data-dir", str(tmp_path / "d"), "--file", str(tmp_path / "none.toml"),
        env=child_env(MESH_PREFIX=prefix), stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1 and b"none.toml: no such file" in err
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", "up", "--data-dir", str(tmp_path / "d"), "--port", "0",
        env=child_env(MESH_PREFIX=prefix, MESH_NATS_SERVER=str(tmp_path / "missing-binary")),
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, cwd=tmp_path)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1 and b"cannot run nats-server" in err and b"Traceback" not in err


async def test_state_and_registry_errors_name_the_cause(nats_server: NatsServer, prefix: str) -> None:
    r = await mesh_cli("state", "put", "a.b", "k", "1", url=nats_server.url, prefix=prefix)
    assert r.code == 1 and "invalid plugin name 'a.b'" in r.err
    r = await mesh_cli("ls", url=nats_server.url, prefix=prefix)  # no registry on this prefix
    assert r.code == 1 and f"no registry is running for mesh {prefix!r}" in r.err


async def test_help_texts_show_the_environment_variables() -> None:
    r = await mesh_cli("ls", "--help", url="", prefix="mesh")
    assert "MESH_NATS_URL" in r.out and "MESH_PREFIX" in r.out


async def test_mesh_up_refuses_a_dependency_cycle_before_starting(tmp_path: Path, prefix: str) -> None:
    (tmp_path / "cyc.py").write_text(
        "from plugin_sdk import Plugin\n"
        "class A(Plugin):\n    name = 'a'\n    dependencies = ['b']\n"
        "class B(Plugin):\n    name = 'b'\n    dependencies = ['c']\n"
        "class C(Plugin):\n    name = 'c'\n    dependencies = ['a']\n")
    (tmp_path / "mesh.toml").write_text(
        '[[plugins]]\nref = "cyc:A"\n[[plugins]]\nref = "cyc:B"\n[[plugins]]\nref = "cyc:C"\n')
    r = await mesh_cli("up", "--data-dir", str(tmp_path / "data"), url="", prefix=prefix, cwd=tmp_path)
    assert r.code == 1 and "DependencyError" in r.err and "dependency cycle a -> b -> c -> a" in r.err
    assert not (tmp_path / "data" / "nats-server.log").exists()  # refused before anything started


async def test_mesh_up_refuses_another_protocol_before_starting(tmp_path: Path, prefix: str) -> None:
    (tmp_path / "future.py").write_text("from plugin_sdk import Plugin\nclass F(Plugin):\n    name = 'f'\n"
                                        "    protocol = '2'\n")
    (tmp_path / "mesh.toml").write_text('[[plugins]]\nref = "future:F"\n')
    r = await mesh_cli("up", "--data-dir", str(tmp_path / "data"), url="", prefix=prefix, cwd=tmp_path)
    assert r.code == 1 and "built for mesh protocol 2; this host speaks 1" in r.err
    assert not (tmp_path / "data" / "nats-server.log").exists()
