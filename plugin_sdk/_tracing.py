"""OpenTelemetry spans for message flows, following the messaging semantic conventions.

Only the OpenTelemetry *API* is used here; a process turns tracing on by installing an SDK
``TracerProvider`` (``mesh`` does that from the standard ``OTEL_*`` variables). Until one is
installed every helper takes a fast path that does nothing, so tracing off costs close to nothing.

The W3C ``traceparent`` (and ``baggage``) travel as NATS headers, so a request that enters plugin A,
which sends to B, which publishes an event that C handles, is one trace.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

from opentelemetry import baggage, context, propagate, trace
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

__all__ = ["consume", "enabled", "produce"]

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
_cache: dict[str, Any] = {"provider": None, "tracer": None, "textmap": None, "fast": False}


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
    raw = headers.get("traceparent")
    match = _TRACEPARENT.match(raw) if raw else None
    if match is None:
        return Context()
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == "0" * 32 or span_id == "0" * 16:
        return Context()  # what the W3C propagator does with an invalid traceparent: no parent
    parent = SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(int(flags, 16)))
    return trace.set_span_in_context(NonRecordingSpan(parent), Context())


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

    def __init__(self, span: Span, base: Context) -> None:
        super().__init__(span, _NO_HEADERS)
        self.base = base  # the extracted context: its baggage reaches the handler
        self.token: object = None

    def __enter__(self) -> Any:
        self.token = context.attach(trace.set_span_in_context(self.span, self.base))
        return self.span

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        try:
            super().__exit__(et, e, tb)
        finally:
            context.detach(self.token)  # type: ignore[arg-type]


def produce(subject: str, *, operation: str = "send",
            attributes: Mapping[str, Any] | None = None) -> AbstractContextManager[dict[str, str]]:
    """A PRODUCER span ``"<operation> <subject>"``; ``with`` gives the headers that carry its context."""
    if not enabled():
        return _NOOP_PRODUCE
    span = _sdk_tracer().start_span(f"{operation} {subject}", kind=SpanKind.PRODUCER,
                                    attributes=_attributes(subject, operation, attributes), record_exception=False)
    return _Produced(span, _inject(span))


def consume(subject: str, headers: Mapping[str, str] | None, *, operation: str = "process", link: bool = False,
            attributes: Mapping[str, Any] | None = None) -> AbstractContextManager[Span | None]:
    """A CONSUMER span ``"<operation> <subject>"``, the child of the producer named in ``headers``.

    With ``link`` the span also links to the producer (events, broadcast replies). User spans
    started inside nest under it.
    """
    if not enabled():
        return _NOOP_CONSUME
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
