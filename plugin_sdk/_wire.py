"""The wire contract, in one place: subjects, headers, bodies and errors.

Documented for humans in ``docs/subjects.md``; keep the two in step.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import nats.errors
import pydantic_core
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ._errors import (
    ConnectionFailed,
    InvalidMessage,
    PayloadTooLarge,
    PluginError,
    PluginNotFound,
    RequestTimeout,
)
from ._message import ErrorInfo, Message, MessageKind, Response, fast_model, new_id

__all__ = ["PROTOCOL_VERSION", "Subjects"]

#: The envelope's protocol version. A major bump means an incompatible wire (docs/subjects.md).
PROTOCOL_VERSION: Final = "1"

#: The envelope: ONE header, ``Mesh: <protocol>;id=…;src=…;inst=…;kind=…;op=…;t=…``, with the
#: defaults (kind=command, empty fields) left out. One header rather than one per field because
#: nats-py parses header lines in Python: five lines cost ~6.4 µs a message, one ~1.3 µs (see
#: docs/subjects.md). Replies carry ``Mesh: 1;inst=<instance>``.
H_ENVELOPE: Final = "Mesh"
#: Message metadata, a JSON object, only when there is some.
H_METADATA: Final = "Mesh-Metadata"
# Error replies (ADR-32 service errors, readable by any NATS tool), plus the error class.
H_ERROR: Final = "Nats-Service-Error"
H_ERROR_CODE: Final = "Nats-Service-Error-Code"
H_ERROR_TYPE: Final = "Mesh-Error-Type"

# JetStream's own, for the KV writes we make by hand (a delete that must not overtake a newer value).
H_KV_OPERATION: Final = "KV-Operation"
H_EXPECTED_LAST_SUBJECT_SEQUENCE: Final = "Nats-Expected-Last-Subject-Sequence"
#: JetStream's de-duplication id: one per logical write, the same on each retry of it.
H_MSG_ID: Final = "Nats-Msg-Id"
#: nats-server's status header (a ``503`` on a reply subject: no responders).
H_STATUS: Final = "Status"

#: Envelope fields: message id, source plugin, source instance, kind, operation, timeout (s).
E_ID, E_SOURCE, E_INSTANCE, E_KIND, E_OPERATION, E_TIMEOUT = "id", "src", "inst", "kind", "op", "t"
#: Envelope values may not contain these (they delimit fields).
_ENVELOPE_UNSAFE = re.compile(r"[;=\s]")

PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True, slots=True)
class Subjects:
    """Every subject and bucket name of one mesh, derived from its prefix (default ``mesh``)."""

    prefix: str = "mesh"

    def __post_init__(self) -> None:
        if not PREFIX_RE.match(self.prefix):
            raise ValueError(f"invalid mesh prefix {self.prefix!r}: use letters, digits, '-' and '_'")

    def plugin(self, name: str) -> str:
        """Any instance of ``name`` (queue group ``name``, load-balanced)."""
        return f"{self.prefix}.plugin.{name}"

    def instance(self, name: str, instance_id: str) -> str:
        return f"{self.prefix}.plugin.{name}.{instance_id}"

    def target(self, target: str) -> str:
        """``name`` or ``name.instance`` → its subject."""
        return f"{self.prefix}.plugin.{target}"

    @property
    def broadcast(self) -> str:
        return f"{self.prefix}.broadcast"

    def broadcast_to(self, name: str) -> str:
        return f"{self.prefix}.broadcast.{name}"

    def event(self, event_type: str) -> str:
        return f"{self.prefix}.event.{event_type}"

    def event_type(self, subject: str) -> str:
        return subject[len(self.prefix) + 7 :]  # strip "<prefix>.event."

    @property
    def event_offset(self) -> int:
        """Where the event type starts in an event's subject (after ``<prefix>.event.``)."""
        return len(self.prefix) + 7

    def registry(self, verb: str) -> str:
        return f"{self.prefix}.registry.{verb}"

    def registry_own(self, verb: str, instance_id: str) -> str:
        """``register`` / ``heartbeat`` / ``unregister`` of one instance's own entry: the id is in the
        subject so that nats-server can allow an instance to write its own entry and no other."""
        return f"{self.prefix}.registry.{verb}.{instance_id}"

    def control(self, instance_id: str, verb: str) -> str:
        return f"{self.prefix}.control.{instance_id}.{verb}"

    def agent(self, agent: str, verb: str) -> str:
        """A command to one machine's agent (``load``, ``unload``, ``reload``, ``list``)."""
        return f"{self.prefix}.agent.{agent}.{verb}"

    @property
    def agents_list(self) -> str:
        """Every agent answers here (no queue group): how the CLI finds them."""
        return f"{self.prefix}.agents.list"

    @property
    def registry_bucket(self) -> str:
        return f"{self.prefix}_registry"

    def state_bucket(self, name: str) -> str:
        return f"{self.prefix}_state_{name}"


