"""``PluginMessaging``: send, broadcast, publish and subscribe on the mesh."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import Any

import nats.errors
import pydantic_core
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from . import _tracing
from ._config import Permissions, check_range
from ._errors import (
    CommunicationError,
    ConnectionFailed,
    InvalidMessage,
    PayloadTooLarge,
    PermissionDenied,
    PluginNotFound,
)
from ._message import BroadcastResult, Message, MessageKind, Response, fast_model, new_id
from ._registry import PluginRegistry
from ._wire import (
    H_ENVELOPE,
    H_METADATA,
    H_STATUS,
    MESH_EVENTS,
    PROTOCOL_VERSION,
    Subjects,
    bounded,
    check_event_type,
    check_token,
    dumps,
    envelope_tail,
    event_headers,
    flush_subscriptions,
    header_block,
    message_from_msg,
    publish,
    request,
    request_headers,
    response_from,
    response_from_msg,
    typed_request_error,
)

__all__ = ["EventSubscription", "PluginMessaging", "subject_matches"]

log = logging.getLogger("plugin_sdk.messaging")

#: How long a version-ranged send trusts the registry's list of matching instances.
RANGE_CACHE_SECONDS = 1.0

#: A send's target: ``name`` or ``name.instance`` (no whitespace, no wildcard: the server would refuse
#: to route a publish to ``mesh.plugin.*``, and whitespace would break the protocol line).
_TARGET_RE = re.compile(r"^[^\s.*>]+(\.[^\s.*>]+)?$")


def check_target(target: str) -> str:
    if not isinstance(target, str) or not _TARGET_RE.match(target):
        raise InvalidMessage(f"invalid target {bounded(repr(target), 120)}: a plugin name or name.instance, "
                             "without whitespace or wildcards")
    return target


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: ``*`` is one token, a final ``>`` one or more."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


class EventSubscription:
    """An async iterator of events (``Message`` of kind event); close it, or use ``async with``."""

    def __init__(self, sub: Subscription, subjects: Subjects, pattern: str,
                 owner: set[EventSubscription]) -> None:
        self._sub = sub
        self._subjects = subjects
        self.pattern = pattern
        self._owner = owner
        owner.add(self)

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        try:
            async for msg in self._sub.messages:
                event = _event_from_msg(msg, self._subjects)
                if event is not None:
                    yield event
        except nats.errors.ConnectionClosedError:
            return

    async def next(self, *, timeout: float | None = None) -> Message:
        """The next event; raises ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                msg = await self._sub.next_msg(timeout=remaining)
            except nats.errors.TimeoutError:
                raise TimeoutError(f"no event on {self.pattern!r} within {timeout}s") from None
            event = _event_from_msg(msg, self._subjects)
            if event is not None:
                return event

    async def close(self) -> None:
        """Unsubscribe; safe to call twice."""
        if self in self._owner:
            self._owner.discard(self)
            try:
                await self._sub.unsubscribe()
            except (nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError):
                pass  # already gone with the connection

    async def __aenter__(self) -> EventSubscription:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


def _event_from_msg(msg: Msg, subjects: Subjects) -> Message | None:
    """The event in ``msg`` (``None``, logged, for a malformed one). With tracing on, its delivery is a
    ``receive`` CONSUMER span, the child of the publisher's: a flow that ends in a loop over
    ``subscribe_to_events`` is still one trace (the consumer's own work comes after the span)."""
    try:
        event = message_from_msg(msg, target=subjects.event_type(msg.subject), kind=MessageKind.EVENT)
    except InvalidMessage as exc:
        log.warning("dropped malformed event on %s: %s", msg.subject, bounded(str(exc)))
        return None
    if _tracing.enabled():
        with _tracing.consume(msg.subject, msg.headers, operation="receive", link=True,
                              attributes={"messaging.message.id": event.id}):
            pass
    return event


