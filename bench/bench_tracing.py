#!/usr/bin/env python
"""groundhog tracing cost: mesh request/reply with tracing off, on without an exporter, and on
exporting over OTLP/HTTP, against raw nats-py, in one run on one nats-server.

Run from the repository root::

    python bench/bench_tracing.py            # full run (about 3 minutes on 2 cores)
    python bench/bench_tracing.py --quick    # short run (< 1 minute)
    python bench/bench_tracing.py --json bench/results-tracing.json

Four sides, each with its own responder process, measured back to back in an order that rotates
from round to round (latency p50/p99 with 1 request in flight, throughput with 1 and with
``--concurrency`` (64) in flight):

- ``raw``: raw nats-py ``nc.request`` to a process that echoes the bytes (``bench.py --role raw-echo``);
- ``off``: ``PluginMessaging.send_message("echo", ...)`` to ``bench.bench:TracedEcho`` (``examples.echo:Echo``
  plus a probe), no tracer provider in either process;
- ``noexport``: the same with an SDK ``TracerProvider`` and no span processor in both processes: every
  span is created, sampled, carried in the headers and ended, then dropped. The plugin process gets
  its provider from ``OTEL_PYTHON_TRACER_PROVIDER=sdk_tracer_provider`` (the OpenTelemetry API loads
  it by its entry-point name);
- ``export``: the same with ``BatchSpanProcessor`` -> ``OTLPSpanExporter`` (HTTP/protobuf, default
  ``OTEL_BSP_*`` batch settings) in both processes (the plugin through ``mesh``'s own
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` set-up), to an OTLP receiver in its own process (this file with
  ``--role otlp-receiver``) that decodes every ``ExportTraceServiceRequest`` and counts the spans.

Each mesh mode has its own prefix, registry and echo process. This (client) process holds one SDK
``TracerProvider``: switching mode sets the API's provider global (``None``: tracing off, exactly as
in a process that never installed one) and the provider's span processors (none, or the batch
processor). After each ``export`` segment the client's batch processor is flushed, and the flush time
is added to that segment's elapsed time, so its last partial batch is charged to ``export`` and not
to the next side. CPU seconds per process (``bench.cpu_seconds``: its CPU-time clock, else
``/proc/PID/stat``; this process: all its threads, the export thread included) are read around every segment,
sequential (1 in flight: what the latency is made of) and in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import importlib.metadata
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import nats
import nats.errors
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

import mesh
from bench import (
    PAYLOAD,
    RAW_BODY,
    REQUEST_TIMEOUT,
    Children,
    Interrupted,
    Op,
    _on_signal,
    concurrent,
    cpu_seconds,
    fmt,
    machine_info,
    percentile,
    progress,
    rotation,
    sequential,
    wait_for,
    workspace,
)
from bench import counts_from as bench_counts_from
from plugin_sdk import CommunicationError, PluginMessaging, PluginRegistry, _tracing

SELF = Path(__file__).resolve()
SIDES = ("raw", "off", "noexport", "export")
MODES = SIDES[1:]  # the mesh sides
ECHO_REF = "bench.bench:TracedEcho"
CLIENT_SERVICE = "bench-client"
ECHO_SERVICE = "echo"


def plugin_env(mode: str, endpoint: str, sample: float = 1.0) -> dict[str, str]:
    """The environment that turns the echo plugin's tracing into ``mode`` (sampling a ``sample`` ratio)."""
    sampler = {} if sample >= 1.0 else {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                        "OTEL_TRACES_SAMPLER_ARG": str(sample)}
    if mode == "noexport":
        return {"OTEL_PYTHON_TRACER_PROVIDER": "sdk_tracer_provider", **sampler}
    if mode == "export":
        return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, **sampler}
    return {}


# ---------------------------------------------------------------------------------------------
# The OTLP/HTTP receiver (`python bench/bench_tracing.py --role otlp-receiver --port N`)


