"""stop() under traffic: every request sent to the stopping instance is answered, none lost.

nats-py's drain leaves its UNSUB in the client's pending buffer for the flusher task and writes
its round trip's PING straight to the socket, so the server could answer the PING while it still
routed the queue group's requests to the draining instance; nats-py then dropped them, silently,
for a subscription it had already forgotten, and their callers timed out (the rolling reload
under traffic lost one request in one run of 5 to 20). Here the flusher is late once, as on
a busy loop, when the stop begins: that makes the window 200 ms wide, where it was rarely open.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from mesh import NatsServer, close, connect
from plugin_sdk import CommunicationError, Message, Plugin, PluginMessaging, PluginRuntime
from tests.conftest import eventually

LATE = 0.2  # seconds the stopping instance's flusher waits before writing what is pending


class Counted(Plugin):
    name = "counted"

    def __init__(self) -> None:
        super().__init__()
        self.handled = 0

    async def handle_message(self, message: Message) -> Any:
        self.handled += 1
        return message.payload


def _late_flusher(nc: Any, delay: float) -> Callable[[], None]:
    """Once armed, nats-py's flusher task picks up its next piece of work ``delay`` late (as on a
    busy loop); what it writes (SUBs, UNSUBs, publishes) waits in the pending buffer meanwhile."""
    queue = nc._flush_queue
    get = queue.get
    armed = False

    async def late_get() -> Any:
        nonlocal armed
        item = await get()
        if armed:
            armed = False
            await asyncio.sleep(delay)
        return item

    queue.get = late_get

    def arm() -> None:
        nonlocal armed
        armed = True

    return arm


@pytest.fixture
async def two(nats_server: NatsServer, prefix: str) -> AsyncIterator[list[tuple[PluginRuntime, Counted]]]:
    """Two instances of one plugin, each on its own connection (one queue group)."""
    conns = [await connect(nats_server.url, name=f"counted-{i}") for i in range(2)]
    plugins = [Counted(), Counted()]
    runtimes = [PluginRuntime(p, c, prefix=prefix, register=False) for p, c in zip(plugins, conns, strict=True)]
    for r in runtimes:
        await r.start()
    yield list(zip(runtimes, plugins, strict=True))
    for r in runtimes:
        await r.stop()
    for c in conns:
        await close(c)


async def test_an_instance_stopped_under_traffic_answers_every_request_it_was_routed(
        two: list[tuple[PluginRuntime, Counted]], messaging: PluginMessaging) -> None:
    (stopping, a), (_, b) = two
    arm = _late_flusher(stopping.nc, LATE)
    await stopping.nc.flush()  # (from now on the flusher waits for work with late_get)
    outcome: Counter[str] = Counter()
    sent: list[asyncio.Task[None]] = []

    async def one(n: int) -> None:
        try:
            reply = await messaging.send_message("counted", {"n": n}, timeout=3)
            outcome["ok" if reply.result == {"n": n} else "wrong"] += 1
        except CommunicationError as exc:  # typed, counted: the test asserts there are none
            outcome[type(exc).__name__] += 1

    async def traffic() -> None:  # a request every 2 ms, whoever is slow to answer
        while True:
            sent.append(asyncio.create_task(one(len(sent))))
            await asyncio.sleep(0.002)

    producer = asyncio.create_task(traffic())
    try:
        async def both_serve() -> bool:
            return a.handled > 20 and b.handled > 20

        await eventually(both_serve, what="the queue group to share the traffic")
        arm()
        assert await asyncio.wait_for(stopping.stop(), 20)  # (a hang guard, not a timing check)
        handled = b.handled

        async def staying_serves_alone() -> bool:
            return b.handled > handled + 50

        await eventually(staying_serves_alone, what="the remaining instance to take all the traffic")
    finally:
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
        await asyncio.gather(*sent)
    assert set(outcome) == {"ok"}, outcome  # before: RequestTimeout, for what was routed after the PONG
