"""Plugins as real `mesh run` processes on a real nats-server."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter as Tally
from pathlib import Path

import nats.errors
import pytest

from mesh import NatsServer, RegistryService, close, connect, free_port
from plugin_sdk import CommunicationError, HandlerError, PluginMessaging, PluginRegistry, RequestTimeout, ResourceError
from tests.conftest import HEARTBEAT, Mesh, eventually


async def test_two_processes_exchange_direct_messages(mesh: Mesh, messaging: PluginMessaging) -> None:
    echo = await mesh.spawn("examples.echo:Echo")
    relay = await mesh.spawn("testplugins:Relay")
    response = await messaging.send_message("relay", {"to": "echo", "body": {"text": "hi"}}, timeout=10)
    assert response.result == {"via": relay.info.id, "reply": {"text": "hi"}}  # type: ignore[union-attr]
    response = await messaging.send_message("relay", {"to": "echo", "body": None, "op": "whoami"}, timeout=10)
    assert response.result == {"via": relay.info.id, "reply": {"instance": echo.info.id}}  # type: ignore[union-attr]
    # And straight to one instance by id.
    direct = await messaging.send_message(f"echo.{echo.info.id}", {"n": 1})  # type: ignore[union-attr]
    assert direct.result == {"n": 1}


async def test_load_balancing_across_two_instances(mesh: Mesh, messaging: PluginMessaging) -> None:
    a, b = await asyncio.gather(mesh.spawn("examples.echo:Echo"), mesh.spawn("examples.echo:Echo"))
    seen = Tally()
    for _ in range(60):
        seen[(await messaging.send_message("echo", operation="whoami")).result["instance"]] += 1
    assert set(seen) == {a.info.id, b.info.id}, seen  # type: ignore[union-attr]
    assert min(seen.values()) >= 5, seen


async def test_broadcast_across_three_instances(mesh: Mesh, messaging: PluginMessaging) -> None:
    procs = await asyncio.gather(*(mesh.spawn("examples.echo:Echo") for _ in range(3)))
    ids = {p.info.id for p in procs}  # type: ignore[union-attr]
    result = await messaging.broadcast_message({"ping": True}, timeout=10)
    assert {r.source for r in result} == ids
    assert all(r.result == {"ping": True} for r in result)
    assert result.missing == []

    # An instance that stops answering is named as missing once the timeout passes.
    procs[0].proc.send_signal(signal.SIGSTOP)
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        result = await messaging.broadcast_message({"ping": 2}, timeout=1.0)
        assert loop.time() - t0 >= 0.9
        assert result.missing == [procs[0].info.id]  # type: ignore[union-attr]
        assert {r.source for r in result} == ids - {procs[0].info.id}  # type: ignore[union-attr]
    finally:
        procs[0].proc.send_signal(signal.SIGCONT)


async def test_events_with_wildcards_across_processes(mesh: Mesh, messaging: PluginMessaging) -> None:
    await mesh.spawn("examples.listener:Listener")
    await mesh.spawn("examples.counter:Counter")
    async with await messaging.subscribe_to_events("counter.>") as mine:
        await messaging.send_message("counter", {"by": 3}, operation="increment")
        await messaging.publish_event("orders.eu.created", {"id": 7})
        await messaging.publish_event("billing.paid", {"id": 8})  # matches nobody
        mine_event = await mine.next(timeout=5)
    assert (mine_event.target, mine_event.payload, mine_event.source) == ("counter.changed", {"total": 3, "by": 3},
                                                                         "counter")

    async def listener_saw_both() -> list[object]:
        seen = (await messaging.send_message("listener")).result
        return seen if len(seen) >= 2 else []

    seen = await eventually(listener_saw_both, timeout=5, what="listener to get both events")
    assert sorted(e["type"] for e in seen) == ["counter.changed", "orders.eu.created"]


async def test_plugin_errors_cross_processes_typed(mesh: Mesh, messaging: PluginMessaging) -> None:
    await mesh.spawn("testplugins:Faulty")
    with pytest.raises(HandlerError) as info:
        await messaging.send_message("faulty", operation="boom")
    assert info.value.remote_type == "ValueError" and "kaboom" in str(info.value)
    with pytest.raises(ResourceError, match="disk full"):
        await messaging.send_message("faulty", operation="full")
    with pytest.raises(RequestTimeout):
        await messaging.send_message("faulty", operation="hang", timeout=0.3)
    assert (await messaging.send_message("faulty", operation="ok")).result == {"ok": True}


async def test_sigterm_drains_runs_lifecycle_in_order_and_unregisters(mesh: Mesh, client: PluginRegistry,
                                                                      messaging: PluginMessaging,
                                                                      tmp_path: Path) -> None:
    log = tmp_path / "lifecycle.jsonl"
    p = await mesh.spawn("testplugins:Recorder", env={"RECORDER_LOG": str(log)})
    # A message in flight when SIGTERM arrives is still answered.
    slow = asyncio.create_task(messaging.send_message("recorder", {"slow": 0.5}, timeout=10))
    await eventually(lambda: _async(log.exists() and "handle" in log.read_text()), what="handler to start")
    p.proc.send_signal(signal.SIGTERM)
    assert (await slow).result == "noted"
    assert await asyncio.wait_for(p.proc.wait(), 20) == 0
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    assert steps == ["initialize", "start", "handle", "handled-slow", "stop", "cleanup"]
    assert await client.list_plugins("recorder") == []


async def test_cleanup_runs_even_when_stop_raises(mesh: Mesh, client: PluginRegistry, tmp_path: Path) -> None:
    log = tmp_path / "lifecycle.jsonl"
    p = await mesh.spawn("testplugins:Recorder", env={"RECORDER_LOG": str(log), "RECORDER_STOP_RAISES": "1"})
    code = await mesh.stop(p)
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    assert steps == ["initialize", "start", "stop", "cleanup"]
    assert code == 1  # reported, not hidden
    assert "stop failed on purpose" in p.log_text()
    assert await client.list_plugins("recorder") == []


async def test_sigkilled_instance_turns_unhealthy(mesh: Mesh, client: PluginRegistry) -> None:
    p = await mesh.spawn("examples.echo:Echo")
    p.proc.send_signal(signal.SIGKILL)
    await p.proc.wait()
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def unhealthy() -> bool:
        found = await client.get_plugin(p.info.id)  # type: ignore[union-attr]
        return found is not None and found.health == "unhealthy"

    await eventually(unhealthy, timeout=10, what="unhealthy after SIGKILL")
    assert loop.time() - t0 < 10 * HEARTBEAT + 2  # a few heartbeat intervals, not minutes


async def test_state_survives_plugin_kill_and_restart(mesh: Mesh, messaging: PluginMessaging) -> None:
    p = await mesh.spawn("examples.counter:Counter")
    for _ in range(5):
        await messaging.send_message("counter", {"by": 2}, operation="increment")
    p.proc.send_signal(signal.SIGKILL)  # acknowledged writes must survive a crash
    await p.proc.wait()
    await mesh.spawn("examples.counter:Counter")
    assert (await messaging.send_message("counter", operation="get")).result == {"total": 10}


async def test_state_and_registry_survive_nats_server_restart(tmp_path: Path, prefix: str) -> None:
    server = NatsServer(tmp_path / "nats", port=free_port())
    server.start()
    try:
        nc = await connect(server.url, name="test")
        try:
            client = PluginRegistry(nc, prefix=prefix)
            async with RegistryService(nc, prefix=prefix):
                m = Mesh(server.url, prefix, tmp_path, client)
                try:
                    counter = await m.spawn("examples.counter:Counter")
                    messaging = PluginMessaging(nc, prefix=prefix, source="test")
                    await messaging.send_message("counter", {"by": 5}, operation="increment")
                    versions_before = await client.list_versions()

                    await asyncio.to_thread(server.stop)
                    await server.astart()  # same port, same store

                    async def answers() -> object:
                        try:
                            return (await messaging.send_message("counter", operation="get", timeout=1)).result
                        except (CommunicationError, nats.errors.Error):  # reconnecting: ask again
                            return None

                    assert await eventually(answers, timeout=30, what="counter after restart") == {"total": 5}
                    await messaging.send_message("counter", {"by": 1}, operation="increment")
                    assert (await messaging.send_message("counter", operation="get")).result == {"total": 6}
                    assert await client.list_versions() == versions_before

                    # The plugin reconnected by itself: same process, same instance, beating again.
                    async def healthy_again() -> bool:
                        info = await client.get_plugin(counter.info.id)  # type: ignore[union-attr]
                        return info is not None and info.health == "healthy" and info.pid == counter.pid

                    await eventually(healthy_again, timeout=15, what="the same instance healthy again")
                    assert counter.proc.returncode is None
                finally:
                    await m.close()
        finally:
            await close(nc)
    finally:
        server.stop()


async def _async(value: bool) -> bool:
    return value
