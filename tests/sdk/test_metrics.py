"""What an instance measures (control ``metrics``) and says of its health (``health_check``)."""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from mesh import RegistryService
from plugin_sdk import Health, HealthCheck, MessageKind, PluginMessaging, PluginRegistry, PluginRuntime
from plugin_sdk._metrics import LatencyHistogram
from tests.conftest import eventually
from tests.plugins.testplugins import Moody


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=2e-6, max_value=500.0, allow_nan=False), min_size=1, max_size=400),
       st.sampled_from([0.5, 0.95, 0.99]))
def test_percentiles_are_within_five_percent_of_the_exact_ones(samples: list[float], q: float) -> None:
    hist = LatencyHistogram()
    for s in samples:
        hist.record(s)
    exact = sorted(samples)[max(1, math.ceil(q * len(samples))) - 1]
    assert abs(hist.percentile(q) - exact) <= 0.05 * exact + 1e-12
    assert hist.count == len(samples) and hist.max == max(samples)


async def _metrics(nc: NATS, prefix: str, instance: str) -> dict:  # type: ignore[type-arg]
    reply = await nc.request(f"{prefix}.control.{instance}.metrics", b"", timeout=5)
    return json.loads(reply.data)  # type: ignore[no-any-return]


async def test_metrics_count_messages_errors_and_latency_by_kind(nc: NATS, prefix: str,
                                                                 messaging: PluginMessaging) -> None:
    async with PluginRuntime(Moody(), nc, prefix=prefix, register=False) as runtime:
        for _ in range(5):
            await messaging.send_message("moody", operation="ping", kind=MessageKind.QUERY)
        for _ in range(3):
            await messaging.send_message("moody", operation="fail", raise_on_error=False)
        await messaging.send_message(f"moody.{runtime.instance_id}", {"status": "healthy"}, operation="feel")
        m = await _metrics(nc, prefix, runtime.instance_id)
    assert (m["instance"], m["name"], m["version"], m["health"]) == (runtime.instance_id, "moody", "1.1.0", "healthy")
    assert (m["messages"], m["errors"], m["error_rate"]) == (9, 3, round(3 / 9, 4))
    query, cmd = m["kinds"]["query"], m["kinds"]["command"]
    assert (query["count"], query["errors"], cmd["count"], cmd["errors"]) == (5, 0, 4, 3)
    for k in (query, cmd):
        lat = k["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert k["recent"]["count"] == k["count"]  # all within the last window
    assert m["inflight"] == 0 and m["restarts"] == 0
    assert m["resources"]["rss_bytes"] > 10 * 2**20 and m["resources"]["open_fds"] > 0
    assert m["load_time_s"] > 0 and 0 <= m["start_time_s"] <= m["load_time_s"]
    # Per endpoint: the load-balanced subject took 8, the instance subject 1; the last error is kept.
    eps = runtime.stats.endpoints
    assert (eps["plugin"].num_requests, eps["plugin"].num_errors, eps["instance"].num_requests) == (8, 3, 1)
    assert eps["plugin"].last_error == "ValueError: bad mood"


async def test_a_plugins_own_counters_are_reported(nc: NATS, prefix: str) -> None:
    async with PluginRuntime(Moody(), nc, prefix=prefix, register=False) as runtime:
        runtime.metrics.increment("cache_hits", 3)
        m = await _metrics(nc, prefix, runtime.instance_id)
    assert m["custom"] == {"cache_hits": 3}


async def test_health_check_verdicts_reach_the_registry(nc: NATS, prefix: str, registry: RegistryService,
                                                       client: PluginRegistry, messaging: PluginMessaging) -> None:
    plugin = Moody()
    async with PluginRuntime(plugin, nc, prefix=prefix, heartbeat_interval=0.2) as runtime, \
            await messaging.subscribe_to_events("mesh.health.moody") as events:
        ident = runtime.instance_id

        async def health_is(health: Health, reason: str) -> bool:
            info = await client.get_plugin(ident)
            return info is not None and (info.health, info.health_reason) == (health, reason)

        plugin.mood = HealthCheck.degraded("cache cold")
        await eventually(lambda: health_is(Health.DEGRADED, "cache cold"), what="degraded in the registry")
        assert [i.id for i in await client.list_plugins("moody", healthy_only=True)] == [ident]  # still serves
        event = await events.next(timeout=5)
        assert (event.payload["health"], event.payload["previous"], event.payload["reason"]) == (
            "degraded", "healthy", "cache cold")

        plugin.mood = HealthCheck.unhealthy("database unreachable")
        await eventually(lambda: health_is(Health.UNHEALTHY, "database unreachable"), what="unhealthy")
        assert await client.list_plugins("moody", healthy_only=True) == []

        plugin.mood = HealthCheck(reason="raise")  # the check itself raises
        await eventually(lambda: health_is(Health.UNHEALTHY, "health_check() raised RuntimeError: sensor offline"),
                         what="a raising check counted as unhealthy")

        plugin.mood = HealthCheck.healthy()
        await eventually(lambda: health_is(Health.HEALTHY, ""), what="healthy again")
        reply = await nc.request(f"{prefix}.control.{ident}.health", b"", timeout=5)
        assert json.loads(reply.data)["health"] == "healthy"


async def test_missed_heartbeats_override_what_the_plugin_said(nc: NATS, prefix: str, registry: RegistryService,
                                                              client: PluginRegistry) -> None:
    async with PluginRuntime(Moody(), nc, prefix=prefix, heartbeat_interval=0.2) as runtime:
        assert runtime._heartbeat is not None
        runtime._heartbeat.cancel()  # the process is stuck: no more beats

        async def silent() -> bool:
            info = await client.get_plugin(runtime.instance_id)
            return info is not None and info.health == Health.UNHEALTHY and \
                info.health_reason.startswith("no heartbeat for")

        await eventually(silent, what="unhealthy for missed beats")


def test_the_proc_reading_of_resources_is_what_psutil_reads() -> None:
    # The host reads /proc/self (psutil cost ~1 MiB of its idle RSS); the figures must stay psutil's.
    import os

    import psutil

    from plugin_sdk._metrics import ResourceSampler

    sampler = ResourceSampler()
    assert sampler.process is None  # (Linux: the /proc reading, not psutil)
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        sample, proc = sampler.sample(), psutil.Process()
        with proc.oneshot():
            rss, threads, fds = proc.memory_info().rss, proc.num_threads(), proc.num_fds()
            cpu = sum(proc.cpu_times()[:2])
    finally:
        os.close(fd)
    assert abs(sampler.created - proc.create_time()) < 0.05
    assert sample["threads"] == threads and sample["open_fds"] == fds
    assert abs(sample["rss_bytes"] - rss) < 4 * 2**20  # (allocations between the two readings)
    assert abs(sample["cpu_seconds"] - cpu) < 0.05
