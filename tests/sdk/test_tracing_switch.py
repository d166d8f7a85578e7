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