def otlp_receiver(port: int) -> None:
    """Accept ``POST /v1/traces``, decode each request and count its spans per service; ``GET /`` returns the counts."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    lock = threading.Lock()
    totals: dict[str, Any] = {"requests": 0, "bytes": 0, "spans": 0, "by_service": {}}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a collector: the exporter reuses its connection

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            size = len(body)
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            request = ExportTraceServiceRequest.FromString(body)
            counted: dict[str, int] = {}
            for rs in request.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "?")
                counted[service] = counted.get(service, 0) + sum(len(ss.spans) for ss in rs.scope_spans)
            with lock:
                totals["requests"] += 1
                totals["bytes"] += size
                for service, n in counted.items():
                    totals["spans"] += n
                    totals["by_service"][service] = totals["by_service"].get(service, 0) + n
            self._answer(b"", "application/x-protobuf")  # an empty ExportTraceServiceResponse: all accepted

        def do_GET(self) -> None:
            with lock:
                body = json.dumps(totals).encode()
            self._answer(body, "application/json")

        def _answer(self, body: bytes, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    while not stop.wait(0.5):
        pass
    server.shutdown()
    server.server_close()


def receiver_totals(endpoint: str) -> dict[str, Any]:
    with urllib.request.urlopen(endpoint + "/", timeout=5) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


# ---------------------------------------------------------------------------------------------
# Tracing in this (client) process


class ClientTracing:
    """One SDK provider for this process; :meth:`use` switches between off, noexport and export."""

    def __init__(self, endpoint: str, sample: float = 1.0) -> None:
        if _tracing.enabled():
            raise SystemExit("a tracer provider is already installed in this process (OTEL_PYTHON_TRACER_PROVIDER?): "
                             "unset the OTEL_* variables")
        self.sample = sample
        sampler = ParentBased(TraceIdRatioBased(sample)) if sample < 1.0 else ParentBased(ALWAYS_ON)
        self.provider = TracerProvider(resource=Resource.create({"service.name": CLIENT_SERVICE}),
                                       sampler=sampler, shutdown_on_exit=False)
        self.batch = BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces"))
        # The provider's SynchronousMultiSpanProcessor; its tuple of processors is swapped per mode.
        self.processors = self.provider._active_span_processor
        if not isinstance(getattr(self.processors, "_span_processors", None), tuple) or \
                not hasattr(trace, "_TRACER_PROVIDER"):
            raise SystemExit("this opentelemetry-sdk has no _active_span_processor._span_processors / "
                             "trace._TRACER_PROVIDER: the mode switch needs updating")
        trace.set_tracer_provider(self.provider)
        self.closed = False
        self.use("off")

    def use(self, side: str) -> None:
        _tracing.flush()  # (spans the mesh makes after their request: made for the side that sent them)
        if side in ("raw", "off"):
            trace._TRACER_PROVIDER = None  # what a process that never installed a provider has
        else:
            trace._TRACER_PROVIDER = self.provider
            self.processors._span_processors = (self.batch,) if side == "export" else ()
        if _tracing.enabled() != (side in ("noexport", "export")):
            raise RuntimeError(f"client tracing did not switch to {side}")

    def flush(self) -> float:
        """Export what the batch processor holds; the seconds it took."""
        start = time.perf_counter()
        _tracing.flush()
        if not self.batch.force_flush(30_000):
            raise RuntimeError("the client's span export did not finish within 30 s")
        return time.perf_counter() - start

    def close(self) -> None:
        """Flush and stop the export thread (idempotent)."""
        if not self.closed:
            self.closed = True
            self.use("off")
            self.processors._span_processors = ()
            self.batch.shutdown()


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Counts:
    rounds: int = 8
    seq: int = 3000  # sequential requests per round and side
    inflight: int = 20000  # requests per round and side at --concurrency in flight
    concurrency: int = 64
    warmup: int = 300  # sequential warm-up requests per side (and 4 x concurrency in flight)


QUICK = Counts(rounds=2, seq=500, inflight=3000, warmup=100)
ROLES = ("client", "responder", "nats-server", "otlp-receiver")


@dataclass
class Side:
    seq_latency: list[float] = field(default_factory=list)  # seconds, pooled over rounds
    seq_rps: list[float] = field(default_factory=list)  # one per round
    inflight_rps: list[float] = field(default_factory=list)
    flush_s: list[float] = field(default_factory=list)  # export: client flush after each segment
    cpu_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ROLES, 0.0))  # in-flight segments
    seq_cpu_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ROLES, 0.0))  # sequential segments
    inflight_done: int = 0
    seq_done: int = 0
    sends: int = 0  # requests made on this side (export: the client spans expected)


def order(round_no: int) -> list[str]:
    return rotation(SIDES, round_no)


@dataclass
class TracingBench:
    counts: Counts
    url: str
    children: Children
    tracing: ClientTracing
    endpoint: str
    server_pid: int | None
    tag: str = field(default_factory=lambda: f"tr{os.getpid()}")
    sides: dict[str, Side] = field(default_factory=lambda: {s: Side() for s in SIDES})
    probes: dict[str, Any] = field(default_factory=dict)
    received: dict[str, Any] = field(default_factory=dict)

    def responder(self, side: str) -> str:
        return "raw-echo" if side == "raw" else f"echo-{side}"

    def pids(self, side: str) -> dict[str, int | None]:
        procs = self.children.procs
        return {"responder": procs[self.responder(side)].pid, "nats-server": self.server_pid,
                "otlp-receiver": procs["otlp"].pid}

    def cpu(self, side: str) -> dict[str, float]:
        return {"client": time.process_time(), **{k: cpu_seconds(p) for k, p in self.pids(side).items()}}

    async def run(self) -> None:
        ch = self.children
        raw_subject = f"raw{self.tag}.echo"
        ch.spawn("otlp", [str(SELF), "--role", "otlp-receiver",
                          "--port", self.endpoint.rsplit(":", 1)[1]])
        for mode in MODES:
            ch.mesh_registry(f"registry-{mode}", f"{self.tag}{mode}")
            ch.mesh_run(f"echo-{mode}", ECHO_REF, f"{self.tag}{mode}",
                            plugin_env(mode, self.endpoint, self.tracing.sample))
        ch.raw("raw-echo", "raw-echo", "--subject", raw_subject)

        raw_nc = await nats.connect(self.url, name="bench raw client")
        mesh_nc = await mesh.connect(self.url, name="bench mesh client", wait=10)
        try:
            registries = {m: PluginRegistry(mesh_nc, prefix=f"{self.tag}{m}") for m in MODES}
            messaging = {m: PluginMessaging(mesh_nc, prefix=f"{self.tag}{m}", source="bench", registry=registries[m],
                                            default_timeout=REQUEST_TIMEOUT) for m in MODES}

            async def receiver_up() -> bool:
                try:
                    await asyncio.to_thread(receiver_totals, self.endpoint)
                except OSError:  # not listening yet
                    return False
                return True

            async def raw_answers() -> bool:
                await raw_nc.request(raw_subject, b"ping", timeout=0.5)
                return True

            await wait_for("the OTLP receiver", receiver_up, ch)
            for mode in MODES:
                async def healthy(mode: str = mode) -> bool:
                    return bool(await registries[mode].list_plugins("echo", healthy_only=True))

                await wait_for(f"the echo plugin with tracing {mode}", healthy, ch)
            await wait_for("the raw echo", raw_answers, ch)
            await self.probe(messaging)

            def mesh_send(m: PluginMessaging) -> Op:
                async def send() -> object:
                    return await m.send_message("echo", PAYLOAD)
                return send

            async def raw_send() -> object:
                return await raw_nc.request(raw_subject, RAW_BODY, timeout=REQUEST_TIMEOUT)

            ops: dict[str, Op] = {"raw": raw_send, **{m: mesh_send(messaging[m]) for m in MODES}}
            await self.measure(ops)
            self.finish()
        finally:
            self.tracing.use("off")
            await raw_nc.close()
            await mesh.close(mesh_nc)

    async def probe(self, messaging: dict[str, PluginMessaging]) -> None:
        """Ask each echo plugin how it traces; fail unless it is the mode it stands for."""
        expected = {"off": (False, []), "noexport": (True, []), "export": (True, ["BatchSpanProcessor"])}
        for mode, m in messaging.items():
            state = (await m.send_message("echo", operation="tracing")).result
            self.probes[mode] = state
            if (state["enabled"], state["processors"]) != expected[mode]:
                raise RuntimeError(f"echo-{mode} traces as {state}, expected enabled/processors {expected[mode]}")

    async def measure(self, ops: dict[str, Op]) -> None:
        c = self.counts
        for side in SIDES:  # warm-up: connections, inboxes, code paths, the exporters' sessions
            self.tracing.use(side)
            await sequential(ops[side], c.warmup)
            await concurrent(ops[side], c.concurrency * 4, c.concurrency)
            self.sides[side].sends += c.warmup + c.concurrency * 4
            if side == "export":
                self.tracing.flush()
        for r in range(c.rounds):
            for side in order(r):
                await self.sequential(side, ops[side])
            for side in order(r + 1):
                await self.in_flight(side, ops[side])
            progress(f"round {r + 1}/{c.rounds}")
        self.tracing.use("off")

    async def sequential(self, side: str, op: Op) -> None:
        n, s = self.counts.seq, self.sides[side]
        self.tracing.use(side)
        before = self.cpu(side)
        latencies, rps = await sequential(op, n)
        after = self.cpu(side)  # (before the export flush: the CPU of the requests themselves, at 1 in flight)
        for role in ROLES:
            s.seq_cpu_s[role] += after[role] - before[role]
        s.seq_done += n
        if side == "export":
            flush = self.tracing.flush()
            s.flush_s.append(flush)
            rps = n / (n / rps + flush)
        s.seq_latency += latencies
        s.seq_rps.append(rps)
        s.sends += n

    async def in_flight(self, side: str, op: Op) -> None:
        n, s = self.counts.inflight, self.sides[side]
        self.tracing.use(side)
        before = self.cpu(side)
        rps = await concurrent(op, n, self.counts.concurrency)
        if side == "export":
            flush = self.tracing.flush()
            s.flush_s.append(flush)
            rps = n / (n / rps + flush)
        after = self.cpu(side)
        for role in ROLES:
            s.cpu_s[role] += after[role] - before[role]
        s.inflight_rps.append(rps)
        s.inflight_done += n
        s.sends += n

    def finish(self) -> None:
        """Stop the echo plugins (they flush their spans on the way out), flush this process, count."""
        self.children.stop([f"echo-{m}" for m in MODES])
        self.tracing.close()
        self.received = receiver_totals(self.endpoint)


# ---------------------------------------------------------------------------------------------
# Reporting


@dataclass
class Row:
    measure: str
    unit: str
    values: dict[str, float]
    higher_is_better: bool

    def ratio(self, a: str, b: str) -> float:
        return self.values[a] / self.values[b] if self.values[b] else math.nan


RATIOS = (("noexport", "off"), ("export", "off"), ("off", "raw"), ("noexport", "raw"), ("export", "raw"))
GOAL = 1.2  # issue 12: tracing exporting every request, p50 at most 1.2x tracing off


def rows(b: TracingBench) -> list[Row]:
    us, conc = 1e6, b.counts.concurrency
    s = b.sides
    return [
        Row("send p50 latency (1 in flight)", "us", {k: percentile(v.seq_latency, 50) * us for k, v in s.items()},
            False),
        Row("send p99 latency (1 in flight)", "us", {k: percentile(v.seq_latency, 99) * us for k, v in s.items()},
            False),
        Row("send throughput, 1 in flight", "req/s", {k: statistics.median(v.seq_rps) for k, v in s.items()}, True),
        Row(f"send throughput, {conc} in flight", "req/s",
            {k: statistics.median(v.inflight_rps) for k, v in s.items()}, True),
    ]


def cpu_per_request(side: Side, sequential: bool = False) -> dict[str, float]:
    """Microseconds of CPU per request at the in-flight concurrency (or at 1 in flight), per process."""
    cpu, done = (side.seq_cpu_s, side.seq_done) if sequential else (side.cpu_s, side.inflight_done)
    per = {role: cpu[role] / done * 1e6 for role in ROLES}
    per["total"] = sum(v for v in per.values() if not math.isnan(v))
    return per


def span_check(b: TracingBench) -> dict[str, Any]:
    by = b.received.get("by_service", {})
    sends = b.sides["export"].sends
    return {"client_created": sends, "client_received": by.get(CLIENT_SERVICE, 0),
            "echo_requests": sends + 1,  # + the probe
            "echo_received": by.get(ECHO_SERVICE, 0),  # also the echo's own registry calls
            "export_requests": b.received.get("requests", 0), "export_bytes": b.received.get("bytes", 0),
            "by_service": by}


def print_report(table: list[Row], b: TracingBench, machine: dict[str, Any]) -> None:
    print()
    print("groundhog tracing cost — " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    c = b.counts
    print(f"rounds {c.rounds}; per round and side: {c.seq} sequential requests, {c.inflight} at {c.concurrency} "
          f"in flight; sampling {b.tracing.sample:g} of the traces")
    print()
    width = max(len(r.measure) for r in table)
    heads = [f"{a}/{z}" for a, z in RATIOS]
    print(f"{'measure':<{width}}  {'unit':>5}  " + "  ".join(f"{s:>9}" for s in SIDES) + "  "
          + "  ".join(f"{h:>11}" for h in heads))
    print("-" * (width + 9 + 11 * len(SIDES) + 13 * len(heads)))
    for r in table:
        print(f"{r.measure:<{width}}  {r.unit:>5}  " + "  ".join(f"{fmt(r.values[s]):>9}" for s in SIDES) + "  "
              + "  ".join(f"{r.ratio(a, z):>10.2f}x" for a, z in RATIOS))
    print()
    print(f"CPU per request at {c.concurrency} in flight (us, bench.cpu_seconds; client = this process, all threads):")
    print(f"  {'side':<9}" + "".join(f"{role:>15}" for role in (*ROLES, "total")))
    for one_in_flight in (False, True):
        if one_in_flight:
            print("CPU per request at 1 in flight (us; the export thread's batches included, its last flush not):")
        for side in SIDES:
            per = cpu_per_request(b.sides[side], one_in_flight)
            print(f"  {side:<9}" + "".join(f"{per[role]:>15.1f}" for role in (*ROLES, "total")))
    flushes = b.sides["export"].flush_s
    if flushes:
        print(f"client flush after each export segment: median {statistics.median(flushes) * 1e3:.1f} ms "
              "(added to that segment's time)")
    spans = span_check(b)
    print(f"OTLP receiver: {spans['export_requests']} export requests, {spans['export_bytes'] / 1e6:.1f} MB; "
          f"spans from {CLIENT_SERVICE}: {spans['client_received']} of {spans['client_created']} created; "
          f"from {ECHO_SERVICE}: {spans['echo_received']} for {spans['echo_requests']} requests "
          "(any more: its own registry calls)")
    print("probes: " + "; ".join(f"{m}: {p['provider']} {p['processors']}" for m, p in b.probes.items()))
    print()
    g = goal(table)
    print(f"  [{'MET' if g['met'] else 'NOT MET'}] {g['name']}: {g['ratio']:.2f}x (needs <= {GOAL:g}x; "
          f"p99 {g['p99_ratio']:.2f}x)")
    print()


def goal(table: list[Row]) -> dict[str, Any]:
    """Issue 12's tracing goal: send p50 with tracing exporting every request / tracing off."""
    by = {r.measure: r for r in table}
    p50 = by["send p50 latency (1 in flight)"].ratio("export", "off")
    p99 = by["send p99 latency (1 in flight)"].ratio("export", "off")
    return {"name": f"issue 12: tracing exporting every request, p50 <= {GOAL:g}x tracing off",
            "ratio": p50, "limit": GOAL, "met": p50 <= GOAL, "p99_ratio": p99}


