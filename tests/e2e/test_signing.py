"""Code signing end to end: mesh keys / sign / verify, and signed packages loaded by a real agent.

A real nats-server, a real agent (its own trust store), plugin hosts as real processes, the CLI in a
subprocess. Each test signs and tampers with its own copy of ``tests/packages/signed_greeter``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import zipfile
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client as NATS

from mesh import NatsServer, RegistryService
from mesh._agent import Agent
from mesh._signing import (
    SIGNATURE_FILE,
    SignatureDoc,
    TrustStore,
    canonical_manifest,
    generate_key,
    load_private_key,
    read_package,
    sign_package,
)
from mesh._up import MeshFile, plan, start_in_order
from plugin_sdk import PluginMessaging, PluginRegistry, SignatureInvalid
from plugin_sdk.host import Subjects, dumps, request, response_from_msg
from tests.conftest import ROOT, CliResult, healthy, mesh_cli
from tests.mesh.test_signing import make_wheel

PACKAGES = Path(__file__).resolve().parents[1] / "packages"
NAME = "signed-greeter"


@dataclass
class Keys:
    """A signing key ``release`` (trusted by the agent) and the agent's trust store."""

    keys_dir: Path
    trust_dir: Path
    private: Ed25519PrivateKey
    key_id: str

    def sign(self, path: Path) -> Path:
        return sign_package(path, self.private)[0]


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    info = generate_key(tmp_path / "keys", "release")
    private, _ = load_private_key(tmp_path / "keys", "release")
    TrustStore(tmp_path / "trusted").add(private.public_key(), "release")
    return Keys(tmp_path / "keys", tmp_path / "trusted", private, info.key_id)


@pytest.fixture
def pkg(tmp_path: Path) -> Path:
    return Path(shutil.copytree(PACKAGES / "signed_greeter", tmp_path / "src" / "greeter"))


AgentFactory = Callable[..., AbstractAsyncContextManager[Agent]]


@pytest.fixture
def make_agent(nc: NATS, nats_server: NatsServer, prefix: str, tmp_path: Path, registry: RegistryService,
               keys: Keys, monkeypatch: pytest.MonkeyPatch) -> AgentFactory:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # (mesh itself; the packages come from the agent's store)

    @asynccontextmanager
    async def factory(*, require_signatures: bool = True) -> AsyncIterator[Agent]:
        async with Agent(nc, nats_url=nats_server.url, name="sig-agent", prefix=prefix, data_dir=tmp_path / "agent",
                         heartbeat_interval=0.3, restart_limit=2, restart_window=30, backoff_base=0.05,
                         backoff_max=0.2, cwd=tmp_path, trust_dir=keys.trust_dir,
                         require_signatures=require_signatures) as a:
            yield a

    return factory


@pytest.fixture
async def agent(make_agent: AgentFactory) -> AsyncIterator[Agent]:
    async with make_agent(require_signatures=True) as a:
        yield a


async def load(path: Path, nats_server: NatsServer, prefix: str) -> CliResult:
    return await mesh_cli("load", str(path), url=nats_server.url, prefix=prefix)


def refusal(r: CliResult) -> str:
    """The one line a refused command printed (exit 1, no traceback)."""
    assert r.code == 1, (r.out, r.err)
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.err, r.err
    assert lines[0].startswith("error: SignatureInvalid: "), lines[0]
    return lines[0]


async def greet(messaging: PluginMessaging, who: str = "ada") -> dict[str, str]:
    result = (await messaging.send_message(NAME, {"name": who}, timeout=10)).result
    assert isinstance(result, dict)
    return result



# -- mesh keys / sign / verify ---------------------------------------------------------------------

