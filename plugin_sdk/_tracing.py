"""OpenTelemetry spans for message flows, following the messaging semantic conventions.

Only the OpenTelemetry *API* is used here; a process turns tracing on by installing an SDK
``TracerProvider`` (``mesh`` does that from the standard ``OTEL_*`` variables). Until one is
installed every helper takes a fast path that does nothing, so tracing off costs close to nothing.

The W3C ``traceparent`` (and ``baggage``) travel as NATS headers, so a request that enters plugin A,
which sends to B, which publishes an event that C handles, is one trace.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import random
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Literal

from opentelemetry import baggage, context, propagate, trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    Tracer,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ._wire import bounded

__all__ = ["consume", "enabled", "flush", "produce"]

log = logging.getLogger(__name__)

_NO_HEADERS: dict[str, str] = {}


_UNKNOWN = object()
if os.environ.get("OTEL_PYTHON_TRACER_PROVIDER"):
    trace.get_tracer_provider()  # a provider named by the environment is loaded on first use: load it now


def enabled() -> bool:
    """Whether a real tracer provider is installed in this process (called on every message).

    ``trace.get_tracer_provider()`` costs ~1.3 µs (it reads ``os.environ``); the global it returns,
    read directly, costs ~0.05 µs. The public call remains the fallback should the API change.
    """
    provider = getattr(trace, "_TRACER_PROVIDER", _UNKNOWN)
    if provider is _UNKNOWN:
        provider = trace.get_tracer_provider()
        return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
    return provider is not None and not isinstance(provider, trace.NoOpTracerProvider)


def _attributes(subject: str, operation: str, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    attrs: dict[str, Any] = {"messaging.system": "nats", "messaging.destination.name": subject,
                             "messaging.operation.type": operation}
    if extra:
        attrs.update({k: v for k, v in extra.items() if v is not None})
    return attrs


# -- the tracer and the propagation fast path ----------------------------------------------------
#
# Per message, the OpenTelemetry SDK costs ~14 µs to start and end a span; what used to wrap it
# (three nested generator context managers, the composite propagator's inject/extract) cost more
# than twice that again. Below: one small class per context manager, the SDK tracer itself rather
# than the API's proxy, and the W3C headers written and read directly when the process uses the
# default propagators (tracecontext + baggage). Any other propagator (OTEL_PROPAGATORS=b3, ...) goes
# through ``opentelemetry.propagate`` as before.

_TRACEPARENT = re.compile(r"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:(-.*)|[ \t]*)$")
_cache: dict[str, Any] = {"provider": None, "tracer": None, "textmap": None, "fast": False,
                          "replay": None, "replay_of": None, "atexit": False,
                          "hot": (None, None, None)}


def _sdk_tracer() -> Tracer:
    # (the API's global read directly, as in enabled(): its getter reads os.environ on every call)
    provider = getattr(trace, "_TRACER_PROVIDER", None) or trace.get_tracer_provider()
    if provider is not _cache["provider"]:
        _cache["provider"], _cache["tracer"] = provider, provider.get_tracer("groundhog.mesh")
    tracer: Tracer = _cache["tracer"]
    return tracer


def _fast_propagation() -> bool:
    """Whether the global propagator is the default one (W3C tracecontext + baggage)."""
    textmap = propagate.get_global_textmap()
    if textmap is not _cache["textmap"]:
        parts = getattr(textmap, "_propagators", None)
        _cache["textmap"] = textmap
        _cache["fast"] = isinstance(textmap, CompositePropagator) and isinstance(parts, list | tuple) and \
            [type(x) for x in parts] == [TraceContextTextMapPropagator, W3CBaggagePropagator]
    return bool(_cache["fast"])


def _inject(span: Span) -> dict[str, str]:
    if not _fast_propagation():
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))  # (the caller's baggage with it)
        return carrier
    sc = span.get_span_context()
    if not sc.is_valid:
        return {}
    carrier = {"traceparent": f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags & 0xFF:02x}"}
    if sc.trace_state:
        carrier["tracestate"] = sc.trace_state.to_header()
    if baggage.get_all():
        W3CBaggagePropagator().inject(carrier)
    return carrier


def _extract(headers: Mapping[str, str] | None) -> Context:
    if not headers:
        return Context()
    if not _fast_propagation() or "tracestate" in headers or "baggage" in headers:
        return propagate.extract(headers)
    remote = _remote(headers.get("traceparent"))
    if remote is None:
        return Context()
    return trace.set_span_in_context(NonRecordingSpan(remote), Context())


def _remote(raw: str | None) -> SpanContext | None:
    """The producer's span context in a ``traceparent`` value; ``None`` for none or an invalid one (what
    the W3C propagator then does: no parent)."""
    ids = _remote_ids(raw)
    return None if ids is None else _remote_context(ids)


def _remote_context(ids: tuple[int, int, int]) -> SpanContext:
    """The producer's span context of :func:`_remote_ids`'s trace id, span id and flags."""
    return SpanContext(ids[0], ids[1], is_remote=True, trace_flags=TraceFlags(ids[2]))


def _remote_ids(raw: str | None) -> tuple[int, int, int] | None:
    """:func:`_remote`'s trace id, span id and flags, without a ``SpanContext``."""
    match = _TRACEPARENT.match(raw) if raw else None
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return int(trace_id, 16), int(span_id, 16), int(flags, 16)


