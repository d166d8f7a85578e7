"""`mesh up` as a real process: --port means the embedded server, one data dir per server, and
each status line once."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mesh import free_port
from tests.conftest import child_env, mesh_cli

READY = "Ctrl-C stops it"
_LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ \w+ [\w.]+: ")


@dataclass
class Up:
    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)

    async def ready(self, timeout: float = 60) -> list[str]:
        """Read stderr until the ready line; fail (with what it said) if it exits first."""
        assert self.proc.stderr is not None

        async def read() -> None:
            assert self.proc.stderr is not None
            while not self.lines or READY not in self.lines[-1]:
                line = await self.proc.stderr.readline()
                if not line:
                    raise AssertionError(f"mesh up exited before it was up: {self.lines}")
                self.lines.append(line.decode().rstrip("\n"))

        await asyncio.wait_for(read(), timeout)
        return self.lines

    async def stop(self, timeout: float = 60) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
        _, rest = await asyncio.wait_for(self.proc.communicate(), timeout)
        self.lines += rest.decode().splitlines()
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def start_up(*args: str, cwd: Path, prefix: str, **env: str) -> Up:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", "up", *args, cwd=cwd, env=child_env(MESH_PREFIX=prefix, **env),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    return Up(proc)


async def test_port_means_the_embedded_server_whatever_mesh_nats_url_says(tmp_path: Path, prefix: str) -> None:
    port = free_port()
    up = await start_up("--port", str(port), "--data-dir", str(tmp_path / "data"), cwd=tmp_path, prefix=prefix,
                        MESH_NATS_URL=f"nats://127.0.0.1:{port}")
    try:
        lines = await up.ready()
        assert any("MESH_NATS_URL" in line and "embedded" in line for line in lines), lines
        assert any(f"nats-server nats://127.0.0.1:{port}" in line for line in lines), lines
        assert await up.stop() == 0, up.lines
    finally:
        await up.kill()
    r = await mesh_cli("up", "--nats", "nats://127.0.0.1:4222", "--port", "4300", url="", prefix=prefix, cwd=tmp_path)
    assert r.code == 1 and len(r.err.strip().splitlines()) == 1 and "--nats" in r.err and "--port" in r.err, r.err


async def test_a_second_mesh_up_in_the_same_data_dir_is_refused(tmp_path: Path, prefix: str) -> None:
    data = tmp_path / "data"
    port = free_port()
    first = await start_up("--port", str(port), "--data-dir", str(data), cwd=tmp_path, prefix=prefix)
    second: Up | None = None
    try:
        await first.ready()
        second = await start_up("--port", str(free_port()), "--data-dir", str(data), cwd=tmp_path, prefix=prefix)
        code = await asyncio.wait_for(second.proc.wait(), 60)
        assert second.proc.stderr is not None
        err = (await second.proc.stderr.read()).decode()
        assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert str(data) in err and f"pid {first.proc.pid}" in err, err
        # The first is unharmed: still running, still serving its registry.
        assert first.proc.returncode is None
        r = await mesh_cli("ls", "--json", url=f"nats://127.0.0.1:{port}", prefix=prefix)
        assert (r.code, json.loads(r.out)) == (0, []), r
        assert await first.stop() == 0, first.lines
    finally:
        await first.kill()
        if second is not None:
            await second.kill()


async def test_each_status_line_appears_once(tmp_path: Path, prefix: str) -> None:
    up = await start_up("--port", str(free_port()), "--data-dir", str(tmp_path / "data"), cwd=tmp_path,
                        prefix=prefix)
    try:
        await up.ready()
        assert await up.stop() == 0
    finally:
        await up.kill()
    texts = [_LOG_PREFIX.sub("", line).removeprefix("mesh ").strip() for line in up.lines]
    assert all(not t.startswith("mesh ") for t in texts), up.lines  # no "mesh mesh is up"
    for i, text in enumerate(texts):
        others = texts[:i] + texts[i + 1:]
        assert not any(text in other or other in text for other in others if other), (text, up.lines)
