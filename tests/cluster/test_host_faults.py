"""Faults of the plugin hosts themselves, on a real three-node cluster: a `mesh run` child killed
mid-traffic (its agent restarts it; nothing acknowledged is lost, nothing hangs), and a whole
`mesh agent` killed (its instances are gone or unhealthy, and none of its children is left)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from nats.aio.client import Client as NATS

from mesh import NatsCluster, RegistryService, close, connect
from mesh._agent import Agent
from plugin_sdk import PluginError, PluginInfo, PluginMessaging, PluginRegistry
from plugin_sdk.host import Subjects
from tests.cluster.conftest import Tally, missing_writes
from tests.conftest import HEARTBEAT, ROOT, TEST_PLUGINS, child_env, eventually, healthy, mesh_cli

KEEPER = "clusterplugins:Keeper"
#: The callers' timeout; a send that has not ended this long after it is a hang.
TIMEOUT = 3.0
HANG_AFTER = TIMEOUT + 5


@pytest.fixture
async def agent(cluster: NatsCluster, prefix: str, tmp_path: Path, cregistry: RegistryService,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Agent]:
    """An in-process agent on its own connection (every node's URL), as `mesh agent` runs one."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(TEST_PLUGINS)]))  # for its children
    monkeypatch.syspath_prepend(str(TEST_PLUGINS))  # the agent imports a ref to check it first
    nc = await connect(cluster.urls, name="agent")
    try:
        async with Agent(nc, nats_url=cluster.urls, name="near", prefix=prefix, data_dir=tmp_path / "agent",
                         heartbeat_interval=HEARTBEAT, backoff_base=0.05, backoff_max=0.5, cwd=tmp_path) as a:
            yield a
    finally:
        await close(nc)


class Traffic:
    """4 workers of acknowledged writes through ``keeper``; each send bounded, a hang counted as one."""

    def __init__(self, messaging: PluginMessaging) -> None:
        self.messaging = messaging
        self.tally = Tally()
        self.hangs = 0
        self.stop = asyncio.Event()
        self._counter = 0
        self._task: asyncio.Future[Any] | None = None

    async def _worker(self, w: int) -> None:
        while not self.stop.is_set():
            self._counter += 1
            key, value = f"k{w}-{self._counter}", self._counter
            try:
                await asyncio.wait_for(self.messaging.send_message(
                    "keeper", {"key": key, "value": value}, operation="put", timeout=TIMEOUT), HANG_AFTER)
            except TimeoutError as exc:
                if isinstance(exc, PluginError):  # RequestTimeout is a TimeoutError too: typed, in time
                    self.tally.error(exc)
                else:
                    self.hangs += 1
                    self.tally.untyped.append(f"hang: no outcome {HANG_AFTER:g}s after a {TIMEOUT:g}s send")
            except Exception as exc:
                self.tally.error(exc)
            else:
                self.tally.answered += 1
                self.tally.acked[key] = value

    def start(self) -> None:
        self._task = asyncio.gather(*(self._worker(w) for w in range(4)))

    async def finish(self) -> None:
        self.stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, HANG_AFTER + 5)

    async def answered(self, n: int) -> bool:
        return self.tally.answered >= n


