"""A plugin's declared permissions are enforced, and every refusal names the rule."""

from __future__ import annotations

from typing import Any

import pytest
from nats.aio.client import Client as NATS

from plugin_sdk import Message, PermissionDenied, Plugin, PluginConfig, PluginRuntime, on_event


class Jailed(Plugin):
    name = "jailed"

    async def handle_message(self, message: Message) -> Any:
        return None


class Open(Plugin):
    name = "open"

    async def handle_message(self, message: Message) -> Any:
        return "open"


async def test_send_publish_subscribe_refusals(nc: NATS, prefix: str, registry: object) -> None:
    config = PluginConfig.model_validate({
        "name": "jailed",
        "permissions": {"send": ["open"], "publish": ["jailed.*"], "subscribe": ["orders.>"]},
    })
    async with PluginRuntime(Open(), nc, prefix=prefix), \
            PluginRuntime(Jailed(), nc, prefix=prefix, config=config) as jailed:
        assert jailed.context is not None
        messaging = jailed.context.messaging
        assert (await messaging.send_message("open")).result == "open"
        with pytest.raises(PermissionDenied, match=r"jailed may not send 'secret' \(permissions.send = \['open'\]\)"):
            await messaging.send_message("secret")
        await messaging.publish_event("jailed.happened", {})
        with pytest.raises(PermissionDenied, match=r"may not publish 'orders.created'"):
            await messaging.publish_event("orders.created", {})
        sub = await messaging.subscribe_to_events("orders.eu.>")
        await sub.close()
        with pytest.raises(PermissionDenied, match=r"may not subscribe 'billing.>'"):
            await messaging.subscribe_to_events("billing.>")


class Eavesdropper(Plugin):
    name = "eavesdropper"

    @on_event("billing.>")
    async def on_billing(self, event: Message) -> None:
        raise AssertionError("must never be subscribed")


async def test_on_event_handlers_obey_subscribe_permissions(nc: NATS, prefix: str, registry: object) -> None:
    config = PluginConfig.model_validate({"name": "eavesdropper", "permissions": {"subscribe": ["orders.>"]}})
    plugin = Eavesdropper()
    with pytest.raises(PermissionDenied, match=r"may not subscribe 'billing\.>'"):
        await PluginRuntime(plugin, nc, prefix=prefix, config=config).start()
    assert plugin.state == "failed"


async def test_send_permission_covers_every_instance_of_a_name(nc: NATS, prefix: str, registry: object) -> None:
    config = PluginConfig.model_validate({"name": "jailed", "permissions": {"send": ["open"]}})
    async with PluginRuntime(Open(), nc, prefix=prefix) as open_rt, \
            PluginRuntime(Jailed(), nc, prefix=prefix, config=config) as jailed:
        assert jailed.context is not None
        reply = await jailed.context.messaging.send_message(f"open.{open_rt.instance_id}")
        assert reply.result == "open"