class _Noop:
    __slots__ = ()

    def __enter__(self) -> Any:
        return _NO_HEADERS

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        return None


class _Consume(_Noop):
    def __enter__(self) -> Any:
        return None


_NOOP_PRODUCE, _NOOP_CONSUME = _Noop(), _Consume()



class _Produced:
    """A started PRODUCER span, ended on exit; an Exception on the way out is recorded on it.

    It is not made current: what runs inside is the mesh's own send (no user code, no span of its
    own), and its context travels in the headers ``with`` gives. (Attaching it cost a context copy,
    an attach and a detach per message.)"""

    __slots__ = ("headers", "span")

    def __init__(self, span: Span, headers: dict[str, str]) -> None:
        self.span = span
        self.headers = headers

    def __enter__(self) -> dict[str, str]:
        return self.headers

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if isinstance(e, Exception):
            _failed(self.span, e)
        self.span.end()


class _Active(_Produced):
    """A started CONSUMER span made current until exit; an Exception on the way out is recorded on it."""

    __slots__ = ("base", "token")

    def __init__(self, span: Span, base: Context) -> None:  # (no super(): a call less per message)
        self.span = span
        self.headers = _NO_HEADERS
        self.base = base  # the extracted context: its baggage reaches the handler
        self.token: object = None

    def __enter__(self) -> Any:
        self.token = context.attach(trace.set_span_in_context(self.span, self.base))
        return self.span

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if isinstance(e, Exception):
                _failed(self.span, e)
            self.span.end()
        finally:
            context.detach(self.token)  # type: ignore[arg-type]


# -- spans recorded off the request's critical path ---------------------------------------------
#
# At one request in flight a process's CPU is the request's latency, and each of a request's two SDK
# spans (the sender's PRODUCER, the handler's CONSUMER) cost 85-110 µs of it on two cores. What the
# request itself needs of a span is only its identity: the ``traceparent`` the sender writes, the
# current span the handler's own spans nest under. So, with the SDK's own tracer, the mesh takes a
# span's ids and sampling decision at once, from the tracer's id generator and sampler, and hands out
# a ``_Deferred``: a ``Span`` that keeps what is done to it (attributes, events, status, exceptions,
# each with its time). Once it has ended, the SDK span is made for it two loop turns later (after the
# reply or the next request has been written), with the same trace id, span id, flags, start and end
# times, parent, links and attributes, and what was kept is replayed on it: processors and exporters
# get the span the SDK would have made. The ids reach the SDK through the public hooks of its
# ``Tracer`` (``id_generator`` and ``sampler``, replaced on the mesh's own tracer only), primed for
# that one call. For the SDK's standard samplers (always on or off, trace-id ratio, parent-based with
# the default delegates: what ``OTEL_TRACES_SAMPLER`` offers), read from their public description,
# the decision is computed as they compute it and they take it again when the span is made; any other
# sampler is asked once, on the spot, and its answer given back. Should the SDK ever make a span
# with other ids or flags than given, that is logged once and every later span is made on the spot.
# ``MESH_TRACE_DEFER=0`` makes every span on the spot.