async def test_keys_sign_and_verify_through_the_cli(tmp_path: Path, pkg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # whatever a default would touch is the test's
    keys_dir, trust_dir = tmp_path / "k", tmp_path / "t"

    async def cli(*args: str) -> CliResult:
        return await mesh_cli(*args, url="nats://127.0.0.1:1", prefix="unused")

    r = await cli("keys", "generate", "--keys-dir", str(keys_dir))  # NAME defaults to "default"
    assert r.code == 0, r.err
    private_pem = (keys_dir / "default.key").read_text()
    assert stat.S_IMODE((keys_dir / "default.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    r = await cli("keys", "list", "--json", "--keys-dir", str(keys_dir), "--trust-dir", str(trust_dir))
    listed = json.loads(r.out)
    (mine,) = listed["keys"]
    assert mine["name"] == "default" and listed["trusted"] == []
    ident = mine["key_id"]
    assert len(ident) == 16

    r = await cli("keys", "generate", "--keys-dir", str(keys_dir))
    assert r.code == 1 and r.err.strip() == f"error: a key named 'default' already exists in {keys_dir} (choose " \
                                            "another name)"

    r = await cli("verify", str(pkg), "--trust-dir", str(trust_dir))
    assert f"is not signed (no {SIGNATURE_FILE})" in refusal(r)

    r = await cli("sign", str(pkg), "--keys-dir", str(keys_dir))
    assert r.code == 0 and f"key default ({ident})" in r.out, r.err
    r = await cli("verify", str(pkg), "--trust-dir", str(trust_dir))
    assert f"signed by key {ident}, which is not in the trust store {trust_dir}" in refusal(r)

    r = await cli("keys", "trust", str(keys_dir / "default.key"), "--trust-dir", str(trust_dir))
    assert r.code == 1 and "that is a private key" in r.err
    r = await cli("keys", "trust", str(keys_dir / "default.pub"), "--trust-dir", str(trust_dir))
    assert r.code == 0 and f"trusted key {ident} (default)" in r.out, r.err

    r = await cli("verify", str(pkg), "--trust-dir", str(trust_dir))
    assert r.code == 0, r.err
    assert r.out.strip().splitlines() == [f"ok: {pkg}: 4 files signed by key {ident} (default)"]

    (pkg / "signed_greeter_pkg" / "words.py").write_text('GREETING = "pwned"\n')
    r = await cli("verify", str(pkg), "--trust-dir", str(trust_dir))
    assert f"file 'signed_greeter_pkg/words.py' changed since it was signed by key {ident}" in refusal(r)

    # The environment names the directories too; the private key is never printed, by any command.
    monkeypatch.setenv("MESH_KEYS_DIR", str(keys_dir))
    monkeypatch.setenv("MESH_TRUST_DIR", str(trust_dir))
    r = await cli("keys", "list")
    assert r.code == 0 and r.out.count(ident) == 2  # yours, and trusted
    pem_body = "".join(line for line in private_pem.splitlines() if "PRIVATE KEY" not in line)
    assert pem_body not in r.out + r.err and "PRIVATE KEY" not in r.out + r.err
    assert not (tmp_path / "home").exists()


# -- packages loaded by an agent -------------------------------------------------------------------

async def test_a_signed_package_runs_from_the_agents_copy(agent: Agent, keys: Keys, pkg: Path, tmp_path: Path,
                                                          nats_server: NatsServer, prefix: str,
                                                          messaging: PluginMessaging, client: PluginRegistry) -> None:
    keys.sign(pkg)
    r = await load(pkg, nats_server, prefix)
    assert r.code == 0, r.err
    loaded = json.loads(r.out)
    (ident,) = loaded["instances"]
    stored = Path(loaded["package"]["stored"])
    assert loaded["package"]["signed_by"] == keys.key_id
    assert stored.parent == tmp_path / "agent" / "packages" and stored.name.startswith(f"{NAME}-1.0.0-")
    await healthy(client, ident)
    answer = await greet(messaging)
    assert answer["greeting"] == "hello ada!"  # plugin.toml's [settings] reached the plugin
    assert Path(answer["file"]) == stored / "signed_greeter_pkg" / "plugin.py"  # not the source it was sent from
    r = await mesh_cli("agents", "--json", url=nats_server.url, prefix=prefix)
    (listed,) = json.loads(r.out)
    assert [x["ref"] for x in listed["plugins"]] == ["signed_greeter_pkg.plugin:Greeter"]


async def test_a_change_to_the_source_after_load_does_not_change_what_runs(
        agent: Agent, keys: Keys, pkg: Path, nats_server: NatsServer, prefix: str, messaging: PluginMessaging,
        client: PluginRegistry) -> None:
    keys.sign(pkg)
    r = await load(pkg, nats_server, prefix)
    assert r.code == 0, r.err
    (ident,) = json.loads(r.out)["instances"]
    await healthy(client, ident)
    before = await greet(messaging)
    assert before["greeting"] == "hello ada!"

    (pkg / "signed_greeter_pkg" / "words.py").write_text('GREETING = "changed"\n')
    keys.sign(pkg)  # even validly re-signed: what was loaded is the agent's copy
    assert await greet(messaging) == before

    proc = agent.placements[ident].proc
    assert proc is not None
    proc.send_signal(signal.SIGKILL)  # a restart starts the stored copy again, not the source
    await healthy(client, ident, restarts=1)
    assert await greet(messaging) == before

    r = await mesh_cli("reload", NAME, url=nats_server.url, prefix=prefix)  # and so does a rolling reload
    assert r.code == 0, r.err
    ((_, new_id),) = json.loads(r.out)[0]["replaced"]
    await healthy(client, new_id)
    assert await greet(messaging) == before


async def test_an_unsigned_package_is_refused_where_signatures_are_required(
        agent: Agent, pkg: Path, tmp_path: Path, nats_server: NatsServer, prefix: str) -> None:
    line = refusal(await load(pkg, nats_server, prefix))
    assert f"{pkg} is not signed (no {SIGNATURE_FILE}), and agent 'sig-agent' requires signatures" in line
    assert agent.placements == {}
    assert not (tmp_path / "agent" / "packages").exists()  # nothing was stored, nothing ran


async def test_an_unsigned_package_loads_with_a_warning_where_they_are_not(
        make_agent: AgentFactory, pkg: Path, nats_server: NatsServer, prefix: str, messaging: PluginMessaging,
        client: PluginRegistry, caplog: pytest.LogCaptureFixture) -> None:
    async with make_agent(require_signatures=False):
        r = await load(pkg, nats_server, prefix)
        assert r.code == 0, r.err
        assert f"warning: {pkg} is not signed" in r.err
        assert any(rec.levelname == "WARNING" and "UNSIGNED" in rec.getMessage() for rec in caplog.records)
        loaded = json.loads(r.out)
        assert loaded["package"]["signed_by"] is None
        await healthy(client, loaded["instances"][0])
        assert (await greet(messaging))["greeting"] == "hello ada!"


@pytest.mark.parametrize("require_signatures", [True, False])
async def test_a_key_the_agent_does_not_trust_is_refused_naming_it(
        make_agent: AgentFactory, pkg: Path, tmp_path: Path, nats_server: NatsServer, prefix: str,
        require_signatures: bool) -> None:
    stranger = generate_key(tmp_path / "other-keys", "mine")
    private, _ = load_private_key(tmp_path / "other-keys", "mine")
    sign_package(pkg, private)
    async with make_agent(require_signatures=require_signatures) as a:  # a bad signature is refused either way
        line = refusal(await load(pkg, nats_server, prefix))
        assert f"signed by key {stranger.key_id}, which is not in the trust store" in line
        assert a.placements == {}


def _change(pkg: Path) -> str:
    (pkg / "signed_greeter_pkg" / "words.py").write_text('GREETING = "pwned"\n')
    return "file 'signed_greeter_pkg/words.py' changed"


def _add(pkg: Path) -> str:
    (pkg / "signed_greeter_pkg" / "backdoor.py").write_text("import os\n")
    return "file 'signed_greeter_pkg/backdoor.py' was added"


def _remove(pkg: Path) -> str:
    (pkg / "signed_greeter_pkg" / "words.py").unlink()
    return "file 'signed_greeter_pkg/words.py' was removed"


@pytest.mark.parametrize("tamper", [_change, _add, _remove], ids=["changed", "added", "removed"])
async def test_tampering_after_signing_is_refused_naming_the_file(
        agent: Agent, keys: Keys, pkg: Path, nats_server: NatsServer, prefix: str,
        tamper: Callable[[Path], str]) -> None:
    keys.sign(pkg)
    named = tamper(pkg)
    line = refusal(await load(pkg, nats_server, prefix))
    assert f"{named} since it was signed by key {keys.key_id}" in line
    assert agent.placements == {}


async def _send_load(nc: NATS, prefix: str, body: dict[str, object]) -> object:
    msg = await request(nc, Subjects(prefix).agent("sig-agent", "load"), dumps(body), headers=None, timeout=30,
                        plugin="agent sig-agent")
    return response_from_msg(msg).raise_for_error().result


def _zip(entries: list[tuple[str, bytes, int]]) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            zf.writestr(info, data)
    return base64.b64encode(buf.getvalue()).decode()


async def test_a_symlink_is_refused_by_the_cli_and_by_the_agent(agent: Agent, keys: Keys, pkg: Path, tmp_path: Path,
                                                                nc: NATS, nats_server: NatsServer,
                                                                prefix: str) -> None:
    keys.sign(pkg)
    (tmp_path / "elsewhere.py").write_text("GREETING = 'from outside'\n")
    (pkg / "signed_greeter_pkg" / "words.py").unlink()
    (pkg / "signed_greeter_pkg" / "words.py").symlink_to(tmp_path / "elsewhere.py")
    line = refusal(await load(pkg, nats_server, prefix))  # the CLI does not follow it into the archive
    assert "'signed_greeter_pkg/words.py' is a symlink" in line
    # A sender that puts the symlink in the archive itself (with a manifest that lists it, signed by a
    # trusted key) is refused by the agent.
    (pkg / "signed_greeter_pkg" / "words.py").unlink()
    good = read_package_files(pkg)
    entries = [(p, d, stat.S_IFREG | 0o644) for p, d in good.items() if p != "signed_greeter_pkg/words.py"]
    entries.append(("signed_greeter_pkg/words.py", str(tmp_path / "elsewhere.py").encode(), stat.S_IFLNK | 0o777))
    signature = hand_signed(keys, good)
    with pytest.raises(SignatureInvalid, match=r"'signed_greeter_pkg/words\.py' is a symlink"):
        await _send_load(nc, prefix, {"package": _zip(entries), "package_name": "crafted", "signature": signature})
    assert agent.placements == {}


def read_package_files(pkg: Path) -> dict[str, bytes]:
    """The package's files as signing sees them (a missing words.py is put back, as it was signed)."""
    files = dict(read_package(pkg).files)
    files.setdefault("signed_greeter_pkg/words.py", (PACKAGES / "signed_greeter/signed_greeter_pkg/words.py")
                     .read_bytes())
    return files


def hand_signed(keys: Keys, files: dict[str, bytes], *, extra: dict[str, str] | None = None) -> str:
    """A signature document made by hand: a trusted key signs whatever manifest it is given."""
    hashes = {p: hashlib.sha256(d).hexdigest() for p, d in files.items()} | (extra or {})
    return SignatureDoc(keys.key_id, hashes, keys.private.sign(canonical_manifest(keys.key_id, hashes))).render()


async def test_a_dotdot_path_is_refused_by_the_agent(agent: Agent, keys: Keys, pkg: Path, tmp_path: Path, nc: NATS,
                                                     prefix: str) -> None:
    files = read_package_files(pkg)
    # In the archive: a member that would be written outside the store.
    entries = [(p, d, stat.S_IFREG | 0o644) for p, d in files.items()] + [("../escape.py", b"x", stat.S_IFREG | 0o644)]
    with pytest.raises(SignatureInvalid, match=r"path '\.\./escape\.py' has a '\.\.' component"):
        await _send_load(nc, prefix, {"package": _zip(entries), "package_name": "crafted",
                                      "signature": hand_signed(keys, files)})
    # In the manifest, signed by a trusted key: refused all the same.
    signature = hand_signed(keys, files, extra={"../escape.py": "0" * 64})
    body = {"package": _zip([(p, d, stat.S_IFREG | 0o644) for p, d in files.items()]), "package_name": "crafted",
            "signature": signature}
    with pytest.raises(SignatureInvalid, match=r"path '\.\./escape\.py' has a '\.\.' component"):
        await _send_load(nc, prefix, body)
    # (the same package with an honest signature loads: the refusals above are about the path)
    body["signature"] = hand_signed(keys, files)
    loaded = await _send_load(nc, prefix, body)
    assert isinstance(loaded, dict) and len(loaded["instances"]) == 1
    assert not (tmp_path / "escape.py").exists() and not (tmp_path / "agent" / "escape.py").exists()


async def test_a_package_too_large_to_send_is_one_line(agent: Agent, keys: Keys, pkg: Path, nats_server: NatsServer,
                                                       prefix: str) -> None:
    (pkg / "signed_greeter_pkg" / "blob.bin").write_bytes(os.urandom(1_100_000))  # does not compress
    keys.sign(pkg)
    r = await load(pkg, nats_server, prefix)
    assert r.code == 1 and "Traceback" not in r.err
    assert r.err.startswith(f"error: package {pkg} is too large to send: ") and "max_payload of" in r.err
    assert len(r.err.strip().splitlines()) == 1


async def test_a_signed_wheel_runs(agent: Agent, keys: Keys, tmp_path: Path, nats_server: NatsServer, prefix: str,
                                   messaging: PluginMessaging, client: PluginRegistry) -> None:
    wheel = make_wheel(tmp_path / "wheel_greeter-1.0.0-py3-none-any.whl")
    keys.sign(wheel)
    r = await load(wheel, nats_server, prefix)
    assert r.code == 0, r.err
    loaded = json.loads(r.out)
    await healthy(client, loaded["instances"][0])
    answer = (await messaging.send_message("wheel-greeter", {}, timeout=10)).result
    assert answer["greeting"] == "hello from a wheel"
    assert Path(answer["file"]).is_relative_to(loaded["package"]["stored"])
    (tmp_path / f"{wheel.name}.sig").unlink()
    line = refusal(await load(wheel, nats_server, prefix))
    assert f"is not signed (no {wheel.name}.sig)" in line


async def test_mesh_toml_path_entries_are_verified_and_run_from_the_store(
        agent: Agent, keys: Keys, pkg: Path, tmp_path: Path, messaging: PluginMessaging) -> None:
    mesh = MeshFile.model_validate({"plugins": [{"path": "src/greeter"}]})
    with pytest.raises(SignatureInvalid, match=r"is not signed .* and mesh\.toml requires signatures"):
        plan(mesh, base_dir=tmp_path, source="mesh.toml", trust_dir=keys.trust_dir, require_signatures=True)
    keys.sign(pkg)
    levels = plan(mesh, base_dir=tmp_path, source="mesh.toml", trust_dir=keys.trust_dir, require_signatures=True)
    assert [[p.config.name for p, _ in level] for level in levels] == [[NAME]]
    (pkg / "signed_greeter_pkg" / "words.py").write_text('GREETING = "changed after planning"\n')
    started = await start_in_order(agent, levels, base_dir=tmp_path, say=lambda line: None)
    assert len(started[0]) == 1
    answer = await greet(messaging)  # what was planned (and verified) is what runs
    assert answer["greeting"] == "hello ada!" and "/agent/packages/" in answer["file"]
    with pytest.raises(ValueError, match="give ref or path"):
        MeshFile.model_validate({"plugins": [{"ref": "a:B", "path": "x"}]})
