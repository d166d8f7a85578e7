"""Under --secure, the agent gives every instance it starts a NATS identity of its own: real
`mesh run` processes, a real nats-server in operator mode, and a rogue plugin that bypasses the SDK."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mesh import NatsServer, RegistryService
from mesh._agent import Agent
from mesh._auth import AuthStore, decode_jwt
from plugin_sdk import PermissionDenied, PluginMessaging, PluginRegistry
from plugin_sdk.host import MeshClient, close, connect
from tests.conftest import ROOT, TEST_PLUGINS


@pytest.fixture
async def secure_agent(tmp_path: Path, prefix: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[
        tuple[Agent, MeshClient, AuthStore]]:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(TEST_PLUGINS)]))
    monkeypatch.syspath_prepend(str(TEST_PLUGINS))
    monkeypatch.delenv("MESH_CREDS", raising=False)
    store = AuthStore(tmp_path / "auth")
    server = NatsServer(tmp_path / "nats", config=store.server_config())
    await server.astart()
    admin = await connect(server.url, name="admin", user_credentials=str(store.admin.creds))
    try:
        async with RegistryService(admin, prefix=prefix, sweep_interval=0.2), \
                Agent(admin, nats_url=server.url, name="secure-agent", prefix=prefix, data_dir=tmp_path / "agent",
                      heartbeat_interval=0.3, cwd=tmp_path, auth=store) as agent:
            yield agent, admin, store
    finally:
        await close(admin)
        server.stop()


async def test_every_instance_runs_under_its_own_identity_and_a_rogue_one_is_refused_by_the_server(
        secure_agent: tuple[Agent, MeshClient, AuthStore], prefix: str) -> None:
    agent, admin, store = secure_agent
    (victim,) = await agent.load("examples.echo:Echo")
    (rogue,) = await agent.load("rogue:Rogue", config_toml='[permissions]\nsend = ["nobody"]\n')
    await agent.wait_healthy(victim, timeout=30)
    await agent.wait_healthy(rogue, timeout=30)
    messaging = PluginMessaging(admin, prefix=prefix, source="test")
    assert (await messaging.send_message("echo", {"x": 1}, timeout=10)).result == {"x": 1}

    # Each instance has its own credentials file, 0600, naming it, with its permissions signed in.
    creds = store.users_dir / f"{rogue}.creds"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    token = creds.read_text().split("-----BEGIN NATS USER JWT-----\n")[1].split("\n")[0]
    claims = decode_jwt(token)
    assert claims["name"] == rogue and claims["exp"] > claims["iat"]
    assert f"{prefix}.plugin.nobody" in claims["nats"]["pub"]["allow"]
    assert f"{prefix}.plugin.echo" not in claims["nats"]["pub"]["allow"]

    outcomes = (await messaging.send_message("rogue", {
        "victim": "echo", "victim_instance": victim, "prefix": prefix, "agent": agent.name},
        operation="attack", timeout=60)).result
    assert outcomes == {what: "PermissionDenied" for what in (
        "send to the victim", "read the victim's state", "unregister the victim", "load a plugin on an agent",
        "listen to the victim's requests", "read the victim's replies", "answer as the registry")}, outcomes

    # The victim is untouched, the agent placed nothing more, and the attempts show in the rogue's metrics.
    info = await PluginRegistry(admin, prefix=prefix).get_plugin(victim)
    assert info is not None and info.health == "healthy"
    assert set(agent.placements) == {victim, rogue}
    reply = await admin.request(f"{prefix}.control.{rogue}.metrics", b"", timeout=5)
    denied = json.loads(reply.data)["permission_denied"]
    assert f"publish {prefix}.plugin.echo" in denied and f"subscribe {prefix}.registry.list" in denied, denied


async def test_a_plugin_identity_cannot_load_or_unload_but_the_admin_can(
        secure_agent: tuple[Agent, MeshClient, AuthStore], prefix: str, tmp_path: Path) -> None:
    agent, admin, store = secure_agent
    (echo,) = await agent.load("examples.echo:Echo")
    await agent.wait_healthy(echo, timeout=30)
    plugin_nc = await connect(admin.connected_url.geturl() if admin.connected_url else "", name="as-echo",
                              user_credentials=str(store.users_dir / f"{echo}.creds"), inbox_prefix=f"_INBOX_{echo}")
    try:
        with pytest.raises(PermissionDenied, match=r"publish to '.*\.agent\.secure-agent\.unload'"):
            await plugin_nc.request(f"{prefix}.agent.secure-agent.unload", b'{"target": "echo"}', timeout=20)
    finally:
        await close(plugin_nc)
    assert echo in agent.placements
    reply = await admin.request(f"{prefix}.agent.secure-agent.unload", b'{"target": "echo"}', timeout=20)
    assert echo in reply.data.decode()
    assert agent.placements == {}
