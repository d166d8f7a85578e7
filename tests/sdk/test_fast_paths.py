"""Each fast path of the message path gives exactly what the straightforward one does.

The sender builds its :class:`Message` without validation (``fast_model``) and its envelope by
hand (``request_headers``); the receiver parses the envelope by hand (``parse_envelope``) and
builds the message without validation (``message_from_msg``). Here, for any fields a sender may
give: the fast message equals the validated one, and what crosses the wire (the header block as
nats-py writes and parses it, the JSON body) comes back as the same message, or as the same
typed error.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.aio.msg import Msg

from plugin_sdk import InvalidMessage, Message, MessageKind, PluginMessaging
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
