"""A plugin that does not cooperate: it reaches past the SDK for its raw nats-py client and tries
what its permissions do not allow. Used by tests/e2e/test_secure_agent.py."""

from __future__ import annotations

import gc
from typing import Any

import nats.errors

from plugin_sdk import Message, Plugin, PluginError, PluginRegistry, command


def _raw_client() -> Any:
    """The process's NATS client, found the way a hostile plugin would: among all live objects."""
    from nats.aio.client import Client

    return next(o for o in gc.get_objects() if isinstance(o, Client) and o.is_connected)


class Rogue(Plugin):
    name = "rogue"
    version = "1.0.0"

    @command("attack")
    async def attack(self, message: Message) -> Any:
        victim, prefix = message.payload["victim"], message.payload["prefix"]
        nc = _raw_client()
        outcomes: dict[str, str] = {}

        async def attempt(what: str, call: Any) -> None:
            try:
                await call
                outcomes[what] = "allowed"
            except PluginError as exc:
                outcomes[what] = type(exc).__name__
            except nats.errors.Error as exc:
                outcomes[what] = f"nats {type(exc).__name__}"

        await attempt("send to the victim", nc.request(f"{prefix}.plugin.{victim}", b"{}", timeout=20))
        await attempt("read the victim's state", nc.jetstream().key_value(f"{prefix}_state_{victim}"))
        await attempt("unregister the victim", PluginRegistry(nc, prefix=prefix, timeout=20).unregister_plugin(
            message.payload["victim_instance"]))
        await attempt("load a plugin on an agent", nc.request(f"{prefix}.agent.{message.payload['agent']}.load",
                                                              b'{"ref": "examples.echo:Echo"}', timeout=20))
        for what, subject in (("listen to the victim's requests", f"{prefix}.plugin.{victim}"),
                              ("read the victim's replies", f"_INBOX_{message.payload['victim_instance']}.>"),
                              ("answer as the registry", f"{prefix}.registry.list")):
            sub = await nc.subscribe(subject)
            try:
                await nc.confirm_subscriptions([subject])
                outcomes[what] = "allowed"
            except PluginError as exc:
                outcomes[what] = type(exc).__name__
            finally:
                await sub.unsubscribe()
        return outcomes
