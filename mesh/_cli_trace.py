"""``mesh trace TRACE_ID`` and ``mesh send --trace``: a message flow, as Jaeger recorded it.

Reads Jaeger's query API v3 (Jaeger v2): ``GET {jaeger}/api/v3/traces/{trace_id}`` answers
``{"result": {"resourceSpans": [...]}}``, OTLP as JSON with the trace and span ids in hex (not
base64 as protobuf's own JSON mapping would have them; both are accepted here). A trace Jaeger
does not know is a 404. The spans are printed as a tree: children under their parent, siblings
in the order they started, links noted.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer

from ._cli_common import JsonOpt, UserError, _fail, _print_json

__all__ = ["DEFAULT_JAEGER", "SpanNode", "build_tree", "get_trace", "render", "root_span", "show_trace",
           "trace_cmd", "wait_for_trace"]

DEFAULT_JAEGER = "http://127.0.0.1:16686"

_KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
_HEX_ID = re.compile(r"[0-9a-fA-F]{16}|[0-9a-fA-F]{32}")


class TraceError(UserError):
    """Jaeger could not be asked, or gave an answer that is not a trace; one line for the user."""


class TraceNotFound(TraceError):
    """Jaeger does not know the trace (yet: spans are exported in batches)."""


@dataclass
class SpanNode:
    """One span of a trace, and the spans that are its children in it."""

    span_id: str
    parent_id: str
    service: str
    name: str
    kind: str
    start_ns: int
    end_ns: int
    error: str | None = None
    links: list[str] = field(default_factory=list)
    children: list[SpanNode] = field(default_factory=list)
    orphan: bool = False  # its parent is not in the trace (not exported, or not yet)

    @property
    def duration_ms(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e6

    def to_json(self) -> dict[str, Any]:
        return {"service": self.service, "name": self.name, "span_id": self.span_id,
                "parent_span_id": self.parent_id or None, "kind": self.kind, "start_unix_nano": self.start_ns,
                "duration_ms": round(self.duration_ms, 3), "error": self.error, "links": self.links,
                "children": [c.to_json() for c in self.children]}


# --------------------------------------------------------------------------------------------
# Asking Jaeger

def check_trace_id(trace_id: str) -> str:
    if not _HEX_ID.fullmatch(trace_id):
        raise TraceError(f"not a trace id: {trace_id!r} (expected 32 hex digits, as `mesh send --trace` prints)")
    return trace_id.lower().rjust(32, "0")


def get_trace(jaeger: str, trace_id: str, *, timeout: float = 5.0) -> list[SpanNode]:
    """Every span of the trace (flat); TraceNotFound, or TraceError naming what went wrong."""
    trace_id = check_trace_id(trace_id)
    base = jaeger.rstrip("/")
    url = f"{base}/api/v3/traces/{trace_id}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise TraceNotFound(f"trace {trace_id} not found in Jaeger at {base}") from None
        raise TraceError(f"Jaeger at {base} answered HTTP {exc.code} {exc.reason} for trace {trace_id}") from None
    except urllib.error.URLError as exc:
        raise TraceError(f"cannot reach Jaeger at {base}: {exc.reason}") from None
    except ValueError as exc:  # urllib refuses the URL itself (no scheme, ...)
        raise TraceError(f"not a Jaeger URL: {jaeger!r} ({exc})") from None
    except OSError as exc:  # e.g. a timeout while reading the answer
        raise TraceError(f"cannot read from Jaeger at {base}: {exc}") from None
    try:
        data = json.loads(raw)
    except ValueError:
        raise TraceError(f"Jaeger at {base} gave a malformed answer for trace {trace_id} (not JSON: "
                         f"{raw[:60]!r})") from None
    spans = parse_spans(data, where=f"Jaeger at {base}")
    if not spans:
        raise TraceNotFound(f"trace {trace_id} not found in Jaeger at {base}")
    return spans


def parse_spans(data: Any, *, where: str = "Jaeger") -> list[SpanNode]:
    """The spans of an api/v3 answer (``{"result": TracesData}``, or a bare ``TracesData``)."""
    try:
        body = data.get("result", data)
        resource_spans = body["resourceSpans"]
        spans = []
        for rs in resource_spans:
            attrs = {a["key"]: a.get("value", {}) for a in (rs.get("resource") or {}).get("attributes", [])}
            service = str(attrs.get("service.name", {}).get("stringValue", "?"))
            for ss in rs.get("scopeSpans", []):
                for s in ss.get("spans", []):
                    status = s.get("status") or {}
                    failed = status.get("code") in (2, "STATUS_CODE_ERROR")
                    spans.append(SpanNode(
                        span_id=_hex(s["spanId"]), parent_id=_hex(s.get("parentSpanId", "")), service=service,
                        name=str(s["name"]), kind=_kind(s.get("kind", 0)), start_ns=int(s["startTimeUnixNano"]),
                        end_ns=int(s["endTimeUnixNano"]), error=(status.get("message") or "error") if failed else None,
                        links=[_hex(link["spanId"]) for link in s.get("links", [])]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise TraceError(f"{where} gave a malformed answer (not an api/v3 trace: {type(exc).__name__} "
                         f"{exc})") from None
    return spans


def _hex(value: Any) -> str:
    """A span or trace id: hex as Jaeger writes it, or base64 as protobuf's JSON mapping does."""
    if not isinstance(value, str):
        raise TypeError(f"an id must be a string, not {value!r}")
    if not value or _HEX_ID.fullmatch(value):
        return value.lower()
    try:
        return base64.b64decode(value, validate=True).hex()
    except binascii.Error:
        raise ValueError(f"id {value!r} is neither hex nor base64") from None


