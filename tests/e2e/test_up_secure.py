"""The whole `mesh up --secure` tour, as a new user runs it: real processes, the printed export
line as the only settings, a signed package loaded, and what a stranger is refused."""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
from pathlib import Path

from mesh import free_port
from tests.conftest import ROOT
from tests.e2e.test_up import start_up
from tests.e2e.test_up_tls import _cli, _exported

PLUGINS = ('[[plugins]]\nref = "examples.echo:Echo"\n\n[[plugins]]\nref = "examples.counter:Counter"\n\n'
           '[[plugins]]\nref = "examples.listener:Listener"\n')


async def test_the_secure_tour_end_to_end(tmp_path: Path, prefix: str) -> None:
    (tmp_path / "mesh.toml").write_text(PLUGINS)
    port = free_port()
    up = await start_up("--secure", "--port", str(port), "--data-dir", str(tmp_path / "data"), cwd=tmp_path,
                        prefix=prefix)
    try:
        exported = _exported(await up.ready())
        data = tmp_path / "data"
        assert exported == {"MESH_NATS_URL": f"tls://127.0.0.1:{port}", "MESH_TLS_CA": str(data / "pki" / "ca.pem"),
                            "MESH_CREDS": str(data / "auth" / "admin.creds"), "MESH_TRUST_DIR": str(data / "trusted")}
        env = {**exported, "MESH_PREFIX": prefix, "MESH_KEYS_DIR": str(tmp_path / "keys")}

        async def ok(*args: str) -> str:
            r = await _cli(*args, env=env)
            assert r.code == 0, (args, r)
            return r.out

        listed = json.loads(await ok("ls", "--json"))
        assert {i["name"] for i in listed} == {"echo", "counter", "listener"}
        assert json.loads(await ok("send", "echo", '{"text": "hi"}')) == {"text": "hi"}
        assert json.loads(await ok("send", "counter", "--op", "increment", '{"by": 2}')) == {"total": 2}
        assert (await ok("state", "get", "counter", "total")).strip() == "2"
        replies = json.loads(await ok("broadcast", '{"ping": true}', "--json"))
        assert len(replies["replies"]) == 3 and replies["missing"] == []
        events = asyncio.create_task(_cli("events", "orders.>", "--count", "1", "--timeout", "20", env=env))
        for _ in range(100):  # (bounded) until the listener is subscribed: then the event reaches it
            await asyncio.sleep(0.1)
            await ok("publish", "orders.created", '{"id": 7}')
            if events.done():
                break
        seen = await asyncio.wait_for(events, 30)
        assert seen.code == 0 and json.loads(seen.out.splitlines()[0])["payload"] == {"id": 7}
        assert (await _cli("send", "echo", "{}", "--trace", env=env)).err.startswith("trace: ")

        # A signed package: refused until its key is trusted, then it runs from the agent's copy.
        pkg = tmp_path / "greeter"
        shutil.copytree(ROOT / "tests" / "packages" / "signed_greeter", pkg,
                        ignore=shutil.ignore_patterns("mesh-signature.json", "__pycache__"))
        r = await _cli("load", str(pkg), env=env)
        assert r.code == 1 and "SignatureInvalid" in r.err and "requires signatures" in r.err, r
        await ok("keys", "generate", "me")
        await ok("sign", str(pkg), "--key", "me")
        r = await _cli("load", str(pkg), env=env)
        assert r.code == 1 and "not in the trust store" in r.err, r
        await ok("keys", "trust", str(tmp_path / "keys" / "me.pub"))
        loaded = json.loads(await ok("load", str(pkg)))
        assert loaded["package"]["signed_by"] and len(loaded["instances"]) == 1

        # Strangers: no TLS, no credentials, credentials of nobody we know.
        plain = await _cli("ls", env={"MESH_NATS_URL": f"nats://127.0.0.1:{port}", "MESH_PREFIX": prefix})
        assert plain.code == 1 and "requires TLS" in plain.err, plain
        anonymous = await _cli("ls", env={k: v for k, v in env.items() if k != "MESH_CREDS"})
        assert anonymous.code == 1 and "credentials" in anonymous.err, anonymous
        assert len(anonymous.err.splitlines()) == 1, anonymous
        assert await up.stop() == 0, up.lines
    finally:
        await up.kill()

    auth = tmp_path / "data" / "auth"
    secrets = [p for p in auth.rglob("*") if p.is_file()]
    assert secrets and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in secrets), secrets
    assert stat.S_IMODE(auth.stat().st_mode) == 0o700
    admin = (auth / "admin.creds").read_text()

    again = await start_up("--secure", "--port", str(port), "--data-dir", str(tmp_path / "data"), cwd=tmp_path,
                           prefix=prefix)
    try:
        assert _exported(await again.ready()) == exported  # made once, reused
        assert (auth / "admin.creds").read_text() == admin
        r = await _cli("send", "echo", '{"text": "again"}', env=env)
        assert json.loads(r.out) == {"text": "again"}, r
        assert await again.stop() == 0
    finally:
        await again.kill()
