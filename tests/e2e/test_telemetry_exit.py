"""Telemetry never holds a process up or dirties stdout: the final flush is bounded whatever the
exporter's timeout, and the console exporters write to stderr."""

from __future__ import annotations

import asyncio
import json
import sys

from mesh import NatsServer, free_port
from tests.conftest import ROOT, Mesh, cli_env


async def test_stop_with_an_unreachable_otlp_endpoint_is_bounded(mesh: Mesh) -> None:
    # Nothing listens there. With the exporter allowed 60 s of retries, an unbounded flush would
    # keep the host alive for about 30 s after SIGTERM; the hang guard below is 20 s.
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}", "OTEL_EXPORTER_OTLP_TIMEOUT": "60",
           "OTEL_BSP_SCHEDULE_DELAY": "60000"}  # spans stay queued until the final flush
    p = await mesh.spawn("examples.echo:Echo", env=env)  # registering made a span at least
    assert await mesh.stop(p, timeout=20) == 0
    log = p.log_text()
    assert "spans not exported" in log and "dropped" in log, log[-2000:]
    assert "Transient error" not in log, log[-2000:]  # the exporter's retry warnings are not printed


async def test_console_traces_go_to_stderr_not_into_the_result(mesh: Mesh, nats_server: NatsServer,
                                                               prefix: str) -> None:
    await mesh.spawn("examples.echo:Echo")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", "send", "echo", '{"text": "hi"}', "--trace", cwd=ROOT,
        env=cli_env(nats_server.url, prefix, OTEL_TRACES_EXPORTER="console"), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().splitlines() == [json.dumps({"text": "hi"})], out.decode()
    assert '"trace_id"' in err.decode()  # the span went to stderr