#: Registry verbs that write one instance's entry (sent on ``<prefix>.registry.<verb>.<instance>``).
REGISTRY_OWN_VERBS: Final = ("register", "heartbeat", "unregister")
#: Registry verbs that only read.
REGISTRY_READ_VERBS: Final = ("get", "list", "versions")

#: Event types under ``mesh.`` are the mesh's own; plugin instances may not publish them.
MESH_EVENTS: Final = "mesh"


def health_event(name: str) -> str:
    """The event type the registry announces health changes of plugin ``name`` with."""
    return f"{MESH_EVENTS}.health.{name}"


# Keys of the registry bucket: one per instance, one per plugin name (every version seen).
def registry_instance_key(instance_id: str) -> str:
    return f"instances.{instance_id}"


def registry_versions_key(name: str) -> str:
    return f"versions.{name}"


@dataclass(frozen=True, slots=True)
class SubjectPermissions:
    """What one identity may publish and subscribe to, as nats-server enforces it (allow, then deny)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()
    #: The identity's own reply inbox prefix (nats-py's ``inbox_prefix``): nobody else may read it.
    inbox_prefix: str = "_INBOX"


def inbox_prefix(instance_id: str) -> str:
    """The reply inbox prefix of one plugin instance under ``--secure`` (``_INBOX_<instance>``)."""
    return f"_INBOX_{instance_id}"


def plugin_permissions(subjects: Subjects, *, name: str, instance_id: str, send: list[str], publish: list[str],
                       subscribe: list[str], dependencies: list[str]) -> SubjectPermissions:
    """Everything one plugin instance needs on the wire and nothing more: its ``permissions``
    (``send``: plugin-name patterns; ``publish``/``subscribe``: event-type patterns) plus what the
    runtime itself does (serve its subjects, its registry entry, its own KV bucket, NATS micro,
    replies). Built here, beside the subjects it names, so the two cannot drift apart.
    """
    p = subjects.prefix
    stream = f"KV_{subjects.state_bucket(name)}"
    pub: list[str] = []
    for target in send:
        pub += [f"{p}.plugin.{target}", f"{p}.broadcast.{target}"]
        if target != ">":  # (its instances; ">" covers them already, and "…>.>" is not a subject)
            pub.append(f"{p}.plugin.{target}.>")
        if target in ("*", ">"):
            pub.append(f"{p}.broadcast")  # to every plugin
    pub += [f"{p}.event.{pattern}" for pattern in publish]
    pub += [subjects.registry(verb) for verb in REGISTRY_READ_VERBS]
    pub += [subjects.registry_own(verb, instance_id) for verb in REGISTRY_OWN_VERBS]
    # Its own state bucket, as nats-py's KV client uses it (the bucket itself is made by the admin).
    pub += [kv_subject(subjects.state_bucket(name), ">"), f"$JS.API.STREAM.INFO.{stream}",
            f"$JS.API.DIRECT.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}.>", f"$JS.API.STREAM.MSG.GET.{stream}",
            f"$JS.API.CONSUMER.CREATE.{stream}", f"$JS.API.CONSUMER.CREATE.{stream}.>",
            f"$JS.API.CONSUMER.DELETE.{stream}.>", f"$JS.API.CONSUMER.INFO.{stream}.>"]
    inbox = inbox_prefix(instance_id)
    sub = [subjects.plugin(name), subjects.instance(name, instance_id), subjects.broadcast,
           subjects.broadcast_to(name), subjects.control(instance_id, ">"), "$SRV.>", f"{inbox}.>"]
    sub += [f"{p}.event.{pattern}" for pattern in subscribe]
    sub += [f"{p}.event.{health_event(dep)}" for dep in dependencies]
    return SubjectPermissions(publish=tuple(dict.fromkeys(pub)), subscribe=tuple(dict.fromkeys(sub)),
                              publish_deny=(f"{p}.event.{MESH_EVENTS}.>",), inbox_prefix=inbox)


def kv_subject(bucket: str, key: str) -> str:
    """The subject JetStream stores ``key`` of KV bucket ``bucket`` under."""
    return f"$KV.{bucket}.{key}"


def kv_delete_headers(*, last: int | None = None) -> dict[str, str]:
    """Headers of a KV delete marker, optionally only if the key is still at revision ``last``."""
    headers = {H_KV_OPERATION: "DEL"}
    if last:
        headers[H_EXPECTED_LAST_SUBJECT_SEQUENCE] = str(last)
    return headers


_EVENT_TYPE_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_EVENT_PATTERN_RE = re.compile(r"^([A-Za-z0-9_-]+|\*)(\.([A-Za-z0-9_-]+|\*))*(\.>)?$|^>$")


def check_event_type(event_type: str, *, pattern: bool = False) -> str:
    ok = (_EVENT_PATTERN_RE if pattern else _EVENT_TYPE_RE).match(event_type)
    if not ok:
        what = "event pattern" if pattern else "event type"
        hint = " (tokens of letters, digits, '-', '_' joined by '.'; '*' and a final '>' as wildcards)" \
            if pattern else " (tokens of letters, digits, '-', '_' joined by '.')"
        raise ValueError(f"invalid {what} {event_type!r}{hint}")
    return event_type


# ---------------------------------------------------------------------------------------------
# Bodies

def dumps(value: Any) -> bytes:
    """JSON-encode a payload (``None`` → empty body)."""
    if value is None:
        return b""
    return pydantic_core.to_json(value)


def loads(data: bytes, *, what: str = "message body") -> Any:
    if not data:
        return None
    try:
        return pydantic_core.from_json(data)
    except ValueError as exc:
        raise InvalidMessage(f"{what} is not valid JSON: {exc}") from None


def check_token(value: str, *, what: str) -> str:
    """Operation names and sources travel in the envelope: no ';', '=' or whitespace."""
    if not value or _ENVELOPE_UNSAFE.search(value):
        raise InvalidMessage(f"invalid {what} {value!r}: no ';', '=' or whitespace, not empty")
    return value


def envelope_tail(source: str, instance: str | None) -> str:
    """The constant part of a sender's envelopes: ``;src=…[;inst=…]`` (computed once per sender)."""
    return f";{E_SOURCE}={source}" + (f";{E_INSTANCE}={instance}" if instance else "")


