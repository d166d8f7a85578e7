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
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from plugin_sdk import ConfigError

__all__ = ["setup_metrics", "setup_tracing"]

log = logging.getLogger("mesh.telemetry")


def _env(*names: str) -> str:
    return next((os.environ[n] for n in names if os.environ.get(n)), "")


def setup_tracing(service_name: str, *, version: str = "", instance_id: str = "") -> Callable[[], None] | None:
    """Install a tracer provider if the environment asks for one; returns its shutdown (flush) or None."""
    exporter_name = _env("OTEL_TRACES_EXPORTER").strip().lower()
    endpoint = _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    if exporter_name == "none" or not (exporter_name or endpoint):
        return None
    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    elif exporter_name in ("", "otlp"):
        exporter = _otlp_exporter("traces")
    else:
        raise ConfigError(f"OTEL_TRACES_EXPORTER={exporter_name!r} is not supported here: use otlp, console or none")
    provider = TracerProvider(resource=_resource(service_name, version, instance_id))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider.shutdown


def _resource(service_name: str, version: str, instance_id: str) -> Resource:
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
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
        elif name == "prometheus":
            reader, close = _prometheus()
            readers.append(reader)
            closers.append(close)
        else:
            raise ConfigError(f"OTEL_METRICS_EXPORTER={name!r} is not supported here: use otlp, prometheus, "
                              "console or none")
    provider = MeterProvider(resource=_resource(service_name, version, instance_id), metric_readers=readers)
    metrics.set_meter_provider(provider)

    def shutdown() -> None:
        provider.shutdown()
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
