"""The mesh's message spans are made by the SDK after the message is on its way (plugin_sdk._tracing):
the spans exported must be exactly those the SDK makes on the spot, for every sampler and every thing
a handler does to its span; and where the SDK would make them otherwise, the mesh must notice.

These tests set the OpenTelemetry API's provider global directly (as ``bench/bench_tracing.py`` does),
a new SDK provider per case, and put back what was there: ``set_tracer_provider`` allows one per process.
"""

from __future__ import annotations

import asyncio
import logging
import random
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import context, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.span import TraceState

from plugin_sdk import _tracing


class SeededIds(IdGenerator):
    """The same ids in the same order for the same seed: the deferred and the on-the-spot run of a case
    get the same trace and span ids, so their spans can be compared field by field."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)

    def generate_span_id(self) -> int:
        return self.random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        return self.random.getrandbits(128) or 1


class Picky(Sampler):
    """A sampler of the user's own (not one the mesh can compute): samples by the span's name, adds an
    attribute and a trace state of its own, and counts how often it is asked."""

    def __init__(self) -> None:
        self.asked = 0

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None, attributes: Any = None,
                      links: Any = None, trace_state: Any = None) -> SamplingResult:
        self.asked += 1
        if "skip" in name:
            return SamplingResult(Decision.DROP)
        decision = Decision.RECORD_ONLY if "quiet" in name else Decision.RECORD_AND_SAMPLE
        return SamplingResult(decision, {**(attributes or {}), "picked.by": "picky"}, TraceState([("picky", "1")]))

    def get_description(self) -> str:
        return "Picky"


SAMPLERS = {"default": lambda: DEFAULT_ON, "always_on": lambda: ALWAYS_ON, "always_off": lambda: ALWAYS_OFF,
            "ratio": lambda: TraceIdRatioBased(0.5), "parent_ratio": lambda: ParentBased(TraceIdRatioBased(0.3)),
            "parent_off": lambda: ParentBased(ALWAYS_OFF), "picky": Picky}


@pytest.fixture
def provider_slot() -> Iterator[None]:
    """Put back the API's provider global and the mesh's tracing cache after the test."""
    before = getattr(trace, "_TRACER_PROVIDER", None)
    try:
        yield
    finally:
        _tracing.flush()
        trace._TRACER_PROVIDER = before  # type: ignore[attr-defined]
        _reset()


def _reset() -> None:
    _tracing._cache.update(provider=None, tracer=None, replay=None, replay_of=None, hot=(None, None, None))


def _install(sampler: Sampler, ids: IdGenerator, *, defer: bool, monkeypatch: pytest.MonkeyPatch
             ) -> InMemorySpanExporter:
    spans = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler, id_generator=ids)
    provider.add_span_processor(SimpleSpanProcessor(spans))
    monkeypatch.setattr(_tracing, "_DEFER_OFF", not defer)
    _reset()
    trace._TRACER_PROVIDER = provider  # type: ignore[attr-defined]
    return spans


GIVEN_TIMES = (1_700_000_000_000_000_000, 1_700_000_000_000_000_001)  # (what the handler passes; else: now)


def _fields(span: ReadableSpan) -> dict[str, Any]:
    """What an exporter sends of a span, but its start and end times (taken at different moments in the
    two runs; the times a handler gives are compared)."""
    return {
        "name": span.name, "kind": span.kind, "trace": span.context.trace_id, "span": span.context.span_id,
        "flags": int(span.context.trace_flags), "state": span.context.trace_state.to_header(),
        "parent": None if span.parent is None else (span.parent.trace_id, span.parent.span_id,
                                                    span.parent.is_remote),
        "attributes": dict(span.attributes or {}),
        "links": [(link.context.trace_id, link.context.span_id) for link in span.links],
        "status": (span.status.status_code, span.status.description),
        "events": [(e.name, dict(e.attributes or {}), e.timestamp if e.timestamp in GIVEN_TIMES else "now")
                   for e in span.events],
    }


async def _flow(case: dict[str, Any]) -> dict[str, Any]:
    """A sender's span (under a user span or none), the handler's span it becomes on the other side
    (with what the handler does to it), and what each side saw of its span while it ran."""
    seen: dict[str, Any] = {}
    tracer = trace.get_tracer("the-users-own")
    token = None
    if case["user_parent"]:
        user = tracer.start_span("users request")
        token = context.attach(trace.set_span_in_context(user))
    try:
        with _tracing.produce(case["subject"], operation=case["operation"],
                              attributes={"mesh.operation": case["op_attr"]}) as carrier:
            seen["carrier"] = dict(carrier)
    finally:
        if token is not None:
            context.detach(token)
            user.end()
    headers = dict(seen["carrier"])
    if case["garbled"]:
        headers["traceparent"] = "00-garbled"
    with _tracing.consume(case["subject"], headers or None, link=case["link"],
                          attributes={"messaging.message.id": "m1", "absent": None}) as span:
        current = trace.get_current_span()
        seen["current_is_span"] = current is span
        seen["recording"] = span.is_recording()
        for op in case["ops"]:
            if op == "attribute":
                span.set_attribute("handler.value", 7)
            elif op == "attributes":
                span.set_attributes({"handler.a": "x", "handler.b": [1, 2]})
            elif op == "event":
                span.add_event("halfway", {"n": 1}, timestamp=1_700_000_000_000_000_000)
            elif op == "status":
                span.set_status(Status(StatusCode.ERROR, "handler said no"))
            elif op == "exception":
                span.record_exception(ValueError("bad input"), timestamp=1_700_000_000_000_000_001)
            elif op == "rename":
                span.update_name("renamed by handler")
            elif op == "child":
                with tracer.start_as_current_span("handler work"):
                    await asyncio.sleep(0)
            elif op == "failed":
                _tracing.failed(span, KeyError("k"))
        seen["attributes_seen"] = dict(getattr(span, "attributes", None) or {})
        await asyncio.sleep(0)
    for _ in range(3):  # (two loop turns, and one to spare: the spans are made)
        await asyncio.sleep(0)
    return seen


cases = st.fixed_dictionaries({
    "sampler": st.sampled_from(sorted(SAMPLERS)),
    "seed": st.integers(0, 2**32),
    "subject": st.sampled_from(["mesh.plugin.echo", "mesh.evt.orders.created", "a"]),
    "operation": st.sampled_from(["send", "publish", "broadcast", "skip it", "quiet send"]),
    "op_attr": st.sampled_from(["echo", "get"]),
    "user_parent": st.booleans(),
    "garbled": st.booleans(),
    "link": st.booleans(),
    "ops": st.lists(st.sampled_from(["attribute", "attributes", "event", "status", "exception", "rename", "child",
                                     "failed"]), max_size=4),
})


@settings(max_examples=150, deadline=None)
@given(cases)
def test_a_deferred_span_is_the_span_the_sdk_makes_on_the_spot(case: dict[str, Any]) -> None:
    before = getattr(trace, "_TRACER_PROVIDER", None)
    runs = []
    try:
        for defer in (True, False):
            with pytest.MonkeyPatch.context() as monkeypatch:
                sampler = SAMPLERS[case["sampler"]]()
                spans = _install(sampler, SeededIds(case["seed"]), defer=defer, monkeypatch=monkeypatch)
                seen = asyncio.run(_flow(case))
                if defer:
                    assert _tracing._replay() is not None  # (the deferred path was the one taken)
                if isinstance(sampler, Picky):
                    seen["asked"] = sampler.asked  # (asked once per span, deferred or not)
                runs.append((seen, sorted((_fields(s) for s in spans.get_finished_spans()), key=repr)))
    finally:
        trace._TRACER_PROVIDER = before  # type: ignore[attr-defined]
        _reset()
    (deferred_seen, deferred), (spot_seen, spot) = runs
    assert deferred == spot
    assert deferred_seen == spot_seen


def test_the_standard_samplers_decide_as_the_mesh_computes() -> None:
    """The decision the mesh computes for a standard sampler (from its description) is the sampler's own."""
    rng = random.Random(7)
    for sampler in (DEFAULT_ON, ALWAYS_ON, ALWAYS_OFF, TraceIdRatioBased(0.25), TraceIdRatioBased(1e-5),
                    TraceIdRatioBased(1.0), ParentBased(TraceIdRatioBased(0.6)), ParentBased(ALWAYS_OFF)):
        decision = _tracing._decision(sampler)
        assert decision is not None, sampler.get_description()
        root, parent_based = decision
        for _ in range(2000):
            trace_id = rng.getrandbits(128) or 1
            parent = rng.choice([None, True, False])
            ctx = context.Context()
            if parent is not None:
                flags = trace.TraceFlags(trace.TraceFlags.SAMPLED if parent else 0)
                sc = trace.SpanContext(trace_id, 1, is_remote=True, trace_flags=flags)
                ctx = trace.set_span_in_context(trace.NonRecordingSpan(sc), ctx)
            theirs = sampler.should_sample(ctx, trace_id, "x").decision.is_sampled()
            ours = parent if parent is not None and parent_based else root(trace_id)
            assert ours == theirs, (sampler.get_description(), parent, trace_id)
    assert _tracing._decision(Picky()) is None
    assert _tracing._decision(ParentBased(ALWAYS_ON, remote_parent_not_sampled=ALWAYS_ON)) is None


