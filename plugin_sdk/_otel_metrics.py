"""A plugin instance's metrics as OpenTelemetry instruments (API only; a process installs the SDK).

Counters, gauges and latency percentiles are *observable*: the exporter's thread reads them from a
snapshot the runtime refreshes once a second on its own loop, so the message path pays nothing for
them. The one synchronous instrument, the ``messaging.process.duration`` histogram of the messaging
semantic conventions, is recorded per message, and only when a real meter provider is installed.

Names: ``mesh.plugin.*`` for the mesh's own figures, ``process.*`` for resource use (the OTel
process conventions), attributes ``mesh.kind`` (command, query, event, broadcast) and ``quantile``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Histogram, Observation

__all__ = ["MeshInstruments", "enabled"]

_HEALTH_CODES = {"healthy": 0, "degraded": 1, "unhealthy": 2, "starting": 3, "stopping": 4, "failed": 5}
#: Seconds; the advisory boundaries of the process-duration histogram (100 µs to 10 s).
_BOUNDARIES = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


def enabled() -> bool:
    """Whether a real meter provider is installed (not the API's no-op or proxy).

    Installing one imports the metrics API, so until something has imported it there is none, and
    a plugin host need not import it (a third of a MiB of its idle RSS): unless the API is told
    to load a provider by itself (``OTEL_PYTHON_METER_PROVIDER``).
    """
    if "opentelemetry.metrics" not in sys.modules and not os.environ.get("OTEL_PYTHON_METER_PROVIDER"):
        return False
    from opentelemetry import metrics

    provider = metrics.get_meter_provider()
    return type(provider).__name__ not in ("NoOpMeterProvider", "_ProxyMeterProvider", "ProxyMeterProvider")


class MeshInstruments:
    """The instruments of one runtime. ``snapshot`` returns what ``metrics_snapshot()`` returns."""

    def __init__(self, snapshot: Callable[[], Mapping[str, Any]]) -> None:
        from opentelemetry import metrics
        from opentelemetry.metrics import Observation

        self._obs = Observation
        self._read = snapshot
        self.latest: Mapping[str, Any] = {}
        meter = metrics.get_meter("groundhog.mesh")
        self.duration: Histogram = meter.create_histogram(
            "messaging.process.duration", unit="s", description="Time to handle one message",
            explicit_bucket_boundaries_advisory=_BOUNDARIES)
        self._attrs = {kind: {"messaging.system": "nats", "messaging.operation.type": "process", "mesh.kind": kind}
                       for kind in ("command", "query", "event", "broadcast")}
        meter.create_observable_counter("mesh.plugin.messages", [self._per_kind("count")], unit="{message}",
                                        description="Messages handled, by kind")
        meter.create_observable_counter("mesh.plugin.errors", [self._per_kind("errors")], unit="{error}",
                                        description="Messages whose handling failed, by kind")
        meter.create_observable_gauge("mesh.plugin.latency", [self._latency], unit="ms",
                                      description="Handling latency percentiles since start, by kind")
        meter.create_observable_up_down_counter("mesh.plugin.inflight", [self._field("inflight")],
                                                unit="{message}", description="Messages being handled now")
        meter.create_observable_gauge("mesh.plugin.error_rate", [self._field("error_rate")], unit="1",
                                      description="errors / messages since start")
        meter.create_observable_gauge("mesh.plugin.load_time", [self._field("load_time_s")], unit="s",
                                      description="Process start to serving")
        meter.create_observable_counter("mesh.plugin.restarts", [self._field("restarts")], unit="{restart}",
                                        description="Restarts by the supervising agent")
        meter.create_observable_gauge("mesh.plugin.health", [self._health], unit="1",
                                      description="0 healthy, 1 degraded, 2 unhealthy, 3 starting, 4 stopping")
        res = "resources"
        meter.create_observable_up_down_counter("process.memory.usage", [self._field(res, "rss_bytes")], unit="By",
                                                description="Resident set size")
        meter.create_observable_gauge("process.cpu.utilization", [self._field(res, "cpu_percent", scale=0.01)],
                                      unit="1", description="CPU time / wall time over the last second (1 = one core)")
        meter.create_observable_up_down_counter("process.open_file_descriptor.count", [self._field(res, "open_fds")],
                                                unit="{file_descriptor}", description="Open file descriptors")

    def refresh(self) -> None:
        """Take a new snapshot (on the runtime's loop; the exporter reads it from its thread)."""
        self.latest = self._read()

    def record(self, kind: str, seconds: float) -> None:
        self.duration.record(seconds, self._attrs.get(kind))

    # -- callbacks (exporter thread): read only ``self.latest``, an immutable-by-convention dict --

    def _per_kind(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            kinds = self.latest.get("kinds", {})
            return [self._obs(k[field], {"mesh.kind": kind}) for kind, k in kinds.items()]
        return observe

    def _latency(self, options: CallbackOptions) -> Iterable[Observation]:
        out = []
        for kind, k in self.latest.get("kinds", {}).items():
            for q in ("p50", "p95", "p99"):
                out.append(self._obs(k["latency_ms"][q], {"mesh.kind": kind, "quantile": q}))
        return out

    def _field(self, *path: str, scale: float = 1.0) -> Callable[[CallbackOptions], Iterable[Observation]]:
        """Observe ``latest[path[0]][path[1]]...`` times ``scale``; nothing when absent or negative
        (a load time not known yet, ``open_fds`` -1 where there are no file descriptors)."""
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            value: Any = self.latest
            for key in path:
                value = value.get(key) if isinstance(value, Mapping) else None
            return [self._obs(value * scale)] if isinstance(value, int | float) and value >= 0 else []
        return observe

    def _health(self, options: CallbackOptions) -> Iterable[Observation]:
        health = self.latest.get("health")
        return [self._obs(_HEALTH_CODES[health])] if health in _HEALTH_CODES else []
