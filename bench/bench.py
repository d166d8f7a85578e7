#!/usr/bin/env python
"""groundhog mesh benchmark: mesh messaging against raw nats-py, in one run on the same nats-server(s).

Run from the repository root::

    python bench/bench.py            # full run (a few minutes)
    python bench/bench.py --quick    # short run (< 1 minute)
    python bench/bench.py --json bench/results.json

One nats-server (JetStream on, temporary data directory, free port) is started here; every
responder runs in its own OS process (``python -m mesh run ...`` for mesh plugins, this file with
``--role ...`` for the raw nats-py baselines). The client side (this process) measures, for each
pair of (raw, mesh), back to back and in alternating order over several rounds:

1. request/reply: raw ``nc.request`` to a process that replies the same bytes, against
   ``PluginMessaging.send_message("echo", ...)`` to ``examples.echo:Echo`` — latency p50/p99 with
   one request in flight, and throughput with 1 and with ``--concurrency`` (64) in flight;
2. broadcast to ``--instances`` (10) processes: raw publish + gather the replies on an inbox,
   against ``PluginMessaging.broadcast_message(target="echo")`` — latency p50/p99;
3. events: raw ``nc.publish`` to a counting subscriber process, against ``publish_event`` to a
   plugin counting with ``@on_event`` — events delivered per second.

Around each side's ``--concurrency`` (64) in-flight phase of every round, the CPU time (user +
system, all threads: :func:`cpu_seconds`; this process: ``time.process_time``) of every process
that side involves is read just before and just after: the client (this process), its responder (raw:
``raw-echo-0``; mesh: the ``echo-0`` plugin host), nats-server, and on the mesh side the registry
process too (it is part of the mesh). CPU microseconds per request = the CPU seconds spent during
that phase / its requests x 1e6, per process and summed over all of them ("all processes").
Before any traffic, once the mesh echo host is registered healthy, its resident set (``VmRSS`` of
``/proc/PID/status``) is read: the idle plugin host RSS.

Latency samples are pooled over the rounds; throughputs and CPU per request are the median over
the rounds. The ratio is mesh/raw for every row (> 1 is slower for latency and costlier for CPU,
< 1 is slower for throughput). The verdicts at the end are against the goals of issue 12, "The hot
path" (:func:`goals`).

``--loop uvloop`` (default ``asyncio``) runs every process of the run on that event loop: this
one, the raw responders and the mesh children (``MESH_LOOP``, mesh/_loop.py), so raw nats-py on
uvloop is the reference for the mesh on uvloop. One run never mixes loops: compare ratios within
a run, never across loops.

``--secure`` runs nats-server as ``mesh up --secure`` does (:class:`Net`): TLS with a CA of the run's
own (mesh/_pki.py) and operator-mode auth (JWT accounts, mesh/_auth.py). Every process connects as
it would under ``mesh up --secure``: the client (this process, mesh side) and the registry as the
admin, over TLS; each mesh plugin host with an identity minted for its instance (its plugin's
permissions, its own inbox prefix) and its state bucket made by the admin, as the agent does. The
raw side is as secure, so that it stays a fair reference: its client connects over TLS as the
admin too, and each raw responder with an identity of its own, minted with exactly the subjects it
subscribes to and answering through the response permission, as the plugin hosts do. Credentials
and the CA reach the children in their environment, never on their command line.

``--cluster N`` (N >= 3) starts an N-node cluster (``NatsCluster``, as ``mesh up --cluster N``)
with the mesh's JetStream replicas for a cluster (3). The client (both sides) and the registry are
on node 0; the responders, raw and mesh alike, round-robin over nodes 1..N-1 (``echo-i`` and
``raw-echo-i`` on node ``1 + i mod (N-1)``, both event counters on node 1), so every request and
event crosses a route. The nats-server CPU is the sum over every node. ``--secure --cluster N``
together: the routes use TLS as well (a route certificate of the same CA, verified both ways).

The plugin :class:`EventCounter` below is loaded by ``python -m mesh run bench.bench:EventCounter``;
:class:`TracedEcho` is the responder of ``bench/bench_tracing.py`` (the cost of tracing), which imports
its building blocks from here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import secrets
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

import mesh
from mesh import _loop
from plugin_sdk import (
    CommunicationError,
    Message,
    Plugin,
    PluginError,
    PluginMessaging,
    PluginRegistry,
    on_event,
)
from plugin_sdk._natsd import child_preexec

if TYPE_CHECKING:
    from mesh._auth import AuthStore
    from mesh._connect import ClientSecurity

REPO = Path(__file__).resolve().parent.parent
PAYLOAD: dict[str, Any] = {"text": "hello", "n": 1}
RAW_BODY = json.dumps(PAYLOAD, separators=(",", ":")).encode()
REQUEST_TIMEOUT = 10.0
EVENT_TYPE = "bench.tick"
COUNTER_PLUGIN = "bench-events"

Op = Callable[[], Awaitable[object]]


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: stop measuring, then clean up."""


_signals: list[int] = []


def _on_signal(signum: int, frame: object) -> None:
    # Cooperative: the measuring loops check the flag, so the connections and the child processes
    # are closed in order (cancelling nats-py mid-operation can leave asyncio.run waiting forever).
    # A second signal interrupts at once.
    if _signals:
        raise KeyboardInterrupt
    _signals.append(signum)


def check_interrupted() -> None:
    if _signals:
        raise Interrupted(signal.Signals(_signals[0]).name)


# ---------------------------------------------------------------------------------------------
# The mesh event subscriber (runs in its own process under `python -m mesh run`)


class EventCounter(Plugin):
    """Counts ``bench.tick`` events; any message returns the counts (operation ``reset`` zeroes them)."""

    name = COUNTER_PLUGIN
    version = "1.0.0"
    capabilities = ["bench"]

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.first = 0.0
        self.last = 0.0

    @on_event(EVENT_TYPE)
    async def on_tick(self, event: Message) -> None:
        now = time.monotonic()
        if not self.count:
            self.first = now
        self.count += 1
        self.last = now

    async def handle_message(self, message: Message) -> Any:
        if message.operation == "reset":
            self.count, self.first, self.last = 0, 0.0, 0.0
        return {"count": self.count, "first": self.first, "last": self.last}


class TracedEcho(Plugin):
    """``examples.echo:Echo`` for the tracing benchmark (``bench/bench_tracing.py``): replies with the
    payload, and answers operation ``tracing`` with whether and how this process traces."""

    name = "echo"
    version = "1.0.0"
    capabilities = ["echo"]

    async def handle_message(self, message: Message) -> Any:
        if message.operation == "tracing":
            return tracing_state()
        return message.payload


