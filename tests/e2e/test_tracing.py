"""Tracing across real processes: one request through three plugins is ONE trace (OTLP/HTTP and
gRPC), registry calls continue the caller's trace, and `mesh trace` prints it back as a tree."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import signal
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
    TraceServiceServicer,
    add_TraceServiceServicer_to_server,
)
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans

from mesh import NatsServer, free_port
from plugin_sdk import PluginMessaging, PluginRegistry
from tests.conftest import Mesh, eventually, mesh_cli, start_registry


class Spans:
    """What a test OTLP endpoint received: (service, span) dicts, and the raw resource spans."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.raw: list[ResourceSpans] = []
        self.lock = threading.Lock()

    def record(self, request: ExportTraceServiceRequest) -> None:
        with self.lock:
            for rs in request.resource_spans:
                self.raw.append(rs)
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        self.spans.append({
                            "service": resource.get("service.name"), "resource": resource,
                            "name": span.name, "kind": span.kind, "trace": span.trace_id.hex(),
                            "id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                            "links": [link.span_id.hex() for link in span.links],
                            "attrs": {a.key: a.value.string_value for a in span.attributes}})

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.spans)

    def jaeger_trace(self, trace_id: str) -> dict[str, Any] | None:
        """The trace as Jaeger v2's ``GET /api/v3/traces/{id}`` answers it: OTLP JSON, ids in hex."""
        wanted = bytes.fromhex(trace_id)
        out = []
        with self.lock:
            for rs in self.raw:
                copy = ResourceSpans()
                copy.CopyFrom(rs)
                for ss in copy.scope_spans:
                    keep = [sp for sp in ss.spans if sp.trace_id == wanted]
                    del ss.spans[:]
                    ss.spans.extend(keep)
                if any(ss.spans for ss in copy.scope_spans):
                    out.append(_hex_ids(MessageToDict(copy, use_integers_for_enums=True)))
        return {"result": {"resourceSpans": out}} if out else None


