"""Turn tracing and metrics on in a mesh process from the standard ``OTEL_*`` environment variables.

Tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``) or an OTLP
endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``);
``OTEL_TRACES_EXPORTER=none`` turns it off. OTLP goes over HTTP/protobuf unless
``OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL=grpc`` (which needs opentelemetry-exporter-otlp-proto-grpc).
Spans are batched (``OTEL_BSP_*``). The service name is the plugin's name; version, instance and
host are resource attributes, beside any from ``OTEL_RESOURCE_ATTRIBUTES``.

Metrics are opt-in, because the usual trace backend (Jaeger) takes no metrics:
``OTEL_METRICS_EXPORTER`` is a comma-separated list of ``otlp``, ``prometheus``, ``console``
(``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` alone also turns ``otlp`` on). ``prometheus`` serves a
scrape endpoint at ``OTEL_EXPORTER_PROMETHEUS_HOST``:``OTEL_EXPORTER_PROMETHEUS_PORT`` (default
``localhost:9464``; port ``0`` picks a free one, logged), and needs the ``prometheus`` extra. OTLP
metrics are pushed every ``OTEL_METRIC_EXPORT_INTERVAL`` ms (default 60000).

The ``console`` exporters write to **stderr**, so a command's result on stdout stays clean.

The final flush (what :func:`setup_tracing` and :func:`setup_metrics` return) is bounded to
:data:`FLUSH_TIMEOUT` seconds whatever the exporter's own timeout (``OTEL_EXPORTER_OTLP_TIMEOUT``,
retries included): past it, the exporter is shut down, what was not exported is dropped, and one
warning says so. A process with an unreachable collector therefore stops in about two seconds.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from plugin_sdk import ConfigError
from plugin_sdk.host import tracing

# The OpenTelemetry SDK is imported only when tracing or metrics are turned on: with them off
# (the default) a plugin host does without it (docs/performance.md: idle host memory).
if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

__all__ = ["FLUSH_TIMEOUT", "setup_metrics", "setup_tracing"]

log = logging.getLogger("mesh.telemetry")

#: Seconds the final flush of spans and metrics may take at exit, whatever the exporter's timeout.
FLUSH_TIMEOUT = 2.0


def _counting_exporter(inner: SpanExporter) -> Any:
    """An exporter that delegates to ``inner`` and counts the spans whose export failed (``.failed``,
    to say so at exit)."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class CountingExporter(SpanExporter):
        def __init__(self) -> None:
            self.inner = inner
            self.failed = 0

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            result = self.inner.export(spans)
            if result is not SpanExportResult.SUCCESS:
                self.failed += len(spans)
            return result

        def shutdown(self) -> None:
            self.inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return self.inner.force_flush(timeout_millis)

    return CountingExporter()


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """At exit, the OTLP exporters' retry warnings are noise: one line of ours says what was lost."""
    logger = logging.getLogger("opentelemetry.exporter")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _bounded(what: str, shutdown: Callable[[], object], abort: Callable[[], object],
             timeout: float = FLUSH_TIMEOUT) -> bool:
    """Run ``shutdown`` (which exports what is left) for at most ``timeout`` seconds; past that,
    ``abort`` (the exporter's shutdown, which ends its retries) and give up. True if it finished.

    The flush runs in a daemon thread: one still stuck in an HTTP call after ``abort`` is left
    behind rather than holding the process up."""
    done = threading.Event()

    def run() -> None:
        try:
            shutdown()
        except Exception:  # an exporter failing at exit must not turn a clean stop into a crash
            log.warning("%s: the final flush failed", what, exc_info=True)
        finally:
            done.set()

    threading.Thread(target=run, name=f"mesh {what} flush", daemon=True).start()
    if done.wait(timeout):
        return True
    with contextlib.suppress(Exception):  # best effort: it only shortens the exporter's retries
        abort()
    done.wait(0.2)
    return False


def _env(*names: str) -> str:
    return next((os.environ[n] for n in names if os.environ.get(n)), "")


def setup_tracing(service_name: str, *, version: str = "", instance_id: str = "") -> Callable[[], None] | None:
    """Install a tracer provider if the environment asks for one; returns its shutdown (flush) or None."""
    exporter_name = _env("OTEL_TRACES_EXPORTER").strip().lower()
    endpoint = _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    if exporter_name == "none" or not (exporter_name or endpoint):
        return None
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter(out=sys.stderr)  # stdout carries command results
    elif exporter_name in ("", "otlp"):
        exporter = _otlp_exporter("traces")
    else:
        raise ConfigError(f"OTEL_TRACES_EXPORTER={exporter_name!r} is not supported here: use otlp, console or none")
    counting = _counting_exporter(exporter)
    provider = TracerProvider(resource=_resource(service_name, version, instance_id))
    provider.add_span_processor(BatchSpanProcessor(counting))
    trace.set_tracer_provider(provider)
    target = endpoint or exporter_name

    def flush() -> None:
        tracing.flush()  # the spans the mesh has still to make (plugin_sdk._tracing: made after their message)
        with _quiet_exporters():
            finished = _bounded("traces", provider.shutdown, exporter.shutdown)
        if not finished:
            log.warning("spans not exported to %s within %gs at exit: dropped (is the collector reachable?)",
                        target, FLUSH_TIMEOUT)
        elif counting.failed:
            log.warning("%d span(s) could not be exported to %s: dropped (is the collector reachable?)",
                        counting.failed, target)

    return flush


