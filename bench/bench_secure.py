"""What `--secure` costs on the send path: the mesh on a plain server against the mesh on a secure one.

Both in one run, alternating which goes first each round: two nats-servers (one plain; one as
`mesh up --secure` runs it: TLS with our CA, operator-mode auth), an echo plugin host on each (as
its agent would start it: on the secure one with its own minted identity and inbox prefix), and a
client on each (the secure one as admin, over TLS). Prints send p50/p99 with one in flight and
throughput with 64 in flight, and the secure/plain ratios; results go in docs/performance.md.

    python bench/bench_secure.py            # about a minute on 2 cores
    python bench/bench_secure.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import Children, concurrent, machine_info, percentile, sequential  # noqa: E402
from mesh._auth import AuthStore  # noqa: E402
from mesh._auth import Permissions as AuthPermissions  # noqa: E402
from mesh._pki import Pki  # noqa: E402
from plugin_sdk import PluginMessaging, PluginRegistry  # noqa: E402
from plugin_sdk.host import NatsServer, Subjects, close, connect, open_bucket, plugin_permissions  # noqa: E402

PREFIX = "bench"


async def ready(messaging: PluginMessaging, registry: PluginRegistry, children: Children) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        children.check()
        if await registry.list_plugins("echo", healthy_only=True):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError("echo did not become healthy within 60 s")


async def run(args: argparse.Namespace) -> int:
    rounds, seq, inflight = (2, 300, 2000) if args.quick else (6, 2000, 10000)
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        store = AuthStore(tmpdir / "auth")
        pki = Pki(tmpdir / "pki")
        ca, cert = pki.ca(), pki.server()
        plain = NatsServer(tmpdir / "plain")
        secure = NatsServer(tmpdir / "secure", config=store.server_config(), tls=(cert.cert, cert.key, ca))
        await plain.astart()
        await secure.astart()
        from mesh import RegistryService

        plain_nc = await connect(plain.url, name="bench plain")
        admin = await connect(secure.url, name="bench secure", user_credentials=str(store.admin.creds),
                              tls_ca=ca)
        children = Children(tmpdir / "logs", plain.url)
        try:
            await open_bucket(admin.jetstream(), Subjects(PREFIX).state_bucket("echo"), create=True)
            perms = plugin_permissions(Subjects(PREFIX), name="echo", instance_id="echo-secure", send=[">"],
                                       publish=[">"], subscribe=[">"], dependencies=[])
            ident = store.mint("echo-secure", AuthPermissions(pub_allow=perms.publish, sub_allow=perms.subscribe,
                                                              pub_deny=perms.publish_deny))
            async with RegistryService(plain_nc, prefix=PREFIX), RegistryService(admin, prefix=PREFIX):
                children.mesh_run("echo-plain", "examples.echo:Echo", PREFIX)
                children.spawn("echo-secure", ["-m", "mesh", "run", "examples.echo:Echo", "--prefix", PREFIX,
                                               "--instance-id", "echo-secure"],
                               env={"MESH_NATS_URL": secure.url, "MESH_CREDS": str(ident.creds),
                                    "MESH_TLS_CA": str(ca), "MESH_INBOX_PREFIX": perms.inbox_prefix})
                sides = {"plain": PluginMessaging(plain_nc, prefix=PREFIX, source="bench"),
                         "secure": PluginMessaging(admin, prefix=PREFIX, source="bench")}
                await ready(sides["plain"], PluginRegistry(plain_nc, prefix=PREFIX), children)
                await ready(sides["secure"], PluginRegistry(admin, prefix=PREFIX), children)
                lat: dict[str, list[float]] = {"plain": [], "secure": []}
                rps: dict[str, list[float]] = {"plain": [], "secure": []}
                for side in sides.values():  # warm-up
                    await sequential(lambda s=side: s.send_message("echo", {"n": 1}), 200)
                for r in range(rounds):
                    order = ["plain", "secure"] if r % 2 == 0 else ["secure", "plain"]
                    for name in order:
                        def op(s: PluginMessaging = sides[name]) -> object:
                            return s.send_message("echo", {"n": 1})
                        samples, _ = await sequential(op, seq)
                        lat[name] += samples
                        rps[name].append(await concurrent(op, inflight, 64))
                    print(f"  .. round {r + 1}/{rounds}", file=sys.stderr)
        finally:
            children.stop()
            await close(plain_nc)
            await close(admin)
            plain.stop()
            secure.stop()
    m = machine_info()
    print(f"\n--secure on the send path — python {m.get('python')}, nproc {m.get('nproc')}, "
          f"{rounds} rounds x {seq} sequential + {inflight} at 64 in flight per side")
    print(f"{'measure':34} {'plain':>10} {'secure':>10} {'secure/plain':>13}")

    def row(label: str, a: float, b: float, unit: str) -> None:
        print(f"{label:34} {a:>10,.0f} {b:>10,.0f} {b / a:>12.2f}x  {unit}")

    for q in (50, 99):
        row(f"send p{q} latency (1 in flight)", percentile(lat["plain"], q) * 1e6, percentile(lat["secure"], q) * 1e6,
            "us")
    med = {k: sorted(v)[len(v) // 2] for k, v in rps.items()}
    row("send throughput, 64 in flight", med["plain"], med["secure"], "req/s")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short run")
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
