"""The agent: one per machine, it runs and supervises plugin hosts and takes commands over NATS.

``mesh agent`` (and ``mesh up``, in-process) starts one. Each supervised instance is a
``python -m mesh run REF --instance-id ID`` child process; the instance keeps its id across
restarts. A child that exits non-zero (crash, SIGKILL, failed ``initialize``) is restarted with
exponential backoff (tenacity); more than ``restart_limit`` restarts within ``restart_window``
seconds mark it ``failed`` in the registry with the last error, and it is left down.

Commands, request/reply on ``<prefix>.agent.<agent>.<verb>``: ``load``, ``unload``, ``reload``,
``list``; every agent also answers ``<prefix>.agents.list`` (no queue group) for discovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from pydantic import BaseModel, ConfigDict, Field
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from plugin_sdk import (
    CommunicationError,
    Health,
    InitializationError,
    InvalidMessage,
    PluginInfo,
    PluginNotFound,
    PluginRegistry,
    RequestTimeout,
)
from plugin_sdk._config import load_config_text, validate_name
from plugin_sdk._natsd import child_preexec
from plugin_sdk._runtime import check_protocol, new_instance_id
from plugin_sdk._wire import Subjects, loads

from ._host import EXIT_RESTART, load_plugin_class, resolve_config
from ._service import json_handler

__all__ = ["Agent", "LoadRequest", "default_agent_name"]

log = logging.getLogger("mesh.agent")


def default_agent_name() -> str:
    """The hostname, made into a valid name (lowercase; dots and other characters → ``-``)."""
    raw = socket.gethostname().lower()
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in raw).strip("-_") or "agent"
    return name[:64]


class LoadRequest(BaseModel):
    """Body of ``<prefix>.agent.<agent>.load`` (unknown fields are ignored: newer callers may add some)."""

    model_config = ConfigDict(extra="ignore")

    ref: str
    #: The text of a plugin.toml (sent as text: the file lives on the caller's machine).
    config_toml: str | None = None
    #: The caller's name for that file, for error messages.
    config_name: str = ""
    instances: int = Field(default=1, ge=1, le=100)


class ChildCrashed(Exception):
    """A supervised child exited non-zero; ``reason`` says how."""

    def __init__(self, reason: str, ran_for: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.ran_for = ran_for


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
    state: str = "starting"  # starting | running | restarting | failed | stopped | exited
    restarts: int = 0
    last_error: str = ""
    crashes: deque[float] = field(default_factory=deque)
    stopping: bool = False
    log_tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))

    def describe(self) -> dict[str, Any]:
        return {"id": self.instance_id, "ref": self.ref, "name": self.name, "version": self.version,
                "state": self.state, "restarts": self.restarts, "last_error": self.last_error,
                "pid": self.proc.pid if self.proc and self.proc.returncode is None else None}


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
                 data_dir: Path | None = None, heartbeat_interval: float = 2.0, restart_limit: int = 5,
                 restart_window: float = 60.0, backoff_base: float = 0.5, backoff_max: float = 30.0,
                 stable_after: float = 10.0, cwd: Path | None = None) -> None:
        self.nc = nc
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
        self.registry = PluginRegistry(nc, prefix=prefix)
        self.placements: dict[str, Placement] = {}
        self._subs: list[Subscription] = []

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
        self._subs.append(await self.nc.subscribe(f"{self.subjects.prefix}.agents.list", cb=cb))
        log.info("agent %s serving %s.*", self.name, self.subject("")[:-1])

    async def stop(self, *, timeout: float = 20.0) -> None:
        """Stop serving, then stop every instance (SIGTERM, drain); safe to call twice."""
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        await asyncio.gather(*(self._stop_placement(p, timeout=timeout) for p in list(self.placements.values())))

    def subject(self, verb: str) -> str:
        return f"{self.subjects.prefix}.agent.{self.name}.{verb}"

    # -- placing instances -----------------------------------------------------------------

    async def load(self, ref: str, *, config_path: Path | None = None, config_toml: str | None = None,
                   config_name: str = "", instances: int = 1) -> list[str]:
        """Validate REF (and its config) here, then start ``instances`` supervised instances."""
        # Importing here gives a typed refusal before anything starts; the child imports afresh.
        cls = await asyncio.to_thread(load_plugin_class, ref)
        if config_toml is not None:
            config = load_config_text(config_toml, base=cls.default_config(), source=config_name or "plugin.toml")
            config_path = self.data_dir / "configs" / f"{config.name}-{time.time_ns()}.toml"
            config_path.parent.mkdir(parents=True, exist_ok=True)
            config_path.write_text(config_toml, encoding="utf-8")
        else:
            config = resolve_config(cls, config_path)
        check_protocol(config)
        ids = []
        for _ in range(instances):
            p = Placement(new_instance_id(config.name), ref, config.name, config.version, config_path)
            self.placements[p.instance_id] = p
            p.task = asyncio.create_task(self._supervise(p), name=f"supervise {p.instance_id}")
            ids.append(p.instance_id)
        return ids

    async def unload(self, target: str, *, timeout: float = 20.0) -> list[str]:
        """Stop every instance of plugin ``target``, or the one instance with that id."""
        chosen = [p for p in self.placements.values() if target in (p.instance_id, p.name)]
        if not chosen:
            raise PluginNotFound(f"agent {self.name} runs no plugin or instance {target!r}", plugin=target)
        await asyncio.gather(*(self._stop_placement(p, timeout=timeout) for p in chosen))
        return [p.instance_id for p in chosen]

    async def reload(self, name: str, *, ready_timeout: float = 30.0) -> list[tuple[str, str]]:
        """Rolling: for each instance, start a new one, wait until healthy, then drain the old."""
        old = [p for p in self.placements.values() if p.name == name and p.state != "stopped"]
        if not old:
            raise PluginNotFound(f"agent {self.name} runs no plugin {name!r}", plugin=name)
        replaced = []
        for p in old:
            (new_id,) = await self.load(p.ref, config_path=p.config_path)
            info = await self.wait_healthy(new_id, timeout=ready_timeout)
            self.placements[new_id].version = info.version  # what the new code declares
            await self._stop_placement(p)
            replaced.append((p.instance_id, new_id))
        return replaced

    async def wait_healthy(self, instance_id: str, *, timeout: float = 30.0) -> PluginInfo:
        """Until the registry lists ``instance_id`` as healthy; RequestTimeout (and the log tail) else."""
        deadline = time.monotonic() + timeout
        while True:
            p = self.placements.get(instance_id)
            if p is not None and p.state == "failed":
                raise InitializationError(f"{instance_id} failed: {p.last_error}", plugin=p.name)
            with contextlib.suppress(CommunicationError):
                info = await self.registry.get_plugin(instance_id)
                if info is not None and info.health.serving:
                    return info
            if time.monotonic() > deadline:
                tail = " | ".join(p.log_tail) if p else ""
                raise RequestTimeout(f"{instance_id} not healthy within {timeout:g}s {tail}".strip(),
                                     plugin=p.name if p else None)
            await asyncio.sleep(0.05)

    async def _stop_placement(self, p: Placement, *, timeout: float = 20.0) -> None:
        p.stopping = True
        if p.proc is not None and p.proc.returncode is None:
            p.proc.send_signal(signal.SIGTERM)  # the host drains, stops, cleans up, unregisters
            try:
                await asyncio.wait_for(p.proc.wait(), timeout)
            except TimeoutError:
                log.warning("%s did not stop within %.0fs; killing it", p.instance_id, timeout)
                p.proc.kill()
                await p.proc.wait()
                with contextlib.suppress(CommunicationError):
                    await self.registry.unregister_plugin(p.instance_id)
        if p.task is not None:
            p.task.cancel()  # it may be sleeping in a backoff
            with contextlib.suppress(asyncio.CancelledError):
                await p.task
        if p.state == "failed":
            with contextlib.suppress(CommunicationError):
                await self.registry.unregister_plugin(p.instance_id)
        p.state = "stopped"
        self.placements.pop(p.instance_id, None)

    # -- supervision -----------------------------------------------------------------------

    async def _supervise(self, p: Placement) -> None:
        """Run the child; on a crash restart it with backoff, until told to stop or over the limit."""
        try:
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
        except asyncio.CancelledError:
            if p.proc is not None and p.proc.returncode is None:
                p.proc.kill()
                await p.proc.wait()
            raise

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
            p.state = "restarting"
            delay = state.next_action.sleep if state.next_action else 0.0
            log.warning("%s %s; restart %d in %.1fs", p.instance_id, p.last_error, p.restarts, delay)

        return before_sleep

    async def _run_child(self, p: Placement) -> None:
        cmd = [sys.executable, "-m", "mesh", "run", p.ref, "--nats", self.nats_url, "--prefix",
               self.subjects.prefix, "--heartbeat-interval", str(self.heartbeat_interval),
               "--instance-id", p.instance_id]
        if p.config_path is not None:
            cmd += ["--config", str(p.config_path)]
        env = dict(os.environ, MESH_AGENT=self.name, MESH_RESTARTS=str(p.restarts), MESH_LAST_ERROR=p.last_error)
        started, started_wall = time.monotonic(), time.time()
        p.proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=self.cwd, env=env, stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            start_new_session=True, preexec_fn=child_preexec)
        p.state = "running"
        assert p.proc.stderr is not None
        await self._relay_output(p, p.proc.stderr)
        code = await p.proc.wait()
        if code == 0 or p.stopping:
            p.state = "exited" if not p.stopping else p.state
            return
        reason = _exit_reason(code)
        detail = next((line for line in reversed(p.log_tail) if "error" in line.lower()), "")
        p.last_error = f"{reason}: {detail}" if detail else reason
        p.crashes.append(time.monotonic())
        # Only a run that got as far as serving (it registered) counts as "stable": a plugin that
        # dies slowly in start-up (say, a dependency timeout) must still end up failed.
        # A requested restart (EXIT_RESTART) is a plugin's own decision after serving, not a crash loop.
        served = code == EXIT_RESTART or await self._registered_since(p.instance_id, started_wall)
        raise ChildCrashed(p.last_error, time.monotonic() - started if served else 0.0)

    async def _registered_since(self, instance_id: str, since: float) -> bool:
        try:
            info = await self.registry.get_plugin(instance_id)
        except CommunicationError:
            return False
        return info is not None and info.started_at >= since - 1.0

    async def _relay_output(self, p: Placement, stream: asyncio.StreamReader) -> None:
        """Pass the child's log lines on (prefixed with its id) and keep the last few for errors."""
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()
            p.log_tail.append(text[-300:])
            sys.stderr.write(f"[{p.instance_id}] {text}\n")

    async def _mark_failed(self, p: Placement, reason: str) -> None:
        p.state = "failed"
        log.error("%s failed after %d restarts: %s", p.instance_id, p.restarts, reason)
        info = PluginInfo(id=p.instance_id, name=p.name, version=p.version, health=Health.FAILED,
                          host=socket.gethostname(), agent=self.name, restarts=p.restarts, last_error=reason,
                          heartbeat_interval=self.heartbeat_interval)
        with contextlib.suppress(CommunicationError):
            await self.registry.register_plugin(info)

    # -- the NATS API ----------------------------------------------------------------------

    async def _load(self, body: Any) -> dict[str, Any]:
        req = LoadRequest.model_validate(body or {})
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