class _PrimedIds:
    """The tracer's id generator, giving out the ids of the span being made when primed (in the thread
    that primed it: another thread's span on the same tracer gets fresh ids)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.thread = 0
        self.trace_id: int | None = None
        self.span_id: int | None = None

    def generate_trace_id(self) -> int:
        if self.trace_id is None or threading.get_ident() != self.thread:
            return int(self.inner.generate_trace_id())
        primed, self.trace_id = self.trace_id, None
        return primed

    def generate_span_id(self) -> int:
        if self.span_id is None or threading.get_ident() != self.thread:
            return int(self.inner.generate_span_id())
        primed, self.span_id = self.span_id, None
        return primed

    def is_trace_id_random(self) -> bool:
        return bool(getattr(self.inner, "is_trace_id_random", lambda: False)())


class _PrimedSampler:
    """The tracer's sampler, giving back the decision already taken for the span being made when primed."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.thread = 0
        self.result: Any = None

    def should_sample(self, parent_context: Context | None, trace_id: int, name: str, kind: SpanKind | None = None,
                      attributes: Any = None, links: Any = None, trace_state: Any = None) -> Any:
        if self.result is not None and threading.get_ident() == self.thread:
            primed, self.result = self.result, None
            return primed
        return self.inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return str(self.inner.get_description())


_SAMPLED, _RANDOM = int(TraceFlags.SAMPLED), int(getattr(TraceFlags, "RANDOM_TRACE_ID", 0))
_STANDARD_DELEGATES = (",remoteParentSampled:AlwaysOnSampler,remoteParentNotSampled:AlwaysOffSampler,"
                       "localParentSampled:AlwaysOnSampler,localParentNotSampled:AlwaysOffSampler}")
_RATIO = re.compile(r"TraceIdRatioBased\{([0-9.eE+-]+)\}")


def _root_decision(description: str) -> Any:
    """``trace_id -> sampled`` of a standard root sampler, from its description; ``None`` if not one."""
    if description == "AlwaysOnSampler":
        return lambda trace_id: True
    if description == "AlwaysOffSampler":
        return lambda trace_id: False
    if match := _RATIO.fullmatch(description):
        bound = round(float(match.group(1)) * (1 << 64))  # (TraceIdRatioBased.get_bound_for_rate)
        return lambda trace_id: trace_id & 0xFFFFFFFFFFFFFFFF < bound
    return None


def _decision(sampler: Any) -> tuple[Any, bool] | None:
    """How one of the SDK's standard samplers decides, computed as it computes it: ``(root, parent_based)``,
    ``root(trace_id) -> sampled`` for a span without a parent, and whether a span with one follows its
    parent's flag instead; ``None`` for any other sampler (it is then asked, on the spot)."""
    if type(sampler).__module__ != "opentelemetry.sdk.trace.sampling":
        return None
    try:
        description = str(sampler.get_description())
    except Exception:  # a sampler that cannot describe itself is asked instead, on the spot
        return None
    if description.startswith("ParentBased{root:") and description.endswith(_STANDARD_DELEGATES):
        root = _root_decision(description[len("ParentBased{root:"):-len(_STANDARD_DELEGATES)])
        return None if root is None else (root, True)
    root = _root_decision(description)
    return None if root is None else (root, False)