def _kind(value: Any) -> str:
    if isinstance(value, int):
        return _KINDS.get(value, str(value))
    return str(value).removeprefix("SPAN_KIND_").lower()


# --------------------------------------------------------------------------------------------
# The tree

def build_tree(spans: list[SpanNode]) -> list[SpanNode]:
    """Link every span under its parent; the roots (and orphans), each level by start time."""
    by_id = {s.span_id: s for s in spans}
    roots = []
    for s in spans:
        s.children = []
    for s in spans:
        parent = by_id.get(s.parent_id) if s.parent_id else None
        if parent is None or parent is s:
            s.orphan = bool(s.parent_id)
            roots.append(s)
        else:
            parent.children.append(s)
    for s in spans:
        s.children.sort(key=lambda c: c.start_ns)
    return sorted(roots, key=lambda r: r.start_ns)


def render(trace_id: str, roots: list[SpanNode]) -> list[str]:
    """``service  span-name  duration`` per span, two spaces of indent per level."""
    flat = list(_walk(roots, 0))
    names = {s.span_id: f"{s.service} {s.name}" for s, _ in flat}
    start = min((s.start_ns for s, _ in flat), default=0)
    end = max((s.end_ns for s, _ in flat), default=0)
    services = sorted({s.service for s, _ in flat})
    lines = [f"trace {trace_id}: {len(flat)} spans, {len(services)} services ({', '.join(services)}), "
             f"{(end - start) / 1e6:.2f} ms"]
    for s, depth in flat:
        line = f"{'  ' * depth}{s.service}  {s.name}  {s.duration_ms:.2f} ms"
        if s.error:
            line += f"  ERROR: {s.error}"
        if s.links:
            line += "  (links: " + ", ".join(names.get(link, f"span {link}") for link in s.links) + ")"
        if s.orphan:
            line += f"  (parent {s.parent_id} not in the trace)"
        lines.append(line)
    return lines


def _walk(nodes: list[SpanNode], depth: int) -> Iterator[tuple[SpanNode, int]]:
    for n in nodes:
        yield n, depth
        yield from _walk(n.children, depth + 1)


# --------------------------------------------------------------------------------------------
# mesh trace

JaegerOpt = Annotated[str, typer.Option("--jaeger", envvar="MESH_JAEGER_URL",
                                        help="Jaeger query URL (env MESH_JAEGER_URL).")]


def trace_cmd(
    trace_id: Annotated[str, typer.Argument(help="Trace id: 32 hex digits, as `mesh send --trace` prints.")],
    jaeger: JaegerOpt = DEFAULT_JAEGER,
    as_json: JsonOpt = False,
) -> None:
    """Print a trace from Jaeger as a tree: service, span, duration; children under their parent."""
    try:
        roots = build_tree(get_trace(jaeger, trace_id))
    except TraceError as exc:
        raise _fail(str(exc)) from None
    tid = check_trace_id(trace_id)
    if as_json:
        _print_json({"trace_id": tid, "roots": [r.to_json() for r in roots]})
        return
    sys.stdout.write("\n".join(render(tid, roots)) + "\n")


# --------------------------------------------------------------------------------------------
# mesh send --trace

@contextlib.contextmanager
def root_span(name: str) -> Iterator[str]:
    """Run the block under a new root span; yields its trace id, printed on stderr at the end.

    The span is exported when the ``OTEL_*`` variables name an exporter (as for every mesh
    process); otherwise it is only the trace's common parent, and Jaeger shows the plugins' spans.
    """
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    from . import __version__
    from ._telemetry import setup_tracing

    flush = setup_tracing("mesh-cli", version=__version__)
    if flush is None:
        provider = TracerProvider(resource=Resource.create({"service.name": "mesh-cli"}))
        trace.set_tracer_provider(provider)
        flush = provider.shutdown
    span = trace.get_tracer("groundhog.mesh.cli").start_span(name)
    trace_id = f"{span.get_span_context().trace_id:032x}"
    try:
        with trace.use_span(span, end_on_exit=True):
            yield trace_id
    finally:
        flush()
        sys.stderr.write(f"trace: {trace_id}\n")
        sys.stderr.flush()


def wait_for_trace(jaeger: str, trace_id: str, *, timeout: float = 10.0, settle: float = 1.0) -> list[SpanNode]:
    """The trace once Jaeger has it and its span count held still for ``settle`` seconds (spans
    arrive in batches, from several processes), or what Jaeger has at ``timeout``."""
    deadline = time.monotonic() + timeout
    count, changed = 0, time.monotonic()
    spans: list[SpanNode] = []
    while True:
        try:
            spans = get_trace(jaeger, trace_id)
        except TraceNotFound:
            if time.monotonic() > deadline:
                raise
            spans = []
        now = time.monotonic()
        if len(spans) != count:
            count, changed = len(spans), now
        elif spans and now - changed >= settle:
            return spans
        if now > deadline:
            return spans
        time.sleep(0.25)


def show_trace(jaeger: str | None, trace_id: str, *, timeout: float = 10.0) -> None:
    """After ``mesh send --trace``: print the tree on stderr when a Jaeger URL is configured."""
    if not jaeger:
        return
    try:
        roots = build_tree(wait_for_trace(jaeger, trace_id, timeout=timeout))
    except TraceError as exc:  # the send itself worked: say why there is no tree, exit 0
        sys.stderr.write(f"trace not shown: {exc}\n")
        return
    sys.stderr.write("\n".join(render(trace_id, roots)) + "\n")
