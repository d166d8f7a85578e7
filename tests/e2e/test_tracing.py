"""One request through three plugin processes is ONE trace, exported over OTLP/HTTP."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from plugin_sdk import PluginMessaging
from tests.conftest import Mesh, eventually


class Receiver:
    """A test OTLP/HTTP endpoint: decodes every export into (service, span) pairs."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    for rs in request.resource_spans:
                        resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                        for ss in rs.scope_spans:
                            for span in ss.spans:
                                receiver.spans.append({
                                    "service": resource.get("service.name"), "resource": resource,
                                    "name": span.name, "kind": span.kind, "trace": span.trace_id.hex(),
                                    "id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                                    "links": [link.span_id.hex() for link in span.links],
                                    "attrs": {a.key: a.value.string_value for a in span.attributes}})
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.spans)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


async def test_a_to_b_to_event_to_c_is_one_trace(mesh: Mesh, receiver: Receiver, messaging: PluginMessaging) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    await mesh.spawn("testplugins:Archivist", env=env)
    await mesh.spawn("testplugins:Announcer", env=env)
    await mesh.spawn("testplugins:Relay", env=env)
    reply = await messaging.send_message("relay", {"to": "announcer", "body": "hello"}, timeout=10)
    assert reply.result["reply"] == {"announced": "hello"}
    p = mesh.prefix

    def find(spans: list[dict[str, Any]], service: str, name: str) -> dict[str, Any] | None:
        return next((s for s in spans if s["service"] == service and s["name"] == name), None)

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