def _hex_ids(value: Any) -> Any:
    """protobuf's JSON mapping writes bytes as base64; Jaeger writes trace and span ids in hex."""
    if isinstance(value, dict):
        return {k: base64.b64decode(v).hex() if k in ("traceId", "spanId", "parentSpanId") and isinstance(v, str)
                else _hex_ids(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_hex_ids(v) for v in value]
    return value


class Receiver(Spans):
    """A test OTLP/HTTP endpoint that also answers Jaeger's query API v3 for what it received."""

    def __init__(self) -> None:
        super().__init__()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.record(ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def do_GET(self) -> None:
                if self.path.startswith("/broken/api/v3/traces/"):  # a server that is not Jaeger
                    return self._answer(200, b"<html>hello</html>")
                if not self.path.startswith("/api/v3/traces/"):
                    return self._answer(404, b"404 page not found")
                found = receiver.jaeger_trace(self.path.rsplit("/", 1)[1])
                if found is None:  # Jaeger's answer for a trace it does not have
                    error = {"error": {"httpCode": 404, "message": "trace not found"}}
                    return self._answer(404, json.dumps(error).encode())
                return self._answer(200, json.dumps(found).encode())

            def _answer(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


class GrpcReceiver(Spans, TraceServiceServicer):
    """A test OTLP/gRPC endpoint (the collector's TraceService) on a free port."""

    def __init__(self) -> None:
        super().__init__()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def Export(self, request: ExportTraceServiceRequest, context: Any) -> ExportTraceServiceResponse:
        self.record(request)
        return ExportTraceServiceResponse()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def grpc_receiver() -> Iterator[GrpcReceiver]:
    r = GrpcReceiver()
    r.server.start()
    yield r
    r.server.stop(grace=None).wait(10)


def find(spans: list[dict[str, Any]], service: str, name: str) -> dict[str, Any] | None:
    return next((s for s in spans if s["service"] == service and s["name"] == name), None)


async def test_a_to_b_to_event_to_c_is_one_trace(mesh: Mesh, receiver: Receiver, messaging: PluginMessaging) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    await mesh.spawn("testplugins:Archivist", env=env)
    await mesh.spawn("testplugins:Announcer", env=env)
    await mesh.spawn("testplugins:Relay", env=env)
    reply = await messaging.send_message("relay", {"to": "announcer", "body": "hello"}, timeout=10)
    assert reply.result["reply"] == {"announced": "hello"}
    p = mesh.prefix

    wanted = [("relay", f"process {p}.plugin.relay"), ("relay", f"send {p}.plugin.announcer"),
              ("announcer", f"process {p}.plugin.announcer"), ("announcer", "compose announcement"),
              ("announcer", f"publish {p}.event.news.posted"), ("archivist", f"process {p}.event.news.posted")]

    async def all_exported() -> list[dict[str, Any]]:
        spans = receiver.snapshot()
        return spans if all(find(spans, *w) for w in wanted) else []

    spans = await eventually(all_exported, timeout=30, what="every span of the flow exported")
    a_process, a_send, b_process, b_own, b_publish, c_process = (find(spans, *w) for w in wanted)
    assert len({s["trace"] for s in (a_process, a_send, b_process, b_own, b_publish, c_process)}) == 1  # type: ignore[index]
    assert a_send["parent"] == a_process["id"]  # type: ignore[index]
    assert b_process["parent"] == a_send["id"]  # type: ignore[index]
    assert b_own["parent"] == b_process["id"]  # a plugin author's span nests with no extra code  # type: ignore[index]
    assert b_publish["parent"] == b_own["id"]  # type: ignore[index]
    assert c_process["parent"] == b_publish["id"] and c_process["links"] == [b_publish["id"]]  # type: ignore[index]
    # Kinds (PRODUCER = 4, CONSUMER = 5) and the messaging conventions.
    assert (a_send["kind"], b_process["kind"], b_publish["kind"], c_process["kind"]) == (4, 5, 4, 5)  # type: ignore[index]
    assert a_send["attrs"]["messaging.system"] == "nats"  # type: ignore[index]
    assert a_send["attrs"]["messaging.destination.name"] == f"{p}.plugin.announcer"  # type: ignore[index]
    assert b_process["attrs"]["messaging.operation.type"] == "process"  # type: ignore[index]
    assert b_process["attrs"]["messaging.consumer.group.name"] == "announcer"  # type: ignore[index]
    resource = b_process["resource"]  # type: ignore[index]
    assert resource["service.version"] == "1.2.0" and resource["service.instance.id"].startswith("announcer-")


async def test_otlp_over_grpc(mesh: Mesh, grpc_receiver: GrpcReceiver, messaging: PluginMessaging) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": grpc_receiver.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
           "OTEL_BSP_SCHEDULE_DELAY": "50"}
    await mesh.spawn("examples.echo:Echo", env=env)
    reply = await messaging.send_message("echo", {"text": "over grpc"}, timeout=10)
    assert reply.result == {"text": "over grpc"}
    name = f"process {mesh.prefix}.plugin.echo"

    async def exported() -> dict[str, Any] | None:
        return find(grpc_receiver.snapshot(), "echo", name)

    span = await eventually(exported, timeout=30, what="the echo process span over OTLP/gRPC")
    assert span["kind"] == 5 and span["resource"]["service.name"] == "echo"
    assert span["resource"]["service.version"] == "1.0.0"


async def test_registry_calls_continue_the_callers_trace(nats_server: NatsServer, prefix: str, tmp_path: Path,
                                                         client: PluginRegistry, receiver: Receiver) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    reg = await start_registry(nats_server.url, prefix, tmp_path / "registry.log", client, env)
    m = Mesh(nats_server.url, prefix, tmp_path, client)
    try:
        echo = await m.spawn("examples.echo:Echo", env=env)
        assert echo.info is not None
        first_seen = echo.info.last_seen

        async def beaten() -> bool:  # a heartbeat reached the registry after the register
            info = await client.get_plugin(echo.info.id)  # type: ignore[union-attr]
            return info is not None and info.last_seen > first_seen

        await eventually(beaten, what="a heartbeat after the register")

        async def pair(verb: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
            spans = receiver.snapshot()
            call = find(spans, "echo", f"send {prefix}.registry.{verb}")
            served = find(spans, "mesh-registry", f"process {prefix}.registry.{verb}")
            return (call, served) if call and served else None

        call, served = await eventually(lambda: pair("register"), timeout=30, what="the register spans")
        assert (call["kind"], served["kind"]) == (4, 5)  # PRODUCER in the plugin, CONSUMER in the registry
        assert served["trace"] == call["trace"] and served["parent"] == call["id"]
        assert call["attrs"]["messaging.system"] == "nats" and call["attrs"]["mesh.registry.verb"] == "register"
        assert served["attrs"]["messaging.consumer.group.name"] == "registry"
        assert served["resource"]["service.name"] == "mesh-registry"

        assert await m.stop(echo) == 0  # unregisters; its spans are flushed as the host exits
        call, served = await eventually(lambda: pair("unregister"), timeout=30, what="the unregister spans")
        assert served["parent"] == call["id"]
        # Heartbeats are never traced (one every 0.3 s here would flood the trace store).
        assert not [s for s in receiver.snapshot() if s["name"].endswith(".registry.heartbeat")]
    finally:
        await m.close()
        reg.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(reg.wait(), 20) == 0


def tree_lines(text: str) -> list[tuple[int, str]]:
    """`mesh trace` output without its header: (indent, "service  span-name") per span."""
    rows = []
    for line in text.splitlines()[1:]:
        body = line.lstrip(" ")
        service, name = body.split("  ")[:2]
        rows.append((len(line) - len(body), f"{service}  {name}"))
    return rows


def under(rows: list[tuple[int, str]], child: str, parent: str) -> bool:
    """``child`` is printed as a direct child of ``parent``: below it, one level deeper, in its subtree."""
    at = next(i for i, (_, text) in enumerate(rows) if text == parent)
    depth = rows[at][0]
    for indent, text in rows[at + 1:]:
        if indent <= depth:
            return False
        if text == child:
            return indent == depth + 2
    return False


async def test_mesh_trace_prints_the_flow(mesh: Mesh, receiver: Receiver, nats_server: NatsServer,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    await mesh.spawn("testplugins:Archivist", env=env)
    await mesh.spawn("testplugins:Announcer", env=env)
    await mesh.spawn("testplugins:Relay", env=env)
    for key, value in env.items():  # the CLI exports its root span too, and knows where Jaeger is
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MESH_JAEGER_URL", receiver.endpoint)
    p = mesh.prefix

    r = await mesh_cli("send", "relay", '{"to": "announcer", "body": "hi"}', "--trace",
                       url=nats_server.url, prefix=p)
    assert r.code == 0, r.err
    assert json.loads(r.out)["reply"] == {"announced": "hi"}
    found = re.search(r"^trace: ([0-9a-f]{32})$", r.err, re.M)
    assert found, r.err
    trace_id = found.group(1)
    assert "mesh-cli  mesh send relay" in r.err  # the tree, printed after the trace id

    root = "mesh-cli  mesh send relay"
    chain = [root, f"mesh-cli  send {p}.plugin.relay", f"relay  process {p}.plugin.relay",
             f"relay  send {p}.plugin.announcer", f"announcer  process {p}.plugin.announcer",
             "announcer  compose announcement", f"announcer  publish {p}.event.news.posted",
             f"archivist  process {p}.event.news.posted"]

    async def all_exported() -> bool:
        have = {f"{s['service']}  {s['name']}" for s in receiver.snapshot() if s["trace"] == trace_id}
        return set(chain) <= have

    await eventually(all_exported, timeout=30, what="every span of the flow exported")

    r = await mesh_cli("trace", trace_id, "--jaeger", receiver.endpoint, url=nats_server.url, prefix=p)
    assert r.code == 0, r.err
    assert r.out.startswith(f"trace {trace_id}: 8 spans, 4 services (announcer, archivist, mesh-cli, relay)")
    rows = tree_lines(r.out)
    assert rows[0] == (0, root)
    assert {text for _, text in rows} == set(chain)
    for parent, child in itertools.pairwise(chain):
        assert under(rows, child, parent), f"{child!r} not under {parent!r}:\n{r.out}"
    archivist = next(line for line in r.out.splitlines() if line.strip().startswith("archivist"))
    assert f"(links: announcer publish {p}.event.news.posted)" in archivist
    assert re.search(r"  \d+\.\d\d ms", archivist)

    r = await mesh_cli("trace", trace_id, "--json", url=nats_server.url, prefix=p)  # MESH_JAEGER_URL
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["trace_id"] == trace_id and len(doc["roots"]) == 1
    node = doc["roots"][0]
    for expected in chain[1:]:
        assert len(node["children"]) == 1, node
        node = node["children"][0]
        assert f"{node['service']}  {node['name']}" == expected
    assert node["kind"] == "consumer" and node["links"] and node["duration_ms"] >= 0


async def test_mesh_trace_errors(receiver: Receiver, nats_server: NatsServer, prefix: str) -> None:
    async def fails(*args: str) -> str:
        r = await mesh_cli("trace", *args, url=nats_server.url, prefix=prefix)
        assert r.code == 1 and r.out == "" and "Traceback" not in r.err, r
        assert len(r.err.strip().splitlines()) == 1, r.err
        return r.err.strip()

    unknown = "0af7651916cd43dd8448eb211c80319c"
    dead = f"http://127.0.0.1:{free_port()}"
    assert (await fails(unknown, "--jaeger", dead)).startswith(f"error: cannot reach Jaeger at {dead}: ")
    assert await fails(unknown, "--jaeger", receiver.endpoint) == (
        f"error: trace {unknown} not found in Jaeger at {receiver.endpoint}")
    assert (await fails(unknown, "--jaeger", f"{receiver.endpoint}/broken")).startswith(
        f"error: Jaeger at {receiver.endpoint}/broken gave a malformed answer for trace {unknown}")
    assert (await fails("not-a-trace", "--jaeger", receiver.endpoint)).startswith(
        "error: not a trace id: 'not-a-trace'")