def tracing_state() -> dict[str, Any]:
    """Whether this process traces: the SDK's provider class and its span processors."""
    from opentelemetry import trace

    from plugin_sdk import _tracing

    provider = trace.get_tracer_provider()
    processors = getattr(getattr(provider, "_active_span_processor", None), "_span_processors", ())
    return {"enabled": _tracing.enabled(), "provider": type(provider).__name__,
            "processors": [type(p).__name__ for p in processors]}


# ---------------------------------------------------------------------------------------------
# The raw nats-py responders (`python bench/bench.py --role raw-echo|raw-counter ...`)


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


#: Under --secure, a raw responder's credentials and the CA (file paths), in its environment.
RAW_CREDS_ENV = "BENCH_RAW_CREDS"
RAW_TLS_CA_ENV = "BENCH_RAW_TLS_CA"


def raw_options(creds: str | Path | None, tls_ca: str | Path | None) -> dict[str, Any]:
    """nats-py's own options for credentials and TLS (as the mesh's connect builds them: a default
    context verifying the server against ``tls_ca``); nothing when neither is given."""
    opts: dict[str, Any] = {}
    if tls_ca:
        opts["tls"] = ssl.create_default_context(cafile=str(tls_ca))
    if creds:
        opts["user_credentials"] = str(creds)
    return opts


async def raw_connect(url: str, name: str) -> NATS:
    """A raw responder's connection: plain nats-py, with the credentials and CA of its environment."""
    return await nats.connect(url, name=name, **raw_options(os.environ.get(RAW_CREDS_ENV),
                                                            os.environ.get(RAW_TLS_CA_ENV)))


async def raw_echo(url: str, subjects: list[str]) -> None:
    """Reply to every message on ``subjects`` with the same bytes, from the callback."""
    nc = await raw_connect(url, "bench raw-echo")

    async def on_msg(msg: Msg) -> None:
        await nc.publish(msg.reply, msg.data)

    for subject in subjects:
        await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    await _until_signalled()
    await nc.drain()


async def raw_counter(url: str, subject: str, control: str) -> None:
    """Count messages on ``subject``; a request on ``control`` returns the counts (``reset`` zeroes them)."""
    nc = await raw_connect(url, "bench raw-counter")
    counts: dict[str, float] = {"count": 0, "first": 0.0, "last": 0.0}

    async def on_event(msg: Msg) -> None:
        now = time.monotonic()
        if not counts["count"]:
            counts["first"] = now
        counts["count"] += 1
        counts["last"] = now

    async def on_control(msg: Msg) -> None:
        if msg.data == b"reset":
            counts.update(count=0, first=0.0, last=0.0)
        await nc.publish(msg.reply, json.dumps(counts).encode())

    await nc.subscribe(subject, cb=on_event)
    await nc.subscribe(control, cb=on_control)
    await nc.flush()
    await _until_signalled()
    await nc.drain()


# ---------------------------------------------------------------------------------------------
# Child processes


