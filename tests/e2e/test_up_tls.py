"""`mesh up --tls` / `--mtls` as real processes: the PKI made once under the data dir and reused,
the printed export line is all another shell needs, and each plugin host has its own certificate."""

from __future__ import annotations

import asyncio
import json
import shlex
import stat
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from mesh import free_port
from tests.conftest import CliResult, child_env, mesh_cli
from tests.e2e.test_up import Up, start_up

ECHO = '[[plugins]]\nref = "examples.echo:Echo"\n'


def _exported(lines: list[str]) -> dict[str, str]:
    """The settings of the one `export …` line mesh up printed."""
    found = [line for line in lines if "export MESH_NATS_URL=" in line]
    assert len(found) == 1, lines
    words = shlex.split(found[0].split("export ", 1)[1])
    return dict(word.split("=", 1) for word in words)


async def _cli(*args: str, env: dict[str, str], timeout: float = 30) -> CliResult:
    """The real `mesh` command line with exactly these MESH_* settings (as in another shell)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", *args, env=child_env(**env), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(), err.decode())


def _fingerprint(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).fingerprint(hashes.SHA256())


async def _run_once(tmp_path: Path, prefix: str, *flags: str, port: int) -> tuple[dict[str, str], Up]:
    up = await start_up(*flags, "--port", str(port), "--data-dir", str(tmp_path / "data"), cwd=tmp_path,
                        prefix=prefix)
    try:
        lines = await up.ready()
    except BaseException:
        await up.kill()
        raise
    return _exported(lines), up


async def test_mesh_up_tls_prints_how_to_connect_and_reuses_its_ca(tmp_path: Path, prefix: str) -> None:
    (tmp_path / "mesh.toml").write_text(ECHO)
    port = free_port()
    exported, up = await _run_once(tmp_path, prefix, "--tls", port=port)
    try:
        pki = tmp_path / "data" / "pki"
        assert exported == {"MESH_NATS_URL": f"tls://127.0.0.1:{port}", "MESH_TLS_CA": str(pki / "ca.pem")}
        env = {**exported, "MESH_PREFIX": prefix}
        r = await _cli("send", "echo", '{"text": "over tls"}', env=env)
        assert (r.code, json.loads(r.out)) == (0, {"text": "over tls"}), r
        r = await mesh_cli("ls", url=f"nats://127.0.0.1:{port}", prefix=prefix)  # no TLS settings at all
        assert r.code == 1 and "requires TLS: use tls://" in r.err and len(r.err.strip().splitlines()) == 1, r.err
        assert await up.stop() == 0, up.lines
    finally:
        await up.kill()
    fingerprint = _fingerprint(pki / "ca.pem")
    for key in ("ca-key.pem", "server-key.pem"):
        assert stat.S_IMODE((pki / key).stat().st_mode) == 0o600, key
    assert stat.S_IMODE(pki.stat().st_mode) == 0o700

    again, up = await _run_once(tmp_path, prefix, "--tls", port=port)  # the next start: the same CA
    try:
        assert again == exported and _fingerprint(pki / "ca.pem") == fingerprint
        r = await _cli("send", "echo", '{"text": "again"}', env={**again, "MESH_PREFIX": prefix})
        assert (r.code, json.loads(r.out)) == (0, {"text": "again"}), r
        assert await up.stop() == 0, up.lines
    finally:
        await up.kill()


async def test_mesh_up_mtls_gives_each_plugin_its_own_certificate(tmp_path: Path, prefix: str) -> None:
    (tmp_path / "mesh.toml").write_text(ECHO)
    port = free_port()
    exported, up = await _run_once(tmp_path, prefix, "--mtls", port=port)
    try:
        clients = tmp_path / "data" / "pki" / "clients"
        assert exported["MESH_TLS_CERT"] == str(clients / "admin.pem")
        assert exported["MESH_TLS_KEY"] == str(clients / "admin-key.pem")
        env = {**exported, "MESH_PREFIX": prefix}
        r = await _cli("send", "echo", '{"text": "over mtls"}', env=env)
        assert (r.code, json.loads(r.out)) == (0, {"text": "over mtls"}), r
        # The echo host connected with a certificate of its own, made by the agent (CN = the plugin).
        echo = x509.load_pem_x509_certificate((clients / "echo.pem").read_bytes())
        assert echo.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "echo"
        assert stat.S_IMODE((clients / "echo-key.pem").stat().st_mode) == 0o600
        # Without a client certificate: refused, saying so.
        r = await _cli("ls", env={k: v for k, v in env.items() if k not in ("MESH_TLS_CERT", "MESH_TLS_KEY")})
        assert r.code == 1 and r.err.strip().splitlines() == [
            f"error: ConnectionFailed: the server at tls://127.0.0.1:{port} requires a client certificate (mTLS): "
            "give --tls-cert and --tls-key (env MESH_TLS_CERT, MESH_TLS_KEY)"], r.err
        assert await up.stop() == 0, up.lines
    finally:
        await up.kill()


async def test_tls_with_a_server_of_ones_own_is_refused_in_one_line(tmp_path: Path, prefix: str) -> None:
    r = await mesh_cli("up", "--tls", "--nats", "nats://127.0.0.1:4222", url="", prefix=prefix, cwd=tmp_path)
    assert r.code == 1 and len(r.err.strip().splitlines()) == 1 and "--tls" in r.err and "--nats" in r.err, r.err
