"""``mesh up``: the embedded nats-server, the registry, and the plugins listed in ``mesh.toml``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import socket
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from plugin_sdk import ConfigError, ConnectionFailed, __version__
from plugin_sdk.host import (
    NatsCluster,
    NatsServer,
    Subjects,
    check_protocol,
    control_subject,
    free_port,
    parse_urls,
)

from . import _loop
from ._agent import Agent
from ._auth import AuthStore
from ._connect import ClientSecurity, close, connect, redact
from ._deps import Planned, start_levels
from ._host import load_plugin_class, resolve_config
from ._pki import ISSUER_ENV, Pki
from ._registry import RegistryService
from ._service import stop_on_signals, wait_any
from ._signing import Package, TrustStore, check_package, default_trust_dir, plugin_entry, probe_package, read_package
from ._telemetry import setup_tracing

__all__ = ["MeshFile", "PluginEntry", "Security", "Topology", "load_mesh_file", "run_up"]

log = logging.getLogger("mesh.up")


class PluginEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: module:Class or an entry-point name, importable from mesh.toml's folder; or, instead, ``path``:
    ref: str | None = None
    #: A plugin package (a directory holding plugin.toml, or a .whl), relative to mesh.toml: verified,
    #: copied into the agent's store and run from there (docs/security.md).
    path: str | None = None
    instances: int = Field(default=1, ge=1, le=1000)
    config: str | None = None
    #: The package as :func:`plan` read and checked it: the very bytes the agent is given.
    _package: Package | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _ref_or_path(self) -> PluginEntry:
        if (self.ref is None) == (self.path is None):
            raise ValueError("give ref or path (one of them)")
        if self.path is not None and self.config is not None:
            raise ValueError("config goes with ref: a package brings its own plugin.toml")
        return self


class MeshSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prefix: str | None = None
    heartbeat_interval: float | None = Field(default=None, gt=0)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str | None) -> str | None:
        if v is not None:
            Subjects(v)  # raises ValueError naming the rule
        return v


class MeshFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mesh: MeshSection = Field(default_factory=MeshSection)
    plugins: list[PluginEntry] = Field(default_factory=list)


def load_mesh_file(path: Path) -> MeshFile:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return MeshFile.model_validate(data)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: {problems}") from None


#: Seconds `mesh up` waits for each level of plugins to be healthy.
START_TIMEOUT = 60.0

Level = list[tuple[Planned, PluginEntry]]


def plan(mesh: MeshFile, *, base_dir: Path, source: str, trust_dir: Path | None = None,
         require_signatures: bool = False) -> list[Level]:
    """Load every entry's class and config, and order them; refuse cycles and bad ranges first.

    A ``path`` entry's package is read once and its signature checked against ``trust_dir`` (as the
    agent will; unsigned refused with ``require_signatures``) before its entry is imported, in a
    child process.
    """
    if str(base_dir) not in sys.path:
        sys.path.insert(0, str(base_dir))  # the file's plugins are importable from its folder
    trust = TrustStore(trust_dir or default_trust_dir())
    pairs = []
    for entry in mesh.plugins:
        if entry.path is not None:
            pkg = entry._package = read_package(base_dir / entry.path)
            check_package(pkg, trust, required=require_signatures, who=source)  # before any of its code runs
            ref, config_text = plugin_entry(pkg)
            config = probe_package(pkg, ref, config_text)
        else:
            assert entry.ref is not None
            ref = entry.ref
            config = resolve_config(load_plugin_class(ref), (base_dir / entry.config) if entry.config else None)
        check_protocol(config)  # refused before anything starts
        pairs.append((Planned(ref, config), entry))
    entry_of = {id(p): e for p, e in pairs}
    return [[(p, entry_of[id(p)]) for p in level] for level in start_levels([p for p, _ in pairs], source=source)]


async def start_in_order(agent: Agent, levels: list[Level], *, base_dir: Path,
                         say: Callable[[str], None]) -> list[list[str]]:
    """Start each level's instances in parallel; the next level once they are all healthy."""
    started: list[list[str]] = []
    for level in levels:
        ids: list[str] = []
        for planned, entry in level:
            if entry._package is not None:  # the agent verifies it again, against its own trust store
                ids += (await agent.load_package(entry._package, instances=entry.instances))[0]
                continue
            config = (base_dir / entry.config).resolve() if entry.config else None
            ids += await agent.load(planned.ref, config_path=config, instances=entry.instances)
        started.append(ids)
        names = ", ".join(p.config.name for p, _ in level)
        say(f"starting {names} ({len(ids)} instance{'s' if len(ids) != 1 else ''})")
        await asyncio.gather(*(agent.wait_healthy(i, timeout=START_TIMEOUT) for i in ids))
        say(f"ready: {names}")
    return started