def test_the_random_trace_id_flag_is_the_sdks(provider_slot: None, monkeypatch: pytest.MonkeyPatch) -> None:
    spans = _install(DEFAULT_ON, RandomIdGenerator(), defer=True, monkeypatch=monkeypatch)
    with _tracing.produce("s") as carrier:
        pass
    made = spans.get_finished_spans()[-1]
    assert carrier["traceparent"] == f"00-{made.context.trace_id:032x}-{made.context.span_id:016x}-" \
                                     f"{int(made.context.trace_flags):02x}"
    monkeypatch.setattr(_tracing, "_DEFER_OFF", True)
    _reset()
    trace._TRACER_PROVIDER = TracerProvider()  # type: ignore[attr-defined]
    with _tracing.produce("s") as on_the_spot:
        pass
    assert carrier["traceparent"][-2:] == on_the_spot["traceparent"][-2:]


def test_an_sdk_that_makes_other_ids_is_noticed_and_spans_are_made_on_the_spot(
        provider_slot: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    spans = _install(DEFAULT_ON, RandomIdGenerator(), defer=True, monkeypatch=monkeypatch)
    replay = _tracing._replay()
    assert replay is not None
    replay.tracer.id_generator = RandomIdGenerator()  # (as an SDK would that no longer asks its id generator)
    with caplog.at_level(logging.WARNING, logger="plugin_sdk._tracing"), _tracing.produce("first") as first:
        pass
    assert "other ids or flags than it was given" in caplog.text and "'send first'" in caplog.text
    assert _tracing._replay() is None  # from now on: on the spot
    with _tracing.produce("second") as second:
        pass
    made = {s.name: s for s in spans.get_finished_spans()}
    assert set(made) == {"send first", "send second"}  # (the first is kept, under the ids the SDK gave it)
    assert second["traceparent"].split("-")[2] == f"{made['send second'].context.span_id:016x}"
    assert first["traceparent"].split("-")[2] != f"{made['send first'].context.span_id:016x}"


class Failing(SimpleSpanProcessor):
    def on_end(self, span: ReadableSpan) -> None:
        if span.name.endswith("boom"):
            raise RuntimeError("exporter fell over")
        super().on_end(span)


async def test_a_failing_processor_loses_its_span_not_the_message_nor_the_next_span(
        provider_slot: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(Failing(spans))
    monkeypatch.setattr(_tracing, "_DEFER_OFF", False)
    _reset()
    trace._TRACER_PROVIDER = provider  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="plugin_sdk._tracing"):
        for subject in ("boom", "boom", "fine"):
            with _tracing.produce(subject) as carrier:
                assert "traceparent" in carrier
        for _ in range(3):
            await asyncio.sleep(0)
    assert [s.name for s in spans.get_finished_spans()] == ["send fine"]
    failures = [r for r in caplog.records if "could not record span" in r.getMessage()]
    assert len(failures) == 2 and "exporter fell over" in failures[0].getMessage()
    assert failures[0].exc_info and not failures[1].exc_info  # (one traceback, then one line each)


EXIT = """
import asyncio, sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from plugin_sdk import _tracing
provider = TracerProvider()
provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stdout)))
trace.set_tracer_provider(provider)

async def main():
    with _tracing.produce("mesh.plugin.last") as carrier:
        pass
    print("deferred:", _tracing._replay() is not None, flush=True)
    if EXIT_INSIDE:
        sys.exit(0)

EXIT_INSIDE = RUNNER == "sys.exit inside"
if RUNNER == "loop closed at once":  # (no turn of the loop after main: the spans wait for the exit hook)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(main())
    loop.close()
else:
    asyncio.run(main())
"""


@pytest.mark.parametrize("runner", ["asyncio.run", "sys.exit inside", "loop closed at once"])
def test_the_last_span_is_exported_when_the_process_ends(runner: str) -> None:
    """The span of a message sent just before the process ends is still made and exported: at the event
    loop's last turns or, at the latest, at exit (before the SDK's own exit hook exports what is left)."""
    out = subprocess.run([sys.executable, "-c", f"RUNNER = {runner!r}\n" + EXIT], capture_output=True, text=True,
                         timeout=60).stdout
    assert "deferred: True" in out
    assert '"name": "send mesh.plugin.last"' in out, out
