"""Permissions enforced by nats-server: each plugin instance's own identity (a user JWT the agent
mints), and a rogue plugin that bypasses the SDK and uses its raw nats-py client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mesh import NatsServer, RegistryService
from mesh._auth import AuthStore
from mesh._auth import Permissions as AuthPermissions
from plugin_sdk import (
    Message,
    PermissionDenied,
    Plugin,
    PluginConfig,
    PluginMessaging,
    PluginRegistry,
    PluginRuntime,
    command,
)
from plugin_sdk.host import MeshClient, Subjects, close, connect, open_bucket, plugin_permissions
from tests.conftest import eventually


class Stock(Plugin):
    name = "stock"

    @command("count")
    async def count(self, message: Message) -> Any:
        return 7


class Shop(Plugin):
    name = "shop"

    @command("buy")
    async def buy(self, message: Message) -> Any:
        assert self.context is not None
        await self.context.state.put("last", message.payload)
        keys = await self.context.state.keys()
        stock = (await self.context.messaging.send_message("stock", operation="count")).result
        await self.context.messaging.publish_event("orders.created", message.payload)
        return {"stock": stock, "keys": keys, "last": await self.context.state.get("last")}


def config_of(cls: type[Plugin], **permissions: list[str]) -> PluginConfig:
    return cls.default_config().merged({"permissions": permissions} if permissions else {})


@dataclass
class SecureMesh:
    url: str
    prefix: str
    store: AuthStore
    admin: MeshClient

    async def identity(self, config: PluginConfig, instance_id: str) -> MeshClient:
        """Connect as the agent would start this instance: its own minted credentials and inbox."""
        await open_bucket(self.admin.jetstream(), Subjects(self.prefix).state_bucket(config.name), create=True)
        perms = plugin_permissions(Subjects(self.prefix), name=config.name, instance_id=instance_id,
                                   send=config.permissions.send, publish=config.permissions.publish,
                                   subscribe=config.permissions.subscribe, dependencies=[])
        ident = self.store.mint(instance_id, AuthPermissions(pub_allow=perms.publish, sub_allow=perms.subscribe,
                                                             pub_deny=perms.publish_deny), ttl=300)
        return await connect(self.url, name=instance_id, user_credentials=str(ident.creds),
                             inbox_prefix=perms.inbox_prefix)


@pytest.fixture
async def secure(tmp_path: Path, prefix: str) -> AsyncIterator[SecureMesh]:
    store = AuthStore(tmp_path / "auth")
    server = NatsServer(tmp_path / "nats", config=store.server_config())
    await server.astart()
    admin = await connect(server.url, name="admin", user_credentials=str(store.admin.creds))
    try:
        async with RegistryService(admin, prefix=prefix, sweep_interval=0.2):
            yield SecureMesh(server.url, prefix, store, admin)
    finally:
        await close(admin)
        server.stop()


async def test_a_plugin_with_its_own_identity_does_everything_it_is_allowed(secure: SecureMesh) -> None:
    p = secure.prefix
    stock_nc = await secure.identity(config_of(Stock), "stock-1")
    shop_config = config_of(Shop, send=["stock"], publish=["orders.*"], subscribe=["payments.*"])
    shop_nc = await secure.identity(shop_config, "shop-1")
    try:
        async with PluginRuntime(Stock(), stock_nc, prefix=p, instance_id="stock-1", heartbeat_interval=0.2), \
                PluginRuntime(Shop(), shop_nc, prefix=p, config=shop_config, instance_id="shop-1",
                              heartbeat_interval=0.2) as shop:
            events = await PluginMessaging(secure.admin, prefix=p, source="test").subscribe_to_events("orders.>")
            client = PluginMessaging(secure.admin, prefix=p, source="test")
            result = (await client.send_message("shop", {"n": 1}, operation="buy", timeout=10)).result
            assert result == {"stock": 7, "keys": ["last"], "last": {"n": 1}}
            assert (await events.next(timeout=5)).payload == {"n": 1}
            await events.close()
            registered = await PluginRegistry(secure.admin, prefix=p).get_plugin("shop-1")
            assert registered is not None and registered.health == "healthy"
            assert shop.metrics_snapshot()["permission_denied"] == {}  # it never needed anything refused
    finally:
        await close(shop_nc)
        await close(stock_nc)


async def test_a_rogue_plugin_is_refused_by_the_server_at_once(secure: SecureMesh) -> None:
    p = secure.prefix
    other_nc = await secure.identity(config_of(Stock), "stock-1")
    rogue_config = config_of(Shop, send=["stock"])
    rogue = await secure.identity(rogue_config, "shop-1")
    try:
        async with PluginRuntime(Stock(), other_nc, prefix=p, instance_id="stock-1", heartbeat_interval=0.2), \
                PluginRuntime(Shop(), rogue, prefix=p, config=rogue_config, instance_id="shop-1",
                              heartbeat_interval=0.2) as shop:
            # The SDK's own check says no before anything reaches the wire...
            with pytest.raises(PermissionDenied, match=r"shop may not send 'billing'"):
                await shop.messaging.send_message("billing", {})
            # ... and the server says no to the raw client, on the call, long before its timeout.
            refusals = {
                "a request to a plugin it may not send to": rogue.request(f"{p}.plugin.billing", b"{}", timeout=30),
                "another plugin's KV bucket": rogue.jetstream().key_value(f"{p}_state_stock"),
                "unregistering another instance": PluginRegistry(rogue, prefix=p, timeout=30).unregister_plugin(
                    "stock-1"),
                "registering as another instance": rogue.request(f"{p}.registry.register", b"{}", timeout=30),
            }
            for what, call in refusals.items():
                with pytest.raises(PermissionDenied, match="the NATS server refused"):
                    await asyncio.wait_for(call, 10)  # (a hang guard: the timeouts are 30 s)
                assert what
            for subject in (f"{p}.plugin.stock", "_INBOX_stock-1.>", f"{p}.registry.list", f"{p}.control.stock-1.>"):
                sub = await rogue.subscribe(subject)
                with pytest.raises(PermissionDenied, match=f"subscribe to '{subject}'"):
                    await rogue.confirm_subscriptions([subject])
                await sub.unsubscribe()
            await rogue.publish(f"{p}.event.mesh.health.stock", b"{}")  # a fake health event: denied too

            async def counted() -> dict[str, int]:  # (the server's -ERR for a publish comes when it comes)
                denied: dict[str, int] = shop.metrics_snapshot()["permission_denied"]
                return denied if f"publish {p}.event.mesh.health.stock" in denied else {}

            denied = await eventually(counted, what="the refused publish to be counted")
            assert {f"publish {p}.plugin.billing", f"subscribe {p}.plugin.stock"} <= set(denied), denied
            # The victim is untouched.
            other = await PluginRegistry(secure.admin, prefix=p).get_plugin("stock-1")
            assert other is not None and other.health == "healthy"
    finally:
        await close(rogue)
        await close(other_nc)


@pytest.mark.parametrize("send", [[">"], ["*"], ["echo", "auth"], []])
def test_every_permission_subject_is_one_the_server_accepts(send: list[str]) -> None:
    # With send = [">"] the list once held "<prefix>.plugin.>.>": nats-server logged "invalid publish
    # subject" for every plugin host's connection. A full wildcard may only be the last token.
    perms = plugin_permissions(Subjects("mesh"), name="echo", instance_id="echo-1", send=send, publish=["a.>"],
                               subscribe=[">"], dependencies=["auth"])
    for subject in (*perms.publish, *perms.subscribe, *perms.publish_deny):
        tokens = subject.split(".")
        assert all(tokens) and ">" not in tokens[:-1], subject
