"""Stopping an agent drains its commands: one in flight still gets its answer."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from mesh import NatsServer, RegistryService
from mesh._agent import Agent, PlacementState
from plugin_sdk import PluginRegistry
from plugin_sdk.host import Subjects, dumps, request, response_from_msg
from tests.conftest import ROOT, TEST_PLUGINS, eventually


async def test_a_reload_in_flight_when_the_agent_stops_still_gets_its_reply(
        nc: NATS, nats_server: NatsServer, prefix: str, tmp_path: Path, registry: RegistryService,
        client: PluginRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(TEST_PLUGINS)]))
    agent = Agent(nc, nats_url=nats_server.url, name="stopping-agent", prefix=prefix, data_dir=tmp_path / "agent",
                  heartbeat_interval=0.3, cwd=tmp_path)
    await agent.start()
    try:
        (old,) = await agent.load("examples.echo:Echo")
        await agent.wait_healthy(old, timeout=30)
        # A rolling reload waits for its new instance to be healthy: it is in flight for a while.
        reply = asyncio.create_task(request(nc, Subjects(prefix).agent("stopping-agent", "reload"),
                                            dumps({"name": "echo"}), headers=None, timeout=60))

        async def replacing() -> bool:
            return len(agent.placements) == 2  # the new instance is placed: the command is running

        await eventually(replacing, what="the reload to start its new instance")
        await agent.stop()
    finally:
        await agent.stop()
    # Unsubscribing (as stop() used to) cancelled the handler: the caller waited out its timeout.
    result = response_from_msg(await asyncio.wait_for(reply, 60)).raise_for_error().result
    ((replaced_old, new),) = result["replaced"]
    assert replaced_old == old and new != old
    assert agent.placements == {}  # and then every instance was stopped

    async def gone() -> bool:
        return not await client.list_plugins("echo")

    await eventually(gone, what="both instances to unregister")


def test_placement_states_are_an_enum_with_their_old_values() -> None:
    assert [s.value for s in PlacementState] == ["starting", "running", "restarting", "failed", "exited", "stopped"]