class Children:
    """The responder processes; :meth:`stop` terminates them (SIGTERM, then SIGKILL) and waits.

    Every child runs on ``loop`` (``MESH_LOOP`` for the mesh ones, ``--loop`` for the raw ones):
    asyncio unless told, as the benchmarks that start them run on asyncio unless told."""

    def __init__(self, log_dir: Path, url: str, *, loop: str = "asyncio") -> None:
        self.log_dir = log_dir
        self.url = url
        self.loop = loop
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        log_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        self.env.setdefault("MESH_LOG_LEVEL", "INFO")
        self.env[_loop.ENV] = loop  # explicit: unset, a mesh child would take uvloop whenever it is installed

    def spawn(self, name: str, args: list[str], env: Mapping[str, str] | None = None) -> None:
        """Start ``python args...`` as ``name``; ``env`` adds to (or overrides) :attr:`env` for this child."""
        # Own session: a Ctrl-C in the terminal reaches only this process, which stops the children
        # in order; PR_SET_PDEATHSIG (child_preexec) stops them if this process is killed outright.
        with open(self.log_dir / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen([sys.executable, *args], cwd=REPO,
                                                env={**self.env, **env} if env else self.env,
                                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True, preexec_fn=child_preexec)

    def mesh_run(self, name: str, ref: str, prefix: str, env: Mapping[str, str] | None = None, *,
                 url: str | None = None, extra: tuple[str, ...] = ()) -> None:
        """``python -m mesh run ref`` connected to ``url`` (default :attr:`url`)."""
        self.spawn(name, ["-m", "mesh", "run", ref, "--nats", url or self.url, "--prefix", prefix, *extra], env)

    def mesh_registry(self, name: str, prefix: str, env: Mapping[str, str] | None = None, *,
                      url: str | None = None) -> None:
        self.spawn(name, ["-m", "mesh", "registry", "--nats", url or self.url, "--prefix", prefix], env)

    def raw(self, name: str, role: str, *extra: str, url: str | None = None,
            env: Mapping[str, str] | None = None) -> None:
        self.spawn(name, [str(Path(__file__).resolve()), "--role", role, "--nats", url or self.url, "--loop",
                          self.loop, *extra], env)

    def check(self) -> None:
        """Raise if a child exited, with the tail of its log."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}: {self.tail(name)}")

    def tail(self, name: str, lines: int = 8) -> str:
        try:
            text = (self.log_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    def stop(self, names: list[str] | None = None, *, timeout: float = 15.0) -> None:
        """SIGTERM ``names`` (default: all) at once, then wait; SIGKILL whatever outlives ``timeout``."""
        chosen = list(self.procs) if names is None else [n for n in names if n in self.procs]
        procs = [self.procs.pop(n) for n in chosen]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------------------------------------
# The NATS side: one node or a cluster, plain or --secure


def plugin_class(ref: str) -> type[Plugin]:
    """The plugin class ``module:Class`` names (those of this file without importing it again)."""
    module, _, attr = ref.partition(":")
    if module == "bench.bench":  # this file, run as __main__ (or imported as ``bench``)
        cls: type[Plugin] = globals()[attr]
        return cls
    from mesh._host import load_plugin_class

    if str(REPO) not in sys.path:  # as `mesh run` (cwd = REPO) finds examples.*
        sys.path.insert(0, str(REPO))
    return load_plugin_class(ref)


class Net:
    """The nats-server(s) of a run, and how each process of it connects, as ``mesh up`` would run them.

    ``cluster``: 0 for one node, else that many nodes routed into one cluster (``NatsCluster``, as
    ``mesh up --cluster N``; JetStream replicas: the mesh's default for it, :attr:`replicas`).
    ``secure``: as ``mesh up --secure``: TLS with a CA of this run's own (mesh/_pki.py, under
    ``directory/pki``) and operator-mode auth (mesh/_auth.py, under ``directory/auth``); in a
    cluster, the routes over TLS too (a route certificate of the same CA, verified both ways).

    Placement: the client (both sides) and the registry on node 0; responder slot ``i`` (``echo-i``
    and ``raw-echo-i``; the event counters are slot 0) on node ``1 + i mod (N-1)``.
    """

    def __init__(self, directory: Path, *, secure: bool = False, cluster: int = 0) -> None:
        self.secure = secure
        self.cluster = cluster
        self.auth: AuthStore | None = None
        self.ca: Path | None = None
        self.replicas = 1
        options: dict[str, Any] = {}
        if cluster:
            from mesh._up import Topology

            self.replicas = Topology(cluster=cluster).wanted_replicas  # refuses fewer than 3 nodes
        if secure:
            from mesh._auth import AuthStore
            from mesh._pki import Pki

            pki = Pki(directory / "pki")
            self.ca = pki.ca()
            cert = pki.server()
            self.auth = AuthStore(directory / "auth")
            options = {"config": self.auth.server_config(), "tls": (cert.cert, cert.key, self.ca)}
            if cluster:
                route = pki.route()
                options["route_tls"] = (route.cert, route.key, self.ca)
        self._cluster = mesh.NatsCluster(directory / "nats", size=cluster, **options) if cluster else None
        self._server = None if cluster else mesh.NatsServer(directory / "nats", **options)

    @property
    def nodes(self) -> list[mesh.NatsServer]:
        # (read each time: a cluster that found a port taken at start chose new ones)
        if self._cluster is not None:
            return self._cluster.nodes
        assert self._server is not None
        return [self._server]

    def start(self) -> None:
        if self._cluster is not None:
            self._cluster.start()
        else:
            assert self._server is not None
            self._server.start()

    def stop(self) -> None:
        if self._cluster is not None:
            self._cluster.stop()
        elif self._server is not None:
            self._server.stop()

    @property
    def pids(self) -> list[int | None]:
        """Every node's nats-server pid (their CPU is summed)."""
        return [n.pid for n in self.nodes]

    @property
    def url(self) -> str:
        """Node 0's: the client's (both sides) and the registry's."""
        return self.nodes[0].url

    def node_of(self, slot: int) -> int:
        """The node of responder slot ``slot``: 0 on one node, else round-robin over nodes 1..N-1."""
        n = len(self.nodes)
        return 0 if n == 1 else 1 + slot % (n - 1)

    def responder_url(self, slot: int) -> str:
        return self.nodes[self.node_of(slot)].url

    def child_env(self) -> dict[str, str]:
        """For every child: in a cluster, ``MESH_REPLICAS`` (what `mesh up --cluster` gives the registry and
        the agent's plugin hosts; the raw responders ignore it)."""
        return {"MESH_REPLICAS": str(self.replicas)} if self.cluster else {}

    def client_security(self) -> ClientSecurity | None:
        """The mesh client's: under --secure the admin over TLS, as the CLI (None: the environment's)."""
        if self.auth is None:
            return None
        from mesh._connect import ClientSecurity

        return ClientSecurity(creds=self.auth.admin.creds, tls_ca=self.ca)

    def raw_client_options(self) -> dict[str, Any]:
        """The raw client's nats-py options: under --secure the same admin credentials and CA."""
        return raw_options(self.auth.admin.creds, self.ca) if self.auth is not None else {}

    def admin_env(self) -> dict[str, str]:
        """The registry's: under --secure the admin's credentials and the CA (as `mesh up` runs it)."""
        if self.auth is None:
            return {}
        return {"MESH_CREDS": str(self.auth.admin.creds), "MESH_TLS_CA": str(self.ca)}

    def plugin_env(self, ref: str, prefix: str) -> tuple[tuple[str, ...], dict[str, str]]:
        """``mesh run`` arguments and environment of a new instance of ``ref``: under --secure, as the
        agent starts one (mesh/_agent.py): its instance id, and an identity minted for it with its
        plugin's permissions (``plugin_permissions``), its own inbox prefix, the CA."""
        if self.auth is None:
            return (), {}
        from mesh._auth import Permissions
        from mesh._host import resolve_config
        from plugin_sdk.host import Subjects, new_instance_id, plugin_permissions

        config = resolve_config(plugin_class(ref), None)
        instance_id = new_instance_id(config.name)
        perms = plugin_permissions(Subjects(prefix), name=config.name, instance_id=instance_id,
                                   send=config.permissions.send, publish=config.permissions.publish,
                                   subscribe=config.permissions.subscribe,
                                   dependencies=[d.name for d in config.dependencies])
        identity = self.auth.mint(instance_id, Permissions(pub_allow=perms.publish, sub_allow=perms.subscribe,
                                                           pub_deny=perms.publish_deny))
        return ("--instance-id", instance_id), {"MESH_CREDS": str(identity.creds), "MESH_TLS_CA": str(self.ca),
                                                "MESH_INBOX_PREFIX": perms.inbox_prefix}

    async def plugin_buckets(self, nc: NATS, prefix: str, refs: list[str]) -> None:
        """Under --secure, the admin (``nc``) makes each plugin's state bucket, as the agent does (a plugin
        identity may use its bucket, not create it); otherwise each host makes its own."""
        if self.auth is None:
            return
        from mesh._host import resolve_config
        from plugin_sdk.host import Subjects, open_bucket

        for name in dict.fromkeys(resolve_config(plugin_class(ref), None).name for ref in refs):
            await open_bucket(nc.jetstream(), Subjects(prefix).state_bucket(name), create=True,
                              description=f"state of plugin {name}", replicas=self.replicas if self.cluster else None)

    def raw_env(self, name: str, subscribe: list[str], publish: str) -> dict[str, str]:
        """A raw responder's environment: under --secure, an identity of its own that may subscribe to
        exactly ``subscribe`` and publish to ``publish`` (its replies go through the response
        permission, as a plugin host's do), and the CA."""
        if self.auth is None:
            return {}
        from mesh._auth import Permissions

        identity = self.auth.mint(name, Permissions(pub_allow=(publish,), sub_allow=tuple(subscribe)))
        return {RAW_CREDS_ENV: str(identity.creds), RAW_TLS_CA_ENV: str(self.ca)}

    def describe(self) -> list[str]:
        """The header lines: security, and nodes with placement."""
        sec = ("secure: TLS + operator auth (mesh up --secure: CA of the run, JWT accounts; client and registry "
               "as the admin, each mesh host and raw responder with an identity of its own)" if self.secure
               else "secure: no (plain: no TLS, no auth)")
        if not self.cluster:
            return [sec, "nats: one node (client, registry and responders on it)"]
        n = len(self.nodes)
        spread = "node 1" if n == 2 else f"nodes 1..{n - 1} (echo-i and raw-echo-i on node 1 + i mod {n - 1})"
        routes = "; routes over TLS" if self.secure else ""
        return [sec, f"cluster: {n} nodes, JetStream replicas {self.replicas}{routes}; client (both sides) and "
                     f"registry on node 0, responders round-robin on {spread}, event counters on node 1"]

    def to_json(self) -> dict[str, Any]:
        return {"secure": self.secure, "cluster": self.cluster, "nodes": len(self.nodes), "replicas": self.replicas,
                "auth": "TLS + operator auth" if self.secure else None,
                "placement": {"client": 0, "registry": 0,
                              "responders": "round-robin over nodes 1..N-1: slot i on node 1 + i mod (N-1) "
                                            "(echo-i / raw-echo-i: slot i; event counters: slot 0)"
                              if self.cluster else 0}}


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Counts:
    rounds: int = 8
    seq: int = 3000  # sequential requests per round and side
    inflight: int = 20000  # requests per round and side at --concurrency in flight
    concurrency: int = 64
    broadcasts: int = 400  # sequential broadcasts per round and side
    events: int = 50000  # events per round and side
    warmup: int = 300  # sequential warm-up requests / broadcasts (/ 10 events x 10) per side
    instances: int = 10  # broadcast fan-out


QUICK = Counts(rounds=2, seq=400, inflight=2000, broadcasts=60, events=5000, warmup=100)


# The processes whose CPU is read around the in-flight phase (the raw side has no registry).
CPU_ROLES = ("client", "responder", "registry", "nats-server")
RESPONDER = {"raw": "raw-echo-0", "mesh": "echo-0"}  # Children names
REGISTRY = "registry"
MESH_HOST = "echo-0"  # the plugin host whose idle RSS is read
ECHO_REF = "examples.echo:Echo"
COUNTER_REF = "bench.bench:EventCounter"


@dataclass
class Side:
    """Every sample of one side (raw or mesh)."""

    seq_latency: list[float] = field(default_factory=list)  # seconds, pooled over rounds
    seq_rps: list[float] = field(default_factory=list)  # one per round
    inflight_rps: list[float] = field(default_factory=list)
    bcast_latency: list[float] = field(default_factory=list)
    event_rate: list[float] = field(default_factory=list)  # delivered events/s, one per round
    publish_rate: list[float] = field(default_factory=list)  # publisher-side events/s
    event_loss: list[int] = field(default_factory=list)
    # CPU us per request in the --concurrency in-flight phase, one per round: per process (CPU_ROLES) and "all"
    inflight_cpu_us: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in (*CPU_ROLES, "all")})
    # CPU us per broadcast in each round's broadcast phase: per role ("responder": all --instances of them) and "all"
    bcast_cpu_us: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in (*CPU_ROLES, "all")})


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def sequential(op: Op, n: int) -> tuple[list[float], float]:
    """Run ``op`` ``n`` times one after the other: (latencies, requests/s)."""
    latencies = []
    clock = time.perf_counter
    start = clock()
    for _ in range(n):
        check_interrupted()
        t = clock()
        await op()
        latencies.append(clock() - t)
    return latencies, n / (clock() - start)


