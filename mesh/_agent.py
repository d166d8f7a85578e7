"""The agent: one per machine, it runs and supervises plugin hosts and takes commands over NATS.

``mesh agent`` (and ``mesh up``, in-process) starts one. Each supervised instance is a
``python -m mesh run REF --instance-id ID`` child process; the instance keeps its id across
restarts. A child that exits non-zero (crash, SIGKILL, failed ``initialize``) is restarted with
exponential backoff (tenacity); more than ``restart_limit`` restarts within ``restart_window``
seconds mark it ``failed`` in the registry with the last error, and it is left down.

Commands, request/reply on ``<prefix>.agent.<agent>.<verb>``: ``load``, ``unload``, ``reload``,
``list``; every agent also answers ``<prefix>.agents.list`` (no queue group) for discovery.

A ``load`` may carry a plugin package (a directory's files or a wheel, zipped) instead of a REF: the
agent verifies its signature against its own trust store (``mesh/_signing.py``; required with
``require_signatures``), copies the verified bytes into ``<data dir>/packages/`` and runs that copy.

A child whose plugin has ``[limits]`` gets them as rlimits (and, where cgroup v2 allows, a cgroup with
``memory.max``); one that goes past a limit is stopped and recorded as ``ResourceError: <limit> limit
... exceeded``, then restarted like any crash (``mesh/_limits.py``).

A child that is alive but stopped heartbeating (wedged: a blocked event loop, SIGSTOP) for
``unresponsive_after`` seconds is killed with SIGKILL, and so restarted like any crash. Its stderr
is always read to the end (long lines are cut, never fatal), so logging never wedges a child.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from plugin_sdk import (
    CommunicationError,
    Health,
    InitializationError,
    InvalidMessage,
    PluginConfig,
    PluginInfo,
    PluginNotFound,
    PluginRegistry,
    RequestTimeout,
    ResourceLimits,
)
from plugin_sdk.host import (
    Subjects,
    TaskOwner,
    check_protocol,
    child_preexec,
    drain_all,
    dumps,
    every,
    load_config_text,
    loads,
    new_instance_id,
    open_bucket,
    plugin_permissions,
    redact,
    request,
    response_from_msg,
    validate_name,
)

from ._auth import DEFAULT_USER_TTL, AuthStore, Identity
from ._auth import Permissions as AuthPermissions
from ._host import EXIT_RESTART, load_plugin_class, resolve_config
from ._limits import STOP_GRACE, ChildGroup, LimitWatch, cgroup_support, limits_preexec, rlimit_plan
from ._pki import plugin_tls_env
from ._service import json_handler
from ._signing import (
    Package,
    TrustStore,
    check_package,
    default_trust_dir,
    install_package,
    plugin_entry,
    probe_config,
    unpack,
)

__all__ = ["Agent", "LoadRequest", "default_agent_name"]

log = logging.getLogger("mesh.agent")

#: A relayed line of a child's output longer than this (bytes) is cut, with a marker saying by how much.
MAX_LINE = 16 * 1024
#: How much of a child's output the relay reads at once.
READ_CHUNK = 64 * 1024
#: Relayed output waiting for a slow stderr, at most (characters); more is dropped, and counted.
STDERR_BACKLOG = 1 << 20
#: How long to wait for a child to be gone after SIGKILL before giving up on it.
REAP_TIMEOUT = 10.0

_INFOS = TypeAdapter(list[PluginInfo])


def default_agent_name() -> str:
    """``MESH_AGENT_NAME``, else the hostname, made into a valid name (lowercase; dots and other
    characters → ``-``: a Kubernetes node name such as ``ip-10-0-1-7.ec2.internal`` works)."""
    raw = (os.environ.get("MESH_AGENT_NAME") or socket.gethostname()).lower()
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in raw).strip("-_") or "agent"
    return name[:64]


class LoadRequest(BaseModel):
    """Body of ``<prefix>.agent.<agent>.load`` (unknown fields are ignored: newer callers may add some)."""

    model_config = ConfigDict(extra="ignore")

    #: What to run: a REF importable on the agent, or (instead) a ``package``.
    ref: str | None = None
    #: The text of a plugin.toml (sent as text: the file lives on the caller's machine).
    config_toml: str | None = None
    #: The caller's name for that file, for error messages.
    config_name: str = ""
    instances: int = Field(default=1, ge=1, le=100)
    #: A plugin package instead of a REF: its files as a zip (``mesh._signing.pack``), base64.
    package: str | None = None
    #: ``dir`` (a directory with plugin.toml) or ``wheel``.
    package_kind: Literal["dir", "wheel"] = "dir"
    #: The caller's name for the package (its path), for messages.
    package_name: str = Field(default="", max_length=1000)
    #: The package's signature document (``mesh-signature.json`` / ``<wheel>.sig``); null: unsigned.
    signature: str | None = None

    @model_validator(mode="after")
    def _ref_or_package(self) -> LoadRequest:
        if (self.ref is None) == (self.package is None):
            raise ValueError("give a ref or a package (one of them)")
        if self.package is not None and self.config_toml is not None:
            raise ValueError("a package brings its own plugin.toml: no config_toml with it")
        return self

    def unpacked(self) -> Package:
        """The package, unzipped in memory, every entry checked (SignatureInvalid, InvalidMessage)."""
        try:
            data = base64.b64decode(self.package or "", validate=True)
        except binascii.Error:
            raise InvalidMessage("agent load: package is not base64") from None
        name = "".join(c if c.isprintable() else "?" for c in self.package_name)  # (it goes into log lines)
        return unpack(data, kind=self.package_kind, signature=self.signature, source=name or "package")


class ChildCrashed(Exception):
    """A supervised child exited non-zero; ``reason`` says how."""

    def __init__(self, reason: str, ran_for: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.ran_for = ran_for


class PlacementState(enum.StrEnum):
    """Where one supervised instance is (``mesh agents`` shows it; JSON carries the value)."""

    STARTING = "starting"  # placed; its first process is being started
    RUNNING = "running"  # its process runs (serving, or still starting inside)
    RESTARTING = "restarting"  # its process ended badly; waiting out the backoff before the next start
    FAILED = "failed"  # crashed more often than the restart limit allows: left down, listed with the reason
    EXITED = "exited"  # its process ended by itself with code 0 (e.g. a control stop): not restarted
    STOPPED = "stopped"  # unloaded by the agent: gone


@dataclass
class Placement:
    """One instance this agent supervises."""

    instance_id: str
    ref: str
    name: str
    version: str
    config_path: Path | None
    proc: asyncio.subprocess.Process | None = None
    task: asyncio.Task[None] | None = None
    state: PlacementState = PlacementState.STARTING
    restarts: int = 0
    last_error: str = ""
    crashes: deque[float] = field(default_factory=deque)
    stopping: bool = False
    log_tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    #: Set when the agent killed the running child for missing its heartbeats: the reason to record.
    unresponsive: str = ""
    #: A package's verified copy in the agent's store (``load_package``): the host's working directory.
    workdir: Path | None = None
    #: The [limits] it was last started with, and the current run's watch over them (mesh/_limits.py).
    limits: ResourceLimits | None = None
    watch: LimitWatch | None = None

    def describe(self) -> dict[str, Any]:
        return {"id": self.instance_id, "ref": self.ref, "name": self.name, "version": self.version,
                "state": self.state, "restarts": self.restarts, "last_error": self.last_error,
                "pid": self.proc.pid if self.proc and self.proc.returncode is None else None}


class _StderrSink:
    """Relayed output goes to our stderr from one thread: a slow stderr never blocks the event loop.

    At most ``backlog`` characters wait; past that, lines are dropped and counted, and the count is
    written once there is room again. (Blocking the loop would stop every relay, and so every child.)
    """

    def __init__(self, backlog: int = STDERR_BACKLOG) -> None:
        self._backlog = backlog
        self._lines: deque[str] = deque()
        self._size = 0
        self._dropped = 0
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def write(self, line: str) -> None:
        """Queue ``line``; never blocks (beyond a short lock)."""
        with self._cond:
            if self._size + len(line) > self._backlog:
                self._dropped += 1
                return
            if self._thread is None or self._closed:
                self._closed = False
                self._thread = threading.Thread(target=self._run, name="mesh-agent-stderr", daemon=True)
                self._thread.start()
            self._lines.append(line)
            self._size += len(line)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._lines and not self._closed:
                    self._cond.wait()
                if not self._lines:
                    return  # closed, and everything written
                text = "".join(self._lines)
                self._lines.clear()
                self._size = 0
                dropped, self._dropped = self._dropped, 0
            if dropped:
                text += f"[agent] {dropped} relayed line(s) dropped: stderr was too slow\n"
            try:
                sys.stderr.write(text)
                sys.stderr.flush()
            except (OSError, ValueError):  # stderr closed or broken: there is no one left to tell
                continue

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (for up to ``timeout``), then end the thread. Blocking: call it in a thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)


def describe_health(info: PluginInfo | None) -> str:
    """``starting: waiting for tally >=1 (25s left)``: an instance's health in the registry, and why."""
    if info is None:
        return "not registered yet"
    return f"{info.health.value}: {info.health_reason}" if info.health_reason else info.health.value


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Agent:
    """Supervise plugin hosts on this machine; serve load/unload/reload/list over NATS."""

    def __init__(self, nc: NATS, *, nats_url: str, name: str | None = None, prefix: str = "mesh",
                 trust_dir: Path | None = None, require_signatures: bool = False,
                 data_dir: Path | None = None, heartbeat_interval: float = 2.0, restart_limit: int = 5,
                 restart_window: float = 60.0, backoff_base: float = 0.5, backoff_max: float = 30.0,
                 stable_after: float = 10.0, cwd: Path | None = None,
                 unresponsive_after: float | None = None, auth: AuthStore | None = None,
                 credentials_ttl: float = DEFAULT_USER_TTL, replicas: int | None = None) -> None:
        self.nc = nc
        #: Copies of the state buckets of the plugins it starts (None: 3 on a cluster of 3+, else 1);
        #: its children are told through MESH_REPLICAS.
        self.replicas = replicas
        self.nats_url = nats_url
        self.name = validate_name(name or default_agent_name(), what="agent name")
        self.subjects = Subjects(prefix)
        self.data_dir = data_dir or Path.cwd() / ".mesh" / "agent"
        self.heartbeat_interval = heartbeat_interval
        self.restart_limit = restart_limit
        self.restart_window = restart_window
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self.cwd = cwd or Path.cwd()
        #: A running child whose heartbeats stopped this long ago (seconds) is killed, then restarted.
        self.unresponsive_after = (unresponsive_after if unresponsive_after is not None
                                   else max(10.0, 5 * heartbeat_interval))
        self.registry = PluginRegistry(nc, prefix=prefix)
        #: Packages are verified against this trust store; unsigned ones are refused if signatures are required.
        self.trust = TrustStore(trust_dir or default_trust_dir())
        self.require_signatures = require_signatures
        self.placements: dict[str, Placement] = {}
        self._subs: list[Subscription] = []
        #: The one owner of the agent's tasks: one supervision task per placement, and the heartbeat watch.
        self._tasks = TaskOwner(f"agent {self.name}", log)
        #: With an auth store (``--secure``), every instance gets its own NATS identity (see _identity_env).
        self.auth = auth
        self.credentials_ttl = credentials_ttl
        self._configs: dict[str, PluginConfig] = {}
        self._identities: dict[str, Identity] = {}
        self._watch: asyncio.Task[None] | None = None
        self._stderr = _StderrSink()

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        try:  # one name, one agent: commands sent to a name must reach one machine
            other = await self.nc.request(self.subject("list"), b"", timeout=0.5)
            if other.data:
                raise InitializationError(f"an agent named {self.name!r} is already running "
                                          f"({loads(other.data).get('host')}); give this one another name "
                                          "(mesh agent --name NAME)")
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            pass
        self.data_dir.mkdir(parents=True, exist_ok=True)
        handlers: dict[str, Callable[[Any], Awaitable[Any]]] = {
            "load": self._load, "unload": self._unload, "reload": self._reload, "list": self._list,
        }
        label = f"agent {self.name}"
        for verb, fn in handlers.items():
            cb = json_handler(self.nc, label, verb, fn, instance=self.name, log=log)
            self._subs.append(await self.nc.subscribe(self.subject(verb), cb=cb))
        cb = json_handler(self.nc, label, "list", self._list, instance=self.name, log=log)
        self._subs.append(await self.nc.subscribe(self.subjects.agents_list, cb=cb))
        if self._watch is None:
            self._watch = self._tasks.spawn(self._watch_heartbeats(), name="heartbeat watch")
            if self.auth is not None:
                self._tasks.spawn(every(max(1.0, self.credentials_ttl / 10), self._renew_credentials, log=log,
                                        what="credentials renewal"), name="credentials renewal")
        log.info("agent %s serving %s.*", self.name, self.subject("")[:-1])

    async def stop(self, *, timeout: float = 20.0) -> None:
        """Stop serving (draining: a load or reload in flight finishes and gets its reply), then stop
        every instance (SIGTERM, drain), then the agent's own tasks; safe to call twice."""
        watch, self._watch = self._watch, None
        await self._tasks.cancel(watch)  # first: nothing is killed for silence while it is being stopped
        subs, self._subs = self._subs, []
        if not await drain_all(subs, timeout=timeout):
            log.warning("agent %s: commands still running after %.0fs were abandoned", self.name, timeout)
        await asyncio.gather(*(self._stop_placement(p, timeout=timeout) for p in list(self.placements.values())))
        await self._tasks.close()
        await asyncio.to_thread(self._stderr.close)

    def subject(self, verb: str) -> str:
        return self.subjects.agent(self.name, verb)

    # -- placing instances -----------------------------------------------------------------

    async def load(self, ref: str, *, config_path: Path | None = None, config_toml: str | None = None,
                   config_name: str = "", instances: int = 1, workdir: Path | None = None,
                   checked: PluginConfig | None = None) -> list[str]:
        """Validate REF (and its config) here, then start ``instances`` supervised instances.

        With ``workdir`` (a package's verified copy in this agent's store: :meth:`load_package`), the
        hosts run there, and REF is checked by a child process there (``checked``: it was already).
        """
        if checked is not None:
            config = checked
        elif workdir is not None:  # a package's code never runs in the agent's own process
            config = await asyncio.to_thread(probe_config, ref, workdir, config_path)
        else:
            # Importing here gives a typed refusal before anything starts; the child imports afresh.
            cls = await asyncio.to_thread(self._import, ref)
            if config_toml is not None:
                config = load_config_text(config_toml, base=cls.default_config(),
                                          source=config_name or "plugin.toml")
                config_path = self.data_dir / "configs" / f"{config.name}-{time.time_ns()}.toml"
                config_path.parent.mkdir(parents=True, exist_ok=True)
                config_path.write_text(config_toml, encoding="utf-8")
            else:
                config = resolve_config(cls, config_path)
        check_protocol(config)
        if self.auth is not None:  # a plugin may use its bucket, not create one: that is the admin's
            await open_bucket(self.nc.jetstream(), self.subjects.state_bucket(config.name), create=True,
                              description=f"state of plugin {config.name}", replicas=self.replicas)
        ids = []
        for _ in range(instances):
            p = Placement(new_instance_id(config.name), ref, config.name, config.version, config_path, workdir=workdir)
            self._configs[p.instance_id] = config
            self.placements[p.instance_id] = p
            p.task = self._tasks.spawn(self._supervise(p), name=f"supervise {p.instance_id}")
            ids.append(p.instance_id)
        return ids

    def _identity_env(self, p: Placement) -> dict[str, str]:
        """Under ``--secure``: a NATS identity of the instance's own, minted now (its ``.creds`` file,
        0600, in the agent's auth store) with exactly its plugin's permissions, and its inbox prefix."""
        config = self._configs.get(p.instance_id)
        if self.auth is None or config is None:
            return {}
        perms = plugin_permissions(self.subjects, name=config.name, instance_id=p.instance_id,
                                   send=config.permissions.send, publish=config.permissions.publish,
                                   subscribe=config.permissions.subscribe,
                                   dependencies=[d.name for d in config.dependencies])
        identity = self.auth.mint(p.instance_id, AuthPermissions(
            pub_allow=perms.publish, sub_allow=perms.subscribe, pub_deny=perms.publish_deny),
            ttl=self.credentials_ttl)
        self._identities[p.instance_id] = identity
        return {"MESH_CREDS": str(identity.creds), "MESH_INBOX_PREFIX": perms.inbox_prefix}

    async def _renew_credentials(self) -> None:
        """Mint anew the credentials of running instances past half their life (run by :func:`every`).
        nats-py reads the ``.creds`` file at every (re)connect: when the server ends a connection
        whose JWT expired, the instance comes back with the fresh one."""
        now = time.time()
        for ident, identity in list(self._identities.items()):
            p = self.placements.get(ident)
            if p is None:  # unloaded: its credentials go with it (they stay valid until they expire)
                self._identities.pop(ident, None)
                identity.creds.unlink(missing_ok=True)
                continue
            if identity.expires is not None and identity.expires - now < self.credentials_ttl / 2:
                self._identity_env(p)

    async def load_package(self, pkg: Package, *, instances: int = 1) -> tuple[list[str], dict[str, Any]]:
        """Verify ``pkg`` against this agent's trust store, copy its files into the agent's store, and
        start ``instances`` of that copy; returns (the ids, ``{"stored", "signed_by"}``).

        The files checked are the bytes in memory, and the same bytes are written: nothing can change
        between the check and the run. An unsigned package is refused with ``require_signatures``, and
        loaded with a warning without it; a signed one is always verified.
        """
        verified = await asyncio.to_thread(check_package, pkg, self.trust, required=self.require_signatures,
                                           who=f"agent {self.name!r}")
        if verified is None:
            log.warning("agent %s: loading %s UNSIGNED (this agent does not require signatures)", self.name,
                        pkg.source)
        else:
            log.info("agent %s: %s verified: %d files signed by key %s %s", self.name, pkg.source, verified.files,
                     verified.key_id, f"({verified.signer})" if verified.signer else "")
        ref, config_text = plugin_entry(pkg)
        config_path = None
        if config_text is not None:  # plugin.toml without its entry line: what `mesh run --config` accepts
            config_path = self.data_dir / "configs" / f"package-{pkg.digest()}-{time.time_ns()}.toml"
            config_path.parent.mkdir(parents=True, exist_ok=True)
            config_path.write_text(config_text, encoding="utf-8")
        config, workdir = await asyncio.to_thread(install_package, pkg, self.data_dir / "packages", ref, config_path)
        ids = await self.load(ref, config_path=config_path, instances=instances, workdir=workdir, checked=config)
        return ids, {"stored": str(workdir), "signed_by": verified.key_id if verified else None}

    def _cwd(self, p: Placement) -> Path:
        """A host's working directory: its package's stored copy, else the agent's (where REFs resolve)."""
        return p.workdir or self.cwd

    def _import(self, ref: str) -> type[Any]:
        """``load_plugin_class`` as a child in ``cwd`` sees it; a missing module says where it was looked for."""
        if str(self.cwd) not in sys.path:  # a child runs `python -m mesh` in cwd: cwd is on its path
            sys.path.append(str(self.cwd))
        try:
            return load_plugin_class(ref)
        except InitializationError as exc:
            if "no module named" not in str(exc):
                raise
            raise InitializationError(
                f"{exc}; REF is imported on the machine of agent {self.name!r} (host {socket.gethostname()}), "
                f"in its working directory {self.cwd}: the module must be importable there (installed in the "
                "agent's Python environment, or a package under that directory)", plugin=exc.plugin) from None

    async def unload(self, target: str, *, timeout: float = 20.0) -> list[str]:
        """Stop every instance of plugin ``target``, or the one instance with that id."""
        chosen = [p for p in self.placements.values() if target in (p.instance_id, p.name)]
        if not chosen:
            raise PluginNotFound(f"agent {self.name} runs no plugin or instance {target!r}", plugin=target)
        await asyncio.gather(*(self._stop_placement(p, timeout=timeout) for p in chosen))
        return [p.instance_id for p in chosen]

    async def reload(self, name: str, *, ready_timeout: float = 30.0) -> list[tuple[str, str]]:
        """Rolling: for each instance, start a new one, wait until healthy, then drain the old."""
        old = [p for p in self.placements.values() if p.name == name and p.state is not PlacementState.STOPPED]
        if not old:
            raise PluginNotFound(f"agent {self.name} runs no plugin {name!r}", plugin=name)
        replaced = []
        for p in old:
            (new_id,) = await self.load(p.ref, config_path=p.config_path, workdir=p.workdir)
            info = await self.wait_healthy(new_id, timeout=ready_timeout)
            self.placements[new_id].version = info.version  # what the new code declares
            await self._stop_placement(p)
            replaced.append((p.instance_id, new_id))
        return replaced

    async def wait_healthy(self, instance_id: str, *, timeout: float = 30.0) -> PluginInfo:
        """Until the registry lists ``instance_id`` as healthy; RequestTimeout (with its registry health and
        reason, and the log tail) else."""
        deadline = time.monotonic() + timeout
        info: PluginInfo | None = None
        while True:
            p = self.placements.get(instance_id)
            if p is not None and p.state is PlacementState.FAILED:
                raise InitializationError(f"{instance_id} failed: {p.last_error}", plugin=p.name)
            with contextlib.suppress(CommunicationError):
                info = await self.registry.get_plugin(instance_id)
                if info is not None and info.health.serving:
                    return info
            if time.monotonic() > deadline:
                tail = " | ".join(p.log_tail) if p else ""
                raise RequestTimeout(f"{instance_id} not healthy within {timeout:g}s ({describe_health(info)}) "
                                     f"{tail}".strip(), plugin=p.name if p else None)
            await asyncio.sleep(0.05)

    async def _stop_placement(self, p: Placement, *, timeout: float = 20.0) -> None:
        p.stopping = True
        proc = p.proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)  # the host drains, stops, cleans up, unregisters
            proc.send_signal(signal.SIGCONT)  # (as systemd does: a stopped process acts on SIGTERM only then)
            try:
                await asyncio.wait_for(proc.wait(), timeout)  # ends once its output is read to the end, too
            except TimeoutError:
                log.warning("%s did not stop within %.0fs; killing it", p.instance_id, timeout)
                await self._kill_and_reap(p, proc)
                with contextlib.suppress(CommunicationError):
                    await self.registry.unregister_plugin(p.instance_id)
        await self._tasks.cancel(p.task)  # it may be sleeping in a backoff
        if p.state is PlacementState.FAILED:
            with contextlib.suppress(CommunicationError):
                await self.registry.unregister_plugin(p.instance_id)
        p.state = PlacementState.STOPPED
        self.placements.pop(p.instance_id, None)

    async def _kill_and_reap(self, p: Placement, proc: asyncio.subprocess.Process) -> None:
        """SIGKILL, then wait (bounded) until it is gone: never hang a stop on one child."""
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        try:
            await asyncio.wait_for(proc.wait(), REAP_TIMEOUT)
        except TimeoutError:  # its output pipe is held open (say, by a grandchild it left behind)
            log.error("%s (pid %d) still not reaped %.0fs after SIGKILL; leaving it", p.instance_id, proc.pid,
                      REAP_TIMEOUT)

    # -- supervision -----------------------------------------------------------------------

    async def _supervise(self, p: Placement) -> None:
        """Run the child; on a crash restart it with backoff, until told to stop or over the limit.

        Cancelled, it kills a running child first (``_run_child`` does, on its way out).
        """
        while not p.stopping:
            retrying = AsyncRetrying(
                retry=retry_if_exception_type(ChildCrashed),
                wait=wait_exponential(multiplier=self.backoff_base, max=self.backoff_max),
                stop=self._over_limit(p), reraise=True, before_sleep=self._note_restart(p))
            try:
                async for attempt in retrying:
                    with attempt:
                        await self._run_child(p)
                return  # exited 0 by itself (e.g. a control stop), or told to stop
            except ChildCrashed as crash:
                if crash.ran_for >= self.stable_after and not self._too_many(p) and not p.stopping:
                    p.restarts += 1  # it had been fine for a while: restart now, fresh backoff
                    continue
                await self._mark_failed(p, crash.reason)
                return

    def _too_many(self, p: Placement) -> bool:
        now = time.monotonic()
        while p.crashes and now - p.crashes[0] > self.restart_window:
            p.crashes.popleft()
        return len(p.crashes) > self.restart_limit

    def _over_limit(self, p: Placement) -> Callable[[RetryCallState], bool]:
        def stop(state: RetryCallState) -> bool:
            exc = state.outcome.exception() if state.outcome else None
            stable = isinstance(exc, ChildCrashed) and exc.ran_for >= self.stable_after
            return p.stopping or stable or self._too_many(p)

        return stop

    def _note_restart(self, p: Placement) -> Callable[[RetryCallState], Awaitable[None]]:
        async def before_sleep(state: RetryCallState) -> None:
            p.restarts += 1
            p.state = PlacementState.RESTARTING
            delay = state.next_action.sleep if state.next_action else 0.0
            log.warning("%s %s; restart %d in %.1fs", p.instance_id, p.last_error, p.restarts, delay)

        return before_sleep

    async def _run_child(self, p: Placement) -> None:
        cmd = [sys.executable, "-m", "mesh", "run", p.ref, "--prefix", self.subjects.prefix,
               "--heartbeat-interval", str(self.heartbeat_interval), "--instance-id", p.instance_id]
        if p.config_path is not None:
            cmd += ["--config", str(p.config_path)]
        # The URL (it may hold a password) goes in the environment: anyone on the machine can read a
        # process's command line, only its user its environment. `mesh run` reads MESH_NATS_URL.
        env = dict(os.environ, **({"MESH_REPLICAS": str(self.replicas)} if self.replicas else {}),
                   MESH_NATS_URL=self.nats_url, MESH_AGENT=self.name, MESH_RESTARTS=str(p.restarts),
                   MESH_LAST_ERROR=p.last_error)
        # Under `mesh up --mtls` (MESH_PKI_DIR set): the plugin's own client certificate, not the agent's.
        env.update(plugin_tls_env(p.name))
        env.update(self._identity_env(p))
        started, started_wall = time.monotonic(), time.time()
        p.unresponsive = ""
        watch = p.watch = await self._limit_watch(p, started_wall)
        group = watch.group if watch is not None else None
        sampler: asyncio.Task[None] | None = None
        try:
            proc = p.proc = await asyncio.create_subprocess_exec(
                *cmd, cwd=self._cwd(p), env=env, stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                start_new_session=True, preexec_fn=child_preexec if watch is None else limits_preexec(
                    rlimit_plan(watch.limits), group.procs if group is not None else None))
            p.state = PlacementState.RUNNING
            assert proc.stderr is not None
            relay = asyncio.create_task(self._relay_output(p, proc.stderr), name=f"relay {p.instance_id}")
            if watch is not None:
                watch.pid = proc.pid
                if watch.limits.cpu_seconds is not None:
                    sampler = asyncio.create_task(watch.sample_cpu(), name=f"cpu time of {p.instance_id}")
                if group is not None and not group.holds(proc.pid):
                    log.warning("%s: not in its cgroup %s; its memory limit is RLIMIT_DATA only", p.instance_id,
                                group.path)
            try:
                code = await proc.wait()  # returns once the child exited *and* the relay read all it wrote
                await relay
            finally:  # cancelled (stop, unload) or failed: the child and its relay go too
                if proc.returncode is None:
                    await self._kill_and_reap(p, proc)
                relay.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await relay
            over = watch.diagnose(code, how=p.unresponsive or _exit_reason(code)) if watch is not None else None
        finally:
            if sampler is not None:
                sampler.cancel()
            if group is not None:  # read (diagnose) first: the group's memory.events go with it
                await group.remove()
        if (code == 0 and not over) or p.stopping:
            p.state = PlacementState.EXITED if not p.stopping else p.state
            return
        if over:  # past a limit: that is the reason, whoever ended the process
            p.last_error = over
        elif p.unresponsive:  # the agent killed it: that is the reason, not what it last logged
            p.last_error = p.unresponsive
        else:
            reason = _exit_reason(code)
            detail = next((line for line in reversed(p.log_tail) if "error" in line.lower()), "")
            p.last_error = f"{reason}: {detail}" if detail else reason
        p.crashes.append(time.monotonic())
        # Only a run that got as far as serving (it registered) counts as "stable": a plugin that
        # dies slowly in start-up (say, a dependency timeout) must still end up failed.
        # A requested restart (EXIT_RESTART) is a plugin's own decision after serving, not a crash loop.
        served = (code == EXIT_RESTART or (watch is not None and watch.served)
                  or await self._registered_since(p.instance_id, started_wall))
        raise ChildCrashed(p.last_error, time.monotonic() - started if served else 0.0)

    async def _limit_watch(self, p: Placement, started_wall: float) -> LimitWatch | None:
        """This run's [limits], from the config read afresh (as the child reads it), with a cgroup if
        memory is limited and cgroup v2 allows; None without OS limits."""
        try:
            if p.workdir is None:  # REF's module is imported here already (load): cheap
                config = await asyncio.to_thread(lambda: resolve_config(self._import(p.ref), p.config_path))
                p.limits = config.limits
            elif p.limits is None:  # a package's code never runs in the agent; its stored copy does not change
                p.limits = (await asyncio.to_thread(probe_config, p.ref, p.workdir, p.config_path)).limits
        except Exception as exc:  # the child fails the same way and says why; keep what we knew
            log.debug("%s: config not read again (%s); last known limits kept", p.instance_id, exc)
        if p.limits is None or not p.limits.os_limits():
            return None
        watch = LimitWatch(p.limits, started_wall=started_wall)
        if p.limits.memory is not None and (parent := cgroup_support().parent) is not None:
            try:
                watch.group = ChildGroup.create(parent, p.instance_id, p.limits.memory)
            except OSError as exc:
                log.warning("%s: no cgroup (%s); its memory limit is RLIMIT_DATA only", p.instance_id, exc)
        return watch

    def _check_limit(self, p: Placement, name: str) -> None:
        """The child's output says it hit limit ``name``: if its usage is still at it, stop it (a crash)."""
        watch, proc = p.watch, p.proc
        if watch is None or watch.exceeded or p.stopping or proc is None or proc.returncode is not None:
            return
        reason = watch.at_limit(name)
        if reason is not None:
            watch.exceeded = reason
            self._tasks.spawn(self._stop_over_limit(p, proc, watch), name=f"stop {p.instance_id} (over a limit)")

    async def _stop_over_limit(self, p: Placement, proc: asyncio.subprocess.Process, watch: LimitWatch) -> None:
        """SIGTERM (the host drains, stops, unregisters), SIGKILL if it is not gone after STOP_GRACE."""
        watch.served = await self._registered_since(p.instance_id, watch.started_wall)  # before it unregisters
        log.warning("%s (pid %d): %s", p.instance_id, proc.pid, watch.exceeded)
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)
        try:
            await asyncio.wait_for(proc.wait(), STOP_GRACE)
        except TimeoutError:
            log.warning("%s did not stop within %.0fs of SIGTERM; killing it", p.instance_id, STOP_GRACE)
            await self._kill_and_reap(p, proc)

    async def _registered_since(self, instance_id: str, since: float) -> bool:
        try:
            info = await self.registry.get_plugin(instance_id)
        except CommunicationError:
            return False
        return info is not None and info.started_at >= since - 1.0

    async def _relay_output(self, p: Placement, stream: asyncio.StreamReader) -> None:
        """Pass the child's log lines on (prefixed with its id) and keep the last few for errors; until EOF.

        It reads chunks and splits them itself, so no line is too long: a line past ``MAX_LINE`` bytes
        is cut, with a marker. The pipe must always be drained: a child writing to a full pipe blocks,
        and with it its replies and heartbeats (and ``proc.wait()`` waits for the pipe's end).
        """
        line = bytearray()
        cut = 0  # bytes of the current line beyond MAX_LINE, dropped
        while chunk := await stream.read(READ_CHUNK):
            start = 0
            while True:
                end = chunk.find(b"\n", start)
                piece = chunk[start:] if end < 0 else chunk[start:end]
                room = MAX_LINE - len(line)
                line += piece[:room]
                cut += max(0, len(piece) - room)
                if end < 0:
                    break
                self._relay_line(p, line, cut)
                line.clear()
                cut = 0
                start = end + 1
        if line or cut:  # the last line had no newline
            self._relay_line(p, line, cut)

    def _relay_line(self, p: Placement, raw: bytearray, cut: int) -> None:
        text = redact(raw.decode(errors="replace").rstrip())  # a child may log its URL, password and all
        if cut:
            text += f" … [{cut} bytes truncated]"
        p.log_tail.append(text[-300:])
        self._stderr.write(f"[{p.instance_id}] {text}\n")
        if p.watch is not None and (hit := p.watch.see(text)) is not None:
            self._check_limit(p, hit)

    # -- unresponsive children ---------------------------------------------------------------

    async def _watch_heartbeats(self) -> None:
        """Kill (SIGKILL) a running child whose heartbeats stopped: the supervise loop then restarts it.

        Only missed heartbeats count. An instance whose own ``health_check()`` says unhealthy still beats
        and is left alone; so is one starting, stopping or not registered by this run.
        """
        every = max(0.1, min(1.0, self.unresponsive_after / 5))
        silent_since: dict[str, tuple[int, float, float]] = {}  # id -> (pid, last_seen, when first seen)
        while True:
            await asyncio.sleep(every)
            try:
                await self._check_heartbeats(silent_since)
            except CommunicationError as exc:  # no registry, or a slow one: what we cannot see is not silence
                silent_since.clear()
                log.debug("heartbeat watch: no answer from the registry: %s", exc)
            except Exception:  # a bug here must not end the watch for good: say so, and look again
                log.exception("heartbeat watch failed; looking again in %.1fs", every)

    async def _check_heartbeats(self, silent_since: dict[str, tuple[int, float, float]]) -> None:
        watched = {p.instance_id: p for p in self.placements.values() if p.state is PlacementState.RUNNING
                   and not p.stopping and p.proc is not None and p.proc.returncode is None}
        for ident in set(silent_since) - set(watched):
            del silent_since[ident]
        if not watched:
            return
        seen: dict[str, PluginInfo] = {}
        for name in sorted({p.name for p in watched.values()}):
            seen.update((info.id, info) for info in await self._registry_list(name))
        now = time.monotonic()
        for ident, p in watched.items():
            info, proc = seen.get(ident), p.proc
            if info is None or proc is None or info.pid != proc.pid:  # not (yet) registered by this run
                silent_since.pop(ident, None)
                continue
            before = silent_since.get(ident)
            if before is None or before[:2] != (info.pid, info.last_seen):  # it beat (or a first look)
                silent_since[ident] = (info.pid, info.last_seen, now)
                continue
            late = info.health == Health.UNHEALTHY and info.health_reason.startswith("no heartbeat")
            if late and now - before[2] >= self.unresponsive_after:
                del silent_since[ident]
                self._kill_unresponsive(p, proc, now - before[2])

    def _kill_unresponsive(self, p: Placement, proc: asyncio.subprocess.Process, silent: float) -> None:
        if p.stopping or proc.returncode is not None or proc is not p.proc:
            return
        p.unresponsive = f"no heartbeat for {silent:.0f}s while running; killed and restarted"
        log.warning("%s (pid %d): %s", p.instance_id, proc.pid, p.unresponsive)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()  # wedged: SIGTERM would not be handled; the supervise loop restarts it

    async def _registry_list(self, name: str) -> list[PluginInfo]:
        """The registry's instances of ``name``. Not traced (unlike PluginRegistry.list_plugins): the watch
        asks every second, and a span each time would bury the traces that matter."""
        subject = self.subjects.registry("list")
        msg = await request(self.nc, subject, dumps({"name": name}), headers=None, timeout=2.0, plugin="registry")
        return _INFOS.validate_python(response_from_msg(msg).raise_for_error().result)

    async def _mark_failed(self, p: Placement, reason: str) -> None:
        p.state = PlacementState.FAILED
        log.error("%s failed after %d restarts: %s", p.instance_id, p.restarts, reason)
        info = PluginInfo(id=p.instance_id, name=p.name, version=p.version, health=Health.FAILED,
                          host=socket.gethostname(), agent=self.name, restarts=p.restarts, last_error=reason,
                          heartbeat_interval=self.heartbeat_interval)
        with contextlib.suppress(CommunicationError):
            await self.registry.register_plugin(info)

    # -- the NATS API ----------------------------------------------------------------------

    async def _load(self, body: Any) -> dict[str, Any]:
        req = LoadRequest.model_validate(body or {})
        if req.ref is None:  # a package
            ids, package = await self.load_package(req.unpacked(), instances=req.instances)
            return {"agent": self.name, "instances": ids, "package": package}
        ids = await self.load(req.ref, config_toml=req.config_toml, config_name=req.config_name,
                              instances=req.instances)
        return {"agent": self.name, "instances": ids}

    async def _unload(self, body: Any) -> dict[str, Any]:
        target = body.get("target") if isinstance(body, dict) else None
        if not isinstance(target, str):
            raise InvalidMessage("unload needs {\"target\": NAME or INSTANCE}")
        return {"agent": self.name, "stopped": await self.unload(target)}

    async def _reload(self, body: Any) -> dict[str, Any]:
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str):
            raise InvalidMessage("reload needs {\"name\": NAME}")
        return {"agent": self.name, "replaced": [list(pair) for pair in await self.reload(name)]}

    async def _list(self, body: Any) -> dict[str, Any]:
        return {"agent": self.name, "host": socket.gethostname(), "pid": os.getpid(),
                "plugins": [p.describe() for p in self.placements.values()]}