def _resource(service_name: str, version: str, instance_id: str) -> Resource:
    from opentelemetry.sdk.resources import Resource

    attributes = {"service.name": service_name, "host.name": socket.gethostname()}
    if version:
        attributes["service.version"] = version
    if instance_id:
        attributes["service.instance.id"] = instance_id
    return Resource.create(attributes)


def setup_metrics(service_name: str, *, version: str = "", instance_id: str = "") -> Callable[[], None] | None:
    """Install a meter provider if the environment asks for one; returns its shutdown or None."""
    names = [n.strip().lower() for n in _env("OTEL_METRICS_EXPORTER").split(",") if n.strip()]
    if not names and _env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        names = ["otlp"]
    if not names or names == ["none"]:
        return None
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        MetricReader,
        PeriodicExportingMetricReader,
    )

    readers: list[MetricReader] = []
    closers: list[Callable[[], None]] = []
    for name in names:
        if name == "otlp":
            readers.append(PeriodicExportingMetricReader(_otlp_exporter("metrics")))
        elif name == "console":
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stderr)))
        elif name == "prometheus":
            reader, close = _prometheus()
            readers.append(reader)
            closers.append(close)
        else:
            raise ConfigError(f"OTEL_METRICS_EXPORTER={name!r} is not supported here: use otlp, prometheus, "
                              "console or none")
    provider = MeterProvider(resource=_resource(service_name, version, instance_id), metric_readers=readers)
    metrics.set_meter_provider(provider)

    def abort() -> None:
        for reader in readers:
            exporter = getattr(reader, "_exporter", None)  # a periodic reader's; ends its retries
            if exporter is not None:
                exporter.shutdown(timeout_millis=0)

    def shutdown() -> None:
        with _quiet_exporters():
            finished = _bounded("metrics", lambda: provider.shutdown(timeout_millis=FLUSH_TIMEOUT * 1000), abort)
        if not finished:
            log.warning("metrics not exported within %gs at exit: dropped (is the collector reachable?)",
                        FLUSH_TIMEOUT)
        for close in closers:
            close()

    return shutdown


def _otlp_exporter(signal: str) -> Any:
    """The OTLP exporter for ``signal`` (``traces`` or ``metrics``): HTTP/protobuf, or gRPC when
    ``OTEL_EXPORTER_OTLP[_<SIGNAL>]_PROTOCOL=grpc``. It reads its endpoint and the rest from ``OTEL_*``."""
    protocol = _env(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    transport = "grpc" if protocol == "grpc" else "http"
    module, cls = {"traces": ("trace_exporter", "OTLPSpanExporter"),
                   "metrics": ("metric_exporter", "OTLPMetricExporter")}[signal]
    try:
        exporter_module = importlib.import_module(f"opentelemetry.exporter.otlp.proto.{transport}.{module}")
    except ImportError:
        if transport != "grpc":
            raise  # the HTTP exporter is a dependency of this package: a broken install
        raise ConfigError("OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the opentelemetry-exporter-otlp-proto-grpc "
                          "package (pip install 'groundhog-mesh[grpc]')") from None
    return getattr(exporter_module, cls)()


def _prometheus() -> tuple[Any, Callable[[], None]]:
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader  # type: ignore[import-not-found,unused-ignore]
        from prometheus_client import start_http_server  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise ConfigError("OTEL_METRICS_EXPORTER=prometheus needs the prometheus extra "
                          "(pip install 'groundhog-mesh[prometheus]')") from None
    host = _env("OTEL_EXPORTER_PROMETHEUS_HOST") or "localhost"
    raw_port = _env("OTEL_EXPORTER_PROMETHEUS_PORT") or "9464"
    try:
        port = int(raw_port)
        server, thread = start_http_server(port, addr=host)
    except ValueError:
        raise ConfigError(f"OTEL_EXPORTER_PROMETHEUS_PORT={raw_port!r} is not a port number") from None
    except OSError as exc:
        raise ConfigError(f"cannot serve Prometheus metrics on {host}:{raw_port}: {exc.strerror or exc} "
                          "(set OTEL_EXPORTER_PROMETHEUS_PORT, 0 for any free port)") from None
    log.info("Prometheus metrics at http://%s:%d/metrics", host, server.server_address[1])

    def close() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return PrometheusMetricReader(), close
