"""Listener: remembers the last events it saw, and answers with them."""

from __future__ import annotations

from collections import deque
from typing import Any

from plugin_sdk import Message, Plugin, on_event


class Listener(Plugin):
    """Subscribes to counter.* and orders.> events; `mesh send listener` returns the latest."""

    name = "listener"
    version = "1.0.0"
    capabilities = ["audit"]

    def __init__(self) -> None:
        super().__init__()
        self.seen: deque[dict[str, Any]] = deque(maxlen=20)

    @on_event("counter.*")
    async def on_counter(self, event: Message) -> None:
        self.seen.append({"type": event.target, "payload": event.payload, "source": event.source})

    @on_event("orders.>")
    async def on_order(self, event: Message) -> None:
        assert self.context is not None
        self.context.logger.info("order event %s: %s", event.target, event.payload)
        self.seen.append({"type": event.target, "payload": event.payload, "source": event.source})

    async def handle_message(self, message: Message) -> Any:
        return list(self.seen)