def to_json(table: list[Row], b: TracingBench, machine: dict[str, Any], elapsed: float) -> Any:
    us = 1e6

    def summary(s: Side) -> dict[str, Any]:
        return {"seq_rps_per_round": s.seq_rps, "inflight_rps_per_round": s.inflight_rps,
                "seq_latency_us": {f"p{q}": percentile(s.seq_latency, q) * us for q in (50, 90, 99, 99.9)},
                "cpu_per_request_us": cpu_per_request(s),
                "cpu_per_request_1_in_flight_us": cpu_per_request(s, sequential=True),
                "flush_s": s.flush_s, "sends": s.sends}

    return {
        "machine": machine, "counts": asdict(b.counts), "elapsed_s": round(elapsed, 1),
        "results": [{"measure": r.measure, "unit": r.unit, **r.values,
                     **{f"{a}/{z}": r.ratio(a, z) for a, z in RATIOS}} for r in table],
        "sides": {name: summary(s) for name, s in b.sides.items()},
        "spans": span_check(b), "probes": b.probes, "goal": goal(table),
    }


# ---------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="The cost of tracing: mesh request/reply with tracing off, on without "
                                            "an exporter, and on exporting over OTLP, against raw nats-py.")
    p.add_argument("--quick", action="store_true", help="short run (< 1 minute)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    for name, help_ in (("rounds", "rounds, the order of the four sides rotating"),
                        ("seq", "sequential requests per round and side"),
                        ("inflight", "requests per round and side at --concurrency in flight"),
                        ("concurrency", "requests in flight for the throughput measure"),
                        ("warmup", "warm-up requests per side")):
        p.add_argument(f"--{name}", type=int, help=help_)
    p.add_argument("--sample", type=float, default=1.0, metavar="RATIO",
                   help="trace this ratio of requests (parentbased_traceidratio) in noexport and export; default 1")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (server and child logs)")
    p.add_argument("--role", choices=["otlp-receiver"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def counts_from(args: argparse.Namespace) -> Counts:
    counts: Counts = bench_counts_from(args, Counts(), QUICK)
    return counts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "otlp-receiver":
        otlp_receiver(args.port)
        return 0
    counts = counts_from(args)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    machine = {**machine_info(), "opentelemetry-sdk": importlib.metadata.version("opentelemetry-sdk")}
    started = time.monotonic()
    endpoint = f"http://127.0.0.1:{mesh.free_port()}"
    with workspace(args.keep) as tmp:
        server = mesh.NatsServer(tmp / "nats")
        children = Children(tmp / "logs", server.url)
        # Tracing is what this benchmark sets, per child: none inherited from the environment.
        children.env = {k: v for k, v in children.env.items() if not k.startswith("OTEL_")}
        tracing = ClientTracing(endpoint, args.sample)
        bench = TracingBench(counts, server.url, children, tracing, endpoint, None)
        try:
            server.start()
            bench.server_pid = server.pid
            asyncio.run(bench.run())
        except Interrupted as exc:
            print(f"interrupted ({exc}); stopping the child processes and nats-server", file=sys.stderr)
            return 130
        except (RuntimeError, CommunicationError, nats.errors.Error, OSError) as exc:
            print(f"benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            for name in children.procs:
                print(f"  {name}: {children.tail(name, 3)}", file=sys.stderr)
            return 1
        finally:
            with contextlib.suppress(Exception):  # the receiver may be gone: do not let the flush mask the error
                tracing.close()
            children.stop([n for n in children.procs if n.startswith("echo")])
            children.stop()
            server.stop()
    table = rows(bench)
    print_report(table, bench, machine)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(table, bench, machine, time.monotonic() - started), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
