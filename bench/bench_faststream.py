#!/usr/bin/env python
"""groundhog mesh against FastStream: the same JSON request/reply, in one run on one nats-server.

FastStream is never a dependency of the project: run this from a separate environment that has
the project and FastStream (``bench/requirements-faststream.txt``)::

    python3.11 -m venv /tmp/bench-fs && /tmp/bench-fs/bin/pip install -e . -r bench/requirements-faststream.txt
    /tmp/bench-fs/bin/python bench/bench_faststream.py            # full run (a few minutes on 2 cores)
    /tmp/bench-fs/bin/python bench/bench_faststream.py --quick    # short run (< 1 minute)
    /tmp/bench-fs/bin/python bench/bench_faststream.py --json bench/results-faststream.json

One nats-server (``mesh.NatsServer``: JetStream on, temporary store, free port) and one responder
process per side; the client side (this process) measures four sides over the same workload, a
small JSON object ``{"text": "hello", "n": i}`` whose reply must carry the same ``n``:

``raw``         raw nats-py ``nc.request`` (JSON encoded and decoded here) to ``bench.py --role
                raw-echo`` (replies the same bytes, parses nothing);
``mesh``        ``PluginMessaging.send_message("echo", ...)`` to ``python -m mesh run examples.echo:Echo``;
``faststream``  FastStream's own client, ``await broker.request(...)`` + ``await msg.decode()``, to a
                FastStream app (this file with ``--role fs-echo``): one ``@broker.subscriber`` whose
                handler returns the JSON it got (the return value is the reply);
``fs-raw``      raw nats-py ``nc.request`` to that same FastStream app.

Each round measures every side back to back, the order rotated from round to round: latency
(p50/p95/p99) and throughput with one request in flight, then throughput with ``--concurrency``
(64) in flight (that many coroutines, each one request at a time), with the CPU each process spent
per request. Latency samples are pooled over the rounds; throughputs are the median of the rounds.

FastStream's subscriber logs "Received"/"Processed" for every message at INFO by default; both
FastStream brokers here are made with ``log_level=logging.DEBUG`` so that nothing is written per
message (the mesh writes nothing per message either). ``--fs-log`` keeps FastStream's default.
``--loop uvloop`` (default ``asyncio``) runs every process of the run on uvloop, as ``bench.py --loop``
does (the mesh children through ``MESH_LOOP``): one run never mixes loops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import itertools
import json
import logging
import math
import os
import secrets
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors

import mesh
from bench import (
    REQUEST_TIMEOUT,
    Children,
    Interrupted,
    Op,
    _on_signal,
    check_interrupted,
    concurrent,
    cpu_seconds,
    fmt,
    machine_info,
    percentile,
    progress,
    rotation,
    run_on,
    sequential,
    wait_for,
    workspace,
)
from bench import counts_from as bench_counts_from
from mesh import _loop
from plugin_sdk import PluginMessaging, PluginRegistry

SELF = Path(__file__).resolve()
SIDES = ("raw", "mesh", "faststream", "fs-raw")
PROCS = ("client", "responder", "nats-server")
GOAL = 3.0  # issue 12: the mesh's 64-in-flight throughput at least 3x FastStream's
TEXT = "hello"


def body(n: int) -> dict[str, Any]:
    return {"text": TEXT, "n": n}


def encode(n: int) -> bytes:
    return json.dumps(body(n), separators=(",", ":")).encode()


def check_reply(reply: Any, n: int, side: str) -> None:
    if not isinstance(reply, dict) or reply.get("n") != n or reply.get("text") != TEXT:
        raise RuntimeError(f"{side}: wrong reply to n={n}: {reply!r}")


# ---------------------------------------------------------------------------------------------
# The FastStream responder (`python bench/bench_faststream.py --role fs-echo --nats URL --subject S`)


def fs_echo(url: str, subject: str, log: bool, loop: str) -> None:
    """A FastStream app with one NATS subscriber returning the JSON it got; stops on SIGTERM/SIGINT."""
    from faststream import FastStream
    from faststream.nats import NatsBroker

    broker = NatsBroker(url, log_level=logging.INFO if log else logging.DEBUG)

    async def echo(msg: dict[str, Any]) -> dict[str, Any]:
        return msg

    broker.subscriber(subject)(echo)  # = @broker.subscriber(subject) (a call: mypy sees no untyped decorator)
    run_on(loop, FastStream(broker).run())


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Counts:
    rounds: int = 6
    seq: int = 2000  # sequential requests per round and side
    inflight: int = 20000  # requests per round and side at --concurrency in flight
    concurrency: int = 64
    warmup: int = 300  # sequential warm-up requests per side (then 4 x concurrency in flight)


QUICK = Counts(rounds=2, seq=300, inflight=3000, warmup=100)


@dataclass
class Side:
    seq_latency: list[float] = field(default_factory=list)  # seconds, pooled over rounds
    seq_rps: list[float] = field(default_factory=list)  # one per round
    inflight_rps: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PROCS, 0.0))  # at --concurrency
    inflight_done: int = 0


def order(round_no: int) -> list[str]:
    return rotation(SIDES, round_no)


RESPONDER = {"raw": "raw-echo", "mesh": "echo", "faststream": "fs-echo", "fs-raw": "fs-echo"}


@dataclass
class FsBench:
    counts: Counts
    url: str
    children: Children
    server_pid: int | None
    fs_log: bool = False
    tag: str = field(default_factory=lambda: f"fsb{secrets.token_hex(3)}")
    sides: dict[str, Side] = field(default_factory=lambda: {s: Side() for s in SIDES})

    def cpu(self, side: str) -> dict[str, float]:
        proc = self.children.procs[RESPONDER[side]]
        return {"client": time.process_time(), "responder": cpu_seconds(proc.pid),
                "nats-server": cpu_seconds(self.server_pid)}

    async def run(self) -> None:
        try:
            from faststream.nats import NatsBroker
        except ImportError as exc:
            raise RuntimeError("FastStream is not installed here: use an environment made with "
                               "bench/requirements-faststream.txt (never the project's own)") from exc
        ch = self.children
        prefix = f"{self.tag}mesh"
        raw_subject = f"{self.tag}.raw.echo"
        fs_subject = f"{self.tag}.fs.echo"
        ch.mesh_registry("registry", prefix)
        ch.mesh_run("echo", "examples.echo:Echo", prefix)
        ch.raw("raw-echo", "raw-echo", "--subject", raw_subject)
        ch.spawn("fs-echo", [str(SELF), "--role", "fs-echo", "--nats", self.url, "--subject", fs_subject,
                             "--loop", ch.loop, *(["--fs-log"] if self.fs_log else [])])

        raw_nc = await nats.connect(self.url, name="bench raw client")
        mesh_nc = await mesh.connect(self.url, name="bench mesh client", wait=10)
        broker = NatsBroker(self.url, log_level=logging.INFO if self.fs_log else logging.DEBUG)
        await broker.connect()
        try:
            registry = PluginRegistry(mesh_nc, prefix=prefix)
            messaging = PluginMessaging(mesh_nc, prefix=prefix, source="bench", registry=registry,
                                        default_timeout=REQUEST_TIMEOUT)

            async def mesh_ready() -> bool:
                return len(await registry.list_plugins("echo", healthy_only=True)) >= 1

            async def raw_ready() -> bool:
                await raw_nc.request(raw_subject, b"{}", timeout=0.5)
                return True

            async def fs_ready() -> bool:
                msg = await raw_nc.request(fs_subject, encode(-1), timeout=0.5)
                check_reply(json.loads(msg.data), -1, "fs-echo")
                return True

            await wait_for("the mesh echo", mesh_ready, ch)
            await wait_for("the raw echo", raw_ready, ch)
            await wait_for("the FastStream echo", fs_ready, ch)

            counter = itertools.count()

            async def raw_send() -> object:
                n = next(counter)
                msg = await raw_nc.request(raw_subject, encode(n), timeout=REQUEST_TIMEOUT)
                check_reply(json.loads(msg.data), n, "raw")
                return None

            async def mesh_send() -> object:
                n = next(counter)
                response = await messaging.send_message("echo", body(n))
                check_reply(response.result, n, "mesh")
                return None

            async def fs_send() -> object:
                n = next(counter)
                msg = await broker.request(body(n), fs_subject, timeout=REQUEST_TIMEOUT)
                check_reply(await msg.decode(), n, "faststream")
                return None

            async def fs_raw_send() -> object:
                n = next(counter)
                msg = await raw_nc.request(fs_subject, encode(n), timeout=REQUEST_TIMEOUT)
                check_reply(json.loads(msg.data), n, "fs-raw")
                return None

            await self.measure({"raw": raw_send, "mesh": mesh_send, "faststream": fs_send, "fs-raw": fs_raw_send})
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(broker.stop(), 10)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(raw_nc.close(), 10)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(mesh.close(mesh_nc), 10)

    async def measure(self, ops: dict[str, Op]) -> None:
        c = self.counts
        for side in SIDES:  # warm-up: connections, inboxes, code paths, caches
            await sequential(ops[side], c.warmup)
            await concurrent(ops[side], c.concurrency * 4, c.concurrency)
        for r in range(c.rounds):
            for side in order(r):
                latencies, rps = await sequential(ops[side], c.seq)
                self.sides[side].seq_latency += latencies
                self.sides[side].seq_rps.append(rps)
            for side in order(r + 1):
                s = self.sides[side]
                before = self.cpu(side)
                s.inflight_rps.append(await concurrent(ops[side], c.inflight, c.concurrency))
                after = self.cpu(side)
                for p in PROCS:
                    s.cpu_s[p] += after[p] - before[p]
                s.inflight_done += c.inflight
            self.children.check()
            progress(f"round {r + 1}/{c.rounds}")


# ---------------------------------------------------------------------------------------------
# Reporting


@dataclass
class Row:
    measure: str
    unit: str
    values: dict[str, float]
    higher_is_better: bool

    def ratio(self, a: str, b: str) -> float:
        return self.values[a] / self.values[b] if self.values[b] else math.nan


RATIOS = (("mesh", "raw"), ("faststream", "raw"), ("fs-raw", "raw"), ("mesh", "faststream"), ("mesh", "fs-raw"))


def cpu_per_request(s: Side) -> dict[str, float]:
    return {p: s.cpu_s[p] / s.inflight_done * 1e6 if s.inflight_done else math.nan for p in PROCS}


def rows(b: FsBench) -> list[Row]:
    sides, us, conc = b.sides, 1e6, b.counts.concurrency

    def each(f: Any) -> dict[str, float]:
        return {name: f(s) for name, s in sides.items()}

    out = [Row(f"p{q} latency, 1 in flight", "us", each(lambda s, q=q: percentile(s.seq_latency, q) * us), False)
           for q in (50, 95, 99)]
    out.append(Row("throughput, 1 in flight", "req/s", each(lambda s: statistics.median(s.seq_rps)), True))
    out.append(Row(f"throughput, {conc} in flight", "req/s", each(lambda s: statistics.median(s.inflight_rps)), True))
    for p in PROCS:
        out.append(Row(f"CPU/request at {conc}: {p}", "us", each(lambda s, p=p: cpu_per_request(s)[p]), False))
    return out


def goal(table: list[Row], conc: int) -> dict[str, Any]:
    row = next(r for r in table if r.measure == f"throughput, {conc} in flight")
    return {"name": f"issue 12: mesh {conc}-in-flight throughput >= {GOAL:g}x FastStream's",
            "limit": GOAL, "ratio": row.ratio("mesh", "faststream"), "met": row.ratio("mesh", "faststream") >= GOAL,
            "ratio_vs_fs_raw_client": row.ratio("mesh", "fs-raw")}


def print_report(table: list[Row], b: FsBench, machine: dict[str, Any]) -> None:
    c = b.counts
    print()
    print("groundhog mesh vs FastStream — " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    print(f"rounds {c.rounds}; per round and side: {c.seq} sequential requests, {c.inflight} at {c.concurrency} "
          f"in flight; payload {json.dumps(body(0))}" + ("; FastStream per-message logging ON" if b.fs_log else ""))
    print()
    width = max(len(r.measure) for r in table)
    head = "".join(f"  {s:>10}" for s in SIDES) + "".join(f"  {a + '/' + z:>13}" for a, z in RATIOS)
    print(f"{'measure':<{width}}  {'unit':>5}{head}")
    print("-" * (width + 7 + len(head)))
    for r in table:
        vals = "".join(f"  {fmt(r.values[s]):>10}" for s in SIDES)
        ratios = "".join(f"  {r.ratio(a, z):>12.2f}x" for a, z in RATIOS)
        print(f"{r.measure:<{width}}  {r.unit:>5}{vals}{ratios}")
    print()
    g = goal(table, c.concurrency)
    print(f"  [{'MET' if g['met'] else 'NOT MET'}] {g['name']}: {g['ratio']:.2f}x (needs >= {GOAL:g}x; "
          f"against a raw nats-py client to the FastStream app: {g['ratio_vs_fs_raw_client']:.2f}x)")
    print()


def to_json(table: list[Row], b: FsBench, machine: dict[str, Any], elapsed: float) -> Any:
    us = 1e6

    def summary(s: Side) -> dict[str, Any]:
        return {"seq_rps_per_round": s.seq_rps, "inflight_rps_per_round": s.inflight_rps,
                "seq_latency_us": {f"p{q}": percentile(s.seq_latency, q) * us for q in (50, 90, 95, 99, 99.9)},
                "cpu_us_per_request_inflight": cpu_per_request(s)}

    return {
        "machine": machine,
        "counts": asdict(b.counts),
        "fs_log": b.fs_log,
        "elapsed_s": round(elapsed, 1),
        "results": [{**asdict(r), "ratios": {f"{a}/{z}": r.ratio(a, z) for a, z in RATIOS}} for r in table],
        "goal": goal(table, b.counts.concurrency),
        "sides": {name: summary(s) for name, s in b.sides.items()},
    }


def versions() -> dict[str, str]:
    out = {}
    for dist in ("faststream", "fast-depends", "pydantic"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


# ---------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark groundhog mesh request/reply against FastStream (NATS).")
    p.add_argument("--quick", action="store_true", help="short run (< 1 minute)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    for name, help_ in (("rounds", "rounds over the four sides, order rotating"),
                        ("seq", "sequential requests per round and side"),
                        ("inflight", "requests per round and side at --concurrency in flight"),
                        ("concurrency", "requests in flight for the throughput measure"),
                        ("warmup", "warm-up iterations per side")):
        p.add_argument(f"--{name}", type=int, help=help_)
    p.add_argument("--loop", choices=_loop.CHOICES, default="asyncio",
                   help="event loop of every process of the run: this one, the responders, the mesh children")
    p.add_argument("--fs-log", action="store_true",
                   help="keep FastStream's default per-message INFO logging (off by default here)")
    p.add_argument("--time-limit", type=float, default=900.0,
                   help="seconds: stop measuring after this (then a hard stop 60 s later)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (server and child logs)")
    # Internal: the FastStream responder process.
    p.add_argument("--role", choices=["fs-echo"], help=argparse.SUPPRESS)
    p.add_argument("--nats", help=argparse.SUPPRESS)
    p.add_argument("--subject", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def counts_from(args: argparse.Namespace) -> Counts:
    counts: Counts = bench_counts_from(args, Counts(), QUICK)
    return counts


def hard_stop(children: Children, server: mesh.NatsServer, after: float) -> threading.Timer:
    """A last resort if the cooperative stop (SIGALRM at --time-limit) does not end the run: kill the
    children's process groups and nats-server, then exit."""

    def fire() -> None:
        print(f"hard stop: still running {after:g}s after the start; killing every child", file=sys.stderr, flush=True)
        pids = [p.pid for p in list(children.procs.values())] + ([server.pid] if server.pid else [])
        for pid in pids:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)  # each child leads its own session (start_new_session)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        os._exit(124)

    timer = threading.Timer(after, fire)
    timer.daemon = True
    timer.start()
    return timer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        _loop.choose({_loop.ENV: args.loop}, _loop.have_uvloop())
    except _loop.LoopError as exc:
        raise SystemExit(f"--loop {args.loop}: {exc}") from None
    if args.role == "fs-echo":
        fs_echo(args.nats, args.subject, args.fs_log, args.loop)
        return 0
    counts = counts_from(args)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
        signal.signal(sig, _on_signal)
    machine = {**machine_info(args.loop), **versions()}
    started = time.monotonic()
    with workspace(args.keep) as tmp:
        server = mesh.NatsServer(tmp / "nats")
        children = Children(tmp / "logs", server.url, loop=args.loop)
        bench = FsBench(counts, server.url, children, None, fs_log=args.fs_log)
        signal.setitimer(signal.ITIMER_REAL, args.time_limit)
        timer = hard_stop(children, server, args.time_limit + 60)
        try:
            server.start()
            bench.server_pid = server.pid
            run_on(args.loop, bench.run())
            check_interrupted()
        except Interrupted as exc:
            print(f"interrupted ({exc}); stopping the child processes and nats-server", file=sys.stderr)
            return 130
        except Exception as exc:  # report, then clean up below
            print(f"benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            for name in children.procs:
                print(f"  {name}: {children.tail(name, 3)}", file=sys.stderr)
            return 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            # The mesh plugin first (it unregisters through the registry), then the rest, then the server.
            children.stop(["echo"])
            children.stop()
            server.stop()
            timer.cancel()
    table = rows(bench)
    print_report(table, bench, machine)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(table, bench, machine, time.monotonic() - started), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