class _Gathering:
    """The replies to one broadcast, as they arrive (on the reply subscription's callback)."""

    def __init__(self, message_id: str) -> None:
        self.message_id = message_id
        self.arrived: list[tuple[bytes, dict[str, str] | None]] = []
        self.progress = asyncio.Event()
        self.result = BroadcastResult()
        self.seen: set[str] = set()
        self.no_responders = False
        self.looked = False
        self.expected: set[str] | None = None  # who should answer, once the registry said

    async def on_reply(self, reply: Msg) -> None:
        self.on_direct(reply.data, reply.headers)

    def on_direct(self, data: bytes, headers: dict[str, str] | None) -> None:
        self.arrived.append((data, headers))
        self.progress.set()

    def take(self) -> None:
        """Account for every reply that has arrived."""
        arrived, self.arrived = self.arrived, []
        for data, headers in arrived:
            if headers and not data and headers.get(H_STATUS) == "503":  # nobody is subscribed: not a reply
                self.no_responders = True
                continue
            try:
                response = response_from(data, headers, message_id=self.message_id)
            except InvalidMessage as exc:
                log.warning("ignored a malformed broadcast reply: %s", bounded(str(exc)))
                continue
            if response.source in self.seen:
                continue
            self.seen.add(response.source or f"anonymous-{len(self.seen)}")
            self.result.responses.append(response)

    def look(self, lookup: asyncio.Task[list[str]],
             expected_of: Callable[[asyncio.Task[list[str]]], set[str] | None]) -> None:
        """Take the registry's answer (who should reply) once it is there."""
        if not self.looked and lookup.done():
            self.looked = True
            self.expected = expected_of(lookup)

    def complete(self) -> bool:
        if self.no_responders and not self.result.responses:
            return True  # nobody is subscribed: nothing will come
        return self.expected is not None and self.expected <= self.seen

    async def until_complete(self, lookup: asyncio.Task[list[str]],
                             expected_of: Callable[[asyncio.Task[list[str]]], set[str] | None]) -> None:
        """Until every expected instance answered, or the server said nobody serves (the caller bounds it)."""
        while True:
            self.progress.clear()
            self.take()
            self.look(lookup, expected_of)
            if self.complete():
                return
            await self.progress.wait()