def event_headers(tail: str, metadata: dict[str, str] | None = None) -> dict[str, str]:
    """An event's envelope: ``Mesh: 1;id=<new>`` plus the sender's ``tail`` (the kind is in the subject)."""
    headers = {H_ENVELOPE: f"{PROTOCOL_VERSION};{E_ID}={new_id()}{tail}"}
    if metadata:
        headers[H_METADATA] = pydantic_core.to_json(metadata).decode()
    return headers


def request_headers(message: Message, *, timeout: float | None = None) -> dict[str, str]:
    """The envelope of ``message`` (defaults left out: every byte is parsed on the far side)."""
    env = f"{PROTOCOL_VERSION};id={message.id}"
    if message.source:
        env += f";src={message.source}"
    if message.source_instance:
        env += f";inst={message.source_instance}"
    if message.kind is not MessageKind.COMMAND:
        env += f";kind={message.kind.value}"
    if message.operation:
        env += f";op={message.operation}"
    if timeout is not None:
        env += f";t={timeout:g}"
    if message.metadata:
        return {H_ENVELOPE: env, H_METADATA: pydantic_core.to_json(message.metadata).decode()}
    return {H_ENVELOPE: env}


def parse_envelope(headers: dict[str, str] | None) -> dict[str, str]:
    """The envelope's fields, with the protocol under ``"v"``; ``{}`` when there is none."""
    raw = headers.get(H_ENVELOPE) if headers else None
    if not raw:
        return {}
    if _WHITESPACE.search(raw) is None:  # (as we write them: nothing to strip, one pass; property-tested)
        proto, _, rest = raw.partition(";")
        env = {"v": proto}
        if rest:
            for part in rest.split(";"):
                key, _, value = part.partition("=")
                env[key] = value
        return env
    return parse_envelope_plain(raw)