class _Replay:
    """The mesh tracer's deferred spans: identified now, made by the SDK after the message is on its way."""

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer
        self.ids = _PrimedIds(tracer.id_generator)
        self.sampler = _PrimedSampler(tracer.sampler)
        decision = _decision(tracer.sampler)
        self.decide: Any = None if decision is None else decision[0]
        self.parent_based = decision is not None and decision[1]
        self.random = self.ids.is_trace_id_random()
        # (the SDK's own generator draws from ``random``: drawn here directly, a call less per id)
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

        self.bits = random.getrandbits if type(self.ids.inner) is RandomIdGenerator else None
        tracer.id_generator, tracer.sampler = self.ids, self.sampler
        self.queue: deque[_Deferred] = deque()
        self.lock = threading.RLock()  # (one span primed and made at a time; a processor may start its own)
        self.armed: asyncio.AbstractEventLoop | None = None
        self.broken = False
        self.failures = 0
        if not _cache["atexit"]:
            _cache["atexit"] = True
            atexit.register(flush)  # (registered after the SDK provider's exit hook: runs before it)

    @staticmethod
    def of(tracer: Any) -> _Replay | None:
        sdk = sys.modules.get("opentelemetry.sdk.trace")
        if sdk is None or type(tracer) is not sdk.Tracer or _DEFER_OFF:
            return None  # not the SDK's own tracer: it makes its spans itself, on the spot
        if not hasattr(tracer, "id_generator") or not hasattr(tracer, "sampler"):
            return None
        return _Replay(tracer)

    def produced(self, ctx: Context, operation: str, subject: str, attributes: Mapping[str, Any] | None) -> Span:
        """The PRODUCER span ``tracer.start_span`` would start now in ``ctx``, as a ``_Deferred`` (or the
        ``NonRecordingSpan`` it would return for a trace not sampled)."""
        parent = trace.get_current_span(ctx).get_span_context() if ctx else None  # (empty: no span, no baggage)
        if parent is None or not parent.is_valid:
            return self._begin(SpanKind.PRODUCER, operation, subject, attributes, ctx, None, None, None, None)
        return self._begin(SpanKind.PRODUCER, operation, subject, attributes, ctx, parent, None, parent.trace_id,
                           int(parent.trace_flags))

    def consumed(self, remote: tuple[int, int, int] | None, operation: str, subject: str,
                 attributes: Mapping[str, Any] | None, link: bool) -> Span:
        """The CONSUMER span, child of the ``remote`` producer (trace id, span id, flags; ``None``: a root),
        as :meth:`produced`."""
        if remote is None:
            return self._begin(SpanKind.CONSUMER, operation, subject, attributes, None, None, None, None, None)
        return self._begin(SpanKind.CONSUMER, operation, subject, attributes, None, None, remote, remote[0],
                           remote[2], link)

    def _begin(self, kind: SpanKind, operation: str, subject: str, attributes: Mapping[str, Any] | None,
               ctx: Context | None, parent: SpanContext | None, remote: tuple[int, int, int] | None,
               trace_id: int | None, parent_flags: int | None, link: bool = False) -> Span:
        ids, bits = self.ids.inner, self.bits
        if trace_id is None or parent_flags is None:  # a root
            trace_id = (bits(128) if bits is not None else 0) or ids.generate_trace_id()
            flags = _RANDOM if self.random else 0
            sampled = None
        else:
            flags = parent_flags & _RANDOM
            sampled = bool(parent_flags & _SAMPLED)
        decide = self.decide
        if decide is not None:
            if not (sampled if sampled is not None and self.parent_based else decide(trace_id)):
                # (the standard samplers drop what they do not sample)
                return NonRecordingSpan(SpanContext(trace_id, ids.generate_span_id(), is_remote=False,
                                                    trace_flags=TraceFlags(flags),
                                                    trace_state=None if parent is None else parent.trace_state))
            d = _Deferred(self, kind, operation, subject, attributes, ctx, parent, remote)
        else:  # a sampler of the user's own: asked now, its answer given back when the span is made
            d = _Deferred(self, kind, operation, subject, attributes, ctx, parent, remote)
            d.link = link
            d.result = result = self.sampler.inner.should_sample(d.context_for_sdk(), trace_id, d.name, kind,
                                                                 d.attributes, d.links)
            d.trace_state = result.trace_state
            if result.decision.is_sampled():
                flags |= _SAMPLED
            if not result.decision.is_recording():
                return NonRecordingSpan(SpanContext(trace_id, ids.generate_span_id(), is_remote=False,
                                                    trace_flags=TraceFlags(flags), trace_state=result.trace_state))
        if sampled is not None:
            d.root = False
        if link:
            d.link = True
        d.trace_id, d.flags = trace_id, flags if decide is None else flags | _SAMPLED
        d.span_id = (bits(64) if bits is not None else 0) or ids.generate_span_id()
        return d

    def later(self, span: _Deferred) -> None:
        self.queue.append(span)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.drain()  # no event loop in this thread: made now
            return
        if self.armed is not loop:
            self.armed = loop
            if isinstance(loop, asyncio.BaseEventLoop):
                # A timer due now: asyncio moves it to the ready queue at the start of the next turn,
                # behind what this turn made ready (the flusher, woken to write the message): the
                # spans are made after the write, in that turn, with no turn of their own.
                loop.call_later(0, self.drain)
            else:  # (another loop, uvloop: after this turn and the next)
                loop.call_soon(loop.call_soon, self.drain)

    def drain(self) -> None:
        self.armed = None
        queue = self.queue
        while queue:
            self.make(queue.popleft())

    def make(self, d: _Deferred) -> None:
        ids, sampler, sc = self.ids, self.sampler, d.get_span_context()
        try:
            with self.lock:
                ids.thread = sampler.thread = threading.get_ident()
                ids.trace_id, ids.span_id, sampler.result = (sc.trace_id if d.root else None), sc.span_id, d.result
                try:
                    span = self.tracer.start_span(d.name, context=d.context_for_sdk(), kind=d.kind,
                                                  attributes=_attributes(d.subject, d.operation, d.extra),
                                                  links=d.links, start_time=d.start, record_exception=False)
                finally:
                    ids.trace_id = ids.span_id = sampler.result = None
            made = span.get_span_context()
            if (made.trace_id, made.span_id, made.trace_flags) != (sc.trace_id, sc.span_id, sc.trace_flags) \
                    and not self.broken:
                self.broken = True
                log.warning("the OpenTelemetry SDK made span %r with other ids or flags than it was given "
                            "(%s, not %s): spans are made on the spot from now on", d.name, made, sc)
            d.made(span)
        except Exception as exc:  # a span processor failed: this span is lost (logged), not the others
            self.failures += 1
            log.warning("could not record span %r: %s: %s", d.name, type(exc).__name__, bounded(str(exc)),
                        exc_info=self.failures == 1)