async def test_a_plugin_host_killed_mid_traffic_is_restarted_and_loses_no_acknowledged_write(
        cnc: NATS, agent: Agent, prefix: str, report: Any) -> None:
    client = PluginRegistry(cnc, prefix=prefix)
    ids = await agent.load(KEEPER, instances=2)
    for ident in ids:
        await healthy(client, ident)
    doomed, spared = ids
    proc = agent.placements[doomed].proc
    assert proc is not None
    info = await client.get_plugin(doomed)
    assert info is not None and info.pid == proc.pid  # the registry's pid is the agent's child

    traffic = Traffic(PluginMessaging(cnc, prefix=prefix, source="test"))
    traffic.start()
    try:
        await eventually(lambda: traffic.answered(50), what="traffic before the kill")
        os.kill(proc.pid, signal.SIGKILL)
        restarted = await healthy(client, doomed, restarts=1)
        after_restart = traffic.tally.answered
        await eventually(lambda: traffic.answered(after_restart + 100), timeout=30, what="answers after the restart")
    finally:
        await traffic.finish()
    tally = traffic.tally
    report(tally.line("kill -9 of one of 2 keeper hosts") + f"; {traffic.hangs} hangs; "
           f"{after_restart} answered when it was healthy again, {tally.answered} at the end")

    assert restarted.pid != proc.pid and restarted.last_error.startswith("killed by SIGKILL"), restarted
    assert (await healthy(client, spared)).pid == agent.placements[spared].proc.pid  # type: ignore[union-attr]
    assert traffic.hangs == 0
    assert not tally.untyped, tally.untyped[:5]
    assert await missing_writes(cnc, Subjects(prefix).state_bucket("keeper"), tally.acked) == []
    assert tally.answered >= after_restart + 100
    # Both instances answer again, the restarted one included.
    replies = {(await PluginMessaging(cnc, prefix=prefix, source="test").send_message(
        f"keeper.{ident}", {"key": "k0-1"}, operation="get", timeout=TIMEOUT)).result for ident in ids}
    assert len(replies) == 1


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_a_killed_agent_leaves_no_instance_serving_and_no_child_running(
        cluster: NatsCluster, cnc: NATS, cregistry: RegistryService, prefix: str, tmp_path: Path,
        report: Any) -> None:
    client = PluginRegistry(cnc, prefix=prefix)
    log = tmp_path / "far.log"
    with log.open("wb") as out:
        far = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh", "agent", "--name", "far", "--nats", cluster.urls, "--prefix", prefix,
            "--heartbeat-interval", str(HEARTBEAT), "--data-dir", str(tmp_path / "far"), cwd=tmp_path,
            env=child_env(), stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        async def listed() -> bool:
            if far.returncode is not None:
                raise AssertionError(f"mesh agent exited with {far.returncode}: {log.read_text()}")
            r = await mesh_cli("agents", "--json", url=cluster.urls, prefix=prefix)
            return r.code == 0 and any(a["agent"] == "far" for a in json.loads(r.out or "[]"))

        await eventually(listed, timeout=30, what="agent far to answer")
        r = await mesh_cli("load", KEEPER, "--instances", "2", "--on", "far", url=cluster.urls, prefix=prefix)
        assert r.code == 0, r.err
        ids = json.loads(r.out)["instances"]
        infos = [await healthy(client, ident) for ident in ids]
        assert {i.agent for i in infos} == {"far"}
        pids = [i.pid for i in infos]
        assert all(pid is not None and psutil.Process(pid).ppid() == far.pid for pid in pids)

        far.kill()  # SIGKILL: no stop, no unload; only the children's parent-death signal is left
        await asyncio.wait_for(far.wait(), 10)

        async def not_serving() -> tuple[list[PluginInfo]] | None:
            infos = [i for i in await client.list_plugins("keeper") if i.id in ids]
            return (infos,) if all(i.health != "healthy" for i in infos) else None  # (a tuple: [] is an answer)

        (left,) = await eventually(not_serving, timeout=30, what="the killed agent's instances to go")
        await eventually(lambda: _none_alive(pids), timeout=30, what="the killed agent's children to exit")
        r = await mesh_cli("ls", "--json", url=cluster.urls, prefix=prefix)
        assert r.code == 0, r.err
        shown = {row["id"]: row["health"] for row in json.loads(r.out)}
        report(f"agent far (2 keeper instances) killed with SIGKILL: registry then showed "
               f"{ {i.id: i.health.value for i in left} or 'none of them'}; mesh ls: {shown or 'empty'}")
        assert all(shown.get(ident, "gone") != "healthy" for ident in ids), shown
        assert not [pid for pid in pids if pid is not None and _alive(pid)]
    finally:
        if far.returncode is None:
            far.kill()
            await far.wait()


async def _none_alive(pids: list[int | None]) -> bool:
    return not any(pid is not None and _alive(pid) for pid in pids)
