"""`python -m mesh run` (how an agent starts a host) takes the short way: only the runtime is
imported, the options are the full CLI's, and everything else is left to the full CLI."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import typer.main

from mesh import NatsServer
from mesh._run_main import OPTIONS
from mesh.cli import app
from tests.conftest import ROOT, child_env

HEAVY = ("typer", "rich", "cryptography", "opentelemetry.sdk", "mesh._agent", "mesh._up", "mesh._registry", "psutil",
         "plugin_sdk._natsd", "tenacity", "opentelemetry.metrics")


async def _mesh(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, *args, env=child_env(**(env or {})), cwd=ROOT,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_a_host_imports_only_the_runtime() -> None:
    code, err = await _mesh("-X", "importtime", "-m", "mesh", "run", "nosuch_module:Thing")
    imported = {line.rsplit("|", 1)[-1].strip() for line in err.splitlines() if line.startswith("import time:")}
    assert "mesh._host" in imported and "plugin_sdk._runtime" in imported
    assert not {m for m in imported if m.split(".")[0] in HEAVY or m in HEAVY or m.startswith(HEAVY)}
    errors = [line for line in err.splitlines() if not line.startswith("import time:")]
    assert code == 1 and errors == ["error: InitializationError: cannot load 'nosuch_module:Thing': no module "
                                    "named 'nosuch_module'"], errors


def test_the_short_way_takes_the_options_of_mesh_run() -> None:
    command = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    full = {opt for param in command.params for opt in param.opts if opt.startswith("-")}
    assert set(OPTIONS) == full - {"--reload", "--help"}


async def test_help_and_unknown_options_go_to_the_full_cli() -> None:
    code, err = await _mesh("-m", "mesh", "run", "--no-such-option", "x:Y")
    assert code == 2 and "No such option" in err  # typer's own message
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "mesh", "run", "--help", env=child_env(),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0 and b"--reload" in out and b"--instance-id" in out


async def test_a_host_without_a_registry_stops_at_once_when_told(nats_server: NatsServer, prefix: str,
                                                                 tmp_path: Path) -> None:
    """Unregistering waits a moment, not the 20 s a state write may retry (the registry forgets a
    silent instance anyway)."""
    log = tmp_path / "host.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh", "run", "examples.echo:Echo", "--nats", nats_server.url, "--prefix", prefix,
            cwd=ROOT, env=child_env(), stdout=out, stderr=out)
    try:
        for _ in range(300):  # bounded: until it serves (it registers through heartbeats later)
            if "serving as" in log.read_text(errors="replace"):
                break
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0, log.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "could not unregister" in log.read_text()