_WHITESPACE = re.compile(r"\s")


def parse_envelope_plain(raw: str) -> dict[str, str]:
    """:func:`parse_envelope` of the header's value, field by field, stripping each."""
    proto, _, rest = raw.partition(";")
    env = {"v": proto.strip()}
    if rest:
        for part in rest.split(";"):
            key, _, value = part.partition("=")
            env[key.strip()] = value.strip()
    return env


def message_from_msg(msg: Msg, *, target: str, env: dict[str, str] | None = None,
                     kind: MessageKind | None = None) -> Message:
    """Rebuild a :class:`Message` from a received NATS message.

    A message without our envelope (``nats req mesh.plugin.echo '{...}'``) is accepted: it becomes
    a command from source ``""`` with a fresh id. A body that is not JSON raises InvalidMessage.
    """
    return message_from(msg.data, msg.headers, target=target, env=env, kind=kind)


def message_from(data: bytes, headers: dict[str, str] | None, *, target: str, env: dict[str, str] | None = None,
                 kind: MessageKind | None = None) -> Message:
    """:func:`message_from_msg` from a message's body and headers (the direct path has no ``Msg``)."""
    if env is None:
        env = parse_envelope(headers)
    metadata: dict[str, str] = {}
    raw_meta = headers.get(H_METADATA) if headers else None
    if raw_meta:
        meta = loads(raw_meta.encode(), what=f"{H_METADATA} header")
        if not isinstance(meta, dict):
            raise InvalidMessage(f"{H_METADATA} header must be a JSON object")
        metadata = {str(k): str(v) for k, v in meta.items()}
    if kind is None:  # (events: the subject says)
        kind_raw = env.get(E_KIND)
        if kind_raw is None:
            kind = MessageKind.COMMAND
        else:
            try:
                kind = MessageKind(kind_raw)
            except ValueError:
                raise InvalidMessage(f"unknown message kind {kind_raw!r} in the {H_ENVELOPE} header") from None
    return fast_model(Message, {
        "id": env.get(E_ID) or new_id(),
        "source": env.get(E_SOURCE, ""),
        "target": target,
        "payload": loads(data) if data else None,
        "metadata": metadata,
        "kind": kind,
        "operation": env.get(E_OPERATION),
        "source_instance": env.get(E_INSTANCE),
    })


def event_from(data: bytes, headers: dict[str, str] | None, target: str) -> Message:
    """``message_from(data, headers, target=target, kind=MessageKind.EVENT)`` in one pass: the
    envelope's fields go straight into the message's, with no dict of the envelope between
    (property-tested equal for any headers and body). An event lane builds one per event."""
    if not headers or H_METADATA in headers:
        return message_from(data, headers, target=target, kind=MessageKind.EVENT)
    raw = headers.get(H_ENVELOPE)
    if not raw or _WHITESPACE.search(raw) is not None:
        return message_from(data, headers, target=target, kind=MessageKind.EVENT)
    fields = _EVENT_FIELDS_TEMPLATE.copy()  # (a copy: a third of the cost of a dict display)
    fields["target"], fields["metadata"] = target, {}
    _, _, rest = raw.partition(";")
    if rest:
        for part in rest.split(";"):
            key, _, value = part.partition("=")
            name = _EVENT_FIELDS.get(key)
            if name is not None:
                fields[name] = value
    if not fields["id"]:
        fields["id"] = new_id()
    if data:
        fields["payload"] = loads(data)
    return fast_model(Message, fields, _MESSAGE_FIELDS)