_DEFER_OFF = os.environ.get("MESH_TRACE_DEFER", "1").strip().lower() in ("0", "false", "no", "off")
_EMPTY = Context()


class _Deferred(Span):
    """A span the SDK makes once it has ended (see above); until then, what is done to it is kept.

    Its name, attributes, links and contexts are built when first asked for (by the span's maker,
    after the message is on its way, or by a handler reading them), not on the message's path."""

    # (what most spans keep as it is: class attributes, not set per span)
    root, link, result, trace_state, sc, ended, real, _parent_sc = True, False, None, None, None, None, None, None
    ops: tuple[tuple[str, tuple[Any, ...]], ...] | list[tuple[str, tuple[Any, ...]]] = ()

    def __init__(self, replay: _Replay, kind: SpanKind, operation: str, subject: str,
                 extra: Mapping[str, Any] | None, ctx: Context | None, parent: SpanContext | None,
                 remote: tuple[int, int, int] | None) -> None:
        self.replay, self.kind, self.operation, self.subject, self.extra = replay, kind, operation, subject, extra
        self.ctx, self.remote, self.start = ctx, remote, time.time_ns()
        self.trace_id = self.span_id = self.flags = 0
        if parent is not None:
            self._parent_sc, self.trace_state = parent, parent.trace_state

    # -- what the SDK is given when it makes the span (and what the SDK's span offers to read) --

    @property
    def name(self) -> str:
        return f"{self.operation} {self.subject}"

    @property
    def parent(self) -> SpanContext | None:
        """The parent's span context (``None``: a root), as the SDK's span has it."""
        if self._parent_sc is None and self.remote is not None:
            self._parent_sc = _remote_context(self.remote)
        return self._parent_sc

    @property
    def links(self) -> list[Link]:
        remote = self.parent if self.link and self.remote is not None else None
        return [] if remote is None else [Link(remote)]

    def context_for_sdk(self) -> Context:
        """The parent context ``start_span`` is given: the sender's current context, or the producer's."""
        if self.ctx is None:
            remote = self.parent if self.remote is not None else None
            self.ctx = _EMPTY if remote is None else trace.set_span_in_context(NonRecordingSpan(remote), _EMPTY)
        return self.ctx

    @property
    def context(self) -> SpanContext:  # (the SDK's span has it as ``context`` too)
        return self.get_span_context()

    @property
    def attributes(self) -> Mapping[str, Any]:
        """Its attributes so far (the SDK's span has them too; some handlers read them)."""
        if self.real is not None:
            return getattr(self.real, "attributes", None) or {}
        attrs = _attributes(self.subject, self.operation, self.extra) if self.result is None else \
            dict(self.result.attributes or {})  # (a sampler of the user's own may add some)
        for op, args in self.ops:
            if op == "set_attribute":
                attrs[args[0]] = args[1]
            elif op == "set_attributes":
                attrs.update(args[0])
        return BoundedAttributes(attributes=attrs)  # (values cleaned as the SDK's span cleans them)

    def made(self, span: Span) -> None:
        self.real = span
        for op, args in self.ops:
            getattr(span, op)(*args)
        self.ops = ()
        span.end(self.ended)

    def _do(self, op: str, *args: Any) -> None:
        if self.real is not None:
            getattr(self.real, op)(*args)
        elif self.ended is not None:
            log.warning("%s on span %r after it ended: ignored", op, self.name)  # (as the SDK warns)
        elif isinstance(self.ops, list):
            self.ops.append((op, args))
        else:
            self.ops = [(op, args)]

    # -- the API's Span --

    def get_span_context(self) -> SpanContext:
        sc = self.sc
        if sc is None:
            sc = self.sc = SpanContext(self.trace_id, self.span_id, is_remote=False,
                                       trace_flags=TraceFlags(self.flags), trace_state=self.trace_state)
        return sc

    def is_recording(self) -> bool:
        return self.real.is_recording() if self.real is not None else self.ended is None

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        self._do("set_attributes", dict(attributes))

    def set_attribute(self, key: str, value: Any) -> None:
        self._do("set_attribute", key, value)

    def add_event(self, name: str, attributes: Any = None, timestamp: int | None = None) -> None:
        self._do("add_event", name, attributes, time.time_ns() if timestamp is None else timestamp)

    def add_link(self, context: SpanContext, attributes: Any = None) -> None:
        self._do("add_link", context, attributes)

    def update_name(self, name: str) -> None:
        self._do("update_name", name)

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        self._do("set_status", status, description)

    def record_exception(self, exception: BaseException, attributes: Any = None, timestamp: int | None = None,
                         escaped: bool = False) -> None:
        self._do("record_exception", exception, attributes, time.time_ns() if timestamp is None else timestamp,
                 escaped)

    def end(self, end_time: int | None = None) -> None:
        if self.real is not None:
            self.real.end(end_time)
        elif self.ended is None:
            self.ended = time.time_ns() if end_time is None else end_time
            self.replay.later(self)

    def __repr__(self) -> str:
        return f"_Deferred({self.name!r}, trace {self.trace_id:032x}, span {self.span_id:016x})"


