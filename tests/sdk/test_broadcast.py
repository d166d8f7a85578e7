"""Broadcast: who answers, who is missing, errors included, and life without a registry."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from plugin_sdk import Message, Plugin, PluginMessaging, PluginRuntime


class Alpha(Plugin):
    name = "alpha"

    async def handle_message(self, message: Message) -> Any:
        if message.payload == "fail":
            raise KeyError("nope")
        return "alpha"


class Beta(Plugin):
    name = "beta"

    async def handle_message(self, message: Message) -> Any:
        return "beta"


async def test_errors_are_replies_and_targets_narrow(nc: NATS, prefix: str, registry: object,
                                                     messaging: PluginMessaging) -> None:
    async with PluginRuntime(Alpha(), nc, prefix=prefix) as a1, PluginRuntime(Alpha(), nc, prefix=prefix) as a2, \
            PluginRuntime(Beta(), nc, prefix=prefix) as b:
        everyone = await messaging.broadcast_message("hi", timeout=5)
        assert sorted((r.source, r.result) for r in everyone) == sorted(
            [(a1.instance_id, "alpha"), (a2.instance_id, "alpha"), (b.instance_id, "beta")])
        assert everyone.missing == [] and everyone.expected_known

        only_alpha = await messaging.broadcast_message("fail", target="alpha", timeout=5)
        assert {r.source for r in only_alpha} == {a1.instance_id, a2.instance_id}
        assert all(r.error is not None and r.error.type == "KeyError" for r in only_alpha)


async def test_a_plugin_does_not_answer_its_own_broadcast(nc: NATS, prefix: str, registry: object) -> None:
    async with PluginRuntime(Alpha(), nc, prefix=prefix) as a1, PluginRuntime(Alpha(), nc, prefix=prefix) as a2:
        assert a1.context is not None
        result = await a1.context.messaging.broadcast_message("hi", timeout=5)
        assert [r.source for r in result] == [a2.instance_id] and result.missing == []


async def test_without_a_registry_it_gathers_until_the_timeout(nc: NATS, prefix: str,
                                                               messaging: PluginMessaging,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    async with PluginRuntime(Beta(), nc, prefix=prefix) as b:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        result = await messaging.broadcast_message("hi", timeout=0.5)
        assert loop.time() - t0 >= 0.45
    assert [r.source for r in result] == [b.instance_id]
    assert not result.expected_known and result.missing == []
    assert "broadcast without the registry" in caplog.text
