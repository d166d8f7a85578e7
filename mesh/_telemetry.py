"""Turn tracing on in a mesh process from the standard ``OTEL_*`` environment variables.

Tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``) or an OTLP
endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``);
``OTEL_TRACES_EXPORTER=none`` turns it off. OTLP goes over HTTP/protobuf unless
``OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL=grpc`` (which needs opentelemetry-exporter-otlp-proto-grpc).
Spans are batched (``OTEL_BSP_*``). The service name is the plugin's name; version, instance and
host are resource attributes, beside any from ``OTEL_RESOURCE_ATTRIBUTES``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from plugin_sdk import ConfigError

__all__ = ["setup_tracing"]


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
        protocol = _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
        if protocol == "grpc":
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                    OTLPSpanExporter as GrpcExporter,
                )
            except ImportError:
                raise ConfigError("OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the opentelemetry-exporter-otlp-proto-grpc "
                                  "package (pip install opentelemetry-exporter-otlp-proto-grpc)") from None
            exporter = GrpcExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

            exporter = HttpExporter()
    else:
        raise ConfigError(f"OTEL_TRACES_EXPORTER={exporter_name!r} is not supported here: use otlp, console or none")
    attributes = {"service.name": service_name, "host.name": socket.gethostname()}
    if version:
        attributes["service.version"] = version
    if instance_id:
        attributes["service.instance.id"] = instance_id
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider.shutdown