#: Seconds `mesh up` waits, per node of its cluster, for every started instance to be reachable there.
REACH_TIMEOUT = 10.0


async def reachable_through_every_node(url: str, instances: list[tuple[str, str]], *,
                                       security: ClientSecurity | None, say: Callable[[str], None]) -> None:
    """In a cluster, until a request through each node reaches every started instance.

    An instance is healthy once its own node has its subscriptions; the other nodes learn of them
    over the routes, a little later (or once a route the cluster did not need for JetStream comes
    up). `mesh send` through another node in between got "no responders". Each instance answers
    NATS micro's ``$SRV.PING.<name>.<id>``, which it subscribes to after its other subjects, so a
    node that routes the ping routes the instance's requests too. Bounded by :data:`REACH_TIMEOUT`
    per node; past it, says which instance is not reachable through which node, and goes on.
    """
    nodes = parse_urls(url)
    if len(nodes) < 2 or not instances:
        return
    for node in nodes:
        try:
            nc = await connect(node, name="mesh up (reach)", wait=5, security=security)
        except ConnectionFailed as exc:  # (a node of a --nats list may be down: the others still serve)
            say(f"warning: cannot check what is reachable through {redact(node)}: {exc}")
            continue
        try:
            deadline = time.monotonic() + REACH_TIMEOUT
            for name, ident in instances:
                subject = control_subject("PING", name, ident)
                while True:
                    try:
                        await nc.request(subject, b"", timeout=1.0)
                        break
                    except nats.errors.NoRespondersError:
                        if time.monotonic() > deadline:
                            say(f"warning: {ident} is not reachable through {redact(node)} yet "
                                f"(no route to its node's subscriptions after {REACH_TIMEOUT:g}s)")
                            break
                        await asyncio.sleep(0.05)
                    except nats.errors.TimeoutError:
                        break  # (routed there, just slow to answer: reachable)
        finally:
            await close(nc)


async def stop_in_reverse(agent: Agent, started: list[list[str]]) -> None:
    """Dependants first: each level stops (in parallel) before the level it depends on."""
    for ids in reversed(started):
        await asyncio.gather(*(agent.unload(i) for i in ids if i in agent.placements))


@dataclass(frozen=True)
class Security:
    """How `mesh up` secures its embedded nats-server and its clients: one switch per field.

    ``tls``: clients must use TLS, with a CA of our own made once under ``<data dir>/pki``
    (``mesh/_pki.py``); ``mtls``: TLS, and every client presents a certificate of that CA (`mesh
    up`'s own connection as ``admin``, each plugin host as its plugin, made by the agent).
    ``secure``: TLS, plus an identity for every client (NATS decentralized auth under
    ``<data dir>/auth``, ``mesh/_auth.py``: the admin for mesh up and the CLI, one minted by the
    agent for each plugin instance, with its permissions), plus signed plugin packages only
    (trust store ``<data dir>/trusted``).
    """

    tls: bool = False
    mtls: bool = False
    secure: bool = False

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.mtls or self.secure

    @property
    def embedded_only(self) -> list[str]:
        """The switches that configure the embedded server (refused with a server of the user's own)."""
        return [flag for flag, on in (("--tls", self.tls), ("--mtls", self.mtls), ("--secure", self.secure)) if on]


