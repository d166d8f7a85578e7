"""`mesh up --cluster` and replicas as a user meets them: a local 3-node mesh answering through any
node with buckets of 3 replicas and nothing left after Ctrl-C; and every refusal (too few nodes for
the replicas, an existing bucket with another count, a bad --cluster / --join) one clear line."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from mesh import NatsCluster, NatsServer, close, connect, free_port
from plugin_sdk import PluginRegistry
from plugin_sdk.host import Subjects, open_bucket
from tests.conftest import child_env, eventually, mesh_cli, start_registry

READY = "Ctrl-C stops it"


def free_ports(n: int) -> int:
    """A first port P with P .. P+n-1 all free now (mesh up --cluster N uses --port upward)."""
    for _ in range(50):
        first = free_port()
        try:
            for i in range(n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", first + i))
        except OSError:
            continue
        return first
    raise AssertionError(f"no {n} consecutive free ports found in 50 tries")


def nats_servers_in(data_dir: Path) -> list[psutil.Process]:
    """The nats-server processes whose command line names ``data_dir``."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if "nats-server" in cmdline and str(data_dir) in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


async def test_mesh_up_cluster_3_answers_through_any_node_with_3_replicas_and_stops_every_node(
        tmp_path: Path, prefix: str) -> None:
    (tmp_path / "mesh.toml").write_text('[[plugins]]\nref = "examples.echo:Echo"\n')
    port, data = free_ports(3), tmp_path / "data"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", "up", "--cluster", "3", "--port", str(port), "--data-dir", str(data),
        cwd=tmp_path, env=child_env(MESH_PREFIX=prefix), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    lines: list[str] = []
    try:
        async def up() -> None:
            assert proc.stderr is not None
            while not lines or READY not in lines[-1]:
                line = await proc.stderr.readline()
                if not line:
                    raise AssertionError(f"mesh up exited before it was up: {lines}")
                lines.append(line.decode().rstrip("\n"))

        await asyncio.wait_for(up(), 60)
        assert "up on" in lines[-1], lines
        assert any("cluster 'mesh' of 3 nodes; buckets with 3 replicas" in line for line in lines), lines
        assert len(nats_servers_in(data)) == 3

        # "up" means reachable through any node: the plugin's interest has crossed the routes (a send
        # through another node right after "up" once got "no responders" in a loaded CI run).
        for node in range(3):
            via = f"nats://127.0.0.1:{port + node}"
            r = await mesh_cli("send", "echo", '{"text":"hi"}', "--nats", via, url=via, prefix=prefix)
            assert r.code == 0 and json.loads(r.out) == {"text": "hi"}, (node, r)
        second = f"nats://127.0.0.1:{port + 1}"

        nc = await connect(second, name="test")
        try:
            js = nc.jetstream()
            subjects = Subjects(prefix)
            for bucket in (subjects.registry_bucket, subjects.state_bucket("echo")):
                info = await js.stream_info(f"KV_{bucket}")
                assert info.config.num_replicas == 3, (bucket, info.config)
        finally:
            await close(nc)

        proc.send_signal(signal.SIGINT)
        assert proc.stderr is not None
        rest = await asyncio.wait_for(proc.stderr.read(), 60)
        lines += rest.decode().splitlines()
        assert await asyncio.wait_for(proc.wait(), 10) == 0, lines
        assert any("3 nats-server nodes stopped" in line for line in lines), lines
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert nats_servers_in(data) == []


async def run_mesh(*args: str, cwd: Path, prefix: str, timeout: float) -> tuple[int, str]:
    """`mesh ARGS` to its end (killed, and the test failed, if it outlives ``timeout``): (code, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", *args, cwd=cwd, env=child_env(MESH_PREFIX=prefix, MESH_NATS_URL=""),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_mesh_up_with_more_replicas_than_nodes_is_one_line(tmp_path: Path, prefix: str) -> None:
    data = tmp_path / "data"
    code, err = await run_mesh("up", "--replicas", "3", "--port", str(free_port()), "--data-dir", str(data),
                               cwd=tmp_path, prefix=prefix, timeout=75)
    assert code != 0 and "Traceback" not in err, err
    said = [line for line in err.splitlines() if "too few JetStream nodes" in line]
    # One line naming the cause: a single server is never going to have more JetStream nodes.
    assert len(said) == 1 and "replicas" in said[0] and said[0].startswith("error:"), (len(said), said[:3])
    assert nats_servers_in(data) == []


async def test_mesh_registry_with_more_replicas_than_one_server_exits_saying_why(
        nats_server: NatsServer, prefix: str) -> None:
    r = await mesh_cli("registry", "--replicas", "3", url=nats_server.url, prefix=prefix, timeout=60)
    assert r.code == 1 and one_line(r.err), r.err
    assert "the registry cannot start" in r.err and "too few JetStream nodes" in r.err, r.err


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[NatsCluster]:
    nodes = NatsCluster(tmp_path / "nats").start()
    try:
        yield nodes
    finally:
        nodes.stop()


async def test_an_existing_registry_bucket_with_1_replica_is_refused_with_3_and_reported_without(
        cluster3: NatsCluster, prefix: str, tmp_path: Path) -> None:
    bucket = Subjects(prefix).registry_bucket
    nc = await connect(cluster3.urls, name="test")
    try:
        await open_bucket(nc.jetstream(), bucket, create=True, replicas=1)
        r = await mesh_cli("registry", "--replicas", "3", url=cluster3.urls, prefix=prefix, timeout=60)
        assert r.code == 1 and one_line(r.err), r.err
        assert bucket in r.err and "1 replica" in r.err and "3" in r.err, r.err

        log = tmp_path / "registry.log"
        proc = await start_registry(cluster3.urls, prefix, log, PluginRegistry(nc, prefix=prefix))
        try:
            async def warned() -> str:
                text = log.read_text(errors="replace")
                return next((line for line in text.splitlines() if "WARNING" in line and bucket in line), "")

            warning = await eventually(warned, timeout=10, what="a WARNING about the bucket's replicas")
            assert "1 replica" in warning and "3" in warning, warning
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 20) == 0, log.read_text()
        assert (await nc.jetstream().stream_info(f"KV_{bucket}")).config.num_replicas == 1  # left as it was
    finally:
        await close(nc)


@pytest.mark.parametrize(("args", "said"), [
    (("--cluster", "2"), "--cluster 2: a JetStream cluster needs 3 nodes or more"),
    (("--cluster", "3", "--join", "nats-route://127.0.0.1:1"), "--cluster starts every node here and --join"),
    (("--join", "http://x"), "--join 'http://x': give route URLs, nats-route://HOST:PORT"),
])
async def test_bad_cluster_options_are_refused_with_one_line(args: tuple[str, ...], said: str, tmp_path: Path,
                                                             prefix: str) -> None:
    data = tmp_path / "data"
    r = await mesh_cli("up", *args, "--port", str(free_port()), "--data-dir", str(data), url="", prefix=prefix,
                       cwd=tmp_path)
    assert r.code != 0 and one_line(r.err) and said in r.err, r.err
    assert nats_servers_in(data) == []