#: Envelope field → Message field, for :func:`event_from` (an event's kind is its subject's).
_EVENT_FIELDS: Final = {E_ID: "id", E_SOURCE: "source", E_INSTANCE: "source_instance", E_OPERATION: "operation"}
_EVENT_FIELDS_TEMPLATE: Final[dict[str, Any]] = {
    "id": "", "source": "", "target": "", "payload": None, "metadata": None, "kind": MessageKind.EVENT,
    "operation": None, "source_instance": None}
_MESSAGE_FIELDS: Final = set(Message.model_fields)


# ---------------------------------------------------------------------------------------------
# Sizes: NATS counts the header block *and* the body against the server's ``max_payload``. A
# message over it makes nats-server close the publisher's connection ("maximum payload
# violation"), so every publish of ours is measured first (nats-py checks the body only).

#: ``NATS/1.0\r\n`` before the header lines and ``\r\n`` after them.
_HEADER_FRAME: Final = 12


def message_size(body: bytes, headers: Mapping[str, str] | None) -> int:
    """Bytes the server counts for this message: the header block (``NATS/1.0``, ``K: V`` lines) plus the body."""
    if not headers:
        return len(body)
    size = _HEADER_FRAME + len(body)
    for key, value in headers.items():
        size += len(key) + len(value.encode()) + 4  # "K: V\r\n"
    return size


def check_size(nc: NATS, subject: str, body: bytes, headers: Mapping[str, str] | None, *,
               plugin: str | None = None, what: str = "message") -> None:
    """Raise :class:`PayloadTooLarge` if the server would refuse (and disconnect us for) this message."""
    size = message_size(body, headers)
    if size > nc.max_payload:
        raise PayloadTooLarge(f"{what} of {size} bytes (headers and body) exceeds the server's limit of "
                              f"{nc.max_payload} bytes", plugin=plugin, subject=subject)


async def publish(nc: NATS, subject: str, body: bytes, *, headers: dict[str, str] | None = None,
                  reply: str = "", plugin: str | None = None, what: str = "message") -> None:
    """``nc.publish`` after :func:`check_size`, with nats-py's connection errors typed."""
    check_size(nc, subject, body, headers, plugin=plugin, what=what)
    try:
        await nc.publish(subject, body, reply=reply, headers=headers)
    except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError,
            nats.errors.OutboundBufferLimitError) as exc:
        raise ConnectionFailed(f"NATS connection unavailable: {type(exc).__name__}", plugin=plugin,
                               subject=subject) from None