#: Where the route listener of a node of --join listens, unless --route-port says otherwise.
ROUTE_PORT = 6222
#: Seconds `mesh up --join` waits for its node to be part of a JetStream cluster with a leader.
JOIN_TIMEOUT = 60.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Topology:
    """What `mesh up` runs for NATS: one node (the default), ``cluster`` local nodes routed together
    (development), or one node that routes to ``join`` (the other machines' route URLs).

    ``listen``: the address its listeners bind (default loopback only). ``replicas``: copies of the
    registry's and the plugins' buckets (None: 3 when the cluster has 3+ nodes, else 1).
    """

    cluster: int = 0
    listen: str = "127.0.0.1"
    join: tuple[str, ...] = ()
    route_port: int | None = None
    name: str | None = None
    replicas: int | None = None

    def __post_init__(self) -> None:
        if self.cluster and self.join:
            raise ValueError("--cluster starts every node here and --join one that routes to others: give one")
        if self.cluster < 0 or self.cluster == 1 or self.cluster == 2:
            raise ValueError(f"--cluster {self.cluster}: a JetStream cluster needs 3 nodes or more (a majority "
                             "must survive a loss); for one node leave --cluster out")
        for url in self.join:
            if not url.startswith("nats-route://") or ":" not in url.removeprefix("nats-route://"):
                raise ValueError(f"--join {url!r}: give route URLs, nats-route://HOST:PORT (port 6222 by default)")
        if self.replicas is not None and self.replicas < 1:
            raise ValueError("--replicas must be 1 or more")

    @property
    def nodes(self) -> int:
        """How many nodes the cluster has by configuration (1 for a single node)."""
        return self.cluster or (len(self.join) + 1 if self.join else 1)

    @property
    def wanted_replicas(self) -> int:
        return self.replicas or (3 if self.nodes >= 3 else 1)

    @property
    def hosts(self) -> list[str]:
        """The addresses certificates must name (beyond the loopback ones)."""
        return [] if self.listen in LOOPBACK or self.listen in ("0.0.0.0", "::") else [self.listen]


@dataclass
class Secured:
    """What the switches of :class:`Security` made for one start."""

    server: dict[str, Any] = field(default_factory=dict)  # NatsServer options (tls=, verify=)
    client: ClientSecurity | None = None  # mesh up's own connection (None: the environment's)
    env: dict[str, str] = field(default_factory=dict)  # for the processes the agent starts
    export: dict[str, str] = field(default_factory=dict)  # how a CLI in another shell reaches the mesh
    describe: str = ""  # for the server's ready line
    auth: AuthStore | None = None  # under --secure: the operator, accounts and admin the agent mints with
    trust_dir: Path | None = None  # under --secure: whose signatures the agent accepts (required)

    def export_line(self, url: str) -> str:
        settings = {"MESH_NATS_URL": url, **self.export}
        return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in settings.items())


