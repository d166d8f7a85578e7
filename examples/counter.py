"""Counter: keeps a total in its KV state and publishes an event on every change."""

from __future__ import annotations

from typing import Any

from plugin_sdk import HealthCheck, Message, Plugin, PluginContext, StateConflict, command, query


class Counter(Plugin):
    """A counter whose total survives restarts (JetStream KV), announcing each change."""

    name = "counter"
    version = "1.0.0"
    capabilities = ["count"]

    async def initialize(self, context: PluginContext) -> None:
        await super().initialize(context)
        self.state_store = context.state

    @command("increment")
    async def increment(self, message: Message) -> dict[str, Any]:
        by = int((message.payload or {}).get("by", 1))
        # Compare-and-set so that several instances never lose an increment.
        while True:
            entry = await self.state_store.get_entry("total")
            current, revision = (entry.value, entry.revision) if entry else (0, 0)
            try:
                await self.state_store.compare_and_set("total", current + by, revision=revision)
                break
            except StateConflict:
                continue
        assert self.context is not None
        await self.context.messaging.publish_event("counter.changed", {"total": current + by, "by": by})
        return {"total": current + by}

    @query("get")
    async def get(self, message: Message) -> dict[str, Any]:
        return {"total": await self.state_store.get("total", 0)}

    async def health_check(self) -> HealthCheck:
        """Healthy while its state can be read: without JetStream KV it cannot count.

        If the read raises (JetStream down, a timeout), the runtime reports this instance as
        unhealthy with the error as the reason; `mesh ls` shows it.
        """
        await self.state_store.get("total")
        return HealthCheck.healthy()

    async def handle_message(self, message: Message) -> Any:
        if message.operation is None:  # a bare `mesh send counter` (or a broadcast) reads the total
            message = message.model_copy(update={"operation": "get"})
        return await super().handle_message(message)
