"""Secure communication: the local PKI, nats-server with TLS and mTLS, and clients that connect
with a CA, a client certificate or credentials, or are refused in one line that names the cause."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import ssl
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import mesh._pki as pki_module
from mesh import NatsServer, close, connect
from mesh._connect import ClientSecurity
from mesh._pki import Pki, plugin_tls_env
from plugin_sdk import ConnectionFailed
from plugin_sdk.host import connect as sdk_connect
from tests.conftest import eventually, mesh_cli

#: Hang guard for connect attempts that must fail: far above the connect deadline (~5 s).
GUARD = 30.0


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# ---------------------------------------------------------------------------------------------
# The PKI


def test_pki_makes_a_ca_a_server_and_client_certificates_with_private_keys_0600(tmp_path: Path) -> None:
    old = os.umask(0)  # the widest umask: keys must still be 0600 from the start
    try:
        pki = Pki(tmp_path / "pki")
        ca_file = pki.ca()
        server = pki.server(["mesh.example.internal", "10.0.0.7"])
        admin = pki.client("admin")
    finally:
        os.umask(old)
    assert _mode(pki.directory) == 0o700 and _mode(pki.directory / "clients") == 0o700
    for key in (pki.ca_key_file, server.key, admin.key):
        assert _mode(key) == 0o600, key

    ca = _cert(ca_file)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert ca.not_valid_after_utc - ca.not_valid_before_utc >= dt.timedelta(days=3650)

    leaf = _cert(server.cert)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "mesh.example.internal"}
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.0.0.7"}
    assert ExtendedKeyUsageOID.SERVER_AUTH in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert dt.timedelta(days=364) < leaf.not_valid_after_utc - leaf.not_valid_before_utc <= dt.timedelta(days=366)
    leaf.verify_directly_issued_by(ca)

    client = _cert(admin.cert)
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "admin"
    assert ExtendedKeyUsageOID.CLIENT_AUTH in client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    client.verify_directly_issued_by(ca)
    # Python's ssl takes them as they are: a server context and a client one.
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca_file).load_cert_chain(server.cert, server.key)
    ssl.create_default_context(cafile=ca_file).load_cert_chain(admin.cert, admin.key)


def test_pki_is_made_once_and_reused_and_remakes_only_what_is_missing_or_expiring(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = Pki(tmp_path / "pki")
    first.ca()
    server, admin = first.server(), first.client("admin")
    before = {p: p.read_bytes() for p in (first.ca_file, first.ca_key_file, server.cert, server.key, admin.cert)}
    fingerprint = first.fingerprint()

    again = Pki(tmp_path / "pki")  # the next start
    assert again.fingerprint() == fingerprint
    assert (again.server(), again.client("admin")) == (server, admin)
    assert {p: p.read_bytes() for p in before} == before

    admin.cert.unlink()  # only that one is made again
    again.client("admin")
    assert admin.cert.read_bytes() != before[admin.cert] and server.cert.read_bytes() == before[server.cert]
    assert again.server(["other.host"]) == server and server.cert.read_bytes() != before[server.cert]  # new SAN

    os.chmod(admin.key, 0o644)  # loosened by hand: tightened again, the certificate kept
    kept = admin.cert.read_bytes()
    again.client("admin")
    assert _mode(admin.key) == 0o600 and admin.cert.read_bytes() == kept

    # A year-long leaf "about to expire" is re-issued; the 10-year CA is kept.
    monkeypatch.setattr(pki_module, "RENEW_BEFORE", dt.timedelta(days=400))
    third = Pki(tmp_path / "pki")
    third.client("admin")
    assert third.fingerprint() == fingerprint and admin.cert.read_bytes() != kept

    # A new CA (the old one deleted): every certificate is re-issued by it.
    monkeypatch.setattr(pki_module, "RENEW_BEFORE", dt.timedelta(days=30))
    first.ca_file.unlink()
    fourth = Pki(tmp_path / "pki")
    assert fourth.fingerprint() != fingerprint
    fourth.server()
    _cert(server.cert).verify_directly_issued_by(_cert(fourth.ca_file))

    # A CA that fails its checks (here: its key is not its certificate's) is replaced, the old files kept.
    replaced = fourth.ca_file.read_bytes()
    fourth.ca_key_file.write_bytes(admin.key.read_bytes())
    fifth = Pki(tmp_path / "pki")
    fifth.ca()
    assert (tmp_path / "pki" / "ca.pem.old").read_bytes() == replaced
    assert _mode(tmp_path / "pki" / "ca-key.pem.old") == 0o600 and fifth.ca_file.read_bytes() != replaced


def test_pki_keeps_a_ca_of_ones_own_and_replaces_a_foreign_certificate_saying_why(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    # An RSA CA brought by hand, as an operator might: kept, and it issues our (ECDSA) leaves.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "our own CA")])
    now = dt.datetime.now(dt.UTC)
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
          .not_valid_after(now + dt.timedelta(days=700))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(key, hashes.SHA256()))
    pki = Pki(tmp_path / "pki")
    pki.directory.mkdir(mode=0o700)
    pki.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.ca_key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    os.chmod(pki.ca_key_file, 0o600)
    server = pki.server()
    assert _cert(pki.ca_file) == ca
    _cert(server.cert).verify_directly_issued_by(ca)
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text

    # A certificate of another CA where ours should be: replaced, and the log says why.
    other = Pki(tmp_path / "other").client("admin")
    mine = pki.client_files("admin")
    mine.cert.parent.mkdir(mode=0o700)
    mine.cert.write_bytes(other.cert.read_bytes())
    mine.key.write_bytes(other.key.read_bytes())
    with caplog.at_level(logging.WARNING, logger="mesh.pki"):
        pki.client("admin")
    _cert(mine.cert).verify_directly_issued_by(ca)
    assert f"replacing {mine.cert} (not issued by this CA)" in caplog.text, caplog.text


def test_the_agent_hands_each_plugin_its_own_certificate_only_under_an_issuer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESH_PKI_DIR", raising=False)
    assert plugin_tls_env("echo") == {}
    monkeypatch.setenv("MESH_PKI_DIR", str(tmp_path / "pki"))
    env = plugin_tls_env("echo")
    assert _cert(Path(env["MESH_TLS_CERT"])).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "echo"
    assert _mode(Path(env["MESH_TLS_KEY"])) == 0o600
    assert plugin_tls_env("echo") == env  # made once


# ---------------------------------------------------------------------------------------------
# Servers


@dataclass
class Tls:
    pki: Pki
    ca: Path
    admin: ClientSecurity  # CA + the admin client certificate
    foreign: Pki  # another CA: trusted by nobody here


@pytest.fixture
def tls_files(tmp_path: Path) -> Tls:
    pki = Pki(tmp_path / "pki")
    ca = pki.ca()
    admin = pki.client("admin")
    foreign = Pki(tmp_path / "foreign")
    foreign.client("admin")
    return Tls(pki, ca, ClientSecurity(tls_ca=ca, tls_cert=admin.cert, tls_key=admin.key), foreign)


def _server(tmp_path: Path, files: Tls, *, verify: bool) -> NatsServer:
    server = files.pki.server()
    return NatsServer(tmp_path / f"nats-{'mtls' if verify else 'tls'}", tls=(server.cert, server.key, files.ca),
                      verify=verify)


@pytest.fixture
def tls_server(tmp_path: Path, tls_files: Tls) -> Iterator[NatsServer]:
    with _server(tmp_path, tls_files, verify=False) as server:
        yield server


@pytest.fixture
def mtls_server(tmp_path: Path, tls_files: Tls) -> Iterator[NatsServer]:
    with _server(tmp_path, tls_files, verify=True) as server:
        yield server


def _hostport(server: NatsServer) -> str:
    return f"127.0.0.1:{server.port}"


def test_the_tls_block_of_the_server_config(tmp_path: Path) -> None:
    server = NatsServer(tmp_path, tls=("/c/server.pem", "/c/server key.pem", "/c/ca.pem"), verify=True)
    assert server.url.startswith("tls://")
    block = server.tls_config()
    for line in ('cert_file: "/c/server.pem"', 'key_file: "/c/server key.pem"', 'ca_file: "/c/ca.pem"',
                 "verify: true", "timeout: 3"):
        assert line in block, block
    assert NatsServer(tmp_path).tls_config() == "" and NatsServer(tmp_path).url.startswith("nats://")
    with pytest.raises(ValueError, match="ca_file"):
        NatsServer(tmp_path, tls=("/c/server.pem", "/c/server-key.pem", None), verify=True)


async def _tls_in_use(nc: object) -> bool:
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    return writer is not None and writer.get_extra_info("ssl_object") is not None


async def test_tls_connects_with_the_ca(tls_server: NatsServer, tls_files: Tls) -> None:
    nc = await connect(tls_server.url, name="tls test", security=ClientSecurity(tls_ca=tls_files.ca))
    try:
        assert await _tls_in_use(nc)
        sub = await nc.subscribe("tls.ping")
        await nc.publish("tls.ping", b"hi")
        assert (await sub.next_msg(timeout=5)).data == b"hi"
    finally:
        await close(nc)
    # nats:// with the CA is upgraded by the server's demand; localhost is in the certificate too.
    for url in (f"nats://{_hostport(tls_server)}", f"tls://localhost:{tls_server.port}"):
        nc = await sdk_connect(url, name="tls test", tls_ca=tls_files.ca)
        assert await _tls_in_use(nc)
        await close(nc)


async def test_mtls_connects_with_a_client_certificate(mtls_server: NatsServer, tls_files: Tls) -> None:
    nc = await connect(mtls_server.url, name="mtls test", security=tls_files.admin)
    try:
        assert await _tls_in_use(nc)
        sub = await nc.subscribe("mtls.ping")
        await nc.publish("mtls.ping", b"hi")
        assert (await sub.next_msg(timeout=5)).data == b"hi"
    finally:
        await close(nc)


async def _refused(url: str, **options: Any) -> str:
    with pytest.raises(ConnectionFailed) as caught:
        await asyncio.wait_for(sdk_connect(url, name="refused test", wait=3, **options), GUARD)
    message = str(caught.value)
    assert "\n" not in message
    return message


async def test_a_plaintext_client_is_told_the_server_requires_tls(tls_server: NatsServer) -> None:
    message = await _refused(f"nats://{_hostport(tls_server)}")
    assert message == (f"the server at nats://{_hostport(tls_server)} requires TLS: use tls://{_hostport(tls_server)} "
                       "and --tls-ca (env MESH_TLS_CA) with the CA that signed its certificate"), message


async def test_a_client_that_does_not_trust_the_ca_is_refused(tls_server: NatsServer, tls_files: Tls) -> None:
    url = f"tls://{_hostport(tls_server)}"
    message = await _refused(url, tls_ca=tls_files.foreign.ca_file)
    assert message.startswith(f"TLS: certificate verify failed for {url}: ") and str(
        tls_files.foreign.ca_file) in message, message
    message = await _refused(url)  # tls:// without a CA: the system's CAs do not know ours
    assert "TLS: certificate verify failed" in message and "--tls-ca" in message, message


async def test_under_mtls_a_client_without_a_certificate_is_told_to_give_one(mtls_server: NatsServer,
                                                                             tls_files: Tls) -> None:
    url = f"tls://{_hostport(mtls_server)}"
    message = await _refused(url, tls_ca=tls_files.ca)
    assert message == (f"the server at {url} requires a client certificate (mTLS): give --tls-cert and --tls-key "
                       "(env MESH_TLS_CERT, MESH_TLS_KEY)"), message
    foreign = tls_files.foreign.client("admin")
    message = await _refused(url, tls_ca=tls_files.ca, tls_cert=foreign.cert, tls_key=foreign.key)
    assert message.startswith(f"TLS: the server at {url} refused this client's certificate ({foreign.cert})"), message


async def test_a_client_that_asked_for_tls_never_talks_plaintext(nats_server: NatsServer, tls_files: Tls) -> None:
    # nats-py upgrades only when the server asks: against a plaintext server it would just connect.
    for url, options in ((f"tls://{_hostport(nats_server)}", {"tls_ca": tls_files.ca}),
                         (nats_server.url, {"tls_ca": tls_files.ca})):
        message = await _refused(url, **options)
        assert "does not use TLS" in message and "refusing a plaintext connection" in message, message


async def test_a_reconnect_to_a_server_without_tls_closes_the_connection(
        tmp_path: Path, tls_files: Tls, caplog: pytest.LogCaptureFixture) -> None:
    tls_server = _server(tmp_path, tls_files, verify=False)
    tls_server.start()
    nc = await connect(tls_server.url, name="downgrade test", security=ClientSecurity(tls_ca=tls_files.ca))
    plain = NatsServer(tmp_path / "plain", port=tls_server.port)  # the same address, now without TLS
    try:
        with caplog.at_level(logging.ERROR, logger="mesh.nats"):
            tls_server.stop()
            plain.start()
            await eventually(lambda: _closed(nc), timeout=20, what="the client to close instead of talking plaintext")
        assert "without TLS, which this client asked for: closing the connection" in caplog.text, caplog.text
    finally:
        await close(nc)
        plain.stop()
        tls_server.stop()


async def _closed(nc: Any) -> bool:
    return bool(nc.is_closed)


async def test_unreadable_security_files_are_named(nats_server: NatsServer, tls_files: Tls, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    assert await _refused(nats_server.url, tls_ca=missing) == (
        f"cannot read TLS CA file {missing}: No such file or directory")
    assert "holds no usable PEM certificate" in await _refused(nats_server.url, tls_ca=tls_files.pki.ca_key_file)
    server = tls_files.pki.server()
    assert "does not load (KEY_VALUES_MISMATCH)" in await _refused(
        nats_server.url, tls_ca=tls_files.ca, tls_cert=tls_files.admin.tls_cert, tls_key=server.key)
    assert "without its certificate" in await _refused(nats_server.url, tls_key=server.key)
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(server.key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted-key.pem"  # refused, never a passphrase prompt on the terminal
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))
    assert "does not load" in await _refused(nats_server.url, tls_ca=tls_files.ca, tls_cert=server.cert,
                                             tls_key=encrypted)
    creds = tmp_path / "x.creds"
    assert await _refused(nats_server.url, creds=creds) == (
        f"cannot read credentials file {creds}: No such file or directory")
    creds.write_text("not a creds file\n")
    assert "not a NATS .creds file" in await _refused(nats_server.url, creds=creds)
    seed = tmp_path / "x.nk"
    seed.write_text("SUnot-a-seed\n")
    assert "holds no valid nkey seed" in await _refused(nats_server.url, nkey_seed=seed)


def _user_seed(path: Path) -> str:
    kp = nkeys.from_seed(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))
    path.write_bytes(bytes(kp.seed))
    return bytes(kp.public_key).decode()


async def test_credentials_the_server_refuses_say_authorization_failed(tmp_path: Path) -> None:
    allowed = _user_seed(tmp_path / "allowed.nk")
    stranger = _user_seed(tmp_path / "stranger.nk")
    with NatsServer(tmp_path / "nats", config=f'authorization {{ users: [ {{ nkey: "{allowed}" }} ] }}') as server:
        nc = await sdk_connect(server.url, name="nkey test", nkey_seed=tmp_path / "allowed.nk")
        await close(nc)
        message = await _refused(server.url, nkey_seed=tmp_path / "stranger.nk")
        assert message == (f"authorization failed at {server.url}: the server refused the nkey in "
                           f"{tmp_path / 'stranger.nk'}"), message
        # A .creds file of the right shape the server does not accept (this server knows no JWTs).
        creds = tmp_path / "user.creds"
        seed = (tmp_path / "stranger.nk").read_text()
        creds.write_text("-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.AA\n"
                         "------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n"
                         f"{seed}\n------END USER NKEY SEED------\n")
        message = await _refused(server.url, creds=creds)
        assert message == f"authorization failed at {server.url}: the server refused the credentials in {creds}"
        assert seed not in message and stranger not in message
        message = await _refused(server.url)
        assert message.startswith(f"authorization failed at {server.url}: the server requires credentials: give "
                                  "--creds"), message


# ---------------------------------------------------------------------------------------------
# The real CLI


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


async def test_the_cli_connects_with_tls_options_and_refuses_in_one_line(
        tls_server: NatsServer, mtls_server: NatsServer, tls_files: Tls, prefix: str, tmp_path: Path) -> None:
    tls_url, mtls_url = tls_server.url, mtls_server.url
    admin = tls_files.admin
    assert admin.tls_cert is not None and admin.tls_key is not None
    ok = await mesh_cli("--tls-ca", str(tls_files.ca), "publish", "tls.works", "{}", url=tls_url, prefix=prefix)
    assert (ok.code, ok.err) == (0, ""), ok
    ok = await mesh_cli("--tls-ca", str(tls_files.ca), "--tls-cert", str(admin.tls_cert), "--tls-key",
                        str(admin.tls_key), "publish", "mtls.works", "{}", url=mtls_url, prefix=prefix)
    assert (ok.code, ok.err) == (0, ""), ok

    plain = f"nats://{_hostport(tls_server)}"
    r = await mesh_cli("ls", url=plain, prefix=prefix)
    assert r.code == 1 and _one_error_line(r.err) == (
        f"error: ConnectionFailed: the server at {plain} requires TLS: use tls://{_hostport(tls_server)} and "
        "--tls-ca (env MESH_TLS_CA) with the CA that signed its certificate"), r.err
    r = await mesh_cli("--tls-ca", str(tls_files.foreign.ca_file), "ls", url=tls_url, prefix=prefix)
    assert r.code == 1 and _one_error_line(r.err).startswith(
        f"error: ConnectionFailed: TLS: certificate verify failed for {tls_url}"), r.err
    r = await mesh_cli("--tls-ca", str(tls_files.ca), "ls", url=mtls_url, prefix=prefix)
    assert r.code == 1 and _one_error_line(r.err) == (
        f"error: ConnectionFailed: the server at {mtls_url} requires a client certificate (mTLS): give --tls-cert "
        "and --tls-key (env MESH_TLS_CERT, MESH_TLS_KEY)"), r.err
    missing = tmp_path / "missing.creds"
    r = await mesh_cli("--creds", str(missing), "ls", url=tls_url, prefix=prefix)
    assert r.code == 1 and _one_error_line(r.err) == (
        f"error: ConnectionFailed: cannot read credentials file {missing}: No such file or directory"), r.err
