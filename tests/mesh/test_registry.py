"""The registry service: versions, health from heartbeats, replicas, restarts."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from mesh import NatsServer, RegistryService, close, connect, free_port
from plugin_sdk import (
    CommunicationError,
    Health,
    InitializationError,
    InvalidMessage,
    PluginInfo,
    PluginMessaging,
    PluginRegistry,
)
from tests.conftest import eventually


def info(ident: str, name: str = "svc", version: str = "1.0.0", interval: float = 0.2) -> PluginInfo:
    return PluginInfo(id=ident, name=name, version=version, capabilities=["c"], heartbeat_interval=interval)


async def test_every_version_is_tracked(registry: RegistryService, client: PluginRegistry) -> None:
    await client.register_plugin(info("svc-a", version="1.0.0"))
    await client.register_plugin(info("svc-b", version="1.1.0"))
    await client.register_plugin(info("svc-c", version="1.0.0"))
    await client.unregister_plugin("svc-a")
    records = await client.list_versions("svc")
    assert [(r.version, r.instances_seen) for r in records] == [("1.0.0", 2), ("1.1.0", 1)]
    assert {i.id for i in await client.list_plugins("svc")} == {"svc-b", "svc-c"}


async def test_missed_heartbeats_turn_unhealthy_then_beats_heal(registry: RegistryService,
                                                                client: PluginRegistry) -> None:
    await client.register_plugin(info("svc-1", interval=0.2))
    assert (await client.get_plugin("svc-1")).health == "healthy"  # type: ignore[union-attr]

    async def unhealthy() -> bool:
        found = await client.get_plugin("svc-1")
        return found is not None and found.health == "unhealthy"

    await eventually(unhealthy, timeout=5, what="unhealthy after missed beats")
    assert await client.list_plugins(healthy_only=True) == []
    await client.heartbeat(info("svc-1", interval=0.2))

    async def healthy() -> bool:
        found = await client.get_plugin("svc-1")
        return found is not None and found.health == "healthy"

    await eventually(healthy, timeout=5, what="healthy again after a beat")


async def test_silent_instances_are_forgotten(nc: NATS, prefix: str) -> None:
    async with RegistryService(nc, prefix=prefix, expire_after=0.5, sweep_interval=0.1):
        client = PluginRegistry(nc, prefix=prefix)
        await client.register_plugin(info("svc-old", interval=0.1))

        async def gone() -> bool:
            return await client.get_plugin("svc-old") is None

        await eventually(gone, timeout=5, what="expiry")
        assert await client.list_plugins() == []


async def test_restart_loses_nothing_and_replicas_agree(nc: NATS, prefix: str) -> None:
    client = PluginRegistry(nc, prefix=prefix)
    async with RegistryService(nc, prefix=prefix):
        for i in range(5):
            await client.register_plugin(info(f"svc-{i}", version=f"1.{i}.0", interval=30))
        before = {i.id: i.version for i in await client.list_plugins()}
    # Nothing serves now; a fresh replica (as after a restart) reads it all back from KV.
    async with RegistryService(nc, prefix=prefix) as a, RegistryService(nc, prefix=prefix):
        assert {i.id: i.version for i in await client.list_plugins()} == before
        assert len(await client.list_versions("svc")) == 5
        # A write through one replica is seen by the other (queue group spreads the reads).
        await client.register_plugin(info("svc-new", interval=30))

        async def both_see_it() -> bool:
            return all([len(await client.list_plugins()) == 6 for _ in range(6)])

        await eventually(both_see_it, timeout=5, what="replicas to converge")
        assert "svc-new" in a.instance_ids


async def test_heartbeat_registers_an_instance_the_registry_never_saw(registry: RegistryService,
                                                                      client: PluginRegistry) -> None:
    # As when the registry was down while the plugin started.
    await client.heartbeat(info("svc-late", interval=30))

    async def known() -> PluginInfo | None:
        return await client.get_plugin("svc-late")

    found = await eventually(known, timeout=5, what="registration from a heartbeat")
    assert found.last_seen <= time.time()
    assert [r.version for r in await client.list_versions("svc")] == ["1.0.0"]


async def test_bad_registry_requests_get_typed_errors(nc: NATS, prefix: str, registry: RegistryService) -> None:
    client = PluginRegistry(nc, prefix=prefix)
    with pytest.raises(InvalidMessage):
        await client._call("register", {"id": "x"})  # no name, no version
    with pytest.raises(InvalidMessage, match="string 'id'"):
        await client._call("unregister", [1, 2])
    reply = await nc.request(f"{prefix}.registry.list", b"{oops", timeout=2)
    assert reply.headers is not None and reply.headers["Nats-Service-Error-Code"] == "400"
    assert await client.list_plugins() == []  # and it keeps serving


async def test_replica_caches_follow_writes_after_a_server_restart(tmp_path: Path) -> None:
    server = NatsServer(tmp_path, port=free_port())
    server.start()
    conns = [await connect(server.url, name=f"replica-{i}") for i in range(2)]
    try:
        a, b = (RegistryService(nc, prefix="r", sweep_interval=0.1) for nc in conns)
        async with a, b:
            client = PluginRegistry(conns[0], prefix="r")
            await client.register_plugin(info("svc-1", interval=30))
            await eventually(lambda: _true("svc-1" in b.instance_ids), what="replica b to see svc-1")

            await asyncio.to_thread(server.stop)
            await server.astart()  # same port and store
            await eventually(lambda: _true(all(nc.is_connected for nc in conns)), what="reconnect")

            async def registered() -> bool:
                try:
                    await client.register_plugin(info("svc-2", interval=30))
                    return True
                except CommunicationError:  # replicas still resubscribing
                    return False

            await eventually(registered, timeout=15, what="a write after the restart")
            # Whichever replica took the write, the other one's cache follows it.
            await eventually(lambda: _true({"svc-1", "svc-2"} <= set(a.instance_ids) and
                                           {"svc-1", "svc-2"} <= set(b.instance_ids)),
                             timeout=15, what="both caches to hold svc-1 and svc-2")
            assert {i.id for i in await client.list_plugins()} == {"svc-1", "svc-2"}
    finally:
        for nc in conns:
            await close(nc)
        server.stop()


async def _true(value: bool) -> bool:
    return value


def test_older_news_never_overwrites_newer() -> None:
    from mesh._registry import _Cache

    cache = _Cache()
    cache.apply("instances.svc-1", None, 11, "DEL")  # the unregister, seen first
    cache.set_instance(info("svc-1"), 10)  # a heartbeat's write that was acknowledged before it
    assert "svc-1" not in cache.instances
    cache.set_instance(info("svc-1"), 12)  # a genuinely newer registration
    assert "svc-1" in cache.instances
    cache.apply("instances.svc-1", info("svc-1").model_dump_json().encode(), 12, None)  # the same, via the watcher
    cache.apply("instances.svc-1", None, 13, "DEL")
    assert cache.instances == {}


async def test_last_beat_racing_unregister_leaves_no_ghost(nc: NATS, prefix: str) -> None:
    async with RegistryService(nc, prefix=prefix) as a, RegistryService(nc, prefix=prefix) as b:
        client = PluginRegistry(nc, prefix=prefix)
        ids = [f"svc-{i}" for i in range(20)]
        for ident in ids:
            await client.register_plugin(info(ident, interval=30))
        stopping = [info(i, interval=30).model_copy(update={"health": Health.STOPPING}) for i in ids]
        await asyncio.gather(*(client.heartbeat(s) for s in stopping),
                             *(client.unregister_plugin(i) for i in ids))

        async def all_gone() -> bool:
            return not a.instance_ids and not b.instance_ids and await client.list_plugins() == []

        await eventually(all_gone, timeout=5, what="no ghost instances on either replica")
        assert await client.list_versions("svc") != []  # the history of versions stays


async def test_health_changes_are_announced_once_across_replicas(nc: NATS, prefix: str) -> None:
    messaging = PluginMessaging(nc, prefix=prefix, source="test")
    async with RegistryService(nc, prefix=prefix, sweep_interval=0.05), \
            RegistryService(nc, prefix=prefix, sweep_interval=0.05), \
            await messaging.subscribe_to_events("mesh.health.svc") as events:
        client = PluginRegistry(nc, prefix=prefix)
        await client.register_plugin(info("svc-1", interval=0.1))
        first = await events.next(timeout=5)
        assert (first.payload["id"], first.payload["health"], first.payload["previous"]) == (
            "svc-1", "healthy", "absent")
        silent = await events.next(timeout=5)  # no beats: the sweepers notice
        assert (silent.payload["health"], silent.payload["previous"]) == ("unhealthy", "healthy")
        await client.heartbeat(info("svc-1", interval=30))
        back = await events.next(timeout=5)
        assert (back.payload["health"], back.payload["previous"]) == ("healthy", "unhealthy")
        await client.unregister_plugin("svc-1")
        gone = await events.next(timeout=5)
        assert gone.payload["gone"] is True
        with pytest.raises(TimeoutError):  # two replicas, yet every change was announced once
            await events.next(timeout=0.5)


async def test_a_registry_whose_watcher_cannot_start_fails_to_start_saying_so(tmp_path: Path) -> None:
    # The KV watcher (a JetStream consumer) is refused: start() used to wait for it forever.
    conf = ('authorization: { users: [ {user: reg, password: pw, '
            'permissions: { publish: { deny: ["$JS.API.CONSUMER.>"] } } } ] }')
    server = NatsServer(tmp_path / "nats", config=conf)
    await server.astart()
    nc = await connect(f"nats://reg:pw@127.0.0.1:{server.port}", name="test")
    try:
        service = RegistryService(nc, prefix="denied")
        with pytest.raises(InitializationError, match="the registry cannot start: the bucket was not loaded within 2s"):
            await asyncio.wait_for(service.start(ready_timeout=2), 30)  # (the hang guard; the bound is 2 s)
        assert service.instance_ids == set()
    finally:
        await close(nc)
        server.stop()


async def test_a_sweep_that_raises_is_logged_and_the_sweeper_goes_on(
        nc: NATS, prefix: str, client: PluginRegistry, caplog: pytest.LogCaptureFixture) -> None:
    failures = 0

    class Flaky(RegistryService):
        async def _sweep(self) -> None:
            nonlocal failures
            failures += 1
            if failures <= 3:
                raise RuntimeError(f"sweep {failures} went wrong")
            await super()._sweep()

    async with Flaky(nc, prefix=prefix, sweep_interval=0.05, missed_beats=1) as service:
        await client.register_plugin(info("svc-late", interval=0.1))

        async def marked() -> bool:  # only a sweep that runs again marks the silent instance
            found = await client.get_plugin("svc-late")
            return found is not None and found.health == Health.UNHEALTHY

        await eventually(marked, what="the sweeper to carry on after its failures")
        assert not service.failed.is_set()
    assert "registry sweep failed (it will run again" in caplog.text


async def test_an_instance_subject_writes_only_that_instances_entry(
        nc: NATS, prefix: str, registry: RegistryService, client: PluginRegistry) -> None:
    from plugin_sdk import PermissionDenied
    from plugin_sdk.host import Subjects, dumps, request, response_from_msg

    subjects = Subjects(prefix)
    await client.register_plugin(info("victim-1"))  # (the SDK writes on register.victim-1)
    assert (await client.get_plugin("victim-1")) is not None
    # From the subject of "rogue-1", an attempt at the victim's entry is refused, naming both.
    for verb, body in (("register", info("victim-1").model_dump(mode="json")), ("unregister", {"id": "victim-1"})):
        reply = await request(nc, subjects.registry_own(verb, "rogue-1"), dumps(body), headers=None, timeout=5)
        with pytest.raises(PermissionDenied, match=r"may change only the entry of 'rogue-1', not 'victim-1'"):
            response_from_msg(reply).raise_for_error()
    await nc.publish(subjects.registry_own("heartbeat", "rogue-1"),
                     dumps(info("victim-1", version="6.6.6").model_dump(mode="json")))
    # Beats on one subscription are handled in order: once a later, legitimate one has landed, the
    # forged one has been dealt with.
    await client.heartbeat(info("marker-1"))

    async def marker() -> bool:
        return await client.get_plugin("marker-1") is not None

    await eventually(marker, what="the later heartbeat to land")
    victim = await client.get_plugin("victim-1")
    assert victim is not None and victim.version == "1.0.0"  # neither overwritten nor removed


async def test_reads_are_served_on_the_direct_path_and_writes_in_order(nc: NATS, prefix: str,
                                                                       registry: RegistryService,
                                                                       client: PluginRegistry) -> None:
    # A broadcast's lookup (list) goes through the reader straight to its handler, with no queue or
    # task hop of nats-py's; writes stay nats-py callbacks, one at a time and in order.
    direct = {sub.subject for sub in registry._subs if sub._id in nc._direct}  # type: ignore[attr-defined]
    assert {f"{prefix}.registry.{verb}" for verb in ("get", "list", "versions")} <= direct, direct
    assert not {f"{prefix}.registry.register", f"{prefix}.registry.unregister"} & direct, direct
    await client.register_plugin(info("svc-1", interval=30))
    answers = await asyncio.gather(*(client.list_ids() for _ in range(50)), client.get_plugin("svc-1"))
    assert all(ids == ["svc-1"] for ids in answers[:-1]) and answers[-1].id == "svc-1"  # type: ignore[union-attr]
    assert not registry._reads  # every read answered and let go
