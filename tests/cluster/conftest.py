"""A real three-node NATS cluster (routes, JetStream R3) on loopback, and what the fault tests share.

Every test gets its own cluster (it kills nodes). The nodes' monitoring ports tell which node leads
a stream and where a client is connected; nothing here fakes a broker.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest
from nats.aio.client import Client as NATS

from mesh import NatsCluster, NatsServer, RegistryService, close, connect
from plugin_sdk import PluginError, PluginMessaging, PluginRegistry
from plugin_sdk.host import DurableKV, Retry
from tests.conftest import Mesh, eventually

#: What each fault test counted, printed in the session's summary (CI output shows it without -s).
COUNTS: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if COUNTS:
        terminalreporter.section("fault test counts")
        for line in COUNTS:
            terminalreporter.write_line(line)


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Any:
    """``report(line)``: keep a count line for the summary, under the test's name."""
    def add(line: str) -> None:
        COUNTS.append(f"{request.node.name}: {line}")
    return add


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    nodes = NatsCluster(tmp_path / "nats").start()
    try:
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
async def cnc(cluster: NatsCluster) -> AsyncIterator[NATS]:
    """The test's own connection, given every node's URL (it fails over like a plugin does)."""
    conn = await connect(cluster.urls, name="test")
    yield conn
    await close(conn)


@pytest.fixture
async def cregistry(cnc: NATS, prefix: str) -> AsyncIterator[RegistryService]:
    async with RegistryService(cnc, prefix=prefix, sweep_interval=0.2) as service:
        yield service


@pytest.fixture
async def cmesh(cluster: NatsCluster, cnc: NATS, prefix: str, tmp_path: Path,
                cregistry: RegistryService) -> AsyncIterator[Mesh]:
    m = Mesh(cluster.urls, prefix, tmp_path, PluginRegistry(cnc, prefix=prefix))
    try:
        yield m
    finally:
        await m.close()


def monitor(node: NatsServer, path: str) -> Any:
    with urllib.request.urlopen(f"http://{node.host}:{node.monitor_port}/{path}", timeout=2) as r:
        return json.loads(r.read())


def node_on_port(cluster: NatsCluster, port: int) -> NatsServer:
    return next(n for n in cluster.nodes if n.port == port)


async def stream_leader(nc: NATS, stream: str) -> str:
    info = await nc.jetstream().stream_info(stream)
    assert info.cluster is not None and info.cluster.leader, f"{stream} has no leader"
    return info.cluster.leader


async def move_leader(nc: NATS, stream: str, to: str, *, attempts: int = 10) -> None:
    """Make server ``to`` lead ``stream`` (step-downs asking for it as preferred; bounded)."""
    for _ in range(attempts):
        if await stream_leader(nc, stream) == to:
            return
        await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}",
                         json.dumps({"placement": {"preferred": to}}).encode(), timeout=5)
        await eventually(lambda: _has_leader(nc, stream), timeout=15, what=f"a new leader of {stream}")
    raise AssertionError(f"{to} did not become the leader of {stream} in {attempts} step-downs")


async def _has_leader(nc: NATS, stream: str) -> bool:
    try:
        info = await nc.jetstream().stream_info(stream)
    except (PluginError, OSError, TimeoutError, Exception):
        return False
    return bool(info.cluster and info.cluster.leader)


@dataclass
class Tally:
    """What traffic saw, counted: every outcome is an answer or a typed error."""

    answered: int = 0
    typed_errors: dict[str, int] = field(default_factory=dict)
    untyped: list[str] = field(default_factory=list)
    acked: dict[str, Any] = field(default_factory=dict)  # key -> value the plugin acknowledged storing

    def error(self, exc: BaseException) -> None:
        if isinstance(exc, PluginError):
            name = type(exc).__name__
            self.typed_errors[name] = self.typed_errors.get(name, 0) + 1
        else:
            self.untyped.append(f"{type(exc).__name__}: {exc}")

    @property
    def failed(self) -> int:
        return sum(self.typed_errors.values()) + len(self.untyped)

    def line(self, what: str) -> str:
        return (f"{what}: {self.answered} answered, {self.failed} failed "
                f"(typed {self.typed_errors}, untyped {len(self.untyped)}), {len(self.acked)} writes acknowledged")


async def put_traffic(messaging: PluginMessaging, tally: Tally, stop: asyncio.Event, *, prefix: str = "k",
                      timeout: float = 5.0, workers: int = 4) -> None:
    """Continuous acknowledged writes through the keeper plugin until ``stop``; counts everything."""
    counter = 0

    async def worker(w: int) -> None:
        nonlocal counter
        while not stop.is_set():
            counter += 1
            key, value = f"{prefix}{w}-{counter}", counter
            try:
                await messaging.send_message("keeper", {"key": key, "value": value}, operation="put",
                                             timeout=timeout)
            except Exception as exc:
                tally.error(exc)
            else:
                tally.answered += 1
                tally.acked[key] = value

    await asyncio.gather(*(worker(w) for w in range(workers)))


async def missing_writes(nc: NATS, bucket: str, acked: dict[str, Any]) -> list[str]:
    """The acknowledged keys whose value is not in ``bucket`` now (read straight from JetStream KV)."""
    # Read as a plugin would, through an election if one is still going on (a node just back).
    retry = Retry(within=30)
    kv = DurableKV(await retry.run(lambda n: nc.jetstream().key_value(bucket), what=f"open {bucket}"), retry)
    missing = []
    for key, value in acked.items():
        try:
            got = json.loads((await kv.get(key)).value or b"null")
        except nats.js.errors.KeyNotFoundError:
            got = "<absent>"
        if got != value:
            missing.append(f"{key}={value!r} (found {got!r})")
    return missing
