"""Greeter: answers with a greeting, and the file it runs from (the agent's stored copy)."""

from __future__ import annotations

from typing import Any

from plugin_sdk import Message, Plugin

from .words import GREETING


class Greeter(Plugin):
    name = "signed-greeter"
    version = "1.0.0"

    async def handle_message(self, message: Message) -> Any:
        assert self.context is not None
        punctuation = self.context.settings.get("punctuation", "")
        who = message.payload.get("name", "world") if isinstance(message.payload, dict) else "world"
        return {"greeting": f"{GREETING} {who}{punctuation}", "file": __file__}