def secure(security: Security, data_dir: Path, topology: Topology | None = None) -> Secured:
    """Make (once) or load the certificates the switches need, under ``data_dir / "pki"``; for a
    cluster, routes use TLS too, each node verified with a route certificate of the same CA."""
    if not security.uses_tls:
        return Secured()
    topology = topology or Topology()
    pki = Pki(data_dir / "pki")
    ca = pki.ca()
    server = pki.server(topology.hosts)
    out = Secured(server={"tls": (server.cert, server.key, ca), "verify": security.mtls},
                  client=ClientSecurity(tls_ca=ca), env={"MESH_TLS_CA": str(ca)}, export={"MESH_TLS_CA": str(ca)},
                  describe="TLS")
    if topology.cluster or topology.join:
        route = pki.route(topology.hosts)
        out.server["route_tls"] = (route.cert, route.key, ca)
    if security.mtls:
        admin = pki.client("admin")
        out.client = ClientSecurity(tls_ca=ca, tls_cert=admin.cert, tls_key=admin.key)
        out.env[ISSUER_ENV] = str(pki.directory)  # the agent gives each plugin host its own certificate
        out.export.update(MESH_TLS_CERT=str(admin.cert), MESH_TLS_KEY=str(admin.key))
        out.describe = "mTLS: client certificates required"
    if security.secure:
        out.auth = AuthStore(data_dir / "auth")
        out.server["config"] = out.auth.server_config()
        out.client = ClientSecurity(tls_ca=ca, creds=out.auth.admin.creds, tls_cert=out.client.tls_cert if
                                    out.client else None, tls_key=out.client.tls_key if out.client else None)
        out.trust_dir = data_dir / "trusted"
        out.trust_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(out.trust_dir, 0o700)
        out.export.update(MESH_CREDS=str(out.auth.admin.creds), MESH_TRUST_DIR=str(out.trust_dir))
        out.describe += ("; " if out.describe != "TLS" else " + ") + "credentials per instance + signed plugins"
        if out.describe.startswith("TLS + "):
            out.describe = "TLS" + out.describe[3:]
    return out


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in this process's environment (where the agent's children get theirs) while inside."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def _serve(url: str, levels: list[Level], *, prefix: str, heartbeat: float, base_dir: Path, data_dir: Path,
                 say: Callable[[str], None], stop: asyncio.Event, secured: Secured, replicas: int | None,
                 wait_for_nodes: float = 0.0) -> int:
    nc = await connect(url, name="mesh up", wait=5, security=secured.client)
    # With OTEL_* set, the in-process registry and agent trace too (the plugins, their own processes, do anyway).
    flush_traces = setup_tracing("mesh-up", version=__version__)
    code = 0
    try:
        # The registry and the agent log their own "serving …" line: no second one here.
        async with RegistryService(nc, prefix=prefix, replicas=replicas,
                                   wait_for_nodes=wait_for_nodes) as registry, Agent(
                nc, nats_url=url, prefix=prefix, heartbeat_interval=heartbeat, data_dir=data_dir / "agent",
                cwd=base_dir, auth=secured.auth, trust_dir=secured.trust_dir,
                require_signatures=secured.trust_dir is not None, replicas=replicas) as agent:
            started = await start_in_order(agent, levels, base_dir=base_dir, say=say)
            await reachable_through_every_node(url, [(agent.placements[i].name, i) for ids in started for i in ids
                                                     if i in agent.placements], security=secured.client, say=say)
            say(f"up on {redact(url)} (prefix {prefix!r}); Ctrl-C stops it")
            if await wait_any(stop, registry.failed) is registry.failed:
                say("the registry failed (see the log above); stopping")
                code = 1
            say("stopping plugins")
            await stop_in_reverse(agent, started)
    finally:
        await close(nc)
        if flush_traces is not None:
            await asyncio.to_thread(flush_traces)
    return code


