"""Each fast path of the message path gives exactly what the straightforward one does.

The sender builds its :class:`Message` without validation (``fast_model``) and its envelope by
hand (``request_headers``); the receiver parses the envelope by hand (``parse_envelope``) and
builds the message without validation (``message_from_msg``). Here, for any fields a sender may
give: the fast message equals the validated one, and what crosses the wire (the header block as
nats-py writes and parses it, the JSON body) comes back as the same message, or as the same
typed error.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.aio.msg import Msg

from plugin_sdk import InvalidMessage, Message, MessageKind, Plugin, PluginMessaging, on_event
from plugin_sdk._wire import H_ENVELOPE, H_METADATA, dumps, message_from_msg, request_headers

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(), lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=12)
names = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True)
operations = st.none() | st.from_regex(r"[A-Za-z0-9_-]{1,16}", fullmatch=True)
# Metadata travels as JSON in a header: any text, but a header value is one line (nats-py strips
# the ends and replaces line breaks), which JSON's escaping already guarantees.
metadata = st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3)
kinds = st.sampled_from(list(MessageKind))


def _wire_headers(headers: dict[str, str]) -> dict[str, str]:
    """The header block as nats-py writes it (``Name: value`` lines) and parses it back."""
    block = "".join(f"{k}: {v.strip()}\r\n" for k, v in headers.items()).encode()
    return Client._parse_header_lines(block)


def _messaging() -> PluginMessaging:
    return PluginMessaging(None, prefix="t", source="sender", source_instance="sender-1")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(names, json_values, operations, metadata, kinds)
def test_the_fast_message_equals_the_validated_one(target: str, payload: Any, operation: str | None,
                                                   meta: dict[str, str], kind: MessageKind) -> None:
    fast = _messaging()._message(target, payload, kind, operation, meta)
    validated = Message.model_validate({**fast.model_dump(), "id": fast.id})
    assert fast.model_dump() == validated.model_dump()
    assert fast == validated


@settings(max_examples=300, deadline=None)
@given(names, json_values, operations, metadata, kinds, st.none() | st.floats(0.001, 3600))
def test_what_crosses_the_wire_comes_back_as_the_same_message(target: str, payload: Any, operation: str | None,
                                                              meta: dict[str, str], kind: MessageKind,
                                                              timeout: float | None) -> None:
    sent = _messaging()._message(target, payload, kind, operation, meta)
    msg = Msg(None, subject=f"t.plugin.{target}", data=dumps(payload),  # type: ignore[arg-type]
              headers=_wire_headers(request_headers(sent, timeout=timeout)))
    received = message_from_msg(msg, target=target)
    assert received.model_dump() == {**sent.model_dump(), "target": target}


@given(st.text(max_size=20).map(lambda s: s.replace(";", "")).filter(
    lambda s: s.strip() not in {k.value for k in MessageKind}))
def test_an_unknown_kind_is_the_same_typed_error(kind: str) -> None:
    msg = Msg(None, subject="t.plugin.x", data=b"null",  # type: ignore[arg-type]
              headers=_wire_headers({H_ENVELOPE: f"1;id=a;kind={kind}"}))
    with pytest.raises(InvalidMessage, match="unknown message kind"):
        message_from_msg(msg, target="x")


@given(json_values.filter(lambda v: not isinstance(v, dict)))
def test_metadata_that_is_not_an_object_is_a_typed_error(value: Any) -> None:
    msg = Msg(None, subject="t.plugin.x", data=b"null",  # type: ignore[arg-type]
              headers={H_ENVELOPE: "1;id=a", H_METADATA: json.dumps(value)})
    with pytest.raises(InvalidMessage, match="must be a JSON object"):
        message_from_msg(msg, target="x")


# -- the direct path (MeshClient): the same bytes, headers, replies and errors as nats-py's ------------

header_names = st.text(st.characters(codec="ascii"), min_size=0, max_size=8) | st.sampled_from(
    ["Mesh", "Mesh-Metadata", "traceparent", "Nats-Msg-Id", " Mesh ", "a b", "\x1cKey", "K\t"])
header_lines = st.lists(st.tuples(header_names, st.sampled_from([b":", b": ", b"", b" : "]),
                                  st.binary(max_size=12)), max_size=4).map(
    lambda lines: b"\r\n".join(n.encode() + sep + v for n, sep, v in lines))


@settings(max_examples=500, deadline=None)
@given(header_lines | st.binary(max_size=40))
def test_the_header_parser_gives_nats_pys_dict(raw: bytes) -> None:
    from plugin_sdk._wire import parse_header_lines

    assert parse_header_lines(raw) == Client._parse_header_lines(raw)


@settings(max_examples=300, deadline=None)
@given(header_lines | st.binary(max_size=40), st.sampled_from([b"", b" 503", b" 100 Idle Heartbeat", b" 404 No"]),
       st.sampled_from([b"\r\n", b"\r\n\r\n", b""]))
async def test_the_header_block_parses_as_nats_py_parses_it(raw: bytes, status: bytes, end: bytes) -> None:
    from plugin_sdk._connection import MeshClient

    nc = MeshClient()  # (parsing needs no connection)
    block = b"NATS/1.0" + status + b"\r\n" + raw + end
    try:
        expected = await Client._process_headers(nc, block)
    except (UnicodeDecodeError, ValueError, IndexError):
        expected = None  # (nats-py fails, and its reader stops: ours reads the message as one without headers)
    assert await nc._process_headers(block) == expected


subjects = st.from_regex(r"[A-Za-z0-9_.$>*-]{1,30}", fullmatch=True)
header_dicts = st.none() | st.dictionaries(
    st.sampled_from(["Mesh", "Mesh-Metadata", "traceparent", "Nats-Service-Error", "X-Other", " Padded "]),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=20), max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(subjects, st.sampled_from(["", "_INBOX.abc.1f"]), st.binary(max_size=64), header_dicts)
async def test_the_protocol_line_is_the_one_nats_py_writes(nc: Client, subject: str, reply: str, body: bytes,
                                                          headers: dict[str, str] | None) -> None:
    # (the connection is only where nats-py's publish puts the line: each example takes it back out)
    from plugin_sdk._wire import pub_command

    await Client.publish(nc, subject, body, reply=reply, headers=headers)
    written = nc._pending.pop()  # (nothing awaited since: nats-py's flusher has not taken it yet)
    nc._pending_data_size -= len(written)
    assert pub_command(subject, reply, body, headers) == written


@settings(max_examples=300, deadline=None)
@given(names, operations, metadata, st.none() | kinds, st.floats(0.001, 3600), st.text(max_size=12))
def test_the_direct_envelope_is_the_message_envelope(target: str, operation: str | None, meta: dict[str, str],
                                                     kind: MessageKind | None, timeout: float, mid: str) -> None:
    from plugin_sdk._wire import event_headers, header_block

    mid = "".join(c for c in mid if c.isalnum()) or "x"
    m = _messaging()
    message = m._message(target, None, kind, operation, meta)
    message.id = mid
    assert m._request_block(mid, kind, operation, timeout, meta) == header_block(
        request_headers(message, timeout=timeout))
    expected = event_headers(m._env_tail, Message(metadata=meta).metadata if meta else None)
    expected["Mesh"] = f"1;id={mid}" + m._env_tail
    assert m._event_block(mid, meta) == header_block(expected)
    trace = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "a=b"}
    assert m._event_block(mid, meta, trace) == header_block({**expected, **trace})
    assert m._request_block(mid, kind, operation, timeout, meta, trace) == header_block(
        {**request_headers(message, timeout=timeout), **trace})
    for value in (trace["traceparent"], f" {trace['traceparent']}", "00-a\r\nInjected: 1", "x\n", "", mid):
        assert m._request_block(mid, kind, operation, timeout, meta, {"traceparent": value}) == header_block(
            {**request_headers(message, timeout=timeout), "traceparent": value})


@settings(max_examples=500, deadline=None)
@given(st.text(st.sampled_from("1;=ab v\t\x1c\xa0.-") | st.characters(), max_size=30))
def test_the_envelope_parser_gives_the_field_by_field_result(raw: str) -> None:
    from plugin_sdk._wire import parse_envelope, parse_envelope_plain

    assert parse_envelope({H_ENVELOPE: raw}) == (parse_envelope_plain(raw) if raw else {})


# -- the reader: MeshParser against nats-py's Parser, MSG/HMSG by MSG/HMSG ----------------------------

class _Recorder:
    """What a parser hands its client, in order (``direct``: the sids served on the direct path)."""

    def __init__(self, direct: frozenset[int] | None = frozenset()) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.direct = direct

    def _msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        self.calls.append(("msg", sid, bytes(subject), bytes(reply), bytes(data), bytes(headers) if headers else None))

    def deliver_direct(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> bool:
        if self.direct is not None and sid not in self.direct:  # (None: every sid)
            return False
        self._msg(sid, subject, reply, data, headers)
        return True

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        self._msg(sid, subject, reply, data, headers)

    async def _process_ping(self) -> None:
        self.calls.append(("ping",))

    async def _process_pong(self) -> None:
        self.calls.append(("pong",))

    async def _process_info(self, info: Any) -> None:
        self.calls.append(("info", info))

    async def _process_err(self, err: str) -> None:
        self.calls.append(("err", err))


tokens = st.from_regex(r"[A-Za-z0-9_.$>*-]{1,12}", fullmatch=True).map(str.encode)
header_blocks = st.builds(lambda rest: b"NATS/1.0" + rest, st.sampled_from(
    [b"\r\n\r\n", b"\r\nMesh: 1;id=a;src=b\r\n\r\n", b" 503\r\n\r\n", b"\r\nK: v\r\nL: w\r\n\r\n"])
    | st.binary(max_size=16))


@st.composite
def messages(draw: Any) -> bytes:
    """One protocol item as nats-server writes it: a MSG or HMSG (sizes right), or a control line."""
    kind = draw(st.sampled_from(["msg", "hmsg", "hmsg", "control"]))
    if kind == "control":
        return draw(st.sampled_from([b"PING\r\n", b"PONG\r\n", b"+OK\r\n", b'INFO {"max_payload":1024}\r\n',
                                     b"-ERR 'Unknown Subject'\r\n"]))
    subject, sid = draw(tokens), draw(st.integers(1, 10**6))
    reply, body = draw(st.none() | tokens), draw(st.binary(max_size=40))
    at = b" ".join([subject, str(sid).encode()] + ([reply] if reply else []))
    if kind == "msg":
        return b"MSG %s %d\r\n%s\r\n" % (at, len(body), body)
    block = draw(header_blocks)
    return b"HMSG %s %d %d\r\n%s%s\r\n" % (at, len(block), len(block) + len(body), block, body)


# Lines only a broken or hostile server would write: what nats-py's expressions make of them
# (a message, a ProtocolError, a wait for more) is what the mesh's parser must make of them too.
odd_lines = st.builds(lambda op, rest: op + rest + b"\r\n", st.sampled_from([b"MSG", b"HMSG", b"MSG ", b"HMSG "]),
                      st.binary(max_size=20)
                      | st.text(st.sampled_from(" \t\r\n\x0b19a+_-"), max_size=20).map(str.encode))


async def _parse_all(parser: Any, chunks: list[bytes]) -> tuple[Any, ...]:
    from nats.protocol.parser import AWAITING_MSG_PAYLOAD

    try:
        for chunk in chunks:
            await parser.parse(chunk)
    except Exception as exc:  # (the outcome compared: nats-py's ProtocolError, or none)
        return ("raised", type(exc).__name__, str(exc))
    waiting = (parser.needed, parser.header_needed, parser.msg_arg) if parser.state == AWAITING_MSG_PAYLOAD else ()
    return ("state", parser.state, bytes(parser.buf), waiting)  # (sizes and args matter while a body is awaited)


@settings(max_examples=400, deadline=None)
@given(st.lists(messages() | odd_lines, min_size=1, max_size=12), st.lists(st.integers(0, 2000), max_size=6),
       st.none() | st.frozensets(st.integers(1, 10**6), max_size=3))
async def test_the_reader_hands_over_what_nats_pys_parser_does(items: list[bytes], cuts: list[int],
                                                               direct: frozenset[int] | None) -> None:
    from nats.protocol.parser import Parser

    from plugin_sdk._parser import MeshParser

    stream = b"".join(items)
    at = sorted({min(c, len(stream)) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *at], [*at, len(stream)], strict=True)]
    theirs, ours = _Recorder(), _Recorder(direct)
    expected = await _parse_all(Parser(theirs), chunks)
    got = await _parse_all(MeshParser(ours), chunks)  # type: ignore[arg-type]
    assert ours.calls == theirs.calls
    assert got == expected


@settings(max_examples=500, deadline=None)
@given(header_lines | st.binary(max_size=40), st.sampled_from([b"", b" 503", b"\r\nMesh: ", b"\r\nMesh:",
                                                             b"\r\nMesh: 1;id=a\r\ntraceparent: ",
                                                             b"\r\nMesh: 1;id=a\r\ntraceparent:00-",
                                                             b"\r\nMesh:\r\ntraceparent :"]),
       st.sampled_from([b"\r\n\r\n", b"\r\n", b""]))
def test_the_direct_path_reads_a_header_block_as_nats_py_does(raw: bytes, head: bytes, end: bytes) -> None:
    from plugin_sdk._connection import MeshClient

    nc = MeshClient()
    got: list[Any] = []
    nc._direct[1] = lambda subject, reply, data, headers: got.append(headers)
    nc._subs[1] = object()  # type: ignore[assignment]
    block = b"NATS/1.0" + head + raw + end
    if nc.deliver_direct(1, b"s", b"", b"", block):
        # (what it reads inline, it reads as nats-py's line parser would; the rest goes to _process_headers)
        assert block[8:10] == b"\r\n" and len(block) > 10
        assert got == [Client._parse_header_lines(block[10:]) or None]


@settings(max_examples=500, deadline=None)
@given(st.none() | st.dictionaries(st.sampled_from([H_ENVELOPE, H_METADATA, "traceparent"]), st.text(max_size=40)
                                   | st.sampled_from(["1;id=a;src=b", "1;src=s;inst=s-1;op=x;kind=query", "1;id=",
                                                      '{"k":"v"}', "[1]", "1; id = a"]), max_size=3),
       st.binary(max_size=12) | st.sampled_from([b"", b"null", b'{"a":1}']))
def test_an_event_is_built_as_message_from_builds_it(headers: dict[str, str] | None, data: bytes) -> None:
    from plugin_sdk._wire import event_from, message_from, parse_envelope

    def built(make: Any) -> Any:
        try:
            message = make()
        except InvalidMessage as exc:
            return ("invalid", str(exc))
        fields = message.model_dump()
        if not parse_envelope(headers).get("id"):  # (no id was sent: each makes up its own)
            fields.pop("id")
        return fields, message.model_fields_set

    assert built(lambda: event_from(data, headers, "a.b")) == built(
        lambda: message_from(data, headers, target="a.b", kind=MessageKind.EVENT))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0, 5000) | st.sampled_from([0.0, 1e-6, 1.5e-6, 2e-3]), max_size=40))
def test_counting_a_burst_of_events_counts_each_one(durations: list[float]) -> None:
    from pytest import approx

    from plugin_sdk._metrics import RuntimeStats

    one, many = RuntimeStats(), RuntimeStats()
    ep_one, ep_many = one.endpoint("e", "s"), many.endpoint("e", "s")
    for seconds in durations:
        one.record(ep_one, "event", seconds, None)
    many.record_many(ep_many, "event", durations)
    if not durations:
        assert "event" not in many.kinds
        return
    for a, b in ((one.kinds["event"].total, many.kinds["event"].total),
                 (one.kinds["event"].current, many.kinds["event"].current)):
        assert (a.counts, a.count, a.max) == (b.counts, b.count, b.max)
        assert b.total == approx(a.total)
    assert (ep_many.num_requests, ep_many.processing_time) == (ep_one.num_requests, approx(ep_one.processing_time))


# -- end to end: a plugin on a MeshClient (the direct path) against one on a plain nats-py client ------

class Probe(Plugin):
    """Answers with what it was sent, or fails as asked; keeps every message and event it got."""

    name = "probe"
    version = "1.0.0"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    async def handle_message(self, message: Message) -> Any:
        # (a message without an envelope id gets a fresh one: of each process's own sequence)
        # (a message without an envelope id gets a fresh one of its process: the test's own ids are short)
        self.seen.append({k: v for k, v in message.model_dump().items()
                          if k != "target" and not (k == "id" and len(v) > 8)})
        if message.operation == "fail":
            raise ValueError(f"failing as asked: {message.payload!r}")
        if message.operation == "refuse":
            raise InvalidMessage("refused as asked")
        return {"payload": message.payload, "metadata": message.metadata, "kind": message.kind.value}

    @on_event("probe.>")
    async def on_probe(self, event: Message) -> None:
        self.events.append({k: v for k, v in event.model_dump().items() if k != "id"})


wire_cases = st.tuples(
    st.one_of(json_values.map(dumps), st.binary(max_size=8)),  # a body: JSON, or anything
    st.one_of(st.none(), st.builds(lambda mid, op, kind: {H_ENVELOPE: f"1;id={mid};src=peer" + (
        f";op={op}" if op else "") + (f";kind={kind}" if kind else "")},
        st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), st.sampled_from([None, "fail", "refuse", "x"]),
        st.sampled_from([None, "query", "event", "bogus"])),
        st.just({H_ENVELOPE: "2;id=a"}), st.just({H_ENVELOPE: "1;id=a", H_METADATA: '{"k": "v"}'}),
        st.just({H_ENVELOPE: "1;id=a", H_METADATA: "[1]"})),
    st.booleans())  # to the plugin's subject, or as a broadcast


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(wire_cases, min_size=15, max_size=15))
async def test_a_plugin_on_the_direct_path_answers_byte_for_byte_as_on_nats_pys(
        nats_server: Any, prefix: str, cases: list[tuple[bytes, dict[str, str] | None, bool]]) -> None:
    import nats

    from plugin_sdk._runtime import PluginRuntime
    from plugin_sdk.host import close, connect

    plain, direct, caller = await nats.connect(nats_server.url), await connect(nats_server.url, name="direct"), \
        await nats.connect(nats_server.url)
    sides = {"plain": (plain, Probe()), "direct": (direct, Probe())}
    runtimes = [PluginRuntime(plugin, nc, prefix=f"{prefix}{side}", register=False, instance_id=f"probe-{side}")
                for side, (nc, plugin) in sides.items()]
    try:
        for runtime in runtimes:
            await runtime.start()
        for body, headers, broadcast in cases:
            replies = []
            for side in sides:
                subject = f"{prefix}{side}.broadcast.probe" if broadcast else f"{prefix}{side}.plugin.probe"
                reply = await caller.request(subject, body, headers=headers, timeout=5)
                replies.append((reply.data, {k: v.replace(side, "*") for k, v in (reply.headers or {}).items()}))
            assert replies[0] == replies[1], (body, headers, broadcast)
        for side in sides:  # events, through each side's own publish path as well
            publisher = PluginMessaging(sides[side][0], prefix=f"{prefix}{side}", source="pub")
            for i in range(5):
                await publisher.publish_event(f"probe.e{i}", {"i": i}, metadata={"n": str(i)} if i % 2 else None)
            await sides[side][0].flush()
        plain_probe, direct_probe = sides["plain"][1], sides["direct"][1]
        for _ in range(100):
            if len(plain_probe.events) == len(direct_probe.events) == 5:
                break
            await asyncio.sleep(0.05)
        assert plain_probe.seen == direct_probe.seen
        assert plain_probe.events == direct_probe.events and len(direct_probe.events) == 5
    finally:
        for runtime in runtimes:
            await runtime.stop()
        await plain.close()
        await caller.close()
        await close(direct)


async def test_a_sender_on_the_direct_path_gets_the_same_results_and_errors(nats_server: Any, prefix: str) -> None:
    import nats

    from plugin_sdk import PluginError
    from plugin_sdk._runtime import PluginRuntime
    from plugin_sdk.host import close, connect

    server_nc, plain, direct = await connect(nats_server.url, name="probe"), await nats.connect(nats_server.url), \
        await connect(nats_server.url, name="direct")
    async with PluginRuntime(Probe(), server_nc, prefix=prefix, register=False):
        senders = [PluginMessaging(nc, prefix=prefix, source="s") for nc in (plain, direct)]

        async def outcome(m: PluginMessaging, *args: Any, **kwargs: Any) -> Any:
            try:
                r = await m.send_message(*args, **kwargs)
                return ("ok", r.result, r.error, r.source)
            except PluginError as exc:
                return (type(exc).__name__, str(exc), exc.plugin, exc.subject)

        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
            (("probe", {"a": [1, 2]}), {}), (("probe", None), {"kind": MessageKind.QUERY}),
            (("probe", "x"), {"operation": "fail"}), (("probe", 1), {"operation": "refuse"}),
            (("probe", {"m": 1}), {"metadata": {"k": "v"}}),
            (("probe", 1), {"operation": "fail", "raise_on_error": False}), (("nobody", 1), {}),
            (("probe.nobody-1", 1), {"timeout": 0.3}), (("probe", "x" * 2_000_000), {}), (("probe", object()), {}),
            (("probe pad", 1), {}), (("probe.*", 1), {}), (("probe", 1), {"operation": "a b"}),
        ]
        for args, kwargs in calls:
            assert await outcome(senders[0], *args, **kwargs) == await outcome(senders[1], *args, **kwargs), args
    for nc in (server_nc, direct):
        await close(nc)
    await plain.close()
