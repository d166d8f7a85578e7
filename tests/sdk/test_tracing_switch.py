"""Tracing is off (the fast path) until a tracer provider is installed."""

from __future__ import annotations

import subprocess
import sys


def test_enabled_follows_the_global_provider() -> None:
    code = ("from plugin_sdk import _tracing\n"
            "from opentelemetry import trace\n"
            "from opentelemetry.sdk.trace import TracerProvider\n"
            "before = _tracing.enabled()\n"
            "with _tracing.produce('s') as carrier: assert carrier == {}\n"
            "trace.set_tracer_provider(TracerProvider())\n"
            "with _tracing.produce('s') as carrier: print(before, _tracing.enabled(), 'traceparent' in carrier)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True", "True"]


PROPAGATION = '''
import json
from opentelemetry import baggage, context, propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from plugin_sdk import _tracing

spans = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(spans))
trace.set_tracer_provider(provider)
out = {}
with _tracing.produce("mesh.plugin.b", attributes={"mesh.operation": "get"}) as carrier:
    out["fast"] = dict(carrier)
    out["current_inside"] = trace.get_current_span().get_span_context().is_valid  # (not made current)
producer = spans.get_finished_spans()[-1]
expected = {}
propagate.inject(expected, context=trace.set_span_in_context(trace.NonRecordingSpan(producer.context)))
out["standard"] = expected
with _tracing.consume("mesh.plugin.b", out["fast"]) as span:
    out["child_of"] = format(span.parent.span_id, "016x")
token = context.attach(baggage.set_baggage("tenant", "acme"))
with _tracing.produce("mesh.plugin.b") as carrier:
    out["baggage"] = carrier.get("baggage")
context.detach(token)
with _tracing.consume("s", out["fast"] | {"baggage": "tenant=acme"}):
    out["baggage_in"] = baggage.get_baggage("tenant")
for bad in ("00-" + "0" * 32 + "-00f067aa0ba902b7-01", "zz-junk",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"):
    with _tracing.consume("s", {"traceparent": bad}) as span:
        out.setdefault("bad_parents", []).append(span.parent is None)
with _tracing.consume("s", out["fast"] | {"tracestate": "vendor=1"}) as span:
    out["tracestate"] = span.get_span_context().trace_state.to_header()
print(json.dumps(out))
'''


def test_fast_w3c_propagation_matches_the_standard_propagator() -> None:
    import json

    out = json.loads(subprocess.run([sys.executable, "-c", PROPAGATION], capture_output=True, text=True,
                                    check=True).stdout)
    assert out["fast"] == out["standard"] and out["fast"]["traceparent"].startswith("00-")
    assert out["child_of"] == out["fast"]["traceparent"].split("-")[2]  # the consumer's parent is the producer
    assert out["baggage"] == "tenant=acme" and out["baggage_in"] == "acme"
    assert out["bad_parents"] == [True, True, True]  # an invalid traceparent starts a new trace
    assert out["tracestate"] == "vendor=1"
    assert out["current_inside"] is False


def test_another_propagator_carries_the_producer_span() -> None:
    # The slow path (any propagator but the default pair) injects the producer's context, not the caller's.
    code = ("from opentelemetry import baggage, context, trace\n"
            "from opentelemetry.sdk.trace import TracerProvider\n"
            "from opentelemetry.sdk.trace.export import SimpleSpanProcessor\n"
            "from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter\n"
            "from opentelemetry.propagate import set_global_textmap\n"
            "from opentelemetry.propagators.composite import CompositePropagator\n"
            "from opentelemetry.baggage.propagation import W3CBaggagePropagator\n"
            "from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator\n"
            "from plugin_sdk import _tracing\n"
            "spans = InMemorySpanExporter()\n"
            "provider = TracerProvider()\n"
            "provider.add_span_processor(SimpleSpanProcessor(spans))\n"
            "trace.set_tracer_provider(provider)\n"
            "set_global_textmap(CompositePropagator([W3CBaggagePropagator(), TraceContextTextMapPropagator()]))\n"
            "context.attach(baggage.set_baggage('tenant', 'acme'))\n"
            "with trace.get_tracer('t').start_as_current_span('caller'):\n"
            "    with _tracing.produce('s') as carrier: pass\n"
            "producer = spans.get_finished_spans()[0]\n"
            "print(carrier['traceparent'].split('-')[2] == format(producer.context.span_id, '016x'),\n"
            "      carrier['baggage'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "tenant=acme"]


def test_other_propagators_are_honoured() -> None:
    code = ("from opentelemetry import trace\n"
            "from opentelemetry.sdk.trace import TracerProvider\n"
            "from opentelemetry.propagate import set_global_textmap\n"
            "from opentelemetry.baggage.propagation import W3CBaggagePropagator\n"
            "from plugin_sdk import _tracing\n"
            "trace.set_tracer_provider(TracerProvider())\n"
            "set_global_textmap(W3CBaggagePropagator())\n"  # no trace context at all
            "with _tracing.produce('s') as carrier: print(sorted(carrier))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]"]