def run_up(*, nats_url: str | None, port: int, data_dir: Path, mesh_file: Path | None,
           say: Callable[[str], None], prefix: str | None = None, security: Security | None = None,
           topology: Topology | None = None) -> int:
    """Blocking: run everything until SIGINT/SIGTERM, then stop it all, children first."""
    security = security or Security()
    topology = topology or Topology()
    _loop.choose(os.environ, _loop.have_uvloop())  # a wrong MESH_LOOP is refused before anything starts
    if nats_url is not None and security.embedded_only:
        raise ValueError(f"{'/'.join(security.embedded_only)} secure the embedded nats-server, and --nats uses a "
                         "running one: give one or the other (for a server of your own: mesh --tls-ca CA up --nats)")
    if nats_url is not None and (topology.cluster or topology.join or topology.listen != "127.0.0.1"):
        raise ValueError("--cluster, --join and --listen are for the embedded nats-server, and --nats uses a "
                         "running one: give one or the other")
    mesh = load_mesh_file(mesh_file) if mesh_file else MeshFile()
    base_dir = mesh_file.parent if mesh_file else Path.cwd()
    trust_dir = data_dir / "trusted" if security.secure else None
    levels = plan(mesh, base_dir=base_dir.resolve(), source=str(mesh_file or "mesh.toml"), trust_dir=trust_dir,
                  require_signatures=security.secure)
    prefix = prefix or mesh.mesh.prefix or "mesh"
    heartbeat = mesh.mesh.heartbeat_interval or float(os.environ.get("MESH_HEARTBEAT_INTERVAL", "2"))
    servers: list[NatsServer] = []
    secured = Secured()
    replicas = topology.replicas
    if nats_url is None:
        secured = secure(security, data_dir, topology)
        t0 = time.monotonic()
        servers, nats_url = _start_nats(topology, port=port, data_dir=data_dir, secured=secured, say=say)
        extra = f"; {secured.describe}" if secured.describe else ""
        what = (f"{len(servers)} nats-server nodes {nats_url}" if len(servers) > 1
                else f"nats-server {nats_url}")
        say(f"{what} (JetStream in {data_dir}{extra}) ready in {time.monotonic() - t0:.2f}s")
        if topology.cluster or topology.join:
            replicas = topology.wanted_replicas
            say(f"cluster {servers[0].cluster_name!r} of {topology.nodes} nodes; buckets with {replicas} "
                f"replica{'s' if replicas != 1 else ''}")
        if secured.export:
            say(f"to use it from another shell: {secured.export_line(nats_url)}")
    else:
        say(f"using NATS at {redact(nats_url)}")
    try:
        with _environment(secured.env):
            # In a cluster this mesh up started, the other nodes may still be starting: the registry
            # waits (bounded) for the JetStream nodes its replicas need, then refuses saying so.
            wait = JOIN_TIMEOUT if (topology.cluster or topology.join) and (replicas or 1) > 1 else 0.0
            return _loop.run(_main(nats_url, levels, prefix=prefix, heartbeat=heartbeat, base_dir=base_dir,
                                   data_dir=data_dir, say=say, secured=secured, replicas=replicas,
                                   wait_for_nodes=wait), announce=logging.INFO)
    finally:
        for server in reversed(servers):
            server.stop()
        if servers:
            say("nats-server stopped" if len(servers) == 1 else f"{len(servers)} nats-server nodes stopped")


def _start_nats(topology: Topology, *, port: int, data_dir: Path, secured: Secured,
                say: Callable[[str], None]) -> tuple[list[NatsServer], str]:
    """Start the embedded node(s) (in the main thread: their parent-death signal follows it)."""
    if topology.cluster:
        size = topology.cluster
        cluster = NatsCluster(data_dir, size=size, hosts=[topology.listen] * size,
                              ports=[port + i for i in range(size)],
                              cluster_ports=[topology.route_port + i for i in range(size)] if topology.route_port
                              else None, **secured.server)
        cluster.start()
        return cluster.nodes, cluster.urls
    if not topology.join:
        server = NatsServer(data_dir, port=port, host=topology.listen, **secured.server)
        server.start()
        return [server], server.url
    name = topology.name or f"{socket.gethostname()}-{port}"
    server = NatsServer(data_dir, port=port, host=topology.listen, name=name, cluster_name="mesh",
                        cluster_port=topology.route_port or ROUTE_PORT, routes=list(topology.join),
                        monitor_port=free_port(topology.listen), **secured.server)
    server.start()
    say(f"node {name} routing to {', '.join(topology.join)}; waiting for the JetStream cluster "
        f"(a majority of its {topology.nodes} nodes, up to {JOIN_TIMEOUT:g}s)")
    try:
        NatsCluster.wait_for([server], timeout=JOIN_TIMEOUT)
    except BaseException:
        server.stop()
        raise
    return [server], server.url


async def _main(url: str, levels: list[Level], *, prefix: str, heartbeat: float, base_dir: Path, data_dir: Path,
                say: Callable[[str], None], secured: Secured, replicas: int | None, wait_for_nodes: float) -> int:
    with stop_on_signals() as stop:
        return await _serve(url, levels, prefix=prefix, heartbeat=heartbeat, base_dir=base_dir, data_dir=data_dir,
                            say=say, stop=stop, secured=secured, replicas=replicas, wait_for_nodes=wait_for_nodes)
