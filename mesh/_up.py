"""``mesh up``: the embedded nats-server, the registry, and the plugins listed in ``mesh.toml``."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from plugin_sdk import ConfigError
from plugin_sdk._wire import Subjects

from ._connect import close, connect
from ._natsd import NatsServer
from ._process import child_preexec
from ._registry import RegistryService

__all__ = ["MeshFile", "PluginEntry", "load_mesh_file", "run_up"]

log = logging.getLogger("mesh.up")


class PluginEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ref: str
    instances: int = Field(default=1, ge=1, le=1000)
    config: str | None = None


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


@dataclass
class Child:
    label: str
    proc: asyncio.subprocess.Process


async def _spawn(entry: PluginEntry, index: int, *, url: str, prefix: str, heartbeat: float,
                 base_dir: Path) -> Child:
    cmd = [sys.executable, "-m", "mesh", "run", entry.ref, "--nats", url, "--prefix", prefix,
           "--heartbeat-interval", str(heartbeat)]
    if entry.config:
        cmd += ["--config", str((base_dir / entry.config).resolve())]
    # Own session: Ctrl-C reaches `mesh up` only, which then stops the plugins in order.
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=base_dir, stdin=asyncio.subprocess.DEVNULL,
                                                start_new_session=True, preexec_fn=child_preexec)
    return Child(f"{entry.ref}#{index}", proc)


async def _stop_children(children: list[Child], *, timeout: float = 15.0) -> None:
    for child in children:
        if child.proc.returncode is None:
            child.proc.send_signal(signal.SIGTERM)
    for child in children:
        try:
            await asyncio.wait_for(child.proc.wait(), timeout)
        except TimeoutError:
            log.warning("%s did not stop within %.0fs; killing it", child.label, timeout)
            child.proc.kill()
            await child.proc.wait()


async def _serve(url: str, mesh: MeshFile, *, prefix: str, heartbeat: float, base_dir: Path,
                 say: Callable[[str], None], stop: asyncio.Event) -> int:
    nc = await connect(url, name="mesh up", wait=5)
    children: list[Child] = []
    try:
        async with RegistryService(nc, prefix=prefix):
            say(f"registry serving {prefix}.registry.*")
            for entry in mesh.plugins:
                for i in range(entry.instances):
                    child = await _spawn(entry, i, url=url, prefix=prefix, heartbeat=heartbeat, base_dir=base_dir)
                    children.append(child)
                    say(f"started {child.label} (pid {child.proc.pid})")
            say(f"mesh is up on {url} (prefix {prefix!r}); Ctrl-C stops it")
            waits = {asyncio.create_task(c.proc.wait()): c for c in children}
            stopper = asyncio.create_task(stop.wait())
            try:
                while not stop.is_set():
                    done, _ = await asyncio.wait({stopper, *waits}, return_when=asyncio.FIRST_COMPLETED)
                    for task in done - {stopper}:
                        child = waits.pop(task)
                        say(f"{child.label} exited with code {child.proc.returncode}")
            finally:
                stopper.cancel()
                for task in waits:
                    task.cancel()
                await asyncio.gather(stopper, *waits, return_exceptions=True)
            say("stopping plugins")
            await _stop_children(children)
    finally:
        await _stop_children(children)
        await close(nc)
    return 0


def run_up(*, nats_url: str | None, port: int, data_dir: Path, mesh_file: Path | None,
           say: Callable[[str], None], prefix: str | None = None) -> int:
    """Blocking: run everything until SIGINT/SIGTERM, then stop it all, children first."""
    mesh = load_mesh_file(mesh_file) if mesh_file else MeshFile()
    prefix = prefix or mesh.mesh.prefix or "mesh"
    heartbeat = mesh.mesh.heartbeat_interval or float(os.environ.get("MESH_HEARTBEAT_INTERVAL", "2"))
    base_dir = mesh_file.parent if mesh_file else Path.cwd()
    server: NatsServer | None = None
    if nats_url is None:
        server = NatsServer(data_dir, port=port)
        t0 = time.monotonic()
        server.start()  # in the main thread: the child's parent-death signal follows this thread
        say(f"nats-server {server.url} (JetStream in {data_dir}) ready in {time.monotonic() - t0:.2f}s")
        nats_url = server.url
    else:
        say(f"using NATS at {nats_url}")
    try:
        return asyncio.run(_main(nats_url, mesh, prefix=prefix, heartbeat=heartbeat, base_dir=base_dir, say=say))
    finally:
        if server is not None:
            server.stop()
            say("nats-server stopped")


async def _main(url: str, mesh: MeshFile, *, prefix: str, heartbeat: float, base_dir: Path,
                say: Callable[[str], None]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await _serve(url, mesh, prefix=prefix, heartbeat=heartbeat, base_dir=base_dir, say=say, stop=stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
