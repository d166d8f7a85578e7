"""Three hosts, each running `mesh up --listen ADDR --join <the other two>` (a cluster node, a
registry replica, an agent), as separate network namespaces where the machine allows it, else on
loopback. A plugin is placed on another host with `mesh load --on`; with --secure, routes use TLS.
A link cut (namespaces only) marks the cut host's instances unhealthy, and nothing is lost."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mesh import close, connect
from mesh._connect import ClientSecurity
from plugin_sdk import Health, PluginInfo, PluginMessaging, PluginRegistry, RequestTimeout
from plugin_sdk.host import Retry, Subjects
from tests.cluster.conftest import Tally, missing_writes, put_traffic
from tests.cluster.netns import Host, Hosts, loopback_hosts, netns_unavailable
from tests.conftest import ROOT, child_env, eventually
from tests.e2e.test_up import Up
from tests.e2e.test_up_tls import _cli, _exported

NETNS = netns_unavailable()


@pytest.fixture(scope="module")
def netns_hosts() -> Iterator[list[Host]]:
    if NETNS:
        pytest.skip(NETNS)
    with Hosts(3) as made:
        yield made.hosts


@pytest.fixture(params=["netns", "loopback"])
def hosts(request: pytest.FixtureRequest) -> list[Host]:
    if request.param == "netns":
        hosts: list[Host] = request.getfixturevalue("netns_hosts")
        return hosts
    return loopback_hosts(3)


@dataclass
class Machine:
    host: Host
    up: Up
    data: Path


async def _start(host: Host, others: list[Host], data: Path, prefix: str, *extra: str) -> Up:
    argv = host.command(sys.executable, "-m", "mesh", "up", "--listen", host.addr, "--port", str(host.port),
                        "--route-port", str(host.route_port), "--join", ",".join(o.route for o in others),
                        "--server-name", host.name, "--data-dir", str(data), *extra)
    env = child_env(MESH_PREFIX=prefix, MESH_AGENT_NAME=host.name, MESH_HEARTBEAT_INTERVAL="0.5",
                    MESH_TRUST_DIR=str(data / "trusted"))  # each host its own trust store
    env.pop("MESH_NATS_URL", None)
    proc = await asyncio.create_subprocess_exec(*argv, cwd=data.parent, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    return Up(proc)


async def _machines(hosts: list[Host], tmp: Path, prefix: str, *, secure: bool,
                    into: list[Machine]) -> list[Machine]:
    """All three up (each waits for a majority of the cluster); under --secure, the first one's CA
    and auth store copied to the others before they start, as an operator would."""
    extra = ("--secure",) if secure else ()
    datas = [tmp / h.name / "data" for h in hosts]
    for d in datas:
        d.parent.mkdir(parents=True)
    machines = into  # each one as it starts: the fixture stops them even if a later one fails
    machines.append(Machine(hosts[0], await _start(hosts[0], hosts[1:], datas[0], prefix, *extra), datas[0]))
    if secure:
        made = [datas[0] / "auth" / "admin.creds", datas[0] / "pki" / "ca-key.pem"]
        await eventually(lambda: _exist(made), timeout=30, what="the first host's CA and auth store")
        for d in datas[1:]:
            for part in ("pki", "auth"):
                shutil.copytree(datas[0] / part, d / part)
    for i in (1, 2):
        machines.append(Machine(hosts[i], await _start(hosts[i], [h for h in hosts if h is not hosts[i]],
                                                       datas[i], prefix, *extra), datas[i]))
    for m in machines:
        await m.up.ready(timeout=90)
    return machines


async def _exist(paths: list[Path]) -> bool:
    return all(p.exists() for p in paths)


@pytest.fixture
async def stop_all() -> AsyncIterator[list[Machine]]:
    machines: list[Machine] = []
    yield machines
    await asyncio.gather(*(m.up.kill() for m in machines))


def _env(machines: list[Machine], prefix: str, *, hosts: list[Host] | None = None) -> dict[str, str]:
    """What the CLI on the test's side is given: the first host's export line (URL, CA, creds)."""
    lines = machines[0].up.lines
    exported = _exported(lines) if any("export MESH_NATS_URL=" in line for line in lines) else {}
    scheme = "tls" if exported else "nats"
    urls = ",".join(f"{scheme}://{h.addr}:{h.port}" for h in (hosts or [m.host for m in machines]))
    return {**exported, "MESH_NATS_URL": urls, "MESH_PREFIX": prefix}


async def _ok(*args: str, env: dict[str, str]) -> Any:
    r = await _cli(*args, env=env, timeout=60)
    assert r.code == 0, (args, r)
    return json.loads(r.out) if r.out.strip().startswith(("{", "[")) else r.out


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
async def test_three_hosts_one_mesh(hosts: list[Host], tmp_path: Path, prefix: str, secure: bool,
                                    stop_all: list[Machine]) -> None:
    await _machines(hosts, tmp_path, prefix, secure=secure, into=stop_all)
    env = _env(stop_all, prefix)
    async def all_agents() -> list[Any] | None:  # (`mesh agents` gathers for 0.5 s: a loaded host may be late)
        found: list[Any] = await _ok("agents", "--json", env=env)
        return found if len(found) == 3 else None

    agents = await eventually(all_agents, timeout=30, interval=0.5, what="all three agents in `mesh agents`")
    assert sorted(a["agent"] for a in agents) == ["host-0", "host-1", "host-2"]
    assert all(a["host"] for a in agents)

    loaded = await _ok("load", "clusterplugins:Keeper", "--on", "host-2", env=env)
    assert len(loaded["instances"]) == 1
    # Sent through host 0's node, answered on host 2, stored with three replicas.
    only_first = _env(stop_all, prefix, hosts=[hosts[0]])
    assert await _ok("send", "keeper", "--op", "put", '{"key": "a", "value": 7}', env=only_first)
    listed = await _ok("ls", "--json", env=only_first)
    assert [(i["name"], i["agent"], i["health"]) for i in listed] == [("keeper", "host-2", "healthy")]
    assert (await _ok("state", "get", "keeper", "a", env=only_first)).strip() == "7"
    security = ClientSecurity.from_env(env) if secure else None
    nc = await connect(env["MESH_NATS_URL"], name="test", security=security)
    try:
        for bucket in (Subjects(prefix).registry_bucket, Subjects(prefix).state_bucket("keeper")):
            info = await nc.jetstream().stream_info(f"KV_{bucket}")
            assert info.config.num_replicas == 3 and info.cluster is not None and len(info.cluster.replicas or []) == 2
    finally:
        await close(nc)
    # A plugin package, signed, sent to host 1 with the load request: it runs from host 1's own
    # copy, verified against host 1's trust store (whose operator trusted the key).
    pkg = tmp_path / "greeter"
    shutil.copytree(ROOT / "tests" / "packages" / "signed_greeter", pkg,
                    ignore=shutil.ignore_patterns("mesh-signature.json", "__pycache__"))
    keys = {**env, "MESH_KEYS_DIR": str(tmp_path / "keys")}
    await _ok("keys", "generate", "ops", env=keys)
    await _ok("sign", str(pkg), "--key", "ops", env=keys)
    await _ok("keys", "trust", str(tmp_path / "keys" / "ops.pub"),
              env={**keys, "MESH_TRUST_DIR": str(stop_all[1].data / "trusted")})
    placed = await _ok("load", str(pkg), "--on", "host-1", env=env)
    assert placed["package"]["signed_by"] and len(placed["instances"]) == 1
    greeted = await _ok("send", "signed-greeter", '{"name": "host 0"}', env=only_first)
    assert greeted["greeting"].endswith("host 0!") and str(stop_all[1].data) in greeted["file"]
    if secure:  # the routes too: TLS, and only with a route certificate of the mesh's CA
        for m in stop_all:
            assert _route_speaks(m.host, m.data / "pki", with_cert=True).startswith(b"INFO"), m.host
            with pytest.raises((ssl.SSLError, OSError)):
                _route_speaks(m.host, m.data / "pki", with_cert=False)
    for m in stop_all:
        assert await m.up.stop() == 0, m.up.lines


def _route_speaks(host: Host, pki: Path, *, with_cert: bool) -> bytes:
    """What a node's route port says after a TLS handshake (with or without a route certificate of
    the mesh's CA); raises ssl.SSLError / OSError if the node refuses. (The test's side reaches every
    host's address: the bridge's.)"""
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    context.check_hostname = False
    if with_cert:
        context.load_cert_chain(str(pki / "route.pem"), str(pki / "route-key.pem"))
    with socket.create_connection((host.addr, host.route_port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=host.addr) as tls:
        return tls.recv(4096)


async def test_a_cut_link_marks_that_hosts_instances_unhealthy_and_loses_nothing(
        netns_hosts: list[Host], tmp_path: Path, prefix: str, stop_all: list[Machine], report: Any) -> None:
    hosts = netns_hosts
    await _machines(hosts, tmp_path, prefix, secure=False, into=stop_all)
    env = _env(stop_all, prefix)
    for where in ("host-1", "host-2"):
        await _ok("load", "clusterplugins:Keeper", "--on", where, env=env)
    # The test's side talks to hosts 0 and 1 only: host 2 is the one cut off.
    nc = await connect(",".join(h.url for h in hosts[:2]), name="test")
    try:
        registry = PluginRegistry(nc, prefix=prefix, retry=Retry(within=5))
        messaging = PluginMessaging(nc, prefix=prefix, source="test")

        async def info_on(agent: str) -> PluginInfo | None:
            try:
                infos = await registry.list_plugins("keeper")
            except RequestTimeout:  # a registry replica on the cut host, picked before its route is dead
                return None
            found = [i for i in infos if i.agent == agent]
            return found[0] if found else None

        async def health_on(agent: str) -> Health | None:
            info = await info_on(agent)
            return info.health if info else None

        await eventually(lambda: _is(health_on("host-2"), Health.HEALTHY), timeout=30, what="keeper on host-2")
        await eventually(lambda: _is(health_on("host-1"), Health.HEALTHY), timeout=30, what="keeper on host-1")
        tally, stop = Tally(), asyncio.Event()
        traffic = asyncio.ensure_future(put_traffic(messaging, tally, stop, timeout=3))
        await eventually(lambda: _more(tally, 20), what="traffic before the cut")
        hosts[2].cut()
        try:
            await eventually(lambda: _is(health_on("host-2"), Health.UNHEALTHY), timeout=60,
                             what="host-2's keeper unhealthy while cut")
            during = tally.answered
            await eventually(lambda: _more(tally, during + 20), timeout=60, what="answers from host-1 while cut")
            # host-1's keeper answered all along; the registry may still call it unhealthy for a few
            # seconds here (seen once in a loaded CI run, reason not recorded): its beats are written
            # to the registry's bucket, which has to elect a new leader if its leader was on host-2.
            # So: healthy within the cut, with what the registry said printed if it never is.
            said: list[PluginInfo | None] = [None]

            async def host_1_healthy() -> bool:
                said[0] = await info_on("host-1")
                return said[0] is not None and said[0].health == Health.HEALTHY

            try:
                await eventually(host_1_healthy, timeout=30, what="host-1's keeper healthy while host-2 is cut")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; the registry said: {said[0]!r}") from None
        finally:
            hosts[2].restore()
        await eventually(lambda: _is(health_on("host-2"), Health.HEALTHY), timeout=90,
                         what="host-2's keeper healthy again after the link is back")
        stop.set()
        await asyncio.wait_for(traffic, 30)
        report(tally.line("link to host-2 cut, then restored"))
        assert not tally.untyped, tally.untyped[:5]
        assert await missing_writes(nc, Subjects(prefix).state_bucket("keeper"), tally.acked) == []
    finally:
        await close(nc)
    for m in stop_all:
        assert await m.up.stop() == 0, m.up.lines


async def _is(value: Any, wanted: Any) -> bool:
    return bool(await value == wanted)


async def _more(tally: Tally, n: int) -> bool:
    return tally.answered >= n
