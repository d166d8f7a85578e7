"""The specification's two integration tests, against a real nats-server."""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS

from plugin_sdk import Message, Plugin, PluginContext, PluginMessaging, PluginRegistry, PluginRuntime, PluginState


class SpecPlugin(Plugin):
    name = "spec"
    version = "1.2.3"
    capabilities = ["greet"]

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def initialize(self, context: PluginContext) -> None:
        await super().initialize(context)
        self.calls.append("initialize")

    async def start(self) -> None:
        self.calls.append("start")

    async def handle_message(self, message: Message) -> Any:
        return {"hello": message.payload["name"], "from": message.source}

    async def stop(self) -> None:
        self.calls.append("stop")

    async def cleanup(self) -> None:
        self.calls.append("cleanup")


async def test_plugin_lifecycle(nc: NATS, prefix: str, registry: object, client: PluginRegistry) -> None:
    plugin = SpecPlugin()
    runtime = PluginRuntime(plugin, nc, prefix=prefix)
    await runtime.start()
    assert plugin.state is PluginState.RUNNING
    assert plugin.calls == ["initialize", "start"]
    assert plugin.context is not None and plugin.context.config.name == "spec"

    info = await client.get_plugin(runtime.instance_id)
    assert info is not None
    assert (info.name, info.version, info.capabilities, info.health) == ("spec", "1.2.3", ["greet"], "healthy")
    by_name = await client.get_plugin("spec")
    assert by_name is not None and by_name.id == runtime.instance_id

    assert await runtime.stop() is True
    assert plugin.calls == ["initialize", "start", "stop", "cleanup"]
    assert plugin.state is PluginState.STOPPED
    assert await client.get_plugin(runtime.instance_id) is None
    assert await client.list_plugins("spec") == []


async def test_plugin_communication(nc: NATS, prefix: str, registry: object, messaging: PluginMessaging) -> None:
    async with PluginRuntime(SpecPlugin(), nc, prefix=prefix) as runtime:
        response = await messaging.send_message("spec", {"name": "ada"}, timeout=5)
        assert response.is_success()
        assert response.result == {"hello": "ada", "from": "test"}
        assert response.message_id != ""

        async with await messaging.subscribe_to_events("user.*") as events:
            assert runtime.context is not None
            await runtime.context.messaging.publish_event("user.created", {"id": 7})
            event = await events.next(timeout=5)
        assert event.kind == "event"
        assert event.target == "user.created"
        assert event.payload == {"id": 7}
        assert event.source == "spec"
