"""Connecting: bounded, typed failures that say what failed (never with the password), and a
connection that the server closes is replaced, not left dead."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import secrets
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from mesh import NatsServer, close, connect
from plugin_sdk import ConnectionFailed
from tests.conftest import eventually, mesh_cli

#: Hang guard for connect attempts that must fail: far above the connect deadline (~5 s).
GUARD = 30.0


async def test_a_connection_closed_by_the_server_reconnects(nats_server: NatsServer, nc: NATS,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    own = await connect(nats_server.url, name="closed-by-server test")
    try:
        subject = "closed." + secrets.token_hex(4)
        sub = await own.subscribe(subject)
        real = own.max_payload
        # Past nats-py's own check, so the server sees it: it answers -ERR 'Maximum Payload
        # Violation' and closes the connection.
        own._max_payload = real * 4
        with caplog.at_level(logging.ERROR, logger="mesh.nats"):
            await own.publish("closed.big", b"x" * (real + 1))

            async def reconnected() -> bool:
                return bool(own.is_connected and own.stats["reconnects"] >= 1)

            await eventually(reconnected, timeout=15, what="the same client to reconnect")
        assert own.max_payload == real  # the server's INFO again
        assert any(r.levelno == logging.ERROR and "NATS server closed the connection" in r.getMessage()
                   and "maximum payload" in r.getMessage().lower() for r in caplog.records), caplog.text

        async def delivered() -> bool:  # the subscription made before the close still receives
            await nc.publish(subject, b"hi")
            try:
                return (await sub.next_msg(timeout=0.5)).data == b"hi"
            except TimeoutError:
                return False

        await eventually(delivered, timeout=15, what="the old subscription to receive again")
    finally:
        await close(own)


async def test_a_wrong_password_says_authorization_failed(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    server = await NatsServer(tmp_path / "nats", config="authorization { user: u, password: p }").astart()
    try:
        good = await connect(f"nats://u:p@127.0.0.1:{server.port}", name="auth test")
        await close(good)
        with caplog.at_level(logging.DEBUG), pytest.raises(ConnectionFailed) as caught:
            await asyncio.wait_for(connect(f"nats://u:hunter2@127.0.0.1:{server.port}", name="auth test"), GUARD)
        message = str(caught.value)
        assert "authorization failed" in message and "u:***@127.0.0.1" in message, message
        assert "hunter2" not in message and "hunter2" not in caplog.text
    finally:
        server.stop()


def _self_signed(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


async def test_tls_against_an_unverifiable_certificate_fails_saying_so(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path / "tls")
    server = await NatsServer(tmp_path / "nats", config=f'tls {{ cert_file: "{cert}", key_file: "{key}" }}').astart()
    try:
        with pytest.raises(ConnectionFailed) as caught:
            await asyncio.wait_for(connect(f"tls://127.0.0.1:{server.port}", name="tls test"), GUARD)
        message = str(caught.value)
        assert "TLS" in message and "certificate verify failed" in message, message
    finally:
        server.stop()


async def test_invalid_urls_are_named_and_passwords_never_shown(prefix: str) -> None:
    for bad in ("garbage", "http://127.0.0.1:4222", "nats://", "nats://host:notaport"):
        with pytest.raises(ConnectionFailed, match="invalid NATS URL"):
            await connect(bad, name="url test")
    r = await mesh_cli("ls", "--nats", "garbage", url="", prefix=prefix)
    assert r.code == 1 and "invalid NATS URL 'garbage'" in r.err and "cannot reach" not in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
    r = await mesh_cli("ls", "--nats", "nats://alice:s3cret@127.0.0.1:1", url="", prefix=prefix)
    assert r.code == 1 and "cannot reach NATS at nats://alice:***@127.0.0.1:1" in r.err, r.err
    assert "s3cret" not in r.err