class PluginMessaging:
    """Messaging for one mesh participant (a plugin instance, or a client such as the CLI)."""

    def __init__(self, nc: NATS, *, prefix: str = "mesh", source: str = "client",
                 source_instance: str | None = None, permissions: Permissions | None = None,
                 registry: PluginRegistry | None = None, default_timeout: float = 5.0) -> None:
        self._nc = nc
        self.subjects = Subjects(prefix)
        self._source = check_token(source, what="source name")
        self._instance = check_token(source_instance, what="source instance") if source_instance else None
        self._perms = permissions
        self._registry = registry or PluginRegistry(nc, prefix=prefix)
        # Look-ups while sending (which versions run, how many should answer a broadcast) are
        # bounded by the send's own timeout: never retried for longer.
        self._lookups = self._registry.without_retries()
        self._timeout = default_timeout
        self._subscriptions: set[EventSubscription] = set()
        # The envelope's constant tail, and event subjects already checked (the publish hot path).
        self._env_tail = envelope_tail(self._source, source_instance)
        self._event_subjects: dict[str, str] = {}
        #: Reply inboxes of the broadcasts this object is sending now (see :meth:`is_own_broadcast`).
        self._own_inboxes: set[str] = set()
        # (name, range) → (expires, instance ids, round-robin counter) for version-ranged sends.
        self._ranges: dict[tuple[str, str], tuple[float, list[str], Iterator[int]]] = {}
        # The direct path (a MeshClient): targets already checked and allowed → their subjects.
        self._request_direct = getattr(nc, "request_direct", None)
        self._send_prebuilt = getattr(nc, "send_prebuilt", None)
        self._targets: dict[str, str] = {}
        self._env_head = f"NATS/1.0\r\n{H_ENVELOPE}: {PROTOCOL_VERSION};id="

    def _message(self, target: str, message_or_payload: Any, kind: MessageKind | None,
                 operation: str | None, metadata: dict[str, str] | None) -> Message:
        if operation is not None:
            check_token(operation, what="operation name")
        if isinstance(message_or_payload, Message):
            msg = message_or_payload.model_copy()
            if kind is not None:
                msg.kind = kind
            if operation is not None:
                msg.operation = operation
            if metadata:
                msg.metadata = {**msg.metadata, **metadata}
            msg.source, msg.source_instance, msg.target = self._source, self._instance, target
            if msg.operation is not None:
                check_token(msg.operation, what="operation name")
            return msg
        if metadata:
            metadata = Message(metadata=metadata).metadata  # validated: str → str
        # Every field is already of its type here: skip validation on the hot path.
        return fast_model(Message, {"id": new_id(), "source": self._source, "target": target,
                                    "payload": message_or_payload, "metadata": metadata or {},
                                    "kind": kind or MessageKind.COMMAND, "operation": operation,
                                    "source_instance": self._instance})

    def _allow(self, rule: str, patterns: list[str] | None, subject: str) -> None:
        if patterns is not None and not any(subject_matches(p, subject) for p in patterns):
            raise PermissionDenied(f"{self._source} may not {rule} {subject!r} (permissions.{rule} = {patterns})",
                                   plugin=self._source)

    async def send_message(self, target: str, message_or_payload: Any = None, *, timeout: float | None = None,
                           operation: str | None = None, kind: MessageKind | None = None,
                           metadata: dict[str, str] | None = None, raise_on_error: bool = True,
                           version: str | None = None) -> Response:
        """Send to ``target`` (a plugin name, load-balanced, or ``name.instance``) and await the reply.

        With ``version`` (a range such as ``">=1.2,<2"``), only instances of that plugin whose
        version is in the range are chosen (round-robin over the registry's healthy ones).

        Raises :class:`PluginNotFound`, :class:`RequestTimeout`, :class:`PayloadTooLarge`, or — with
        ``raise_on_error`` (the default) — the remote handler's typed error.
        """
        if self._request_direct is not None and not version and not isinstance(message_or_payload, Message):
            return await self._send_direct(target, message_or_payload, timeout, operation, kind, metadata,
                                           raise_on_error)
        check_target(target)
        self._allow("send", self._perms.send if self._perms else None, target.split(".", 1)[0])
        if version:
            target = await self._instance_in_range(target, version)
        msg = self._message(target, message_or_payload, kind, operation, metadata)
        t = timeout if timeout is not None else self._timeout
        subject = self.subjects.target(target)
        # Few attributes: each costs ~5 µs to export (the process span carries the message id).
        # With tracing off, produce() is a no-op whose carrier is empty.
        with _tracing.produce(subject, attributes={"mesh.operation": msg.operation}) as carrier:
            return await self._send(msg, subject, t, version, raise_on_error, carrier)

    async def _send(self, msg: Message, subject: str, timeout: float, version: str | None, raise_on_error: bool,
                    trace_headers: dict[str, str] | None) -> Response:
        headers = request_headers(msg, timeout=timeout)
        if trace_headers:
            headers.update(trace_headers)
        try:
            reply = await request(self._nc, subject, self._encode(msg, subject), headers=headers, timeout=timeout,
                                  plugin=msg.target)
        except PluginNotFound:
            if version:  # the chosen instance went away: ask afresh next time
                self._ranges.pop((msg.target.split(".", 1)[0], version), None)
            raise
        response = response_from_msg(reply, message_id=msg.id)
        if raise_on_error and response.error is not None:
            raise response.error.to_exception(subject=subject)
        return response

    async def _send_direct(self, target: str, payload: Any, timeout: float | None, operation: str | None,
                           kind: MessageKind | None, metadata: dict[str, str] | None,
                           raise_on_error: bool) -> Response:
        """:meth:`send_message` on the direct path: the same envelope, body, errors and Response as
        ``_send`` (property-tested), without a Message, a nats-py ``Msg`` or its request machinery."""
        subject = self._targets.get(target)
        if subject is None:
            check_target(target)
            self._allow("send", self._perms.send if self._perms else None, target.split(".", 1)[0])
            subject = self.subjects.target(target)
            if len(self._targets) > 4096:
                self._targets.clear()
            self._targets[target] = subject
        if _tracing.enabled():  # (the same span as _send's; its context in the header block)
            with _tracing.produce(subject, attributes={"mesh.operation": operation}) as carrier:
                return await self._request_on(subject, target, payload, timeout, operation, kind, metadata,
                                              raise_on_error, carrier)
        return await self._request_on(subject, target, payload, timeout, operation, kind, metadata,
                                      raise_on_error, None)

    async def _request_on(self, subject: str, target: str, payload: Any, timeout: float | None,
                          operation: str | None, kind: MessageKind | None, metadata: dict[str, str] | None,
                          raise_on_error: bool, trace_headers: dict[str, str] | None) -> Response:
        message_id = new_id()
        t = timeout if timeout is not None else self._timeout
        block = self._request_block(message_id, kind, operation, t, metadata, trace_headers)
        body = self._encode_payload(payload, subject, target)
        if (size := len(block) + len(body)) > self._nc.max_payload:
            raise PayloadTooLarge(f"request of {size} bytes (headers and body) exceeds the server's limit of "
                                  f"{self._nc.max_payload} bytes", plugin=target, subject=subject)
        try:
            data, headers = await self._request_direct(subject, block, body, t)  # type: ignore[misc]
        except nats.errors.Error as exc:
            raise typed_request_error(exc, subject=subject, plugin=target, timeout=t, size=len(body)) from None
        response = response_from(data, headers, message_id=message_id)
        if raise_on_error and response.error is not None:
            raise response.error.to_exception(subject=subject)
        return response

    def _request_block(self, message_id: str, kind: MessageKind | None, operation: str | None, timeout: float,
                       metadata: dict[str, str] | None, extra: dict[str, str] | None = None) -> bytes:
        """The header block of a request: ``header_block(request_headers(message, timeout=…) | extra)``
        of the message ``_message`` would build (property-tested), from its fields."""
        env = f"{message_id}{self._env_tail}"
        if kind is not None and kind is not MessageKind.COMMAND:
            env += f";kind={MessageKind(kind).value}"
        if operation is not None:
            env += f";op={check_token(operation, what='operation name')}"
        env += f";t={timeout:g}"
        lines = f"{self._env_head}{env}\r\n"
        if metadata and (valid := Message(metadata=metadata).metadata):
            lines += f"{H_METADATA}: {pydantic_core.to_json(valid).decode()}\r\n"
        if extra:  # (trace context: traceparent, tracestate)
            if len(extra) == 1 and (tp := extra.get("traceparent")) is not None and "\r" not in tp \
                    and "\n" not in tp and tp == tp.strip():  # (the usual one: header_block's line, as is)
                return f"{lines}traceparent: {tp}\r\n\r\n".encode()
            return lines.encode() + header_block(extra)[10:]
        return f"{lines}\r\n".encode()

    def _event_block(self, message_id: str, metadata: dict[str, str] | None,
                     extra: dict[str, str] | None = None) -> bytes:
        """The header block of an event: ``header_block(event_headers(tail, metadata) | extra)`` (property-tested)."""
        lines = f"{self._env_head}{message_id}{self._env_tail}\r\n"
        if metadata and (valid := Message(metadata=metadata).metadata):
            lines += f"{H_METADATA}: {pydantic_core.to_json(valid).decode()}\r\n"
        if extra:
            return lines.encode() + header_block(extra)[10:]
        return f"{lines}\r\n".encode()

    async def _instance_in_range(self, name: str, version: str) -> str:
        """``name.instance`` of a healthy instance whose version is in ``version`` (cached 1 s)."""
        if "." in name:
            raise InvalidMessage(f"a version range selects among a plugin's instances: give a name, not {name!r}")
        try:
            check_range(version)
        except ValueError as exc:
            raise InvalidMessage(str(exc)) from None
        now = time.monotonic()
        cached = self._ranges.get((name, version))
        if cached is None or cached[0] < now:
            infos = await self._lookups.list_plugins(name, version=version, healthy_only=True)
            cached = (now + RANGE_CACHE_SECONDS, [i.id for i in infos], itertools.count())
            self._ranges[(name, version)] = cached
        ids = cached[1]
        if not ids:
            running = sorted({i.version for i in await self._lookups.list_plugins(name, healthy_only=True)})
            raise PluginNotFound(f"no healthy instance of {name!r} has a version in {version!r} "
                                 f"(running: {', '.join(running) or 'none'})", plugin=name)
        return f"{name}.{ids[next(cached[2]) % len(ids)]}"

    async def broadcast_message(self, message_or_payload: Any = None, *, target: str | None = None,
                                timeout: float = 2.0, operation: str | None = None,
                                metadata: dict[str, str] | None = None) -> BroadcastResult:
        """Send to every live instance (of ``target``, or of every plugin) and gather the replies.

        Returns as soon as every instance the registry lists as healthy has answered, else at
        ``timeout`` with what came and ``missing`` naming the silent instances. Error replies are
        included as responses with ``.error`` set; nothing raises for one instance's failure.
        Raises :class:`PluginNotFound` when no instance at all serves the broadcast (NATS "no
        responders"). The registry is asked while the broadcast is already on its way, not before.
        """
        self._allow("send", self._perms.send if self._perms else None, target or "*")
        msg = self._message(target or "*", message_or_payload, None, operation, metadata)
        subject = self.subjects.broadcast_to(target) if target else self.subjects.broadcast
        headers = request_headers(msg, timeout=timeout)
        body = self._encode_payload(msg.payload, subject, target)
        gathering = _Gathering(msg.id)
        gather_inbox = getattr(self._nc, "gather_inbox", None)
        sub: Subscription | None = None
        if gather_inbox is not None:  # a MeshClient: a token on its requests' inbox, no SUB/UNSUB each time
            token, inbox = await gather_inbox(gathering.on_direct)
        else:
            sub = await self._nc.subscribe(self._nc.new_inbox(), cb=gathering.on_reply)
            inbox = sub.subject
        # Our own runtime knows its broadcasts by this inbox (which no other client can choose for
        # us), not by the envelope's inst= (which anyone could set to silence an instance).
        self._own_inboxes.add(inbox)
        lookup = asyncio.create_task(self._lookups.list_ids(target, healthy_only=True,
                                                            timeout=max(0.05, min(1.0, timeout / 2))))
        lookup.add_done_callback(lambda _: gathering.progress.set())
        try:
            with _tracing.produce(subject) as carrier:
                headers.update(carrier)
                await publish(self._nc, subject, body, headers=headers, reply=inbox, plugin=target,
                              what="broadcast")
            with contextlib.suppress(TimeoutError):  # the deadline ends it with what came
                async with asyncio.timeout(timeout):
                    await gathering.until_complete(lookup, self._expected)
            gathering.look(lookup, self._expected)
        finally:
            self._own_inboxes.discard(inbox)
            if not lookup.done():
                lookup.cancel()
                await asyncio.gather(lookup, return_exceptions=True)
            elif not lookup.cancelled():
                lookup.exception()  # (retrieved, with no loop turn: it is done, and _expected took it or it was left)
            if sub is None:
                self._nc.end_gather(token)  # type: ignore[attr-defined]
            else:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
        gathering.take()
        if gathering.no_responders and not gathering.result.responses:
            raise PluginNotFound(f"no plugin instance serves broadcasts{f' to {target!r}' if target else ''} "
                                 f"(no responders on {subject})", plugin=target, subject=subject)
        result, expected = gathering.result, gathering.expected
        result.expected_known = expected is not None
        if expected is not None:
            result.missing = sorted(expected - gathering.seen)
        return result

    def is_own_broadcast(self, reply: str | None) -> bool:
        """Whether a broadcast received with this reply subject is one this object is sending."""
        return reply is not None and reply in self._own_inboxes

    def _expected(self, lookup: asyncio.Task[list[str]]) -> set[str] | None:
        if lookup.cancelled():
            return None
        exc = lookup.exception()
        if exc is None:
            return {i for i in lookup.result() if i != self._instance}
        if isinstance(exc, CommunicationError):
            log.warning("broadcast without the registry (%s): gathering until the timeout", exc)
            return None
        raise exc

    async def publish_event(self, event_type: str, payload: Any = None, *,
                            metadata: dict[str, str] | None = None) -> None:
        """Publish an event to every subscriber of a matching pattern (at most once, no reply)."""
        subject = self._event_subjects.get(event_type)
        if subject is None:
            check_event_type(event_type)
            if event_type.split(".", 1)[0] == MESH_EVENTS and self._instance is not None:
                raise PermissionDenied(f"{self._source} may not publish {event_type!r}: event types under "
                                       "'mesh.' are the mesh's own (e.g. mesh.health.<name>)", plugin=self._source)
            self._allow("publish", self._perms.publish if self._perms else None, event_type)
            subject = self.subjects.event(event_type)
            if len(self._event_subjects) > 4096:
                self._event_subjects.clear()
            self._event_subjects[event_type] = subject
        body = self._encode_payload(payload, subject, None)
        if self._send_prebuilt is not None:
            try:
                if _tracing.enabled():
                    with _tracing.produce(subject, operation="publish") as carrier:
                        await self._send_prebuilt(self._event_line(subject, event_type, body, metadata, carrier),
                                                  len(body))
                else:
                    await self._send_prebuilt(self._event_line(subject, event_type, body, metadata, None), len(body))
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError,
                    nats.errors.OutboundBufferLimitError) as exc:
                raise ConnectionFailed(f"NATS connection unavailable: {type(exc).__name__}", subject=subject) from None
            return
        # The kind is implied by the subject; build the envelope without a Message (hot path).
        headers = event_headers(self._env_tail, Message(metadata=metadata).metadata if metadata else None)
        with _tracing.produce(subject, operation="publish") as carrier:
            headers.update(carrier)
            await publish(self._nc, subject, body, headers=headers, what=f"event {event_type!r}")

    def _event_line(self, subject: str, event_type: str, body: bytes, metadata: dict[str, str] | None,
                    trace_headers: dict[str, str] | None) -> bytes:
        """:meth:`publish_event`'s ``HPUB`` line on the direct path: the same bytes on the wire as
        ``_wire.publish`` with ``event_headers`` (property-tested), without nats-py re-checking our
        subject and header names."""
        block = self._event_block(new_id(), metadata, trace_headers)
        n = len(block)
        if (size := n + len(body)) > self._nc.max_payload:
            raise PayloadTooLarge(f"event {event_type!r} of {size} bytes (headers and body) exceeds the server's "
                                  f"limit of {self._nc.max_payload} bytes", subject=subject)
        return f"HPUB {subject}  {n} {size}\r\n".encode() + block + body + b"\r\n"

    def check_subscribe(self, pattern: str) -> None:
        """Raise ValueError for a malformed pattern, PermissionDenied for a forbidden one."""
        check_event_type(pattern, pattern=True)
        self._allow("subscribe", self._perms.subscribe if self._perms else None, pattern)

    async def subscribe_to_events(self, pattern: str) -> EventSubscription:
        """Events whose type matches ``pattern`` (NATS wildcards), as an async iterator."""
        self.check_subscribe(pattern)
        subject = self.subjects.event(pattern)
        sub = await self._nc.subscribe(subject)
        await flush_subscriptions(self._nc)  # subscribed at the server when this returns: no later event is missed
        confirm = getattr(self._nc, "confirm_subscriptions", None)  # (a MeshClient: what the server refused)
        if confirm is not None:
            try:
                await confirm([subject])
            except PermissionDenied:
                await sub.unsubscribe()
                raise
        return EventSubscription(sub, self.subjects, pattern, self._subscriptions)

    async def close(self) -> None:
        """Close every event subscription this object opened; safe to call twice."""
        for sub in list(self._subscriptions):
            await sub.close()

    def _encode(self, msg: Message, subject: str) -> bytes:
        return self._encode_payload(msg.payload, subject, msg.target)

    def _encode_payload(self, payload: Any, subject: str, target: str | None) -> bytes:
        """The JSON body. Its size, with the headers, is checked once, where it is published."""
        try:
            return dumps(payload)
        except (TypeError, ValueError) as exc:
            raise InvalidMessage(f"payload is not JSON-serialisable: {exc}", plugin=target, subject=subject) from None