def _replay() -> _Replay | None:
    """The deferred-span maker of the mesh's SDK tracer; ``None``: make spans on the spot."""
    tracer = _sdk_tracer()
    replay = _cache["replay"]
    if _cache["replay_of"] is not tracer:
        if replay is not None:
            replay.drain()  # (the spans of the tracer before: made by it)
        _cache["replay_of"], _cache["replay"] = tracer, (replay := _Replay.of(tracer))
    if replay is None or replay.broken:
        return None
    made: _Replay = replay
    return made


def flush() -> None:
    """Make the SDK spans of every ended deferred span now (before a tracer provider's flush or shutdown)."""
    replay = _cache["replay"]
    if replay is not None:
        replay.drain()


def _traceparent(span: Span, ctx: Context | None) -> dict[str, str]:
    """:func:`_inject` for a span of ours, the default propagators in use: its headers."""
    if type(span) is _Deferred:
        carrier = {"traceparent": f"00-{span.trace_id:032x}-{span.span_id:016x}-{span.flags & 0xFF:02x}"}
        trace_state = span.trace_state
    else:
        sc = span.get_span_context()
        carrier = {"traceparent": f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags & 0xFF:02x}"}
        trace_state = sc.trace_state
    if trace_state:
        carrier["tracestate"] = trace_state.to_header()
    if ctx and baggage.get_all(ctx):
        W3CBaggagePropagator().inject(carrier, context=ctx)
    return carrier


