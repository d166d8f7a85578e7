"""Bad input gets a typed error naming the cause, and the plugin keeps serving."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from plugin_sdk import (
    HandlerError,
    InvalidMessage,
    Message,
    PayloadTooLarge,
    Plugin,
    PluginConfig,
    PluginMessaging,
    PluginNotFound,
    PluginRuntime,
    ProtocolMismatch,
    RequestTimeout,
    ResourceError,
    UnknownOperation,
    command,
)
from plugin_sdk._wire import response_from_msg
from tests.conftest import eventually


class Touchy(Plugin):
    name = "touchy"
    version = "1.0.0"

    @command("ok")
    async def ok(self, message: Message) -> Any:
        return {"ok": True, "echo": message.payload}

    @command("boom")
    async def boom(self, message: Message) -> Any:
        raise ValueError("kaboom")

    @command("full")
    async def full(self, message: Message) -> Any:
        raise ResourceError("disk full")

    @command("hang")
    async def hang(self, message: Message) -> Any:
        await asyncio.sleep(3600)

    @command("weird")
    async def weird(self, message: Message) -> Any:
        return {"not json": object()}


@pytest.fixture
async def touchy(nc: NATS, prefix: str, registry: object) -> Any:
    config = Touchy.default_config().merged({"max_payload": 4096})
    async with PluginRuntime(Touchy(), nc, prefix=prefix, config=config) as runtime:
        yield runtime


async def still_serving(messaging: PluginMessaging) -> None:
    assert (await messaging.send_message("touchy", {"n": 1}, operation="ok")).result == {"ok": True, "echo": {"n": 1}}


async def test_malformed_json_gets_invalid_message(nc: NATS, prefix: str, touchy: Any,
                                                   messaging: PluginMessaging) -> None:
    reply = await nc.request(f"{prefix}.plugin.touchy", b"{not json", timeout=5)
    response = response_from_msg(reply)
    assert response.error is not None
    assert response.error.type == "InvalidMessage" and "not valid JSON" in response.error.message
    assert reply.headers is not None and reply.headers["Nats-Service-Error-Code"] == "400"
    with pytest.raises(InvalidMessage):
        response.raise_for_error()
    await still_serving(messaging)


async def test_plain_nats_request_without_headers_works(nc: NATS, prefix: str, touchy: Any) -> None:
    # What `nats req <prefix>.plugin.touchy.<id> ...` would send: no mesh headers at all.
    reply = await nc.request(f"{prefix}.plugin.touchy", b'{"x": 1}', timeout=5)
    response = response_from_msg(reply)
    assert response.error is not None and response.error.type == "UnknownOperation"


async def test_handler_raising_gives_handler_error_and_keeps_serving(
        touchy: Any, messaging: PluginMessaging, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO), pytest.raises(HandlerError) as info:
        await messaging.send_message("touchy", operation="boom")
    assert info.value.remote_type == "ValueError"
    assert "kaboom" in str(info.value)
    assert info.value.plugin == "touchy"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a handler error is not a crash"
    await still_serving(messaging)


async def test_plugin_error_arrives_as_the_same_class(touchy: Any, messaging: PluginMessaging) -> None:
    with pytest.raises(ResourceError, match="disk full"):
        await messaging.send_message("touchy", operation="full")
    response = await messaging.send_message("touchy", operation="full", raise_on_error=False)
    assert not response.is_success()
    assert response.error is not None and response.error.type == "ResourceError" and response.error.code == 507
    await still_serving(messaging)


async def test_unknown_operation(touchy: Any, messaging: PluginMessaging) -> None:
    with pytest.raises(UnknownOperation, match=r"'nope'.*known: boom, full, hang, ok, weird"):
        await messaging.send_message("touchy", operation="nope")


async def test_unknown_target(registry: object, messaging: PluginMessaging) -> None:
    with pytest.raises(PluginNotFound, match="no plugin instance serves 'ghost'"):
        await messaging.send_message("ghost", {"x": 1}, timeout=2)


async def test_hanging_handler_times_out_and_plugin_keeps_serving(touchy: Any, messaging: PluginMessaging) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RequestTimeout, match="touchy"):
        await messaging.send_message("touchy", operation="hang", timeout=0.5)
    assert loop.time() - started < 5  # the caller got its answer within (about) its timeout, not never
    await still_serving(messaging)
    # The runtime cancels the hung handler at the caller's deadline: nothing is left in flight.
    async def drained() -> bool:
        return len(touchy._inflight) == 0

    await eventually(drained, timeout=2, what="the hung handler to be cancelled")


async def test_payload_over_plugin_limit(touchy: Any, messaging: PluginMessaging) -> None:
    with pytest.raises(PayloadTooLarge, match="max_payload of 4096"):
        await messaging.send_message("touchy", {"blob": "x" * 5000}, operation="ok")
    await still_serving(messaging)


async def test_payload_over_server_limit(nc: NATS, touchy: Any, messaging: PluginMessaging) -> None:
    with pytest.raises(PayloadTooLarge, match="server's limit"):
        await messaging.send_message("touchy", {"blob": "x" * (nc.max_payload + 1)}, operation="ok")
    await still_serving(messaging)


async def test_not_json_serialisable_payload_and_result(touchy: Any, messaging: PluginMessaging) -> None:
    with pytest.raises(InvalidMessage, match="not JSON-serialisable"):
        await messaging.send_message("touchy", {"x": object()}, operation="ok")
    with pytest.raises(HandlerError, match="not JSON-serialisable"):
        await messaging.send_message("touchy", operation="weird")
    await still_serving(messaging)


async def test_newer_protocol_is_refused_with_a_typed_error(nc: NATS, prefix: str, touchy: Any) -> None:
    reply = await nc.request(f"{prefix}.plugin.touchy", b"{}", timeout=5,
                             headers={"Mesh": "2;op=ok"})
    with pytest.raises(ProtocolMismatch, match="speaks mesh protocol 1"):
        response_from_msg(reply).raise_for_error()


async def test_invalid_config_is_refused() -> None:
    from plugin_sdk import ConfigError

    with pytest.raises(ConfigError, match="version"):
        PluginConfig(name="x").merged({"version": "1.0"}, source="inline")
    with pytest.raises(ConfigError, match="max_concurrency"):
        PluginConfig(name="x").merged({"max_concurrency": "lots"}, source="inline")


async def test_handler_timeout_bounds_a_patient_caller(nc: NATS, prefix: str, registry: object,
                                                       messaging: PluginMessaging) -> None:
    config = Touchy.default_config().merged({"handler_timeout": 0.3})
    async with PluginRuntime(Touchy(), nc, prefix=prefix, config=config) as runtime:
        with pytest.raises(RequestTimeout, match=r"did not finish within 0\.3s"):
            await messaging.send_message("touchy", operation="hang", timeout=30)
        await still_serving(messaging)
        # Idle, the deadline watchdog ends (no wake-ups for nothing); the next slow handler starts it again.
        async def watchdog_ended() -> bool:
            return runtime._watchdog is None

        await eventually(watchdog_ended, timeout=5, what="the idle watchdog to end")
        with pytest.raises(RequestTimeout, match=r"did not finish within 0\.3s"):
            await messaging.send_message("touchy", operation="hang", timeout=30)


async def test_envelope_breaking_operation_names_are_refused(touchy: Any, messaging: PluginMessaging) -> None:
    for bad in ["a;b", "x=1", "two words", ""]:
        with pytest.raises(InvalidMessage, match="invalid operation name"):
            await messaging.send_message("touchy", operation=bad)
    await still_serving(messaging)


async def _line_starting(reader: asyncio.StreamReader, prefix: tuple[bytes, ...], timeout: float = 5.0) -> bytes:
    """The first protocol line from the server that starts with one of ``prefix`` (PING, PONG, +OK skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            line = await reader.readline()
            if line.startswith(prefix) or not line:
                return line
            assert line.startswith((b"PING", b"PONG", b"+OK")), line


async def test_a_header_block_that_starts_with_digits_does_not_desynchronise_the_reader(
        nats_server: Any, nc: Any, prefix: str, touchy: Any, messaging: PluginMessaging) -> None:
    # nats-server forwards a header block as the publisher wrote it. nats-py's expression for an
    # HMSG line lets its last separator run past the line's end, so a block that starts with
    # digits and CRLF (``12\r\n``) made it read the message with the wrong reply and sizes, then
    # the rest of the stream as garbage: a ProtocolError and a reconnect, and the requests that
    # arrived with it were lost. The mesh's parser reads the line up to its CRLF, as the protocol does.
    reconnects = nc.stats["reconnects"]
    host, port = nats_server.url.removeprefix("nats://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        await reader.readline()  # INFO
        block, body = b"12\r\nzz", b"hi"
        subject = f"{prefix}.plugin.touchy".encode()
        writer.write(b'CONNECT {"verbose":false,"headers":true}\r\nSUB hostile.inbox 1\r\n'
                     + b"HPUB %s %d %d\r\n%s%s\r\n" % (subject, len(block), len(block) + len(body), block, body)
                     + b"PUB %s hostile.inbox 8\r\n{\"n\": 2}\r\nPING\r\n" % subject)
        await writer.drain()
        # (the request right behind the odd block is answered: the plugin read both as they were)
        assert await _line_starting(reader, (b"MSG hostile.inbox 1 ", b"HMSG hostile.inbox 1 "))
    finally:
        writer.close()
    await still_serving(messaging)
    assert nc.stats["reconnects"] == reconnects


async def test_a_status_header_nats_py_cannot_parse_does_not_leave_the_plugin_deaf(
        nats_server: Any, prefix: str, touchy: Any, messaging: PluginMessaging) -> None:
    # nats-py parses an inline status (``NATS/1.0 503 …``) with a strict UTF-8 decode, inside its
    # reader; the error ended the reader for good, and the plugin heard nothing more. Any client
    # can send such a header block, so here one does, byte for byte, from a socket of its own.
    host, port = nats_server.url.removeprefix("nats://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        await reader.readline()  # INFO
        block = b"NATS/1.0 503 \x80\xff\r\nX: y\r\n\r\n"
        writer.write(b'CONNECT {"verbose":false,"headers":true}\r\n'
                     + f"HPUB {prefix}.plugin.touchy {len(block)} {len(block)}\r\n".encode() + block + b"\r\n"
                     + b"PING\r\n")
        await writer.drain()
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"PONG")
    finally:
        writer.close()
    await still_serving(messaging)
