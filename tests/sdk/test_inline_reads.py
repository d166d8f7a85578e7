"""The reader parses a read where asyncio hands it over (``MeshClient._read_loop``), against a real
nats-server: in the same event-loop turn as the socket read, in order, and when a parse has to wait
(inside nats-py), what follows still comes in order and nothing is lost."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from mesh import NatsServer, free_port
from plugin_sdk._connection import MeshClient
from plugin_sdk._wire import flush_subscriptions
from tests.conftest import eventually


async def _client(url: str, **options: object) -> MeshClient:
    nc = MeshClient()
    await nc.connect(servers=[url], name="inline-reads", allow_reconnect=True, reconnect_time_wait=0.1,
                     max_reconnect_attempts=-1, **options)  # type: ignore[arg-type]
    return nc


async def test_a_message_is_handed_over_in_the_turn_its_read_came(nats_server: NatsServer, nc: NATS,
                                                                  prefix: str) -> None:
    # The mechanism: a direct handler runs inside asyncio's data_received (no task is current),
    # not in nats-py's read-loop task one loop iteration later.
    reader = await _client(nats_server.url)
    try:
        where: list[asyncio.Task[object] | None] = []
        got: list[bytes] = []

        def handler(subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None) -> None:
            where.append(asyncio.current_task())
            got.append(data)

        await reader.subscribe_direct(f"{prefix}.inline", handler)
        await flush_subscriptions(reader)
        for i in range(20):
            await nc.publish(f"{prefix}.inline", str(i).encode())
            await nc.flush()
            await eventually(lambda n=i: _true(len(got) > n), what=f"message {i}")
        assert got == [str(i).encode() for i in range(20)]
        assert where.count(None) >= 15, where  # (one that came while the loop read its buffer runs in the task)
    finally:
        await reader.close()


async def _true(value: bool) -> bool:
    return value


async def test_a_parse_that_waits_keeps_what_follows_in_order_and_loses_none(nats_server: NatsServer, nc: NATS,
                                                                             prefix: str) -> None:
    # A plain subscription with a pending limit of one and a blocked callback: nats-py awaits the
    # error callback for every message it drops, inside the parse. That callback waits, so the
    # parse stops midway; the read loop's task must finish it, and the direct subscription's
    # messages, interleaved with the dropped ones in the same reads, must all come, in order.
    waited_in: list[asyncio.Task[object] | None] = []
    drops = 0

    async def error_cb(exc: Exception) -> None:
        nonlocal drops
        if isinstance(exc, nats.errors.SlowConsumerError):
            drops += 1
            await asyncio.sleep(0.001)
            waited_in.append(asyncio.current_task())

    reader = await _client(nats_server.url, error_cb=error_cb)
    try:
        release = asyncio.Event()

        async def blocked(msg: Msg) -> None:
            await release.wait()

        got: list[int] = []

        def handler(subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None) -> None:
            got.append(int(data))

        await reader.subscribe(f"{prefix}.slow", cb=blocked, pending_msgs_limit=1)
        await reader.subscribe_direct(f"{prefix}.direct", handler)
        await flush_subscriptions(reader)
        n = 300
        for i in range(n):
            await nc.publish(f"{prefix}.slow", b"x")
            await nc.publish(f"{prefix}.direct", str(i).encode())
        await nc.flush()
        await eventually(lambda: _true(len(got) >= n), what=f"{n} direct messages")
        assert got == list(range(n))
        assert drops >= 10
        assert waited_in and all(task is reader._reading_task for task in waited_in), waited_in
        release.set()
        # ... and the reader still serves, inline again, once nothing waits.
        await nc.publish(f"{prefix}.direct", str(n).encode())
        await nc.flush()
        await eventually(lambda: _true(got[-1:] == [n]), what="a message after the waits")
    finally:
        await reader.close()


async def test_after_the_server_restarts_the_reader_reads_inline_on_the_new_connection(
        tmp_path: Path, prefix: str) -> None:
    # EOF while parked ends the loop as nats-py's does (a reconnect); the new connection's reads
    # go inline too, and nothing is delivered twice.
    server = NatsServer(tmp_path, port=free_port())
    server.start()
    try:
        reader = await _client(server.url)
        sender = await _client(server.url)
        try:
            got: list[bytes] = []
            where: list[asyncio.Task[object] | None] = []

            def handler(subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None) -> None:
                got.append(data)
                where.append(asyncio.current_task())

            await reader.subscribe_direct(f"{prefix}.after", handler)
            await flush_subscriptions(reader)
            await sender.publish(f"{prefix}.after", b"before")
            await sender.flush()
            await eventually(lambda: _true(got == [b"before"]), what="the first message")
            first_task = reader._reading_task
            await asyncio.to_thread(server.stop)
            await server.astart()  # same port and store

            async def delivered() -> bool:
                if not (reader.is_connected and sender.is_connected):
                    return False
                with _suppress():
                    await sender.publish(f"{prefix}.after", b"after")
                    await sender.flush(timeout=1)
                return b"after" in got

            await eventually(delivered, timeout=30, what="a message after the restart")
            assert got[0] == b"before" and set(got[1:]) == {b"after"}
            assert reader._reading_task is not first_task
            assert where[-1] is None, where
        finally:
            await sender.close()
            await reader.close()
    finally:
        await asyncio.to_thread(server.stop)


def _suppress() -> contextlib.suppress:
    return contextlib.suppress(nats.errors.Error, asyncio.TimeoutError)