async def concurrent(op: Op, n: int, in_flight: int) -> float:
    """Run ``op`` ``n`` times with ``in_flight`` coroutines each doing one at a time: ops/s."""
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0 and not _signals:
            remaining -= 1
            await op()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - start
    check_interrupted()
    return n / elapsed


@dataclass
class EventTarget:
    publish: Op
    stats: Callable[[bool], Awaitable[dict[str, float]]]  # stats(reset)
    nc: NATS


async def event_run(target: EventTarget, n: int) -> tuple[float, float, int]:
    """Publish ``n`` events as fast as possible: (delivered/s, published/s, events lost).

    Delivered/s is count / (time of the last delivery - time of the first publish), both read
    from CLOCK_MONOTONIC (system-wide on Linux) in the publisher and subscriber processes.
    """
    await target.stats(True)
    start = time.monotonic()
    for _ in range(n):
        await target.publish()
    check_interrupted()
    await target.nc.flush()
    published = n / (time.monotonic() - start)
    seen, progress_at = -1.0, time.monotonic()
    while True:
        check_interrupted()
        stats = await target.stats(False)
        if stats["count"] >= n:
            break
        if stats["count"] != seen:
            seen, progress_at = stats["count"], time.monotonic()
        elif time.monotonic() - progress_at > 3.0:  # stalled: some were dropped
            break
        await asyncio.sleep(0.02)
    count = int(stats["count"])
    delivered = count / (stats["last"] - start) if count else 0.0
    return delivered, published, n - count