def _deferring() -> _Replay | Literal[False] | None:
    """The deferred-span maker when spans can be deferred and the default propagators are in use;
    ``None``: tracing is on but spans are made on the spot; ``False``: tracing is off. The usual case
    costs two globals compared with the ones seen last time (inlined in :func:`produce` and
    :func:`consume`); this is the look-up behind it."""
    if not enabled():
        return False
    replay = _replay() if _fast_propagation() else None
    _cache["hot"] = (getattr(trace, "_TRACER_PROVIDER", None), propagate.get_global_textmap(), replay)
    return replay


def produce(subject: str, *, operation: str = "send",
            attributes: Mapping[str, Any] | None = None) -> AbstractContextManager[dict[str, str]]:
    """A PRODUCER span ``"<operation> <subject>"``; ``with`` gives the headers that carry its context."""
    hot = _cache["hot"]  # (the usual case first: the provider and propagator seen last time)
    provider = getattr(trace, "_TRACER_PROVIDER", None)
    replay = hot[2] if provider is hot[0] and provider is not None and propagate.get_global_textmap() is hot[1] \
        else _deferring()
    if replay is False:
        return _NOOP_PRODUCE
    if replay is not None and not replay.broken:
        ctx = context.get_current()
        span = replay.produced(ctx, operation, subject, attributes)
        return _Produced(span, _traceparent(span, ctx))
    span = _sdk_tracer().start_span(f"{operation} {subject}", kind=SpanKind.PRODUCER,
                                    attributes=_attributes(subject, operation, attributes), record_exception=False)
    return _Produced(span, _inject(span))


def consume(subject: str, headers: Mapping[str, str] | None, *, operation: str = "process", link: bool = False,
            attributes: Mapping[str, Any] | None = None) -> AbstractContextManager[Span | None]:
    """A CONSUMER span ``"<operation> <subject>"``, the child of the producer named in ``headers``.

    With ``link`` the span also links to the producer (events, broadcast replies). User spans
    started inside nest under it.
    """
    hot = _cache["hot"]  # (as in produce)
    provider = getattr(trace, "_TRACER_PROVIDER", None)
    replay = hot[2] if provider is hot[0] and provider is not None and propagate.get_global_textmap() is hot[1] \
        else _deferring()
    if replay is False:
        return _NOOP_CONSUME
    if replay is not None and not replay.broken and (
            not headers or ("tracestate" not in headers and "baggage" not in headers)):
        remote = _remote_ids(headers.get("traceparent")) if headers else None
        return _Active(replay.consumed(remote, operation, subject, attributes, link), _EMPTY)
    parent = _extract(headers)
    links = []
    if link:
        producer = trace.get_current_span(parent).get_span_context()
        if producer.is_valid:
            links.append(Link(producer))
    span = _sdk_tracer().start_span(f"{operation} {subject}", context=parent, kind=SpanKind.CONSUMER,
                                    attributes=_attributes(subject, operation, attributes), links=links,
                                    record_exception=False)
    return _Active(span, parent)


def failed(span: Span | None, error: BaseException) -> None:
    """Mark ``span`` (from :func:`consume`) as failed with ``error``, when tracing is on."""
    if span is not None:
        _failed(span, error)


def _failed(span: Span, error: BaseException) -> None:
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.set_attribute("error.type", type(error).__name__)