def bounded(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut (for logs and error messages
    about input someone else chose: one hostile message must not write megabytes of log)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [{len(text) - limit} more characters]"


# ---------------------------------------------------------------------------------------------
# Replies

#: Longest error message a reply carries (the rest is cut, saying so): error replies stay small.
ERROR_MESSAGE_LIMIT: Final = 4096

def success_reply(result: Any, *, instance: str | None) -> tuple[bytes, dict[str, str] | None]:
    # The caller knows the message id already; a success carries only who answered.
    return dumps(result), ({H_ENVELOPE: f"{PROTOCOL_VERSION};inst={instance}"} if instance else None)


def error_reply(info: ErrorInfo, *, message_id: str, instance: str | None) -> tuple[bytes, dict[str, str]]:
    env = f"{PROTOCOL_VERSION};id={message_id}" if message_id else PROTOCOL_VERSION
    if instance:
        env += f";inst={instance}"
    if len(info.message) > ERROR_MESSAGE_LIMIT:
        info = info.model_copy(update={"message": bounded(info.message, ERROR_MESSAGE_LIMIT)})
    headers = {
        H_ENVELOPE: env,
        H_ERROR: info.message.replace("\r", " ").replace("\n", " ")[:1024],
        H_ERROR_CODE: str(info.code),
        H_ERROR_TYPE: info.type[:200],
    }
    return pydantic_core.to_json({"error": info.model_dump()}), headers


async def send_reply(nc: NATS, reply: str, body: bytes, headers: dict[str, str] | None, *, message_id: str = "",
                     instance: str | None = None, plugin: str | None = None) -> None:
    """Publish a reply. One that the server would refuse for its size goes out as a typed
    :class:`PayloadTooLarge` error reply instead (the caller learns why; our connection lives)."""
    size = message_size(body, headers)
    if size > nc.max_payload:
        info = ErrorInfo(type="PayloadTooLarge", code=PayloadTooLarge.code, plugin=plugin,
                         message=f"{plugin or 'the'} reply of {size} bytes (headers and body) exceeds the "
                                 f"server's limit of {nc.max_payload} bytes")
        body, headers = error_reply(info, message_id=message_id, instance=instance)
    prebuilt = getattr(nc, "send_prebuilt", None)
    if prebuilt is None:
        await nc.publish(reply, body, headers=headers)
    elif headers is None:  # (the server gave us ``reply``: one token, no whitespace; checked for size above)
        await prebuilt(f"PUB {reply}  {len(body)}\r\n".encode() + body + b"\r\n", len(body))
    else:
        await prebuilt(hpub_command(reply, "", header_block(headers), body), len(body))


def is_no_responders(msg: Msg) -> bool:
    """The server's "no responders" status (503), sent to a reply subject when nobody is subscribed."""
    return bool(msg.headers) and msg.headers.get(H_STATUS) == "503" and not msg.data  # type: ignore[union-attr]


def response_from_msg(msg: Msg, *, message_id: str = "") -> Response:
    """Turn a reply into a :class:`Response` (an error reply sets ``.error``)."""
    return response_from(msg.data, msg.headers, message_id=message_id)


def response_from(data: bytes, headers: dict[str, str] | None, *, message_id: str = "") -> Response:
    """:func:`response_from_msg` from a reply's body and headers (the direct path has no ``Msg``)."""
    if not headers:  # a direct success reply: the body only (the hot path)
        return fast_model(Response, {"message_id": message_id, "result": loads(data, what="reply"), "error": None,
                                     "source": None})
    h = headers
    env = parse_envelope(h)
    source = env.get(E_INSTANCE)
    if H_ERROR in h or H_ERROR_CODE in h:
        info: ErrorInfo | None = None
        try:
            body = loads(data)
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                info = ErrorInfo.model_validate(body["error"])
        except (PluginError, ValueError):
            info = None
        if info is None:  # a plain ADR-32 service error
            code = h.get(H_ERROR_CODE, "500")
            info = ErrorInfo(type=h.get(H_ERROR_TYPE, "HandlerError"), message=h.get(H_ERROR, ""),
                             code=int(code) if code.isdigit() else 500)
        return fast_model(Response, {"message_id": env.get(E_ID, message_id), "result": None, "error": info,
                                     "source": source})
    return fast_model(Response, {"message_id": env.get(E_ID, message_id), "result": loads(data, what="reply"),
                                 "error": None, "source": source})


# ---------------------------------------------------------------------------------------------
# Requests

async def request(nc: NATS, subject: str, body: bytes, *, headers: dict[str, str] | None, timeout: float,
                  plugin: str | None = None) -> Msg:
    """``nc.request`` with nats-py's errors turned into typed mesh errors."""
    check_size(nc, subject, body, headers, plugin=plugin, what="request")
    try:
        return await nc.request(subject, body, timeout=timeout, headers=headers)
    except nats.errors.Error as exc:
        raise typed_request_error(exc, subject=subject, plugin=plugin, timeout=timeout, size=len(body)) from None


def typed_request_error(exc: nats.errors.Error, *, subject: str, plugin: str | None, timeout: float,
                        size: int) -> BaseException:
    """The mesh's typed error for nats-py's ``exc`` from a request (``exc`` itself if it has none)."""
    if isinstance(exc, nats.errors.NoRespondersError):
        return PluginNotFound(f"no plugin instance serves {plugin or subject!r} (no responders on {subject})",
                              plugin=plugin, subject=subject)
    if isinstance(exc, nats.errors.TimeoutError):
        return RequestTimeout(f"no reply from {plugin or subject!r} within {timeout:g}s ({subject})",
                              plugin=plugin, subject=subject)
    if isinstance(exc, nats.errors.MaxPayloadError):
        return PayloadTooLarge(f"payload of {size} bytes exceeds the server's limit", plugin=plugin, subject=subject)
    if isinstance(exc, nats.errors.ConnectionClosedError | nats.errors.ConnectionDrainingError
                  | nats.errors.ConnectionReconnectingError | nats.errors.OutboundBufferLimitError):
        return ConnectionFailed(f"NATS connection unavailable: {type(exc).__name__}", plugin=plugin, subject=subject)
    return exc


# ---------------------------------------------------------------------------------------------
# The direct path: protocol lines built by hand, exactly as nats-py builds them (a property test
# holds the two equal: tests/sdk/test_fast_paths.py). nats-py's publish validates every subject
# and header name again on every message; here the subjects are ours (checked once, cached) or
# the reply subject the server gave us, and the header names are constants.

_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
_GOOD_NAMES: set[str] = {H_ENVELOPE, H_METADATA, H_ERROR, H_ERROR_CODE, H_ERROR_TYPE, "traceparent", "tracestate"}


def header_block(headers: Mapping[str, str]) -> bytes:
    """The header block nats-py's publish makes of ``headers``: ``NATS/1.0``, a ``K: V`` line each, an
    empty line (names stripped, empty ones skipped, values stripped with CR/LF made spaces; a bad
    name is BadHeaderError)."""
    parts = ["NATS/1.0\r\n"]
    for k, v in headers.items():
        key = k.strip()
        if not key:
            continue
        if key not in _GOOD_NAMES and not _HEADER_NAME.fullmatch(key):
            raise nats.errors.BadHeaderError(key)
        parts.append(f"{key}: {v.strip().translate(_NEWLINES)}\r\n")
    parts.append("\r\n")
    return "".join(parts).encode()


def pub_command(subject: str, reply: str, body: bytes, headers: Mapping[str, str] | None) -> bytes:
    """The ``PUB``/``HPUB`` protocol line nats-py's ``publish(subject, body, reply=, headers=)`` writes."""
    if headers is None:
        return f"PUB {subject} {reply} {len(body)}\r\n".encode() + body + b"\r\n"
    return hpub_command(subject, reply, header_block(headers), body)


def hpub_command(subject: str, reply: str, block: bytes, body: bytes) -> bytes:
    n = len(block)
    return f"HPUB {subject} {reply} {n} {n + len(body)}\r\n".encode() + block + body + b"\r\n"


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """nats-py's ``Client._parse_header_lines`` (2.16), without its per-character generator: the
    same dict for every input (property-tested against it)."""
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if key and key.split() != [key]:  # (whitespace in the name, as str.isspace sees it: not a header)
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


async def flush_subscriptions(nc: NATS) -> None:
    """Return once the server has every subscription made (or ended) on ``nc`` so far, and answered for it.

    One ``flush()`` does not promise that, for two reasons. nats-py leaves a SUB (or UNSUB) in the
    client's pending buffer for its flusher task but writes the flush's PING straight to the
    socket, ahead of it; and even with the SUB first on the wire, nats-server's PONG can come back
    before the subscription takes effect. Measured here (nats-server 2.15, nats-py 2.16): after
    subscribe + one flush, 5 of 300 events published at once from another connection were lost,
    and a refused subscription's -ERR arrived after the PONG in about half the tries; with two
    round trips, none of 900. So: the pending buffer written first, then two round trips.
    """
    await _write_pending(nc)
    await nc.flush()
    await nc.flush()


#: Seconds to wait for nats-py's flusher task to write the pending buffer (on a live connection, at once).
PENDING_WRITE_TIMEOUT = 5.0


async def _write_pending(nc: NATS) -> None:
    """Return once nats-py's flusher task has written what was pending (SUBs, UNSUBs, publishes).

    Kicking it (``_flush_pending()``) does not wait for the write, so the wire read PING, SUB,
    PING; its ``force_flush=True`` waits but swallows a cancellation (and with it a timeout of
    ours). So: a future of our own in its queue, which it sets once it has written (nats-py's own
    protocol; there is no public call).
    """
    queue, flusher = getattr(nc, "_flush_queue", None), getattr(nc, "_flusher_task", None)
    if queue is None or flusher is None or flusher.done() or not nc.is_connected:
        return  # (nothing to wait for: disconnected, the pending buffer goes out on reconnect)
    written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    await queue.put(written)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(written, PENDING_WRITE_TIMEOUT)


async def drain_all(subs: list[Subscription], *, timeout: float = 10.0) -> bool:
    """Drain ``subs`` together (stop interest, let queued callbacks finish) within ``timeout``.

    nats-py's drain waits, without a limit, for every queued callback; one that never finishes
    would hang a shutdown. Past ``timeout`` the rest are unsubscribed. False if that happened.

    Nor does its drain know when the server has stopped sending: it leaves its UNSUB in the pending
    buffer and writes its round trip's PING ahead of it (see :func:`flush_subscriptions`), so the
    PONG can come back while the server still routes to the subscription (a queue group member
    gets its share); the drain finds nothing queued and forgets the subscription, and nats-py
    drops what then arrives for it, silently: a request lost, its caller waiting out its timeout
    (measured: one request lost per 7 to 30 instances stopped under 4 callers' traffic, by how
    loaded the machine was; none in 300 since). So every UNSUB goes out
    first and is confirmed (:func:`flush_subscriptions`), and only then do the drains run (the
    server ignores their second UNSUB).
    """

    async def drain(sub: Subscription) -> None:
        with contextlib.suppress(nats.errors.Error):
            await sub.drain()  # type: ignore[no-untyped-call]

    try:
        async with asyncio.timeout(timeout):
            await _stop_interest(subs)
            await asyncio.gather(*(drain(sub) for sub in subs))
        return True
    except TimeoutError:
        for sub in subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
            _stop_callbacks(sub)
        return False


async def _stop_interest(subs: list[Subscription]) -> None:
    """Send an UNSUB for each of ``subs`` and return once the server has them; their callbacks and
    queued messages are kept (nats-py's drain then handles those)."""
    conns: list[NATS] = []
    for sub in subs:
        conn, sid = sub._conn, getattr(sub, "_id", None)
        send = getattr(conn, "_send_unsubscribe", None)  # (nats-py's own: no public call keeps the queue)
        if send is None or sid is None or not conn.is_connected:
            continue
        await send(sid)
        if not any(c is conn for c in conns):
            conns.append(conn)
    for conn in conns:
        with contextlib.suppress(nats.errors.Error):
            await flush_subscriptions(conn)


def _stop_callbacks(sub: Subscription) -> None:
    """End the task that runs ``sub``'s callbacks (a stuck callback is cancelled).

    A drain cancelled half-way leaves nats-py's subscription marked closed, so ``unsubscribe``
    refuses it and its callback task, stuck in a handler, runs on: the connection's own drain
    then waits up to its drain_timeout (30 s) for it. nats-py has no public call for this.
    """
    stop = getattr(sub, "_stop_processing", None)
    if stop is not None:
        stop()
    remove, sid = getattr(sub._conn, "_remove_sub", None), getattr(sub, "_id", None)
    if remove is not None and sid is not None:
        remove(sid)
