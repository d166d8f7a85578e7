#!/usr/bin/env python
"""groundhog mesh at scale: N plugin hosts on one machine, and request/reply across a 3-node cluster.

Run from the repository root::

    python bench/bench_scale.py                     # N = 10, 30, 100 and the 3-node part (~2 minutes on 2 cores)
    python bench/bench_scale.py --quick             # N = 10, 30 and fewer samples (~40 seconds)
    python bench/bench_scale.py --sizes 10,30,100 --json bench/results-scale.json

Part 1, for each N in ``--sizes`` (a fresh mesh prefix and ``mesh registry`` process per N, on one
embedded nats-server with JetStream on a free port and a temporary store):

1. startup: ``N`` ``python -m mesh run examples.echo:Echo`` processes are launched at once; the time
   until all N are registered healthy, polled through ``PluginRegistry.list_plugins()`` (also the
   first one healthy, the CPU each host spent getting there, and, as a reference, the time until N
   raw nats-py responder processes all answer);
2. registry ``list_plugins()`` latency (every instance, ``--lists`` sequential calls);
3. broadcast gather: ``PluginMessaging.broadcast_message(target="echo")``, checked that all N
   replied, against a raw nats-py publish + gather of N replies from the N raw responders,
   alternating (``--broadcasts`` each);
4. memory per host: RSS and USS (psutil) of each host process, mean and max (and the raw responders,
   the registry and nats-server for reference), and the mesh's idle CPU (heartbeats) over ``--idle`` s;
5. the time for all N hosts to stop after SIGTERM.

Part 2 (skipped with ``--no-cluster``): a 3-node ``NatsCluster``; one raw nats-py echo process and
one mesh echo host connect to node 0 only; requesters connect to node 0 (same node) or to node 1
(across the route); sequential request/reply latency for raw ``nc.request`` and mesh
``send_message``, rotating the order of the four sides each round.

Every process is started by this one, with a timeout on every wait; all of them are stopped on
every path (SIGTERM, then SIGKILL; leftovers of this process's tree are killed at the end), and
``--time-limit`` bounds the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import nats
import nats.errors
import psutil
from nats.aio.client import Client as NATS

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import mesh  # noqa: E402
from bench import (  # noqa: E402
    PAYLOAD,
    RAW_BODY,
    Children,
    Interrupted,
    _on_signal,
    check_interrupted,
    fmt,
    machine_info,
    percentile,
    progress,
    sequential,
    wait_for,
    workspace,
)
from plugin_sdk import CommunicationError, PluginInfo, PluginMessaging, PluginRegistry  # noqa: E402
from plugin_sdk.host import NatsCluster, NatsServer  # noqa: E402

ECHO_REF = "examples.echo:Echo"
# The raw responder: nats-py only (no mesh, no plugin_sdk imported), replies the same bytes from the
# callback, until SIGTERM. Run as `python -c RAW_ECHO URL SUBJECT`, so its memory is nats-py's own.
RAW_ECHO = """
import asyncio, signal, sys
import nats

async def main(url, subject):
    nc = await nats.connect(url, name="bench-scale raw-echo")

    async def on_msg(msg):
        await nc.publish(msg.reply, msg.data)

    await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await nc.drain()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""
REQUEST_TIMEOUT = 10.0
MIB = 1024 * 1024


@dataclass
class Counts:
    sizes: tuple[int, ...] = (10, 30, 100)
    lists: int = 200  # sequential list_plugins() calls per size
    broadcasts: int = 60  # broadcasts per side and size (raw and mesh alternate)
    idle: float = 5.0  # seconds of idle CPU measured per size
    rounds: int = 4  # cluster: rounds over the four sides
    seq: int = 1000  # cluster: sequential requests per round and side
    warmup: int = 100  # cluster: warm-up requests per side


QUICK = Counts(sizes=(10, 30), lists=100, broadcasts=15, idle=3.0, rounds=2, seq=300, warmup=50)


# ---------------------------------------------------------------------------------------------
# Part 1: N hosts on one machine


