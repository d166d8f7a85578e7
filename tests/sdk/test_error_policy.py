"""handle_plugin_error: initialisation errors restart, connection errors reset it, others are logged."""

from __future__ import annotations

import logging

import pytest

from mesh import NatsServer, close, connect
from plugin_sdk import ConnectionFailed, InitializationError, Message, Plugin, PluginMessaging, PluginRuntime, on_event
from tests.conftest import eventually


class Troubled(Plugin):
    name = "troubled"

    @on_event("trouble.*")
    async def on_trouble(self, event: Message) -> None:
        kind = event.target.split(".", 1)[1]
        if kind == "connection":
            raise ConnectionFailed("the socket looks stuck")
        if kind == "init":
            raise InitializationError("configuration vanished")
        raise ValueError("just a bad event")

    async def handle_message(self, message: Message) -> str:
        return "fine"


async def test_policy(nats_server: NatsServer, prefix: str, messaging: PluginMessaging,
                      caplog: pytest.LogCaptureFixture) -> None:
    own = await connect(nats_server.url, name="troubled")  # its own connection, to be reset
    try:
        async with PluginRuntime(Troubled(), own, prefix=prefix, register=False) as runtime:
            async def handled() -> bool:  # events are at most once: publish until one is handled
                if runtime.stats.errors_of("event") == 0:
                    await messaging.publish_event("trouble.other", {})
                return runtime.stats.errors_of("event") >= 1

            await eventually(handled, what="the bad event handled")
            assert "just a bad event" in caplog.text
            assert not runtime.stop_requested.is_set()

            before = own.stats["reconnects"]
            await messaging.publish_event("trouble.connection", {})
            await eventually(lambda: _true(own.stats["reconnects"] > before and own.is_connected),
                             what="the connection reset and back")
            assert (await messaging.send_message("troubled", timeout=5)).result == "fine"  # resubscribed

            await messaging.publish_event("trouble.init", {})
            await eventually(lambda: _true(runtime.stop_requested.is_set()), what="a restart request")
            assert runtime.restart_requested
            assert any(r.levelno == logging.ERROR and "restart requested" in r.getMessage() for r in caplog.records)
    finally:
        await close(own)


async def _true(value: bool) -> bool:
    return value


