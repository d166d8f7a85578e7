"""Hostile and unlucky input: what one message, a full queue or a closed connection must not do.

Each test here reproduces a fault found when the mesh was tried under faults and hostile input
(the "Hardening" issue), against a real nats-server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

from mesh import NatsServer
from plugin_sdk import (
    CommunicationError,
    HandlerError,
    Health,
    Message,
    PayloadTooLarge,
    Plugin,
    PluginMessaging,
    PluginNotFound,
    PluginRegistry,
    PluginRuntime,
    RequestTimeout,
    ResourceError,
    command,
    on_event,
)
from plugin_sdk._wire import message_size, response_from_msg
from tests.conftest import eventually


class Echo(Plugin):
    name = "echo"
    version = "1.0.0"

    async def handle_message(self, message: Message) -> Any:
        return message.payload


class Slow(Plugin):
    name = "slow"
    version = "1.0.0"

    @command("hang")
    async def hang(self, message: Message) -> Any:
        await asyncio.sleep(3600)

    @command("ping")
    async def ping(self, message: Message) -> Any:
        return "pong"


def body_of_exactly(size: int) -> bytes:
    """A JSON string literal of exactly ``size`` bytes."""
    return b'"' + b"x" * (size - 2) + b'"'


# -- 0: Python 3.12+ -------------------------------------------------------------------------

async def test_a_plugin_answers_on_this_python(nc: NATS, prefix: str, messaging: PluginMessaging) -> None:
    # On 3.12 and 3.13 the eager handler task was built without its loop: it raised inside
    # nats-py's callback, nothing answered, and every request timed out. CI runs 3.11 and 3.13.
    async with PluginRuntime(Echo(), nc, prefix=prefix, register=False):
        response = await messaging.send_message("echo", {"python": sys.version_info[:2]}, timeout=5)
    assert response.result == {"python": list(sys.version_info[:2])}


# -- 2: sizes count headers + body -----------------------------------------------------------

async def test_a_send_of_exactly_max_payload_is_refused_typed_and_the_connection_lives(
        nc: NATS, prefix: str, messaging: PluginMessaging) -> None:
    async with PluginRuntime(Echo(), nc, prefix=prefix, register=False):
        payload = "x" * (nc.max_payload - 2)  # its JSON is exactly max_payload; the envelope header tips it over
        with pytest.raises(PayloadTooLarge, match=r"headers and body\) exceeds the server's limit"):
            await messaging.send_message("echo", payload, timeout=5)
        assert nc.is_connected
        assert (await messaging.send_message("echo", "still here", timeout=5)).result == "still here"


async def test_an_echo_of_a_max_payload_broadcast_becomes_a_typed_error_reply(
        nc: NATS, prefix: str, messaging: PluginMessaging) -> None:
    # A raw client broadcasts a body of exactly max_payload (legal: no headers). An echo's reply
    # is that body plus its envelope header: too big. It used to be sent anyway, and the server
    # closed the plugin's connection for good.
    raw = await nats.connect(nc.connected_url.geturl() if nc.connected_url else "", name="raw")
    try:
        async with PluginRuntime(Echo(), raw, prefix=prefix, register=False, config=Echo.default_config().merged(
                {"max_payload": raw.max_payload})) as echo:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            await nc.publish(f"{prefix}.broadcast", body_of_exactly(nc.max_payload), reply=inbox)
            reply = await sub.next_msg(timeout=10)
            await sub.unsubscribe()
            response = response_from_msg(reply)
            assert response.error is not None and response.error.type == "PayloadTooLarge", response
            assert response.source == echo.instance_id
            assert raw.is_connected, "the plugin's connection must survive its own oversized reply"
            assert (await messaging.send_message("echo", "next", timeout=5)).result == "next"
    finally:
        await raw.close()


async def test_an_event_over_the_limit_with_its_headers_is_refused_typed(nc: NATS, messaging: PluginMessaging) -> None:
    with pytest.raises(PayloadTooLarge, match=r"event 'big\.one'") as info:
        await messaging.publish_event("big.one", "x" * (nc.max_payload - 2))
    assert info.value.plugin is None  # the event type is not a plugin (it used to be named as one)
    assert nc.is_connected


def test_message_size_counts_what_the_server_counts() -> None:
    # NATS/1.0\r\n + "Mesh: 1;id=x\r\n" + \r\n, then the body.
    assert message_size(b"abc", None) == 3
    assert message_size(b"abc", {"Mesh": "1;id=x"}) == len(b"NATS/1.0\r\nMesh: 1;id=x\r\n\r\n") + 3


async def test_a_runtime_whose_connection_the_server_closed_asks_to_be_restarted(
        nats_server: NatsServer, prefix: str, registry: object) -> None:
    # A plain nats-py client stays CLOSED after a server -ERR; the runtime must not live on deaf.
    raw = await nats.connect(nats_server.url, name="deaf", max_reconnect_attempts=0)
    runtime = PluginRuntime(Echo(), raw, prefix=prefix, heartbeat_interval=0.1)
    await runtime.start()
    try:
        real_limit = raw.max_payload
        raw._max_payload = real_limit * 4  # fault injection: let one oversized message past nats-py
        await raw.publish("x.y", b"x" * (real_limit + 1))
        await asyncio.wait_for(runtime.stop_requested.wait(), 20)
        assert raw.is_closed and runtime.restart_requested
    finally:
        await runtime.stop(drain_timeout=1)
        await raw.close()


# -- 3: deadlines count from arrival ---------------------------------------------------------

async def test_requests_whose_deadline_passed_in_the_queue_are_dropped(
        nc: NATS, prefix: str, messaging: PluginMessaging) -> None:
    config = Slow.default_config().merged({"max_concurrency": 2})
    async with PluginRuntime(Slow(), nc, prefix=prefix, register=False, config=config) as slow:
        # 40 hanging requests whose callers give up after 0.3 s: 2 run, 38 wait for a slot.
        hangs = [asyncio.create_task(messaging.send_message("slow", operation="hang", timeout=0.3))
                 for _ in range(40)]
        done = await asyncio.gather(*hangs, return_exceptions=True)
        assert all(isinstance(d, RequestTimeout) for d in done), done
        # The queued ones expired with their callers: the next request runs at once. (Counted from
        # a slot freeing up, they used to hold the instance for 20 rounds of 0.3 s: this timed out.)
        assert (await messaging.send_message("slow", operation="ping", timeout=3)).result == "pong"
        snapshot = slow.metrics_snapshot()
        assert snapshot["expired"] >= 36, snapshot  # never started: their deadline passed while queued
        assert snapshot["queued"] == 0


async def test_a_saturated_instance_reports_degraded_while_it_is(
        nc: NATS, prefix: str, messaging: PluginMessaging) -> None:
    config = Slow.default_config().merged({"max_concurrency": 1})
    async with PluginRuntime(Slow(), nc, prefix=prefix, register=False, config=config) as slow:
        assert (await slow.check_health()).status == Health.HEALTHY
        hangs = [asyncio.create_task(messaging.send_message("slow", operation="hang", timeout=5)) for _ in range(3)]

        async def queued() -> bool:
            return len(slow._queue) == 2

        await eventually(queued, what="two requests queued behind the busy slot")
        check = await slow.check_health()
        assert check.status == Health.DEGRADED and "saturated: 1/1 handlers busy, 2 requests queued" in check.reason
        for h in hangs:
            h.cancel()
        await asyncio.gather(*hangs, return_exceptions=True)


async def test_past_max_queued_a_request_is_refused_at_once(nc: NATS, prefix: str, messaging: PluginMessaging) -> None:
    config = Slow.default_config().merged({"max_concurrency": 1, "max_queued": 1})
    async with PluginRuntime(Slow(), nc, prefix=prefix, register=False, config=config) as slow:
        busy = [asyncio.create_task(messaging.send_message("slow", operation="hang", timeout=10)) for _ in range(2)]

        async def full() -> bool:
            return len(slow._inflight) == 1 and len(slow._queue) == 1

        await eventually(full, what="one running, one queued")
        with pytest.raises(ResourceError, match=r"overloaded: 1 handlers busy and 1 requests queued"):
            await messaging.send_message("slow", operation="ping", timeout=5)
        assert slow.metrics_snapshot()["refused"] == 1
        for b in busy:
            b.cancel()
        await asyncio.gather(*busy, return_exceptions=True)


async def test_requests_still_running_at_stop_get_a_typed_error(nc: NATS, prefix: str,
                                                               messaging: PluginMessaging) -> None:
    config = Slow.default_config().merged({"max_concurrency": 1})
    runtime = PluginRuntime(Slow(), nc, prefix=prefix, register=False, config=config)
    await runtime.start()
    calls = [asyncio.create_task(messaging.send_message("slow", operation="hang", timeout=30)) for _ in range(2)]

    async def waiting() -> bool:
        return len(runtime._inflight) == 1 and len(runtime._queue) == 1

    await eventually(waiting, what="one running, one queued")
    await runtime.stop(drain_timeout=0.2)
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
    assert all(isinstance(r, CommunicationError) and "stopped before" in str(r) for r in results), results


# -- 5, 6: broadcast -------------------------------------------------------------------------

async def test_a_broadcast_nobody_serves_raises_plugin_not_found(registry: object, messaging: PluginMessaging) -> None:
    # The server's no-responders status used to be counted as one (anonymous, empty) reply.
    with pytest.raises(PluginNotFound, match=r"no plugin instance serves broadcasts to 'ghost'"):
        await messaging.broadcast_message({}, target="ghost", timeout=2)


async def test_a_forged_instance_id_does_not_silence_an_instance(nc: NATS, prefix: str, registry: object) -> None:
    async with PluginRuntime(Echo(), nc, prefix=prefix) as echo:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        # Anyone can write the victim's own id in the envelope; it must still answer.
        await nc.publish(f"{prefix}.broadcast", b'"hi"', reply=inbox,
                         headers={"Mesh": f"1;id=forged;inst={echo.instance_id}"})
        reply = await sub.next_msg(timeout=5)
        await sub.unsubscribe()
        assert response_from_msg(reply).result == "hi"
        # Its own broadcast it still does not answer (known by the inbox it owns).
        result = await echo.messaging.broadcast_message("self?", timeout=1)
        assert [r.source for r in result] == []


# -- 1: bounded logs -------------------------------------------------------------------------

async def test_one_huge_bad_header_logs_a_bounded_line_and_a_flood_a_bounded_count(
        nc: NATS, prefix: str, messaging: PluginMessaging, caplog: pytest.LogCaptureFixture) -> None:
    async with PluginRuntime(Echo(), nc, prefix=prefix, register=False):
        with caplog.at_level(logging.INFO, logger="mesh.plugin.echo"):
            huge = "{" + "x" * 70_000  # not JSON: InvalidMessage, whose text used to carry all of it
            for _ in range(100):
                reply = await nc.request(f"{prefix}.plugin.echo", b"{}", timeout=5, headers={"Mesh-Metadata": huge})
                assert response_from_msg(reply).error is not None
        records = [r for r in caplog.records if r.name == "mesh.plugin.echo"]
        assert records, "the bad message is logged"
        assert max(len(r.getMessage()) for r in records) < 1000
        assert len(records) <= 25, f"{len(records)} lines for 100 identical bad messages"
        assert (await messaging.send_message("echo", "ok", timeout=5)).result == "ok"


# -- 13: errors through two plugins ----------------------------------------------------------

class Front(Plugin):
    name = "front"

    async def handle_message(self, message: Message) -> Any:
        assert self.context is not None
        return (await self.context.messaging.send_message("back", message.payload)).result


class Back(Plugin):
    name = "back"

    async def handle_message(self, message: Message) -> Any:
        raise LookupError("out of stock: 7")


async def test_an_error_through_two_plugins_names_its_type_once(
        nc: NATS, prefix: str, messaging: PluginMessaging) -> None:
    async with PluginRuntime(Back(), nc, prefix=prefix, register=False), \
            PluginRuntime(Front(), nc, prefix=prefix, register=False):
        with pytest.raises(HandlerError) as info:
            await messaging.send_message("front", {"sku": 7}, timeout=5)
    err = info.value
    assert str(err) == "LookupError: out of stock: 7"  # was "HandlerError: LookupError: out of stock: 7"
    assert err.remote_type == "LookupError" and err.plugin == "back"
    assert err.via == ["front"]  # type: ignore[attr-defined]


# -- 11: what a starting instance waits for --------------------------------------------------

class Needs(Plugin):
    name = "needs"
    dependencies = [{"name": "tally", "version": ">=1"}]


async def test_an_instance_waiting_for_a_dependency_says_so_in_the_registry(
        nc: NATS, prefix: str, registry: object, client: PluginRegistry) -> None:
    config = Needs.default_config().merged({"dependency_timeout": 3})
    runtime = PluginRuntime(Needs(), nc, prefix=prefix, config=config, heartbeat_interval=0.2)
    starting = asyncio.create_task(runtime.start())

    async def announced() -> Any:
        info = await client.get_plugin(runtime.instance_id)
        return info if info is not None and "waiting for tally" in info.health_reason else None

    info = await eventually(announced, what="the instance to register as starting")
    assert info.health == Health.STARTING and "tally >=1" in info.health_reason
    with pytest.raises(Exception, match="tally"):
        await starting

    async def gone() -> bool:
        return await client.get_plugin(runtime.instance_id) is None

    await eventually(gone, what="the failed instance to unregister")


# -- 8: an iterating event consumer is part of the trace -------------------------------------

RECEIVE_SPAN = '''
import asyncio, json, sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
import nats
from plugin_sdk import PluginMessaging

spans = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(spans))
trace.set_tracer_provider(provider)

async def main():
    nc = await nats.connect(sys.argv[1])
    publisher = PluginMessaging(nc, prefix=sys.argv[2], source="shop")
    consumer = PluginMessaging(nc, prefix=sys.argv[2], source="mailer")
    async with await consumer.subscribe_to_events("orders.*") as events:
        await publisher.publish_event("orders.created", {"id": 7})
        event = await events.next(timeout=5)
    await nc.close()
    print(json.dumps({"event": event.payload, "spans": [
        {"name": s.name, "kind": s.kind.name, "trace": s.context.trace_id, "id": s.context.span_id,
         "parent": s.parent.span_id if s.parent else None,
         "links": [link.context.span_id for link in s.links]} for s in spans.get_finished_spans()]}))

asyncio.run(main())
'''


async def test_an_event_read_from_subscribe_to_events_gets_a_receive_span(nats_server: NatsServer, prefix: str) -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", RECEIVE_SPAN, nats_server.url, prefix,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    found = json.loads(out)
    assert found["event"] == {"id": 7}
    by_name = {s["name"]: s for s in found["spans"]}
    subject = f"{prefix}.event.orders.created"
    publish, receive = by_name[f"publish {subject}"], by_name[f"receive {subject}"]
    assert receive["kind"] == "CONSUMER" and receive["trace"] == publish["trace"]  # one trace
    assert receive["parent"] == publish["id"] and receive["links"] == [publish["id"]]


# -- slow consumers: counted and logged once per burst ---------------------------------------

class Sluggish(Plugin):
    name = "sluggish"

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.seen = 0

    @on_event("flood.*")
    async def on_flood(self, event: Message) -> None:
        self.seen += 1
        await self.release.wait()


async def test_slow_consumer_drops_are_counted_per_subscription_and_logged_once_per_burst(
        nc: NATS, prefix: str, messaging: PluginMessaging, caplog: pytest.LogCaptureFixture) -> None:
    plugin = Sluggish()
    async with PluginRuntime(plugin, nc, prefix=prefix, register=False) as runtime:
        (sub,) = [s for s in runtime._subs if s.subject == f"{prefix}.event.flood.*"]
        sub._pending_bytes_limit = 64  # fault injection: a tiny pending buffer, so a burst overflows it
        with caplog.at_level(logging.WARNING, logger="mesh.nats"):
            for i in range(50):
                await messaging.publish_event(f"flood.{i}", {"i": i})
            await nc.flush()

            async def dropped() -> dict[str, int]:
                return runtime.metrics_snapshot()["dropped"]

            counts = await eventually(dropped, what="drops to be counted")
        plugin.release.set()
    assert list(counts) == [f"{prefix}.event.flood.*"] and counts[f"{prefix}.event.flood.*"] >= 10
    lines = [r for r in caplog.records if "slow consumer" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]  # one line per burst, not one per message


# -- subscribed means subscribed at the server ------------------------------------------------

async def test_an_event_published_right_after_subscribe_to_events_returns_is_never_missed(
        nats_server: NatsServer, prefix: str) -> None:
    # nats-py's flush() writes its PING ahead of a SUB still in the client's buffer, so "subscribed"
    # could come back before the server had the subscription: 5 of 300 such events were lost here.
    from plugin_sdk.host import close, connect

    consumer_nc = await connect(nats_server.url, name="consumer")
    publisher_nc = await connect(nats_server.url, name="publisher")
    try:
        consumer = PluginMessaging(consumer_nc, prefix=prefix, source="consumer")
        publisher = PluginMessaging(publisher_nc, prefix=prefix, source="publisher")
        missed = []
        for i in range(200):
            async with await consumer.subscribe_to_events(f"tick.{i}") as events:
                await publisher.publish_event(f"tick.{i}", i)
                try:
                    await events.next(timeout=2)
                except TimeoutError:
                    missed.append(i)
        assert missed == []
    finally:
        await close(consumer_nc)
        await close(publisher_nc)
