"""A small local PKI for ``mesh up --tls`` / ``--mtls``: one CA, a server certificate, client certificates.

Everything lives in one directory (``<data dir>/pki/``, mode 0700), made once and reused:

- ``ca.pem`` / ``ca-key.pem``: the CA (self-signed, ``CA:true``, key usage certSign + cRLSign), valid 10 years;
- ``server.pem`` / ``server-key.pem``: the embedded nats-server's certificate (serverAuth), SANs ``localhost``,
  ``127.0.0.1``, ``::1`` and any extra host or IP asked for, valid 1 year;
- ``clients/<name>.pem`` / ``clients/<name>-key.pem``: a client certificate (clientAuth) with CN = ``name``
  (``admin``, or a plugin's name), valid 1 year.

Keys are ECDSA P-256: Go's TLS (nats-server) and OpenSSL (Python's ``ssl``) both take them for
TLS 1.2 and 1.3 alike; Ed25519 certificates are not accepted by every TLS stack. Private keys are
written 0600 from the start (``os.open(..., 0o600)``, then renamed into place, so a reader never
sees half a file and a key is never briefly readable by others).

On the next start each file is loaded and checked: it parses, the key matches the certificate,
the certificate was issued by *this* CA, it is valid for at least :data:`RENEW_BEFORE` more, and a
server certificate covers every host asked for. Only what fails a check is made again (a file
that was there is replaced with a warning saying why); a new CA therefore re-issues every
certificate (the old ones no longer verify against it). Files put there by hand (your own CA or
server certificate, RSA, ECDSA or Ed25519) are kept as long as they pass the same checks.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CA_DAYS", "ISSUER_ENV", "LEAF_DAYS", "RENEW_BEFORE", "CertFiles", "Pki", "plugin_tls_env"]

log = logging.getLogger("mesh.pki")

#: Validity of the CA, and of server and client certificates, in days.
CA_DAYS = 3650
LEAF_DAYS = 365
#: A certificate with less than this left is made again at the next start.
RENEW_BEFORE = dt.timedelta(days=30)
#: Back-dating of ``not_valid_before``, for clocks a little behind ours.
_SKEW = dt.timedelta(minutes=5)

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

#: Keys we make are ECDSA P-256; keys found in place (brought by the user) may also be these.
Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey


@dataclass(frozen=True)
class CertFiles:
    """A certificate and its private key, as file paths (secrets are only ever passed as paths)."""

    cert: Path
    key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret: created 0600 (never wider, whatever the umask), then renamed into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a stale tmp file of ours could have been wider
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _key_pem(key: Key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _hash_for(key: Key) -> hashes.SHA256 | None:
    """The digest to sign with ``key`` (Ed25519 and Ed448 take none)."""
    return None if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) else hashes.SHA256()


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


class Pki:
    """The CA and the certificates under ``directory``; each made once, then loaded and checked."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._ca: tuple[x509.Certificate, Key] | None = None

    # -- paths -------------------------------------------------------------------------------

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key_file(self) -> Path:
        return self.directory / "ca-key.pem"

    @property
    def server_files(self) -> CertFiles:
        return CertFiles(self.directory / "server.pem", self.directory / "server-key.pem")

    @property
    def route_files(self) -> CertFiles:
        return CertFiles(self.directory / "route.pem", self.directory / "route-key.pem")

    def client_files(self, name: str) -> CertFiles:
        folder = self.directory / "clients"
        return CertFiles(folder / f"{name}.pem", folder / f"{name}-key.pem")

    # -- what callers use --------------------------------------------------------------------

    def ca(self) -> Path:
        """``ca.pem``, made if missing, unreadable or about to expire (which re-issues every leaf)."""
        self._load_ca()
        return self.ca_file

    def fingerprint(self) -> str:
        """SHA-256 fingerprint of the CA certificate (``AB:CD:…``), as ``openssl x509 -fingerprint`` shows it."""
        cert, _ = self._load_ca()
        return cert.fingerprint(hashes.SHA256()).hex(":").upper()

    def server(self, hosts: Iterable[str] = ()) -> CertFiles:
        """The server certificate, for ``localhost``, ``127.0.0.1``, ``::1`` and ``hosts``."""
        wanted = list(dict.fromkeys([*DEFAULT_HOSTS, *(h.strip() for h in hosts if h.strip())]))
        files = self.server_files
        problem = self._problem(files, ExtendedKeyUsageOID.SERVER_AUTH, hosts=wanted)
        if not problem:
            return files
        self._replacing(files, problem)
        self._issue(files, common_name=wanted[0], sans=[_san(h) for h in wanted],
                    usage=ExtendedKeyUsageOID.SERVER_AUTH)
        log.info("made a server certificate for %s (%s)", ", ".join(wanted), files.cert)
        return files

    def route(self, hosts: Iterable[str] = ()) -> CertFiles:
        """The certificate a node presents on its cluster routes, both ways (serverAuth and
        clientAuth: each node dials some routes and accepts others), for the same hosts as :meth:`server`."""
        wanted = list(dict.fromkeys([*DEFAULT_HOSTS, *(h.strip() for h in hosts if h.strip())]))
        files = self.route_files
        problem = (self._problem(files, ExtendedKeyUsageOID.SERVER_AUTH, hosts=wanted)
                   or self._problem(files, ExtendedKeyUsageOID.CLIENT_AUTH))
        if not problem:
            return files
        self._replacing(files, problem)
        self._issue(files, common_name=wanted[0], sans=[_san(h) for h in wanted],
                    usage=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
        log.info("made a route certificate for %s (%s)", ", ".join(wanted), files.cert)
        return files

    def client(self, name: str) -> CertFiles:
        """The client certificate of ``name`` (CN = ``name``): ``admin``, or a plugin's name."""
        if not _NAME.match(name):
            raise ValueError(f"invalid certificate name {name!r}: letters, digits, '_', '.', '-' (max 128)")
        files = self.client_files(name)
        problem = self._problem(files, ExtendedKeyUsageOID.CLIENT_AUTH, common_name=name)
        if not problem:
            return files
        self._replacing(files, problem)
        self._issue(files, common_name=name, sans=[], usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        log.info("made a client certificate for %r (%s)", name, files.cert)
        return files

    # -- internals ---------------------------------------------------------------------------

    def _mkdir(self, path: Path) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_IMODE(path.stat().st_mode) != 0o700:
            os.chmod(path, 0o700)

    def _load_ca(self) -> tuple[x509.Certificate, Key]:
        if self._ca is not None and _now() < self._ca[0].not_valid_after_utc - RENEW_BEFORE:
            return self._ca
        self._mkdir(self.directory)
        files = CertFiles(self.ca_file, self.ca_key_file)
        loaded = self._read(files)
        if isinstance(loaded, tuple):
            cert, key = loaded
            problem = "" if _is_ca(cert) else "not a CA certificate (CA:true, keyCertSign)"
            problem = problem or _expiring(cert)
            if not problem:
                self._ca = (cert, key)
                return self._ca
        else:
            problem = loaded
        if problem != _MISSING:
            log.warning("replacing the CA %s (%s; the old files kept as *.old): every certificate it issued will be "
                        "made again", self.ca_file, problem)
            for path in (self.ca_file, self.ca_key_file):
                if path.exists():
                    os.replace(path, path.with_name(path.name + ".old"))
        key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "groundhog mesh"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"groundhog mesh CA {_now():%Y-%m-%d}")])
        now = _now()
        public = key.public_key()
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - _SKEW).not_valid_after(now + dt.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
                .sign(key, hashes.SHA256()))
        _write_private(self.ca_key_file, _key_pem(key))
        _write_public(self.ca_file, _cert_pem(cert))
        log.info("made a CA (%s), valid until %s", self.ca_file, cert.not_valid_after_utc.date())
        self._ca = (cert, key)
        return self._ca

    def _read(self, files: CertFiles) -> tuple[x509.Certificate, Key] | str:
        """The pair, if both files are there and parse and the key is the certificate's; else what is wrong."""
        if not files.cert.exists() and not files.key.exists():
            return _MISSING
        try:
            cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
            key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
        except OSError as exc:
            return f"cannot read {exc.filename}: {exc.strerror}"
        except (ValueError, TypeError) as exc:
            return f"not a PEM certificate and unencrypted key ({exc})"
        if not isinstance(key, Key):
            return f"unsupported key type {type(key).__name__}"
        if key.public_key() != cert.public_key():
            return "the key is not the certificate's"
        mode = stat.S_IMODE(files.key.stat().st_mode)
        if mode & 0o077:
            log.warning("%s was readable by others (mode %o): now 0600", files.key, mode)
            os.chmod(files.key, 0o600)
        return cert, key

    def _problem(self, files: CertFiles, usage: x509.ObjectIdentifier, *, hosts: list[str] | None = None,
                 common_name: str | None = None) -> str:
        """What is wrong with a leaf certificate (``""``: nothing, keep it)."""
        ca_cert, _ = self._load_ca()
        loaded = self._read(files)
        if isinstance(loaded, str):
            return loaded
        cert, _ = loaded
        try:
            if cert.issuer != ca_cert.subject:
                raise ValueError
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            return "not issued by this CA"
        expiring = _expiring(cert)
        if expiring:
            return expiring
        try:
            if usage not in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value:
                return f"its extended key usage lacks {_USAGE_NAMES.get(usage, usage.dotted_string)}"
        except x509.ExtensionNotFound:
            pass  # no restriction: good for any use
        if common_name is not None:
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if not names or names[0].value != common_name:
                return f"its common name is not {common_name!r}"
        if hosts:
            try:
                sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            except x509.ExtensionNotFound:
                return "it names no hosts (subjectAltName)"
            have = {str(n) for n in sans.get_values_for_type(x509.DNSName)}
            have |= {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
            missing = [h for h in hosts if str(_san(h).value) not in have]
            if missing:
                return f"it does not name {', '.join(missing)}"
        return ""

    def _replacing(self, files: CertFiles, problem: str) -> None:
        if problem != _MISSING:
            log.warning("replacing %s (%s)", files.cert, problem)

    def _issue(self, files: CertFiles, *, common_name: str, sans: list[x509.GeneralName],
               usage: x509.ObjectIdentifier | list[x509.ObjectIdentifier]) -> None:
        ca_cert, ca_key = self._load_ca()
        usages = usage if isinstance(usage, list) else [usage]
        self._mkdir(files.cert.parent)
        key = _new_key()
        now = _now()
        public = key.public_key()
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "groundhog mesh"),
                                            x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                   .issuer_name(ca_cert.subject).public_key(public).serial_number(x509.random_serial_number())
                   .not_valid_before(now - _SKEW)
                   .not_valid_after(min(now + dt.timedelta(days=LEAF_DAYS), ca_cert.not_valid_after_utc))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, _hash_for(ca_key))
        _write_private(files.key, _key_pem(key))
        _write_public(files.cert, _cert_pem(cert))


_MISSING = "missing"
_USAGE_NAMES = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth"}


def _expiring(cert: x509.Certificate) -> str:
    left = cert.not_valid_after_utc - _now()
    if left < RENEW_BEFORE:
        return "expired" if left.total_seconds() <= 0 else f"expires in {left.days} days"
    return ""


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return basic.ca and usage.key_cert_sign


#: Set (by ``mesh up --mtls``) in an agent's environment: the PKI directory whose CA issues each
#: plugin host the agent starts its own client certificate.
ISSUER_ENV = "MESH_PKI_DIR"


def plugin_tls_env(plugin: str) -> dict[str, str]:
    """``MESH_TLS_CERT`` / ``MESH_TLS_KEY`` for a plugin host: the plugin's own client certificate
    (CN = its name, made once) from the CA in ``$MESH_PKI_DIR``; nothing when that is not set."""
    directory = os.environ.get(ISSUER_ENV)
    if not directory:
        return {}
    files = Pki(directory).client(plugin)
    return {"MESH_TLS_CERT": str(files.cert), "MESH_TLS_KEY": str(files.key)}
