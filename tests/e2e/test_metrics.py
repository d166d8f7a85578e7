"""Metrics of real plugin processes: control request, `mesh stats`, `mesh top`, Prometheus and OTLP export."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from mesh import free_port
from plugin_sdk import MessageKind, PluginMessaging
from tests.conftest import Mesh, eventually, mesh_cli


async def _traffic(messaging: PluginMessaging, ok: int, failing: int) -> None:
    for _ in range(ok):
        await messaging.send_message("moody", operation="ping", kind=MessageKind.QUERY, timeout=5)
    for _ in range(failing):
        await messaging.send_message("moody", operation="fail", raise_on_error=False, timeout=5)


async def test_mesh_stats_shows_each_instance(mesh: Mesh, messaging: PluginMessaging) -> None:
    moody = await mesh.spawn("testplugins:Moody")
    await _traffic(messaging, 6, 2)
    res = await mesh_cli("stats", "--json", url=mesh.url, prefix=mesh.prefix)
    assert res.code == 0, res.err
    [row] = json.loads(res.out)
    m = row["metrics"]
    assert row["info"]["id"] == moody.info.id and m["pid"] == moody.pid  # type: ignore[union-attr]
    assert (m["messages"], m["errors"], m["kinds"]["query"]["count"], m["kinds"]["command"]["errors"]) == (8, 2, 6, 2)
    assert m["load_time_s"] > 0 and m["resources"]["rss_bytes"] > 0 and m["health"] == "healthy"

    res = await mesh_cli("stats", "moody", url=mesh.url, prefix=mesh.prefix)
    assert res.code == 0, res.err
    assert moody.info.id in res.out and "by message kind" in res.out  # type: ignore[union-attr]
    assert re.search(r"query\s+│\s+6\s+│\s+0", res.out), res.out

    res = await mesh_cli("stats", "nobody", url=mesh.url, prefix=mesh.prefix)
    assert res.code == 1 and "no instance of 'nobody'" in res.err and "Traceback" not in res.err


async def test_mesh_top_shows_live_rates(mesh: Mesh, messaging: PluginMessaging) -> None:
    moody = await mesh.spawn("testplugins:Moody")
    await mesh.spawn("testplugins:Faulty")
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            await _traffic(messaging, 5, 0)
            await asyncio.sleep(0.01)

    loader = asyncio.create_task(load())
    try:
        res = await mesh_cli("top", "--iterations", "3", "--interval", "0.5", url=mesh.url, prefix=mesh.prefix)
    finally:
        stop.set()
        await loader
    assert res.code == 0, res.err
    assert "2 instance(s)" in res.out
    row = next((line for line in res.out.splitlines() if moody.info.id in line), res.out)  # type: ignore[union-attr]
    cells = [c.strip() for c in row.split("│")]
    assert cells[3] == "healthy"
    assert float(cells[4]) > 0  # msgs/s while the load runs


async def test_prometheus_scrape_endpoint(mesh: Mesh, messaging: PluginMessaging) -> None:
    port = free_port()
    await mesh.spawn("testplugins:Moody", env={"OTEL_METRICS_EXPORTER": "prometheus",
                                               "OTEL_EXPORTER_PROMETHEUS_PORT": str(port)})
    await _traffic(messaging, 4, 1)

    async def scraped() -> str:
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=5).read().decode())
        return text if re.search(r'mesh_plugin_messages_total\{[^}]*mesh_kind="query"[^}]*\} 4', text) else ""

    text = await eventually(scraped, timeout=10, what="the query count in the scrape")
    assert re.search(r'mesh_plugin_errors_total\{[^}]*mesh_kind="command"[^}]*\} 1', text)
    assert re.search(r'messaging_process_duration_seconds_count\{[^}]*mesh_kind="query"[^}]*\} 4', text)
    assert re.search(r"process_memory_usage_bytes\{[^}]*\} \d", text)
    assert re.search(r'target_info\{[^}]*service_name="moody"', text)  # resource attributes


class MetricsReceiver:
    """A test OTLP/HTTP metrics endpoint: every export decoded into {metric name: [(attrs, value)]}."""

    def __init__(self) -> None:
        self.metrics: dict[str, list[tuple[dict[str, str], float]]] = {}
        self.services: set[str] = set()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                request = ExportMetricsServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    for rm in request.resource_metrics:
                        receiver.services |= {a.value.string_value for a in rm.resource.attributes
                                              if a.key == "service.name"}
                        for sm in rm.scope_metrics:
                            for metric in sm.metrics:
                                receiver.metrics[metric.name] = _points(metric)
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def get(self, name: str) -> list[tuple[dict[str, str], float]]:
        with self.lock:
            return list(self.metrics.get(name, []))


def _points(metric: Any) -> list[tuple[dict[str, str], float]]:
    kind = metric.WhichOneof("data")
    data = getattr(metric, kind)
    out = []
    for p in data.data_points:
        attrs = {a.key: a.value.string_value for a in p.attributes}
        value = p.count if kind == "histogram" else (p.as_int if p.WhichOneof("value") == "as_int" else p.as_double)
        out.append((attrs, float(value)))
    return out


@pytest.fixture
def metrics_receiver() -> Iterator[MetricsReceiver]:
    r = MetricsReceiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


async def test_otlp_metrics_export(mesh: Mesh, messaging: PluginMessaging, metrics_receiver: MetricsReceiver) -> None:
    port = metrics_receiver.server.server_address[1]
    await mesh.spawn("testplugins:Moody", env={"OTEL_METRICS_EXPORTER": "otlp", "OTEL_METRIC_EXPORT_INTERVAL": "300",
                                               "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                                               "OTEL_TRACES_EXPORTER": "none"})
    await _traffic(messaging, 3, 2)

    async def counted() -> bool:
        return ({"mesh.kind": "query"}, 3.0) in metrics_receiver.get("mesh.plugin.messages")

    await eventually(counted, timeout=15, what="mesh.plugin.messages exported")
    assert ({"mesh.kind": "command"}, 2.0) in metrics_receiver.get("mesh.plugin.errors")
    durations = {a["mesh.kind"]: v for a, v in metrics_receiver.get("messaging.process.duration")}
    assert durations == {"query": 3.0, "command": 2.0}
    assert [v > 0 for _, v in metrics_receiver.get("process.memory.usage")] == [True]
    assert [v for _, v in metrics_receiver.get("mesh.plugin.health")] == [0.0]
    assert metrics_receiver.services == {"moody"}


async def test_a_busy_prometheus_port_is_a_clear_error(mesh: Mesh) -> None:
    port = free_port()
    first = await mesh.spawn("testplugins:Moody", env={"OTEL_METRICS_EXPORTER": "prometheus",
                                                       "OTEL_EXPORTER_PROMETHEUS_PORT": str(port)})
    second = await mesh.spawn("testplugins:Moody", wait=False, env={"OTEL_METRICS_EXPORTER": "prometheus",
                                                                    "OTEL_EXPORTER_PROMETHEUS_PORT": str(port)})
    assert await asyncio.wait_for(second.proc.wait(), 20) == 1
    log = second.log_text()
    assert f"cannot serve Prometheus metrics on localhost:{port}" in log and "Traceback" not in log
    assert first.proc.returncode is None
