"""A plugin host's socket reads reuse memory rather than map it afresh.

asyncio's socket transport receives every read into a new 256 KiB buffer. glibc maps a block that
large afresh when its heap cannot serve it and the block is above its dynamic mmap threshold, which
only rises when the process frees a mapped block larger still: whether it has depends on all the
process did before. A plugin host on a server of its own, answering broadcasts one at a time (what
``bench/bench.py`` does), had not, and took two page faults (and an ``mmap``, ``mremap`` and
``munmap``) for every message it read: 800 for these 400 broadcasts on 3.11 before
``_connection._raise_mmap_threshold``, 0 after.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mesh import NatsServer, close, connect
from plugin_sdk import PluginMessaging, PluginRegistry
from tests.conftest import Mesh, PluginProc, start_registry

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="glibc's dynamic mmap threshold, and page faults read from /proc")


def minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])  # minflt, field 10


@pytest.fixture
async def own_mesh(tmp_path: Path) -> AsyncIterator[tuple[Mesh, PluginMessaging]]:
    # (a server and registry of its own, as bench.py has: the heap's history, and so the faults,
    # depend on what the host read before, and the shared server's answers differ)
    server = NatsServer(tmp_path / "nats")
    server.start()
    nc = await connect(server.url, name="test")
    client = PluginRegistry(nc, prefix="t")
    log = tmp_path / "registry.log"
    m = Mesh(server.url, "t", tmp_path, client)
    m.procs.append(PluginProc("registry", await start_registry(server.url, "t", log, client), log))  # m.close stops it
    try:
        yield m, PluginMessaging(nc, prefix="t", source="test", registry=client, default_timeout=5)
    finally:
        await m.close()
        await close(nc)
        server.stop()


async def test_a_host_does_not_fault_in_memory_for_every_message(own_mesh: tuple[Mesh, PluginMessaging]) -> None:
    mesh, messaging = own_mesh
    p = await mesh.spawn("examples.echo:Echo", env={"MESH_LOOP": "asyncio"})  # (uvloop reads into its own buffer)
    payload = {"n": 1, "text": "hello"}
    for _ in range(200):  # warm: every code path of the host has run, its heap has settled
        assert len(await messaging.broadcast_message(payload, target="echo", timeout=5)) == 1
    before = minor_faults(p.pid)
    n = 400
    for _ in range(n):  # one at a time: (at least) one read by the host per broadcast
        replies = await messaging.broadcast_message(payload, target="echo", timeout=5)
        assert [r.result for r in replies] == [payload] and not replies.missing
    faults = minor_faults(p.pid) - before
    assert faults < n / 4, f"the host took {faults} page faults answering {n} broadcasts one at a time"
