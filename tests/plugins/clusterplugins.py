"""Plugins the cluster fault tests run with `mesh run clusterplugins:<Class>`."""

from __future__ import annotations

from typing import Any

from plugin_sdk import Message, Plugin, PluginConfig, StateConflict, command, on_event, query


class Keeper(Plugin):
    """Writes, reads and counts state, and says which NATS node it is connected to.

    ``incr`` is one compare-and-set increment of a key (retrying conflicts); every increment that
    succeeded is remembered with its value and revision, for ``report``: the count of successful
    compare-and-sets is the plugin's own, not the caller's (a reply lost with a node is still a
    success that happened).
    """

    config = PluginConfig(name="keeper", version="1.0.0", retry_for=None)

    def __init__(self) -> None:
        super().__init__()
        self.successes: list[tuple[int, int]] = []
        self.events = 0


    @command("put")
    async def put(self, message: Message) -> Any:
        assert self.context is not None
        return {"revision": await self.context.state.put(message.payload["key"], message.payload["value"])}

    @query("get")
    async def get(self, message: Message) -> Any:
        assert self.context is not None
        return await self.context.state.get(message.payload["key"])

    @command("incr")
    async def incr(self, message: Message) -> Any:
        assert self.context is not None
        state, key = self.context.state, message.payload["key"]
        for _ in range(200):
            entry = await state.get_entry(key)
            value, revision = (entry.value, entry.revision) if entry is not None else (0, 0)
            try:
                new_revision = await state.compare_and_set(key, value + 1, revision=revision)
            except StateConflict:
                continue
            self.successes.append((value + 1, new_revision))
            return {"value": value + 1, "revision": new_revision}
        raise StateConflict(f"{key!r}: 200 conflicts in a row")

    @query("report")
    async def report(self, message: Message) -> Any:
        return {"successes": self.successes, "events": self.events}

    @query("where")
    async def where(self, message: Message) -> Any:
        assert self.context is not None
        nc = self.context.messaging._nc  # (test code: which node this instance is connected to)
        return {"port": nc.connected_url.port if nc.connected_url else None}

    @on_event("tick.*")
    async def tick(self, event: Message) -> None:
        self.events += 1
