"""Echo: answers every message with its payload (and who sent it)."""

from __future__ import annotations

from typing import Any

from plugin_sdk import Message, Plugin


class Echo(Plugin):
    """Replies with what it was sent."""

    name = "echo"
    version = "1.0.0"
    capabilities = ["echo"]

    async def handle_message(self, message: Message) -> Any:
        if message.operation == "whoami":
            assert self.context is not None
            return {"instance": self.context.runtime.instance_id}
        return message.payload
