"""stop() is bounded whatever a plugin is stuck in, and says what it gave up on."""

from __future__ import annotations

import asyncio
import logging

import pytest
from nats.aio.client import Client as NATS

from plugin_sdk import Message, Plugin, PluginMessaging, PluginRuntime, on_event
from tests.conftest import eventually


class Stuck(Plugin):
    name = "stuck"

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.cancelled = False

    @on_event("jam")
    async def on_jam(self, event: Message) -> None:
        self.entered.set()
        try:
            await asyncio.Event().wait()  # never returns: its subscription cannot drain
        except asyncio.CancelledError:
            self.cancelled = True
            raise


async def test_stop_with_a_stuck_event_handler_unsubscribes_after_the_drain_timeout(
        nc: NATS, prefix: str, messaging: PluginMessaging, caplog: pytest.LogCaptureFixture) -> None:
    plugin = Stuck()
    runtime = PluginRuntime(plugin, nc, prefix=prefix, register=False)
    await runtime.start()
    await messaging.publish_event("jam", {})
    await asyncio.wait_for(plugin.entered.wait(), 10)
    with caplog.at_level(logging.WARNING):
        ok = await asyncio.wait_for(runtime.stop(drain_timeout=0.3), 20)  # (a hang guard, not a timing check)
    assert ok  # stop() and cleanup() themselves did not raise
    # (on a MeshClient events run on the direct path, where the handler, not the subscription, is what waits)
    assert ("subscriptions did not drain within 0.3s; unsubscribed" in caplog.text
            or "event handlers did not finish within 0.3s; cancelled" in caplog.text)
    assert runtime._subs == [] and len(runtime._tasks) == 0

    async def cancelled() -> bool:  # the stuck handler must not outlive stop(): it held the connection's close 30 s
        return plugin.cancelled

    await eventually(cancelled, timeout=5, what="the stuck handler to be cancelled")