async def wait_for(what: str, check: Callable[[], Awaitable[bool]], children: Children,
                   timeout: float = 60.0, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check_interrupted()
        children.check()
        with contextlib.suppress(CommunicationError, nats.errors.Error, TimeoutError):
            if await check():
                return
        await asyncio.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")


def alternate(round_no: int) -> tuple[str, str]:
    return ("raw", "mesh") if round_no % 2 == 0 else ("mesh", "raw")


@dataclass
class Bench:
    counts: Counts
    net: Net
    children: Children
    prefix: str = field(default_factory=lambda: f"bench{secrets.token_hex(3)}")
    raw_prefix: str = field(default_factory=lambda: f"rawbench{secrets.token_hex(3)}")
    sides: dict[str, Side] = field(default_factory=lambda: {"raw": Side(), "mesh": Side()})
    registry_lookup: list[float] = field(default_factory=list)
    host_rss: float = math.nan  # bytes: the mesh echo host, idle (registered healthy, before any traffic)

    def cpu_pids(self, side: str) -> dict[str, list[int | None]]:
        """The processes of ``side`` other than this one (the client), by role: the raw side has no
        registry; nats-server is every node of the run."""
        procs = self.children.procs
        return {"responder": [procs[RESPONDER[side]].pid],
                "registry": [procs[REGISTRY].pid] if side == "mesh" else [],
                "nats-server": self.net.pids}

    def cpu(self, side: str, *, every_responder: bool = False) -> dict[str, float]:
        """CPU seconds so far of every process of ``side``, summed per role (the raw side's registry: 0);
        ``every_responder``: the broadcast's responders, all of the side's echo processes."""
        out = {"client": time.process_time()}
        pids = self.cpu_pids(side)
        if every_responder:
            prefix = "raw-echo-" if side == "raw" else "echo-"
            pids["responder"] = [p.pid for name, p in self.children.procs.items() if name.startswith(prefix)]
        for role, role_pids in pids.items():
            out[role] = sum(cpu_seconds(pid) for pid in role_pids)
        return out

    def mesh_host(self, name: str, ref: str, slot: int) -> None:
        """``mesh run ref`` on responder slot ``slot``'s node; under --secure as its agent would start it."""
        extra, env = self.net.plugin_env(ref, self.prefix)
        self.children.mesh_run(name, ref, self.prefix, env, url=self.net.responder_url(slot), extra=extra)

    def raw_host(self, name: str, role: str, slot: int, subscribe: list[str], *args: str) -> None:
        """A raw responder on slot ``slot``'s node; under --secure with an identity for ``subscribe``."""
        env = self.net.raw_env(name, subscribe, f"{self.raw_prefix}.>")
        self.children.raw(name, role, *args, url=self.net.responder_url(slot), env=env)

    async def run(self) -> None:
        c, ch = self.counts, self.children
        raw_echo_subject = f"{self.raw_prefix}.echo"
        raw_bcast_subject = f"{self.raw_prefix}.bcast"
        raw_event_subject = f"{self.raw_prefix}.event.{EVENT_TYPE}"
        raw_control = f"{self.raw_prefix}.control"

        net = self.net

        ch.mesh_registry(REGISTRY, self.prefix, net.admin_env(), url=net.url)
        async with contextlib.AsyncExitStack() as connections:  # closed last first: raw, then mesh
            mesh_nc = await mesh.connect(net.url, name="bench mesh client", wait=10, security=net.client_security())
            connections.push_async_callback(mesh.close, mesh_nc)
            await net.plugin_buckets(mesh_nc, self.prefix, [ECHO_REF, COUNTER_REF])
            self.mesh_host("echo-0", ECHO_REF, 0)
            self.mesh_host("events", COUNTER_REF, 0)
            self.raw_host("raw-echo-0", "raw-echo", 0, [raw_echo_subject, raw_bcast_subject],
                          "--subject", raw_echo_subject, "--subject", raw_bcast_subject)
            self.raw_host("raw-events", "raw-counter", 0, [raw_event_subject, raw_control],
                          "--subject", raw_event_subject, "--control", raw_control)
            raw_nc = await nats.connect(net.url, name="bench raw client", **net.raw_client_options())
            connections.push_async_callback(raw_nc.close)
            registry = PluginRegistry(mesh_nc, prefix=self.prefix)
            messaging = PluginMessaging(mesh_nc, prefix=self.prefix, source="bench", registry=registry,
                                        default_timeout=REQUEST_TIMEOUT)

            async def healthy(name: str, n: int) -> bool:
                return len(await registry.list_plugins(name, healthy_only=True)) >= n

            async def raw_answers() -> bool:
                await raw_nc.request(raw_echo_subject, b"ping", timeout=0.5)
                await raw_nc.request(raw_control, b"", timeout=0.5)
                return True

            await wait_for("the mesh echo and event counter", lambda: self._both(healthy("echo", 1),
                                                                                 healthy(COUNTER_PLUGIN, 1)), ch)
            await wait_for("the raw responders", raw_answers, ch)
            self.host_rss = rss_bytes(ch.procs[MESH_HOST].pid)  # serving, no traffic yet

            async def raw_send() -> object:
                return await raw_nc.request(raw_echo_subject, RAW_BODY, timeout=REQUEST_TIMEOUT)

            async def mesh_send() -> object:
                return await messaging.send_message("echo", PAYLOAD)

            await self.request_reply({"raw": raw_send, "mesh": mesh_send})

            async def raw_publish() -> None:
                await raw_nc.publish(raw_event_subject, RAW_BODY)

            async def mesh_publish() -> None:
                await messaging.publish_event(EVENT_TYPE, PAYLOAD)

            async def raw_stats(reset: bool) -> dict[str, float]:
                msg = await raw_nc.request(raw_control, b"reset" if reset else b"", timeout=REQUEST_TIMEOUT)
                result: dict[str, float] = json.loads(msg.data)
                return result

            async def mesh_stats(reset: bool) -> dict[str, float]:
                response = await messaging.send_message(COUNTER_PLUGIN, operation="reset" if reset else "stats")
                result: dict[str, float] = response.result
                return result

            await self.events({"raw": EventTarget(raw_publish, raw_stats, raw_nc),
                               "mesh": EventTarget(mesh_publish, mesh_stats, mesh_nc)})

            extra = [f"echo-{i}" for i in range(1, c.instances)]
            raw_extra = [f"raw-echo-{i}" for i in range(1, c.instances)]
            for slot, name in enumerate(extra, start=1):
                self.mesh_host(name, ECHO_REF, slot)
            for slot, name in enumerate(raw_extra, start=1):
                self.raw_host(name, "raw-echo", slot, [raw_bcast_subject], "--subject", raw_bcast_subject)
            try:
                async def raw_broadcast(timeout: float = REQUEST_TIMEOUT) -> int:
                    inbox = raw_nc.new_inbox()
                    sub = await raw_nc.subscribe(inbox)
                    try:
                        await raw_nc.publish(raw_bcast_subject, RAW_BODY, reply=inbox)
                        got = 0
                        with contextlib.suppress(nats.errors.TimeoutError):
                            while got < c.instances:
                                await sub.next_msg(timeout=timeout)
                                got += 1
                        return got
                    finally:
                        await sub.unsubscribe()

                async def raw_bcast_ready() -> bool:
                    return await raw_broadcast(timeout=0.5) >= c.instances

                async def checked_raw_broadcast() -> object:
                    got = await raw_broadcast()
                    if got != c.instances:
                        raise RuntimeError(f"raw broadcast gathered {got} of {c.instances} replies")
                    return got

                async def mesh_broadcast() -> object:
                    result = await messaging.broadcast_message(PAYLOAD, target="echo", timeout=REQUEST_TIMEOUT)
                    if len(result) != c.instances or result.missing:
                        raise RuntimeError(f"mesh broadcast gathered {len(result)} of {c.instances} replies "
                                           f"(missing {result.missing})")
                    return result

                await wait_for(f"{c.instances} healthy echo instances", lambda: healthy("echo", c.instances), ch)
                await wait_for(f"{c.instances} raw broadcast responders", raw_bcast_ready, ch)
                await self.broadcast({"raw": checked_raw_broadcast, "mesh": mesh_broadcast})

                async def lookup() -> object:
                    return await registry.list_plugins("echo", healthy_only=True, timeout=REQUEST_TIMEOUT)

                self.registry_lookup, _ = await sequential(lookup, c.broadcasts)
            finally:
                ch.stop(extra + raw_extra)

    @staticmethod
    async def _both(a: Awaitable[bool], b: Awaitable[bool]) -> bool:
        return all(await asyncio.gather(a, b))

    async def request_reply(self, ops: dict[str, Op]) -> None:
        c = self.counts
        for op in ops.values():  # warm-up: connections, inboxes, code paths, caches
            await sequential(op, c.warmup)
            await concurrent(op, c.concurrency * 4, c.concurrency)
        for r in range(c.rounds):
            for side in alternate(r):
                latencies, rps = await sequential(ops[side], c.seq)
                self.sides[side].seq_latency += latencies
                self.sides[side].seq_rps.append(rps)
            for side in alternate(r + 1):
                s = self.sides[side]
                before = self.cpu(side)  # read just around the timed phase
                s.inflight_rps.append(await concurrent(ops[side], c.inflight, c.concurrency))
                after = self.cpu(side)
                per = {role: (after[role] - before[role]) / c.inflight * 1e6 for role in CPU_ROLES}
                for role, value in per.items():
                    s.inflight_cpu_us[role].append(value)
                s.inflight_cpu_us["all"].append(sum(per.values()))
            progress(f"request/reply round {r + 1}/{c.rounds}")

    async def broadcast(self, ops: dict[str, Op]) -> None:
        c = self.counts
        for op in ops.values():
            await sequential(op, max(10, c.warmup // 5))
        for r in range(c.rounds):
            for side in alternate(r):
                before = self.cpu(side, every_responder=True)
                latencies, _ = await sequential(ops[side], c.broadcasts)
                after = self.cpu(side, every_responder=True)
                s = self.sides[side]
                s.bcast_latency += latencies
                per = {role: (after[role] - before[role]) / c.broadcasts * 1e6 for role in CPU_ROLES}
                for role, value in per.items():
                    s.bcast_cpu_us[role].append(value)
                s.bcast_cpu_us["all"].append(sum(per.values()))
            progress(f"broadcast round {r + 1}/{c.rounds}")

    async def events(self, targets: dict[str, EventTarget]) -> None:
        c = self.counts
        for target in targets.values():
            await event_run(target, c.warmup * 10)
        for r in range(c.rounds):
            for side in alternate(r):
                delivered, published, lost = await event_run(targets[side], c.events)
                s = self.sides[side]
                s.event_rate.append(delivered)
                s.publish_rate.append(published)
                s.event_loss.append(lost)
            progress(f"events round {r + 1}/{c.rounds}")


def progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Reporting


@dataclass
class Row:
    measure: str
    unit: str
    raw: float
    mesh: float
    higher_is_better: bool

    @property
    def ratio(self) -> float:
        return self.mesh / self.raw if self.raw else math.nan


@dataclass
class Goal:
    """A goal of issue 12: ``value`` (the row's mesh/raw ratio, or an absolute figure in ``unit``)
    against ``limit``; NaN (not measured) is never met."""

    name: str
    measure: str
    limit: float
    higher_is_better: bool
    value: float = math.nan
    unit: str = "x"  # "x": a mesh/raw ratio
    shown: str = ""  # the value as printed, when not "{value:.2f}x"

    @property
    def met(self) -> bool:
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit

    @property
    def op(self) -> str:
        return ">=" if self.higher_is_better else "<="

    def line(self) -> str:
        if self.shown:
            shown = self.shown
        else:  # a third digit when two would show the limit itself on the wrong side of it
            digits = 3 if f"{self.value:.2f}" == f"{self.limit:.2f}" else 2
            shown = f"{self.value:.{digits}f}{self.unit}"
        limit = f"{self.limit:.2f}x" if self.unit == "x" else f"{self.limit:g} {self.unit}"
        return f"  [{'MET' if self.met else 'NOT MET'}] {self.name}: {shown} (needs {self.op} {limit})"


def rows(b: Bench) -> list[Row]:
    raw, msh = b.sides["raw"], b.sides["mesh"]
    us = 1e6
    n = b.counts.instances
    conc = b.counts.concurrency
    return [
        Row("send p50 latency (1 in flight)", "us", percentile(raw.seq_latency, 50) * us,
            percentile(msh.seq_latency, 50) * us, False),
        Row("send p99 latency (1 in flight)", "us", percentile(raw.seq_latency, 99) * us,
            percentile(msh.seq_latency, 99) * us, False),
        Row("send throughput, 1 in flight", "req/s", statistics.median(raw.seq_rps),
            statistics.median(msh.seq_rps), True),
        Row(f"send throughput, {conc} in flight", "req/s", statistics.median(raw.inflight_rps),
            statistics.median(msh.inflight_rps), True),
        Row(f"broadcast x{n} p50 latency", "us", percentile(raw.bcast_latency, 50) * us,
            percentile(msh.bcast_latency, 50) * us, False),
        Row(f"broadcast x{n} p99 latency", "us", percentile(raw.bcast_latency, 99) * us,
            percentile(msh.bcast_latency, 99) * us, False),
        Row("events delivered/s", "ev/s", statistics.median(raw.event_rate), statistics.median(msh.event_rate), True),
        Row("events published/s (publisher side)", "ev/s", statistics.median(raw.publish_rate),
            statistics.median(msh.publish_rate), True),
        *(Row(cpu_measure(role, conc), "us", median(raw.inflight_cpu_us[role]), median(msh.inflight_cpu_us[role]),
              False) for role in ("all", "client", "responder", "nats-server")),
        *(Row(bcast_cpu_measure(role, n), "us", median(raw.bcast_cpu_us[role]), median(msh.bcast_cpu_us[role]),
              False) for role in ("all", "client", "responder", "nats-server")),
    ]


def cpu_measure(role: str, concurrency: int) -> str:
    if role == "all":
        return f"CPU us/request at {concurrency} in flight, all processes"
    return f"CPU us/request, {role}"


def bcast_cpu_measure(role: str, instances: int) -> str:
    if role == "all":
        return f"CPU us/broadcast to {instances}, all processes"
    return f"CPU us/broadcast, {f'the {instances} responders' if role == 'responder' else role}"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


MB = 1e6  # the unit for the RSS goal
MIB = 1024 * 1024


def goals(table: list[Row], concurrency: int, host_rss: float = math.nan, instances: int = 10) -> list[Goal]:
    """The goals of issue 12 ("The hot path") that this benchmark measures (the issue's are at 64 in
    flight and a broadcast to 10: other --concurrency / --instances are named as measured); the
    tracing goal is bench_tracing.py's, the FastStream one bench_faststream.py's."""
    by = {r.measure: r.ratio for r in table}
    out = [
        Goal(f"issue 12: send throughput, {concurrency} in flight, mesh/raw >= 0.8x",
             f"send throughput, {concurrency} in flight", 0.8, True),
        Goal("issue 12: events delivered per second, mesh/raw >= 0.7x", "events delivered/s", 0.7, True),
        Goal("issue 12: send p50, 1 in flight, mesh/raw <= 1.10x", "send p50 latency (1 in flight)", 1.10, False),
        Goal(f"issue 12: broadcast to {instances}, p50, mesh/raw <= 1.15x", f"broadcast x{instances} p50 latency",
             1.15, False),
        Goal(f"issue 12: CPU us per request at {concurrency} in flight, all processes, mesh/raw <= 1.4x",
             cpu_measure("all", concurrency), 1.4, False),
    ]
    for g in out:
        g.value = by.get(g.measure, math.nan)
    out.append(Goal("issue 12: idle plugin host RSS <= 45 MB", "idle plugin host RSS", 45.0, False,
                    host_rss / MB, "MB", f"{host_rss / MB:.1f} MB = {host_rss / MIB:.1f} MiB"))
    return out


def fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def print_report(table: list[Row], checks: list[Goal], b: Bench, machine: dict[str, Any]) -> None:
    print()
    print("groundhog mesh benchmark — " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    c = b.counts
    for line in b.net.describe():
        print(line)
    print(f"rounds {c.rounds}; per round and side: {c.seq} sequential requests, {c.inflight} at {c.concurrency} "
          f"in flight, {c.broadcasts} broadcasts to {c.instances}, {c.events} events")
    print()
    width = max(len(r.measure) for r in table)
    print(f"{'measure':<{width}}  {'unit':>6}  {'raw':>10}  {'mesh':>10}  {'mesh/raw':>8}")
    print("-" * (width + 42))
    for r in table:
        print(f"{r.measure:<{width}}  {r.unit:>6}  {fmt(r.raw):>10}  {fmt(r.mesh):>10}  {r.ratio:>7.2f}x")
    only = "(mesh only) "
    print(f"{only + 'CPU us/request, registry':<{width}}  {'us':>6}  {'':>10}  "
          f"{fmt(median(b.sides['mesh'].inflight_cpu_us['registry'])):>10}")
    print(f"{only + 'CPU us/broadcast, registry':<{width}}  {'us':>6}  {'':>10}  "
          f"{fmt(median(b.sides['mesh'].bcast_cpu_us['registry'])):>10}")
    if b.registry_lookup:
        print(f"{only + 'registry list_plugins p50':<{width}}  {'us':>6}  {'':>10}  "
              f"{fmt(percentile(b.registry_lookup, 50) * 1e6):>10}")
    print(f"{only + 'idle plugin host RSS':<{width}}  {'MiB':>6}  {'':>10}  {b.host_rss / MIB:>10.1f}  "
          f"({b.host_rss / MB:.1f} MB)")
    nodes = len(b.net.nodes)
    servers = f"nats-server (all {nodes} nodes)" if nodes > 1 else "nats-server"
    print(f"CPU us/request: CPU time during each side's {c.concurrency}-in-flight phase / its requests, median of the"
          f" rounds;\n  all processes = client (this process) + responder + {servers} (+ the registry, mesh side)")
    lost = {side: sum(s.event_loss) for side, s in b.sides.items() if sum(s.event_loss)}
    if lost:
        print(f"events lost (not delivered within 3s of the last one): {lost}")
    print()
    for g in checks:
        print(g.line())
    print()


def code_version() -> str:
    """The commit measured, ``+dirty`` when mesh/, plugin_sdk/ or examples/ differ from it."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mesh", "plugin_sdk", "examples"], cwd=REPO,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def loop_label(loop: str) -> str:
    """``asyncio``, or ``uvloop <version>``."""
    if loop != "uvloop":
        return loop
    return f"uvloop {importlib.metadata.version('uvloop')}"


def run_on(loop: str, coro: Any) -> Any:
    """Run ``coro`` on ``loop`` by the mesh's own rule (mesh/_loop.py), exactly as its children do."""
    os.environ[_loop.ENV] = loop
    return _loop.run(coro)


def machine_info(loop: str = "asyncio") -> dict[str, Any]:
    try:
        server = subprocess.run([mesh.find_binary(), "--version"], capture_output=True, text=True,
                                check=False, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        server = f"unknown ({exc})"
    return {
        "code": code_version(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "nats-server": server.removeprefix("nats-server: "),
        "nats-py": importlib.metadata.version("nats-py"),
        "loop": loop_label(loop),
        "platform": platform.platform(terse=True),
        "loadavg": "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
    }


def to_json(table: list[Row], checks: list[Goal], b: Bench, machine: dict[str, Any], elapsed: float) -> Any:
    us = 1e6

    def summary(s: Side) -> dict[str, Any]:
        return {
            "seq_rps_per_round": s.seq_rps,
            "inflight_rps_per_round": s.inflight_rps,
            "event_rate_per_round": s.event_rate,
            "publish_rate_per_round": s.publish_rate,
            "events_lost_per_round": s.event_loss,
            "seq_latency_us": {f"p{q}": percentile(s.seq_latency, q) * us for q in (50, 90, 99, 99.9)},
            "bcast_latency_us": {f"p{q}": percentile(s.bcast_latency, q) * us for q in (50, 90, 99)},
            "inflight_cpu_us_per_request_per_round": s.inflight_cpu_us,
            "inflight_cpu_us_per_request": {role: median(v) for role, v in s.inflight_cpu_us.items()},
            "bcast_cpu_us_per_broadcast_per_round": s.bcast_cpu_us,
            "bcast_cpu_us_per_broadcast": {role: median(v) for role, v in s.bcast_cpu_us.items()},
        }

    servers = [f"nats-server {n.name}" for n in b.net.nodes] if b.net.cluster else ["nats-server"]
    return {
        "machine": machine,
        "loop": b.children.loop,
        "secure": b.net.secure,
        "cluster": b.net.cluster,  # nodes of the cluster; 0: one node
        "nats": b.net.to_json(),
        "counts": asdict(b.counts),
        "elapsed_s": round(elapsed, 1),
        "results": [{**asdict(r), "ratio": r.ratio} for r in table],
        "registry_lookup_p50_us": percentile(b.registry_lookup, 50) * us if b.registry_lookup else None,
        "idle_host_rss": {"bytes": b.host_rss, "MiB": b.host_rss / MIB, "MB": b.host_rss / MB},
        "cpu_processes": {"raw": ["client", RESPONDER["raw"], *servers],
                          "mesh": ["client", RESPONDER["mesh"], REGISTRY, *servers]},
        "goals": [{"name": g.name, "measure": g.measure, "value": g.value, "unit": g.unit, "op": g.op,
                   "limit": g.limit, "met": g.met} for g in checks],
        "sides": {name: summary(s) for name, s in b.sides.items()},
    }


# ---------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark groundhog mesh messaging against raw nats-py.")
    p.add_argument("--quick", action="store_true", help="short run (< 1 minute)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    for name, help_ in (("rounds", "rounds of (raw, mesh) pairs, order alternating"),
                        ("seq", "sequential requests per round and side"),
                        ("inflight", "requests per round and side at --concurrency in flight"),
                        ("concurrency", "requests in flight for the throughput measure"),
                        ("broadcasts", "broadcasts per round and side"),
                        ("events", "events per round and side"),
                        ("warmup", "warm-up iterations per side"),
                        ("instances", "broadcast fan-out (processes per side)")):
        p.add_argument(f"--{name}", type=int, help=help_)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (server and child logs)")
    p.add_argument("--loop", choices=_loop.CHOICES, default="asyncio",
                   help="event loop of every process of the run, raw and mesh alike (default asyncio)")
    p.add_argument("--secure", action="store_true",
                   help="nats-server as `mesh up --secure` runs it (TLS + operator auth), every client of both "
                        "sides with TLS and credentials")
    p.add_argument("--cluster", type=int, default=0, metavar="N",
                   help="an N-node cluster (N >= 3, JetStream replicas 3): client and registry on node 0, the "
                        "responders of both sides round-robin on nodes 1..N-1")
    # Internal: the raw responder processes.
    p.add_argument("--role", choices=["raw-echo", "raw-counter"], help=argparse.SUPPRESS)
    p.add_argument("--nats", help=argparse.SUPPRESS)
    p.add_argument("--subject", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--control", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def counts_from(args: argparse.Namespace, default: Any = None, quick: Any = None) -> Any:
    """The counts of a run: ``quick`` with --quick, else ``default`` (this bench's by default), each
    field overridden by the option of the same name when given; every count at least 1."""
    counts = (quick if quick is not None else QUICK) if args.quick else (default if default is not None else Counts())
    overrides = {k: getattr(args, k) for k in asdict(counts) if getattr(args, k, None) is not None}
    counts = replace(counts, **overrides)
    if min(asdict(counts).values()) < 1:
        raise SystemExit("every count must be at least 1")
    return counts


def cpu_seconds(pid: int | None) -> float:
    """user + system CPU seconds of ``pid``, all its threads (those that exited included).

    Read from the process's CPU-time clock (Linux: ``clock_getcpuclockid(pid)``, the clock id
    ``~pid << 3 | 2``, nanosecond resolution), else from utime + stime of ``/proc/PID/stat`` (clock
    ticks: 10 ms); NaN if neither can be read."""
    if pid is None:
        return math.nan
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            return time.clock_gettime((~pid << 3) | 2)  # CPUCLOCK_SCHED of the whole process
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int | None) -> float:
    """Resident set size of ``pid`` in bytes (``VmRSS`` of Linux ``/proc/PID/status``; NaN elsewhere)."""
    if pid is None:
        return math.nan
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # the kernel's "kB" is KiB
    except (OSError, ValueError, IndexError):
        pass
    return math.nan


def rotation(sides: list[str] | tuple[str, ...], round_no: int) -> list[str]:
    """``sides`` rotated by ``round_no``, reversed in odd rounds: each side takes every position."""
    k = round_no % len(sides)
    rotated = [*sides[k:], *sides[:k]]
    return rotated[::-1] if round_no % 2 else rotated


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
    try:
        yield tmp
    finally:
        if keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        _loop.choose({_loop.ENV: args.loop}, _loop.have_uvloop())
    except _loop.LoopError as exc:
        raise SystemExit(f"--loop {args.loop}: {exc}") from None
    if args.role == "raw-echo":
        run_on(args.loop, raw_echo(args.nats, args.subject))
        return 0
    if args.role == "raw-counter":
        run_on(args.loop, raw_counter(args.nats, args.subject[0], args.control))
        return 0
    counts = counts_from(args)
    if args.cluster and args.cluster < 3:
        raise SystemExit(f"--cluster {args.cluster}: a JetStream cluster needs 3 nodes or more (as mesh up --cluster); "
                         "for one node leave --cluster out")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    machine = machine_info(args.loop)
    started = time.monotonic()
    with workspace(args.keep) as tmp:
        net = Net(tmp, secure=args.secure, cluster=args.cluster)
        children = Children(tmp / "logs", net.url, loop=args.loop)
        children.env.update(net.child_env())
        bench = Bench(counts, net, children)
        try:
            net.start()
            children.url = net.url  # (a cluster that found a port taken chose new ones)
            run_on(args.loop, bench.run())
        except Interrupted as exc:
            print(f"interrupted ({exc}); stopping the child processes and nats-server", file=sys.stderr)
            return 130
        except (RuntimeError, PluginError, nats.errors.Error) as exc:  # PluginError: CommunicationError, StateError...
            print(f"benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            for name in children.procs:
                print(f"  {name}: {children.tail(name, 3)}", file=sys.stderr)
            return 1
        finally:
            # Plugins first (they unregister through the registry), then the rest, then the server.
            children.stop([n for n in children.procs if n.startswith(("echo", "events"))])
            children.stop()
            net.stop()
    table = rows(bench)
    checks = goals(table, counts.concurrency, bench.host_rss, counts.instances)
    print_report(table, checks, bench, machine)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(table, checks, bench, machine, time.monotonic() - started),
                                        indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