@dataclass
class SizeResult:
    n: int
    startup_all_s: float = math.nan  # launch → all N healthy at once
    startup_first_s: float = math.nan  # launch → first healthy
    startup_median_s: float = math.nan  # launch → half of them healthy
    startup_cpu_s: list[float] = field(default_factory=list)  # per host: CPU (user+sys) when all were healthy
    flaps: int = 0  # instances seen unhealthy after having been healthy, during startup
    raw_startup_s: float = math.nan  # launch → N raw nats-py responders all answer a gather
    list_latency: list[float] = field(default_factory=list)
    list_bytes: int = 0
    list_registry_cpu_s: float = math.nan  # registry CPU per list_plugins() call, less its idle rate
    bcast_mesh: list[float] = field(default_factory=list)
    bcast_raw: list[float] = field(default_factory=list)
    # CPU per broadcast over the measured broadcasts, seconds: every host together, every raw
    # responder together, the registry (both less their idle rate), and this client (process_time
    # around each gather)
    bcast_cpu: dict[str, float] = field(default_factory=dict)
    rss: list[int] = field(default_factory=list)  # per host, bytes
    uss: list[int] = field(default_factory=list)
    raw_rss: list[int] = field(default_factory=list)
    raw_uss: list[int] = field(default_factory=list)
    registry_rss: int = 0
    server_rss: int = 0
    idle_cpu: dict[str, float] = field(default_factory=dict)  # % of one core, over the idle window
    stop_s: float = math.nan  # SIGTERM to every host → all exited


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` (its main thread's and all its threads'): ``/proc/PID/schedstat`` (ns, exact)
    where the kernel has it, else user+sys from psutil (in 10 ms clock ticks: too coarse for one
    idle process over a few seconds)."""
    try:
        total = 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return math.nan
    return float(t.user + t.system)


def memory(pid: int) -> tuple[int, int]:
    """(RSS, USS) of ``pid``, in bytes."""
    m = psutil.Process(pid).memory_full_info()
    return int(m.rss), int(m.uss)


async def raw_gather(nc: NATS, subject: str, n: int, timeout: float) -> int:
    """Publish one request on ``subject`` and count the replies until ``n`` came or ``timeout``."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(subject, RAW_BODY, reply=inbox)
        got = 0
        deadline = time.monotonic() + timeout
        with contextlib.suppress(nats.errors.TimeoutError):
            while got < n:
                await sub.next_msg(timeout=max(0.001, deadline - time.monotonic()))
                got += 1
        return got
    finally:
        await sub.unsubscribe()


@dataclass
class ScaleBench:
    counts: Counts
    server: NatsServer
    children: Children
    results: list[SizeResult] = field(default_factory=list)

    async def run(self) -> None:
        nc = await mesh.connect(self.server.url, name="bench-scale client", wait=10)
        raw_nc = await nats.connect(self.server.url, name="bench-scale raw client")
        try:
            for n in self.counts.sizes:
                result = SizeResult(n)
                self.results.append(result)
                await self.one_size(nc, raw_nc, result)
        finally:
            await raw_nc.close()
            await mesh.close(nc)

    async def one_size(self, nc: Any, raw_nc: NATS, r: SizeResult) -> None:
        c, ch, n = self.counts, self.children, r.n
        prefix = f"scale{n}x{secrets.token_hex(2)}"
        raw_subject = f"raw{prefix}.bcast"
        registry = PluginRegistry(nc, prefix=prefix)
        messaging = PluginMessaging(nc, prefix=prefix, source="bench-scale", registry=registry,
                                    default_timeout=REQUEST_TIMEOUT)
        reg_name = f"registry-{n}"
        hosts = [f"echo-{n}-{i}" for i in range(n)]
        raws = [f"raw-{n}-{i}" for i in range(n)]
        ch.mesh_registry(reg_name, prefix)
        try:
            async def registry_serves() -> bool:
                await registry.list_plugins(timeout=1.0)
                return True

            await wait_for(f"mesh registry on {prefix}", registry_serves, ch, 30)
            progress(f"N={n}: launching {n} hosts")
            await self.startup(registry, r, hosts, prefix)
            progress(f"N={n}: all healthy after {r.startup_all_s:.1f}s; launching {n} raw responders")
            await self.raw_startup(raw_nc, r, raws, raw_subject)
            await asyncio.sleep(2.0)  # let the hosts' post-start work settle before measuring
            await self.idle(r, hosts, reg_name)
            for name in hosts:
                rss, uss = memory(ch.procs[name].pid)
                r.rss.append(rss)
                r.uss.append(uss)
            for name in raws:
                rss, uss = memory(ch.procs[name].pid)
                r.raw_rss.append(rss)
                r.raw_uss.append(uss)
            r.registry_rss = memory(ch.procs[reg_name].pid)[0]
            assert self.server.pid is not None
            r.server_rss = memory(self.server.pid)[0]

            async def lookup() -> object:
                return await registry.list_plugins(timeout=REQUEST_TIMEOUT)

            infos = await registry.list_plugins(timeout=REQUEST_TIMEOUT)
            r.list_bytes = len(json.dumps([i.model_dump(mode="json") for i in infos], separators=(",", ":")))
            await sequential(lookup, max(10, c.lists // 10))
            reg_cpu, t0 = cpu_seconds(ch.procs[reg_name].pid), time.monotonic()
            r.list_latency, _ = await sequential(lookup, c.lists)
            heartbeats = r.idle_cpu.get("registry", 0.0) / 100 * (time.monotonic() - t0)  # spent anyway
            r.list_registry_cpu_s = (cpu_seconds(ch.procs[reg_name].pid) - reg_cpu - heartbeats) / c.lists
            progress(f"N={n}: list_plugins p50 {percentile(r.list_latency, 50) * 1e6:,.0f} µs; broadcasting")
            await self.broadcast(messaging, raw_nc, r, raw_subject)
        finally:
            started = time.monotonic()
            ch.stop([h for h in hosts if h in ch.procs], timeout=30 + n * 0.3)
            r.stop_s = time.monotonic() - started
            ch.stop([*raws, reg_name])

    async def startup(self, registry: PluginRegistry, r: SizeResult, hosts: list[str], prefix: str) -> None:
        ch, n = self.children, r.n
        started = time.monotonic()
        for name in hosts:
            ch.mesh_run(name, ECHO_REF, prefix)
        pids = {ch.procs[name].pid: name for name in hosts}
        first_healthy: dict[int, float] = {}
        was_healthy: set[int] = set()
        deadline = started + 60 + 2.0 * n
        while True:
            check_interrupted()
            ch.check()
            infos: list[PluginInfo] = []
            with contextlib.suppress(CommunicationError, nats.errors.Error, TimeoutError):
                infos = await registry.list_plugins(timeout=2.0)
            now = time.monotonic() - started
            healthy = {i.pid for i in infos if i.pid in pids and i.health == "healthy"}
            for pid in healthy:
                first_healthy.setdefault(pid, now)
            r.flaps += len(was_healthy - healthy) if infos else 0
            was_healthy = healthy if infos else was_healthy
            if len(healthy) == n:
                r.startup_all_s = now
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"N={n}: {len(healthy)} of {n} hosts healthy after {now:.0f}s")
            await asyncio.sleep(0.1)
        r.startup_cpu_s = [cpu_seconds(pid) for pid in pids]
        times = sorted(first_healthy.values())
        r.startup_first_s = times[0]
        r.startup_median_s = times[len(times) // 2]

    async def raw_startup(self, raw_nc: NATS, r: SizeResult, raws: list[str], subject: str) -> None:
        ch, n = self.children, r.n
        started = time.monotonic()
        for name in raws:
            ch.spawn(name, ["-c", RAW_ECHO, ch.url, subject])

        async def all_answer() -> bool:
            return await raw_gather(raw_nc, subject, n, timeout=0.3) >= n

        await wait_for(f"{n} raw responders", all_answer, ch, 60 + 1.0 * n, interval=0.05)
        r.raw_startup_s = time.monotonic() - started

    async def idle(self, r: SizeResult, hosts: list[str], reg_name: str) -> None:
        ch = self.children
        assert self.server.pid is not None
        groups = {"hosts": [ch.procs[h].pid for h in hosts], "registry": [ch.procs[reg_name].pid],
                  "nats-server": [self.server.pid]}
        before = {g: sum(cpu_seconds(p) for p in pids) for g, pids in groups.items()}
        t0 = time.monotonic()
        await asyncio.sleep(self.counts.idle)
        elapsed = time.monotonic() - t0
        r.idle_cpu = {g: 100 * (sum(cpu_seconds(p) for p in pids) - before[g]) / elapsed
                      for g, pids in groups.items()}

    async def broadcast(self, messaging: PluginMessaging, raw_nc: NATS, r: SizeResult, subject: str) -> None:
        n, clock, ch = r.n, time.perf_counter, self.children
        client_cpu = {"mesh client": 0.0, "raw client": 0.0}

        async def mesh_once() -> float:
            t, cpu = clock(), time.process_time()
            result = await messaging.broadcast_message(PAYLOAD, target="echo", timeout=REQUEST_TIMEOUT)
            elapsed = clock() - t
            client_cpu["mesh client"] += time.process_time() - cpu
            if len(result) != n or result.missing:
                raise RuntimeError(f"N={n}: mesh broadcast gathered {len(result)} of {n} replies "
                                   f"(missing {result.missing})")
            return elapsed

        async def raw_once() -> float:
            t, cpu = clock(), time.process_time()
            got = await raw_gather(raw_nc, subject, n, timeout=REQUEST_TIMEOUT)
            elapsed = clock() - t
            client_cpu["raw client"] += time.process_time() - cpu
            if got != n:
                raise RuntimeError(f"N={n}: raw broadcast gathered {got} of {n} replies")
            return elapsed

        for _ in range(3):  # warm-up
            await mesh_once()
            await raw_once()
        groups = {"hosts": [p.pid for name, p in ch.procs.items() if name.startswith(f"echo-{n}-")],
                  "raw responders": [p.pid for name, p in ch.procs.items() if name.startswith(f"raw-{n}-")],
                  "registry": [ch.procs[f"registry-{n}"].pid]}
        before = {g: sum(cpu_seconds(p) for p in pids) for g, pids in groups.items()}
        client_cpu.update({k: 0.0 for k in client_cpu})
        t0 = time.monotonic()
        for i in range(self.counts.broadcasts):
            check_interrupted()
            if i % 2 == 0:
                r.bcast_mesh.append(await mesh_once())
                r.bcast_raw.append(await raw_once())
            else:
                r.bcast_raw.append(await raw_once())
                r.bcast_mesh.append(await mesh_once())
        count, wall = self.counts.broadcasts, time.monotonic() - t0
        # Less what the hosts and the registry spend anyway (heartbeats), at the idle rate measured before.
        r.bcast_cpu = {g: (sum(cpu_seconds(p) for p in pids) - before[g] - r.idle_cpu.get(g, 0.0) / 100 * wall) / count
                       for g, pids in groups.items()}
        r.bcast_cpu.update({k: v / count for k, v in client_cpu.items()})


# ---------------------------------------------------------------------------------------------
# Part 2: three nodes, within and across


SIDES = ("raw same node", "raw across nodes", "mesh same node", "mesh across nodes")


@dataclass
class ClusterResult:
    latency: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SIDES})
    connected: dict[str, str] = field(default_factory=dict)


async def cluster_bench(counts: Counts, cluster: NatsCluster, children: Children, out: ClusterResult) -> None:
    node0, node1 = cluster.nodes[0].url, cluster.nodes[1].url
    prefix = f"cl{secrets.token_hex(3)}"
    raw_subject = f"raw{prefix}.echo"
    ch = children  # its url is node 0's: the responders and the registry connect to node 0 only
    ch.mesh_registry("cluster-registry", prefix)
    ch.mesh_run("cluster-echo", ECHO_REF, prefix)
    ch.spawn("cluster-raw-echo", ["-c", RAW_ECHO, ch.url, raw_subject])
    conns: list[tuple[Any, Callable[[], Awaitable[None]]]] = []  # (connection, its close)
    try:
        raw_same = await nats.connect(node0, name="bench-scale raw same")
        conns.append((raw_same, raw_same.close))
        raw_across = await nats.connect(node1, name="bench-scale raw across")
        conns.append((raw_across, raw_across.close))
        mesh_same = await mesh.connect(node0, name="bench-scale mesh same", wait=10)
        conns.append((mesh_same, lambda: mesh.close(mesh_same)))
        mesh_across = await mesh.connect(node1, name="bench-scale mesh across", wait=10)
        conns.append((mesh_across, lambda: mesh.close(mesh_across)))
        for side, conn in zip(SIDES, (raw_same, raw_across, mesh_same, mesh_across), strict=True):
            out.connected[side] = str(conn.connected_url.netloc if conn.connected_url else "?")
        registry = PluginRegistry(mesh_same, prefix=prefix)
        m_same = PluginMessaging(mesh_same, prefix=prefix, source="bench-same", default_timeout=REQUEST_TIMEOUT)
        m_across = PluginMessaging(mesh_across, prefix=prefix, source="bench-across", default_timeout=REQUEST_TIMEOUT)

        async def echo_healthy() -> bool:
            return bool(await registry.list_plugins("echo", healthy_only=True, timeout=1.0))

        async def raw_answers() -> bool:
            await raw_across.request(raw_subject, b"ping", timeout=0.5)
            await raw_same.request(raw_subject, b"ping", timeout=0.5)
            return True

        async def mesh_answers() -> bool:
            await m_across.send_message("echo", PAYLOAD, timeout=0.5)
            return True

        await wait_for("the cluster's echo host", echo_healthy, ch, 60)
        await wait_for("the cluster's raw echo", raw_answers, ch, 30)
        await wait_for("the mesh echo from node 1", mesh_answers, ch, 30)

        def raw_op(conn: NATS) -> Callable[[], Awaitable[object]]:
            async def op() -> object:
                return await conn.request(raw_subject, RAW_BODY, timeout=REQUEST_TIMEOUT)
            return op

        def mesh_op(messaging: PluginMessaging) -> Callable[[], Awaitable[object]]:
            async def op() -> object:
                return await messaging.send_message("echo", PAYLOAD)
            return op

        ops = dict(zip(SIDES, (raw_op(raw_same), raw_op(raw_across), mesh_op(m_same), mesh_op(m_across)),
                       strict=True))
        for op in ops.values():
            await sequential(op, counts.warmup)
        for rnd in range(counts.rounds):
            order = SIDES[rnd % 4:] + SIDES[:rnd % 4]
            for side in order:
                latencies, _ = await sequential(ops[side], counts.seq)
                out.latency[side] += latencies
            progress(f"cluster round {rnd + 1}/{counts.rounds}")
    finally:
        for _, close_conn in reversed(conns):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(close_conn(), 10)
        ch.stop(["cluster-echo"])
        ch.stop()


# ---------------------------------------------------------------------------------------------
# Reporting


def mean(values: list[float] | list[int]) -> float:
    return sum(values) / len(values) if values else math.nan


def pct(samples: list[float], q: float, scale: float = 1e6) -> float:
    return percentile(samples, q) * scale if samples else math.nan


def scale_rows(results: list[SizeResult]) -> list[tuple[str, str, list[float]]]:
    """(measure, unit, one value per size)."""
    def row(measure: str, unit: str, fn: Callable[[SizeResult], float]) -> tuple[str, str, list[float]]:
        return measure, unit, [fn(r) for r in results]

    return [
        row("startup: all N healthy", "s", lambda r: r.startup_all_s),
        row("startup: first healthy", "s", lambda r: r.startup_first_s),
        row("startup: half healthy", "s", lambda r: r.startup_median_s),
        row("startup: CPU per host (mean)", "s", lambda r: mean(r.startup_cpu_s)),
        row("startup: N x CPU per host / cores", "s",
            lambda r: sum(r.startup_cpu_s) / (psutil.cpu_count() or 1)),
        row("startup: health flaps seen", "", lambda r: r.flaps),
        row("startup raw nats-py: all N answer", "s", lambda r: r.raw_startup_s),
        row("list_plugins() p50", "us", lambda r: pct(r.list_latency, 50)),
        row("list_plugins() p95", "us", lambda r: pct(r.list_latency, 95)),
        row("list_plugins() reply size", "KiB", lambda r: r.list_bytes / 1024),
        row("list_plugins() registry CPU per call", "us", lambda r: r.list_registry_cpu_s * 1e6),
        row("broadcast gather mesh p50", "us", lambda r: pct(r.bcast_mesh, 50)),
        row("broadcast gather mesh p95", "us", lambda r: pct(r.bcast_mesh, 95)),
        row("broadcast gather raw p50", "us", lambda r: pct(r.bcast_raw, 50)),
        row("broadcast gather raw p95", "us", lambda r: pct(r.bcast_raw, 95)),
        row("broadcast mesh/raw p50", "x", lambda r: pct(r.bcast_mesh, 50) / pct(r.bcast_raw, 50)),
        row("broadcast mesh p50 per instance", "us", lambda r: pct(r.bcast_mesh, 50) / r.n),
        row("broadcast raw p50 per instance", "us", lambda r: pct(r.bcast_raw, 50) / r.n),
        row("bcast CPU per reply: mesh host", "us", lambda r: r.bcast_cpu.get("hosts", math.nan) * 1e6 / r.n),
        row("bcast CPU per reply: raw responder", "us",
            lambda r: r.bcast_cpu.get("raw responders", math.nan) * 1e6 / r.n),
        row("bcast CPU per reply: mesh client", "us", lambda r: r.bcast_cpu.get("mesh client", math.nan) * 1e6 / r.n),
        row("bcast CPU per reply: raw client", "us", lambda r: r.bcast_cpu.get("raw client", math.nan) * 1e6 / r.n),
        row("bcast CPU per broadcast: registry", "us", lambda r: r.bcast_cpu.get("registry", math.nan) * 1e6),
        row("host RSS mean", "MiB", lambda r: mean(r.rss) / MIB),
        row("host RSS max", "MiB", lambda r: max(r.rss, default=0) / MIB),
        row("host USS mean", "MiB", lambda r: mean(r.uss) / MIB),
        row("host USS max", "MiB", lambda r: max(r.uss, default=0) / MIB),
        row("raw nats-py responder RSS mean", "MiB", lambda r: mean(r.raw_rss) / MIB),
        row("raw nats-py responder USS mean", "MiB", lambda r: mean(r.raw_uss) / MIB),
        row("registry RSS", "MiB", lambda r: r.registry_rss / MIB),
        row("nats-server RSS", "MiB", lambda r: r.server_rss / MIB),
        row("idle CPU, all hosts", "%core", lambda r: r.idle_cpu.get("hosts", math.nan)),
        row("idle CPU, registry", "%core", lambda r: r.idle_cpu.get("registry", math.nan)),
        row("idle CPU, nats-server", "%core", lambda r: r.idle_cpu.get("nats-server", math.nan)),
        row("stop: all N exited after SIGTERM", "s", lambda r: r.stop_s),
    ]


def growth(values: list[float], sizes: list[int]) -> tuple[float, float]:
    """(last/first, exponent k of value ~ N^k between the first and last size)."""
    first, last = values[0], values[-1]
    if len(values) < 2 or not first or not math.isfinite(first) or not math.isfinite(last) or first <= 0 or last <= 0:
        return math.nan, math.nan
    ratio = last / first
    return ratio, math.log(ratio) / math.log(sizes[-1] / sizes[0])


def fmtv(value: float) -> str:
    return "-" if not math.isfinite(value) else fmt(value) if abs(value) >= 10 else f"{value:.2f}"


def cluster_rows(res: ClusterResult) -> list[tuple[str, list[float]]]:
    return [(f"p{q}", [pct(res.latency[s], q) for s in SIDES]) for q in (50, 95, 99)]


def print_report(counts: Counts, results: list[SizeResult], cluster: ClusterResult | None,
                 machine: dict[str, Any]) -> None:
    print()
    print("groundhog mesh at scale — " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    if results:
        sizes = [r.n for r in results]
        print(f"per size: {counts.lists} list_plugins(), {counts.broadcasts} broadcasts per side, "
              f"idle CPU over {counts.idle:g}s")
        print()
        table = scale_rows(results)
        width = max(len(m) for m, _, _ in table)
        head = "".join(f"{'N=' + str(n):>10}" for n in sizes)
        print(f"{'measure':<{width}}  {'unit':>5}{head}  {'last/first':>10}  {'~N^k':>6}")
        print("-" * (width + 7 + 10 * len(sizes) + 20))
        for measure, unit, values in table:
            ratio, k = growth(values, sizes) if len(sizes) > 1 else (math.nan, math.nan)
            cells = "".join(f"{fmtv(v):>10}" for v in values)
            print(f"{measure:<{width}}  {unit:>5}{cells}  {fmtv(ratio):>10}  {fmtv(k):>6}")
        print()
    if cluster is not None and any(cluster.latency.values()):
        n = len(cluster.latency[SIDES[0]])
        print(f"3-node cluster: request/reply to one echo on node 0, {n} sequential requests per side "
              f"(connected: " + ", ".join(f"{s} {u}" for s, u in cluster.connected.items()) + ")")
        print()
        print(f"{'latency':<8}" + "".join(f"{s:>19}" for s in SIDES)
              + f"{'raw across/same':>17}{'mesh across/same':>18}{'mesh/raw same':>15}{'mesh/raw across':>17}")
        for label, (rs, ra, ms, ma) in cluster_rows(cluster):
            print(f"{label + ' us':<8}" + "".join(f"{fmt(v):>19}" for v in (rs, ra, ms, ma))
                  + f"{ra / rs:>16.2f}x{ma / ms:>17.2f}x{ms / rs:>14.2f}x{ma / ra:>16.2f}x")
        print()


def to_json(counts: Counts, results: list[SizeResult], cluster: ClusterResult | None, machine: dict[str, Any],
            elapsed: float) -> Any:
    sizes = [r.n for r in results]
    table = []
    for measure, unit, values in scale_rows(results):
        ratio, k = growth(values, sizes) if len(sizes) > 1 else (math.nan, math.nan)
        table.append({"measure": measure, "unit": unit, "values": dict(zip(map(str, sizes), values, strict=True)),
                      "last_over_first": ratio, "exponent": k})
    per_size = []
    for r in results:
        d = asdict(r)
        for key in ("list_latency", "bcast_mesh", "bcast_raw"):
            samples = d.pop(key)
            d[key + "_us"] = {f"p{q}": pct(samples, q) for q in (50, 95, 99)}
        per_size.append(d)
    out: dict[str, Any] = {"machine": machine, "counts": asdict(counts), "elapsed_s": round(elapsed, 1),
                           "scale": table, "per_size": per_size}
    if cluster is not None:
        out["cluster"] = {"connected": cluster.connected,
                          "latency_us": {s: {f"p{q}": pct(cluster.latency[s], q) for q in (50, 95, 99)}
                                         for s in SIDES}}
    return json.loads(json.dumps(out, default=str).replace("NaN", "null"))


# ---------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="groundhog mesh at scale: N hosts on one machine; 3-node latency.")
    p.add_argument("--quick", action="store_true", help="N = 10, 30 and fewer samples (~40 seconds)")
    p.add_argument("--sizes", help="comma-separated numbers of hosts (default 10,30,100)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    for name, kind, help_ in (("lists", int, "sequential list_plugins() calls per size"),
                              ("broadcasts", int, "broadcasts per side and size"),
                              ("idle", float, "seconds of idle CPU measured per size"),
                              ("rounds", int, "cluster: rounds over the four sides"),
                              ("seq", int, "cluster: sequential requests per round and side"),
                              ("warmup", int, "cluster: warm-up requests per side")):
        p.add_argument(f"--{name}", type=kind, help=help_)
    p.add_argument("--no-cluster", action="store_true", help="skip the 3-node part")
    p.add_argument("--no-scale", action="store_true", help="skip the N-hosts part")
    p.add_argument("--time-limit", type=float, default=900.0, help="stop (cleanly) after this many seconds")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (server and child logs)")
    return p.parse_args(argv)


def counts_from(args: argparse.Namespace) -> Counts:
    counts = QUICK if args.quick else Counts()
    overrides: dict[str, Any] = {k: getattr(args, k) for k in ("lists", "broadcasts", "idle", "rounds", "seq",
                                                               "warmup") if getattr(args, k) is not None}
    if args.sizes:
        try:
            overrides["sizes"] = tuple(int(s) for s in args.sizes.split(",") if s.strip())
        except ValueError:
            raise SystemExit(f"--sizes: expected numbers like 10,30,100, not {args.sizes!r}") from None
    counts = replace(counts, **overrides)
    if not counts.sizes or min(counts.sizes) < 1 or min(v for k, v in asdict(counts).items() if k != "sizes") <= 0:
        raise SystemExit("every count must be at least 1")
    return counts


def kill_leftovers() -> list[int]:
    """SIGKILL whatever of this process's tree is still alive (nothing, normally)."""
    left = psutil.Process().children(recursive=True)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=5)
    return [p.pid for p in left]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = counts_from(args)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
        signal.signal(sig, _on_signal)
    signal.alarm(max(1, int(args.time_limit)))
    machine = machine_info()
    if machine["code"] == "unknown" and os.environ.get("BENCH_CODE"):  # run from an exported tree
        machine["code"] = os.environ["BENCH_CODE"]
    started = time.monotonic()
    results: list[SizeResult] = []
    cluster_result: ClusterResult | None = None
    code = 0
    with workspace(args.keep) as tmp:
        try:
            if not args.no_scale:
                server = NatsServer(tmp / "nats")
                children = Children(tmp / "logs", server.url)
                bench = ScaleBench(counts, server, children)
                results = bench.results
                try:
                    server.start()
                    asyncio.run(bench.run())
                finally:
                    children.stop()
                    server.stop()
            if not args.no_cluster:
                progress("3-node cluster")
                cluster = NatsCluster(tmp / "cluster")
                cluster_result = ClusterResult()
                try:
                    cluster.start()
                    children = Children(tmp / "logs-cluster", cluster.nodes[0].url)
                    try:
                        asyncio.run(cluster_bench(counts, cluster, children, cluster_result))
                    finally:
                        children.stop()
                finally:
                    cluster.stop()
        except Interrupted as exc:
            print(f"interrupted ({exc}); stopped the child processes and nats-server", file=sys.stderr)
            code = 130
        except (RuntimeError, CommunicationError, nats.errors.Error, psutil.Error) as exc:
            print(f"benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            code = 1
        finally:
            signal.alarm(0)
            left = kill_leftovers()
            if left:
                print(f"killed leftover processes: {left}", file=sys.stderr)
    complete = [r for r in results if r.bcast_mesh]
    print_report(counts, complete, cluster_result, machine)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(counts, complete, cluster_result, machine,
                                                time.monotonic() - started), indent=2) + "\n")
        print(f"wrote {args.json}")
    return code


if __name__ == "__main__":
    sys.exit(main())
