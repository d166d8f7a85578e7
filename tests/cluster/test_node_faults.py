"""Faults of a three-node cluster, survived: a node killed under a plugin, rolling restarts,
compare-and-set while nodes die. Every request is answered or fails typed; every acknowledged
write is there afterwards. The counts are printed in the session summary ("fault test counts")."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.client import Client as NATS

from mesh import NatsCluster
from plugin_sdk import PluginMessaging
from plugin_sdk.host import Subjects
from tests.cluster.conftest import Tally, missing_writes, move_leader, node_on_port, put_traffic, stream_leader
from tests.conftest import Mesh, eventually

KEEPER = "clusterplugins:Keeper"


async def test_killing_the_node_a_plugin_uses_and_its_bucket_leader_loses_no_acknowledged_write(
        cluster: NatsCluster, cnc: NATS, cmesh: Mesh, prefix: str, report: Any) -> None:
    keeper = await cmesh.spawn(KEEPER)
    messaging = PluginMessaging(cnc, prefix=prefix, source="test")
    bucket = Subjects(prefix).state_bucket("keeper")
    where = (await messaging.send_message("keeper", {}, operation="where")).result["port"]
    doomed = node_on_port(cluster, where)
    await move_leader(cnc, f"KV_{bucket}", doomed.name)  # the node it uses also leads its bucket

    tally, stop = Tally(), asyncio.Event()
    traffic = asyncio.ensure_future(put_traffic(messaging, tally, stop))
    await eventually(lambda: _at_least(tally, 50), what="traffic before the kill")
    before = tally.answered
    doomed.kill()
    # It fails over: answering again, from another node, with another leader for its bucket.
    try:
        await eventually(lambda: _at_least(tally, before + 100), timeout=60, what="answers after the kill")
    except AssertionError as exc:  # (seen once, on 3.13 in a loaded CI run: say what the caller and the plugin saw)
        raise AssertionError(f"{exc}; {tally.line('after the kill')}; the keeper's log ends: "
                             f"{keeper.log_text()[-3000:]}") from None
    finally:
        stop.set()
        await asyncio.wait_for(traffic, 30)
    report(tally.line("kill -9 of the plugin's node, leading its bucket"))

    moved = (await messaging.send_message("keeper", {}, operation="where")).result["port"]
    assert moved != doomed.port
    assert await stream_leader(cnc, f"KV_{bucket}") != doomed.name
    assert keeper.proc.returncode is None, keeper.log_text()  # the same process, not a restart
    assert not tally.untyped, tally.untyped[:5]
    assert await missing_writes(cnc, bucket, tally.acked) == []
    assert tally.answered > before + 100


async def _at_least(tally: Tally, n: int) -> bool:
    return tally.answered >= n


async def test_a_rolling_restart_of_every_node_under_traffic_loses_nothing_silently(
        cluster: NatsCluster, cnc: NATS, cmesh: Mesh, prefix: str, report: Any) -> None:
    await cmesh.spawn(KEEPER)
    await cmesh.spawn(KEEPER)
    messaging = PluginMessaging(cnc, prefix=prefix, source="test")
    bucket = Subjects(prefix).state_bucket("keeper")
    tally, stop = Tally(), asyncio.Event()
    published = 0

    async def events() -> None:
        nonlocal published
        while not stop.is_set():
            try:
                await messaging.publish_event("tick.rolling", {"n": published})
                published += 1
            except Exception as exc:
                tally.error(exc)
            await asyncio.sleep(0.01)

    traffic = asyncio.gather(put_traffic(messaging, tally, stop), events())
    await eventually(lambda: _at_least(tally, 30), what="traffic before the restarts")
    for node in cluster.nodes:  # one at a time: stop, start again, healthy, then the next
        before = tally.answered
        node.stop()
        node.start()
        await asyncio.to_thread(cluster.wait_healthy, timeout=60)
        await eventually(lambda b=before: _at_least(tally, b + 30), timeout=60,
                         what=f"answers after restarting {node.name}")
    stop.set()
    await asyncio.wait_for(traffic, 30)
    reports = [(await messaging.send_message(f"keeper.{p.info.id}", {}, operation="report")).result
               for p in cmesh.procs if p.info is not None]
    received = sum(r["events"] for r in reports)
    report(tally.line("rolling restart of 3 nodes") + f"; events: {published} published, {received} received "
           "by 2 instances (core NATS events are at most once: not asserted)")
    assert not tally.untyped, tally.untyped[:5]
    assert await missing_writes(cnc, bucket, tally.acked) == []
    assert received > 0


async def test_compare_and_set_from_three_processes_while_nodes_are_killed_counts_exactly(
        cluster: NatsCluster, cnc: NATS, cmesh: Mesh, prefix: str, report: Any) -> None:
    for _ in range(3):
        await cmesh.spawn(KEEPER)
    messaging = PluginMessaging(cnc, prefix=prefix, source="test")
    bucket = Subjects(prefix).state_bucket("keeper")
    tally, stop = Tally(), asyncio.Event()

    async def worker() -> None:
        while not stop.is_set():
            try:  # the caller's timeout outlasts the plugin's retries: no increment is left running unseen
                await messaging.send_message("keeper", {"key": "n"}, operation="incr", timeout=40)
            except Exception as exc:
                tally.error(exc)
            else:
                tally.answered += 1

    traffic = asyncio.gather(*(worker() for _ in range(6)))
    await eventually(lambda: _at_least(tally, 20), what="increments before the kills")
    for node in (cluster.nodes[0], cluster.nodes[2], cluster.nodes[1]):
        before = tally.answered
        node.kill()
        await eventually(lambda b=before: _at_least(tally, b + 10), timeout=60, what=f"increments without {node.name}")
        node.start()
        await asyncio.to_thread(cluster.wait_healthy, timeout=60)
    stop.set()
    await asyncio.wait_for(traffic, 60)

    reports = [(await messaging.send_message(f"keeper.{p.info.id}", {}, operation="report")).result
               for p in cmesh.procs if p.info is not None]
    successes = sorted((value, revision) for r in reports for value, revision in r["successes"])
    kv = await cnc.jetstream().key_value(bucket)
    final = int((await kv.get("n")).value or b"0")
    report(tally.line("compare-and-set under node kills") + f"; {len(successes)} successful CAS in 3 processes, "
           f"final value {final}")
    assert final == len(successes)
    assert [v for v, _ in successes] == list(range(1, final + 1))  # each value set by exactly one CAS
    revisions = [r for _, r in successes]
    assert revisions == sorted(set(revisions))  # strictly increasing with the value
    assert not tally.untyped, tally.untyped[:5]


async def test_a_plugin_given_one_url_fails_over_to_a_server_the_cluster_advertised(
        cluster: NatsCluster, cnc: NATS, cmesh: Mesh, prefix: str) -> None:
    only = cluster.nodes[0]
    cmesh.url = only.url  # this plugin host knows one server; the cluster tells it of the others
    keeper = await cmesh.spawn(KEEPER)
    messaging = PluginMessaging(cnc, prefix=prefix, source="test")
    assert (await messaging.send_message("keeper", {}, operation="where")).result["port"] == only.port
    only.kill()

    async def elsewhere() -> int | None:
        try:
            port = (await messaging.send_message("keeper", {}, operation="where", timeout=2)).result["port"]
        except Exception:
            return None
        return port if port != only.port else None

    moved = await eventually(elsewhere, timeout=60, what="the plugin answering through another node")
    assert moved in {n.port for n in cluster.nodes[1:]}
    assert keeper.proc.returncode is None
    # (its bucket may be electing a leader: the write waits for one, up to the plugin's retry_for)
    assert await messaging.send_message("keeper", {"key": "after", "value": 1}, operation="put", timeout=40)
