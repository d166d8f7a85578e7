"""Events: envelope and metadata round trip, bad events dropped, a raising handler keeps its subscription."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from plugin_sdk import Message, Plugin, PluginMessaging, PluginRuntime, on_event
from tests.conftest import eventually


async def test_metadata_and_source_travel_with_events(nc: NATS, prefix: str, messaging: PluginMessaging) -> None:
    async with await messaging.subscribe_to_events("a.>") as sub:
        await messaging.publish_event("a.b.c", [1, "two"], metadata={"tenant": "acme"})
        await messaging.publish_event("a.d")
        first, second = await sub.next(timeout=5), await sub.next(timeout=5)
    assert (first.target, first.payload, first.metadata, first.source, first.kind) == (
        "a.b.c", [1, "two"], {"tenant": "acme"}, "test", "event")
    assert (second.target, second.payload) == ("a.d", None)
    assert first.id != second.id


async def test_malformed_event_is_dropped_and_the_next_arrives(nc: NATS, prefix: str,
                                                               messaging: PluginMessaging,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    async with await messaging.subscribe_to_events("x.*") as sub:
        await nc.publish(f"{prefix}.event.x.bad", b"{nope")
        await messaging.publish_event("x.good", {"ok": 1})
        event = await sub.next(timeout=5)
    assert (event.target, event.payload) == ("x.good", {"ok": 1})
    assert "dropped malformed event" in caplog.text


async def test_event_patterns_are_checked(messaging: PluginMessaging) -> None:
    for bad in ["a..b", "a.>.b", "", "sp ace"]:
        with pytest.raises(ValueError, match="invalid event"):
            await messaging.subscribe_to_events(bad)
    with pytest.raises(ValueError, match="invalid event type"):
        await messaging.publish_event("a.*")


class Fragile(Plugin):
    name = "fragile"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []

    @on_event("jobs.*")
    async def on_job(self, event: Message) -> None:
        if event.payload == "poison":
            raise RuntimeError("cannot digest")
        self.seen.append(event.payload)


async def test_a_raising_event_handler_keeps_its_subscription(nc: NATS, prefix: str, registry: object,
                                                              messaging: PluginMessaging) -> None:
    plugin = Fragile()
    async with PluginRuntime(plugin, nc, prefix=prefix) as runtime:
        for payload in [1, "poison", 2]:
            await messaging.publish_event("jobs.run", payload)

        async def both() -> bool:
            await asyncio.sleep(0)
            return plugin.seen == [1, 2]

        await eventually(both, timeout=5, what="events after the poison one")
        assert runtime.stats.errors_of("event") == 1 and runtime.stats.count("event") == 3


async def test_plugins_may_not_forge_mesh_events(nc: NATS, prefix: str) -> None:
    from plugin_sdk import PermissionDenied

    plugin_side = PluginMessaging(nc, prefix=prefix, source="sneaky", source_instance="sneaky-1")
    with pytest.raises(PermissionDenied, match=r"'mesh\.' are the mesh's own"):
        await plugin_side.publish_event("mesh.health.auth", {"health": "failed"})
    await plugin_side.publish_event("meshy.ok")  # only the 'mesh' token is reserved
