"""Code signing of plugin packages: keys, the trust store, the manifest, sign, verify, the agent's store.

A *plugin package* is a directory holding ``plugin.toml`` (with ``entry = "module:Class"``) and its
Python files, or a wheel (``.whl``). Its signature covers a canonical manifest: every regular
file's relative POSIX path and SHA-256, sorted, after a domain-separation prefix and the signer's
key id (see :func:`canonical_manifest`). The signature document (:data:`SIGNATURE_FILE`, JSON) lives
in the package root, or beside a wheel in ``<wheel>.sig``, and is not part of what it covers.

``__pycache__`` directories and ``*.pyc`` files are ignored (never signed, packed or copied), so
running a package does not invalidate it. Symlinks, non-regular files, absolute paths and ``..``
components are refused when signing, packing and verifying.

Keys are Ed25519 (``cryptography``): ``<name>.key`` (PKCS#8 PEM, mode 0600) and ``<name>.pub``
(``ed25519:<base64 of the 32 raw bytes> <name>``) in the keys directory; a trusted key is
``<key id>.pub`` in the trust store. A key id is the first 16 hex digits of the SHA-256 of the raw
public key. See ``docs/security.md``.
"""

from __future__ import annotations

import base64
import binascii
import configparser
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError

from plugin_sdk import ConfigError, ErrorInfo, InitializationError, InvalidMessage, PluginConfig, SignatureInvalid

__all__ = [
    "DOMAIN",
    "FORMAT",
    "SIGNATURE_FILE",
    "KeyInfo",
    "Package",
    "SignatureDoc",
    "TrustStore",
    "Verified",
    "canonical_manifest",
    "check_package",
    "default_keys_dir",
    "default_trust_dir",
    "encode_public",
    "generate_key",
    "install_package",
    "key_id",
    "list_keys",
    "load_private_key",
    "looks_like_package",
    "pack",
    "parse_public",
    "plugin_entry",
    "probe_config",
    "probe_package",
    "read_package",
    "sign_package",
    "unpack",
    "verify",
]

#: Prefix of every signed message: a signature made for anything else never verifies as a package's.
DOMAIN = b"groundhog-plugin-signature-v1\n"
#: The ``format`` field of a signature document.
FORMAT = "groundhog-plugin-signature-v1"
#: The signature document in a directory package's root (a wheel's is ``<wheel>.sig`` beside it).
SIGNATURE_FILE = "mesh-signature.json"
WHEEL_SIGNATURE_SUFFIX = ".sig"
PLUGIN_TOML = "plugin.toml"
PUBLIC_PREFIX = "ed25519:"
#: Bounds on what a package may hold (checked when reading one and when unpacking one off the wire).
MAX_FILES = 10_000
MAX_BYTES = 64 * 1024 * 1024
#: Seconds the agent gives a package's module to import when it checks the entry (in a child process).
PROBE_TIMEOUT = 60.0

KEY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
ENTRY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")

Kind = Literal["dir", "wheel"]


# -- where keys live ---------------------------------------------------------------------------

def default_keys_dir() -> Path:
    """``$MESH_KEYS_DIR``, else ``~/.config/groundhog/keys``: your signing keys."""
    env = os.environ.get("MESH_KEYS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".config" / "groundhog" / "keys"


def default_trust_dir() -> Path:
    """``$MESH_TRUST_DIR``, else ``~/.config/groundhog/trusted``: the public keys whose packages are accepted."""
    env = os.environ.get("MESH_TRUST_DIR")
    return Path(env).expanduser() if env else Path.home() / ".config" / "groundhog" / "trusted"


def _private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner can enter (created 0700 if missing)."""
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)
        os.chmod(path, 0o700)  # (mkdir's mode is cut by the umask; 0700 is what we mean)
    elif not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    return path


# -- keys ---------------------------------------------------------------------------------------

def key_id(public: Ed25519PublicKey) -> str:
    """First 16 hex digits of the SHA-256 of the raw 32-byte public key."""
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def encode_public(public: Ed25519PublicKey) -> str:
    """``ed25519:<base64 of the raw key>``: how a public key is written and passed around."""
    return PUBLIC_PREFIX + base64.b64encode(_raw(public)).decode()


def parse_public(text: str) -> tuple[Ed25519PublicKey, str]:
    """A public key from ``ed25519:<base64> [label]`` or a PEM public key; returns (key, label)."""
    stripped = text.strip()
    if "PRIVATE KEY" in stripped:
        raise ValueError("that is a private key: give the public key (the .pub file, or its ed25519:… text)")
    if stripped.startswith("-----BEGIN PUBLIC KEY-----"):
        try:
            loaded = serialization.load_pem_public_key(stripped.encode())
        except ValueError:
            raise ValueError("not a valid PEM public key") from None
        if not isinstance(loaded, Ed25519PublicKey):
            raise ValueError(f"not an Ed25519 public key ({type(loaded).__name__})")
        return loaded, ""
    token, _, label = stripped.partition(" ")
    if not token.startswith(PUBLIC_PREFIX):
        raise ValueError(f"not a public key: expected {PUBLIC_PREFIX}<base64> (as mesh keys generate writes it)")
    try:
        raw = base64.b64decode(token[len(PUBLIC_PREFIX):], validate=True)
        return Ed25519PublicKey.from_public_bytes(raw), label.strip()
    except (binascii.Error, ValueError):
        raise ValueError(f"not a valid Ed25519 public key: {token[:60]!r}") from None


@dataclass(frozen=True)
class KeyInfo:
    """A key as listed: its name (or a trusted key's label), id, public key text and file."""

    name: str
    key_id: str
    public_key: str
    path: Path

    def as_json(self) -> dict[str, str]:
        return {"name": self.name, "key_id": self.key_id, "public_key": self.public_key, "path": str(self.path)}


def _check_key_name(name: str) -> str:
    if not KEY_NAME_RE.match(name):
        raise ValueError(f"invalid key name {name!r}: letters, digits, '.', '_' and '-', starting with a letter "
                         "or digit (at most 64 characters)")
    return name


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (never overwrite, never through a symlink) with exactly ``mode``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_key(keys_dir: Path, name: str = "default") -> KeyInfo:
    """A new Ed25519 key pair: ``<name>.key`` (mode 0600) and ``<name>.pub`` in ``keys_dir`` (0700)."""
    _check_key_name(name)
    _private_dir(keys_dir)
    private_path, public_path = keys_dir / f"{name}.key", keys_dir / f"{name}.pub"
    if private_path.exists() or public_path.exists() or private_path.is_symlink():
        raise ValueError(f"a key named {name!r} already exists in {keys_dir} (choose another name)")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    _write_new(private_path, pem, 0o600)
    public = encode_public(private.public_key())
    _write_new(public_path, f"{public} {name}\n".encode(), 0o644)
    return KeyInfo(name, key_id(private.public_key()), public, private_path)


def _read_private(path: Path) -> Ed25519PrivateKey:
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 key ({type(loaded).__name__})")
    return loaded


def load_private_key(keys_dir: Path, name: str = "default") -> tuple[Ed25519PrivateKey, KeyInfo]:
    """The private key ``name``; refused if group or others may read it (as ssh does)."""
    path = keys_dir / f"{_check_key_name(name)}.key"
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        raise ValueError(f"no key named {name!r} in {keys_dir} (mesh keys generate {name})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file")
    if st.st_mode & 0o077:
        raise ValueError(f"private key {path} is accessible by group or others (mode "
                         f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")
    private = _read_private(path)
    public = private.public_key()
    return private, KeyInfo(name, key_id(public), encode_public(public), path)


def list_keys(keys_dir: Path) -> list[KeyInfo]:
    """Your key pairs (``*.key`` in ``keys_dir``), by name."""
    if not keys_dir.is_dir():
        return []
    found = []
    for path in sorted(keys_dir.glob("*.key")):
        public = _read_private(path).public_key()
        found.append(KeyInfo(path.stem, key_id(public), encode_public(public), path))
    return found


@dataclass(frozen=True)
class _Trusted:
    info: KeyInfo
    public: Ed25519PublicKey


class TrustStore:
    """The public keys whose signatures are accepted: ``<key id>.pub`` files in one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def add(self, public: Ed25519PublicKey, label: str = "") -> KeyInfo:
        """Trust ``public`` (kept as ``<key id>.pub``); trusting a key twice changes nothing."""
        ident = key_id(public)
        path = self.directory / f"{ident}.pub"
        label = " ".join(label.split())  # one line
        if not path.exists():
            _private_dir(self.directory)
            _write_new(path, f"{encode_public(public)} {label}".rstrip().encode() + b"\n", 0o644)
        found = self._read(ident)
        assert found is not None
        return found.info

    def get(self, ident: str) -> _Trusted | None:
        """The trusted key with id ``ident``, or ``None``."""
        return self._read(ident) if KEY_ID_RE.match(ident) else None

    def list(self) -> list[KeyInfo]:
        if not self.directory.is_dir():
            return []
        return [t.info for path in sorted(self.directory.glob("*.pub")) if (t := self._read(path.stem))]

    def _read(self, ident: str) -> _Trusted | None:
        path = self.directory / f"{ident}.pub"
        try:
            text = path.read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            public, label = parse_public(text)
        except ValueError as exc:
            raise SignatureInvalid(f"trust store file {path} is not a public key: {exc}") from None
        if key_id(public) != ident:  # a file renamed by hand: its name must be its key's id
            raise SignatureInvalid(f"trust store file {path} holds key {key_id(public)}, not {ident}: "
                                   f"rename it {key_id(public)}.pub")
        return _Trusted(KeyInfo(label, ident, encode_public(public), path), public)


# -- packages -----------------------------------------------------------------------------------

def _ignored(path: str) -> bool:
    """``__pycache__`` directories and ``*.pyc`` files: what running a package writes into it."""
    return path.endswith(".pyc") or "__pycache__" in path.split("/")


def check_path(path: str, source: str) -> str:
    """``path`` if it is a plain relative POSIX path inside the package; SignatureInvalid naming it else."""
    if not path:
        raise SignatureInvalid(f"{source}: an empty path")
    if "\\" in path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise SignatureInvalid(f"{source}: path {path!r} has a backslash or a control character")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise SignatureInvalid(f"{source}: path {path!r} is absolute: a package holds relative paths only")
    parts = path.split("/")
    if ".." in parts:
        raise SignatureInvalid(f"{source}: path {path!r} has a '..' component: a package may not reach outside "
                               "itself")
    if any(p in ("", ".") for p in parts):
        raise SignatureInvalid(f"{source}: path {path!r} is not a normalized relative path")
    return path


def _check_tree(paths: Iterable[str], source: str) -> None:
    """No path is both a file and a directory (``a`` and ``a/b``)."""
    files = set(paths)
    for p in files:
        parts = p.split("/")
        for i in range(1, len(parts)):
            if (prefix := "/".join(parts[:i])) in files:
                raise SignatureInvalid(f"{source}: {prefix!r} is both a file and a directory")


@dataclass(frozen=True)
class Package:
    """A plugin package in memory: what is verified is what is stored and run.

    ``files`` maps relative POSIX paths to contents (ignored files and the signature document left
    out); ``signature`` is the signature document's text, or ``None`` for an unsigned package.
    """

    source: str
    kind: Kind
    files: Mapping[str, bytes]
    signature: str | None

    @property
    def signature_name(self) -> str:
        return f"{Path(self.source).name}{WHEEL_SIGNATURE_SUFFIX}" if self.kind == "wheel" else SIGNATURE_FILE

    def hashes(self) -> dict[str, str]:
        return {path: hashlib.sha256(data).hexdigest() for path, data in self.files.items()}

    def digest(self) -> str:
        """A short content address: the SHA-256 of the sorted (path, hash) listing, 12 hex digits."""
        return hashlib.sha256(_listing(self.hashes())).hexdigest()[:12]


def _listing(hashes: Mapping[str, str]) -> bytes:
    return b"".join(f"{hashes[p]} {p}\n".encode() for p in sorted(hashes, key=lambda p: p.encode()))


def looks_like_package(arg: str) -> bool:
    """Whether a ``mesh load`` argument names a package (an existing path, a ``.whl``, or a path with a
    separator) rather than a REF (``module:Class`` or an entry-point name)."""
    return arg.endswith(".whl") or os.sep in arg or os.path.exists(arg)


def read_package(path: Path) -> Package:
    """Read a package from disk into memory: a directory, or a ``.whl`` (and its ``.sig``)."""
    source = str(path)
    if path.is_dir():
        files = _read_dir(path, source)
        sig = path / SIGNATURE_FILE
        if sig.is_symlink():
            raise SignatureInvalid(f"{source}: {SIGNATURE_FILE} is a symlink: a package holds regular files only")
        return Package(source, "dir", files, _read_text(sig) if sig.exists() else None)
    if not path.exists():
        raise ValueError(f"{path}: no such directory or wheel")
    if path.suffix != ".whl":
        raise ValueError(f"{path} is not a plugin package: give a directory holding plugin.toml, or a .whl")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_BYTES:
        raise SignatureInvalid(f"{source}: larger than {MAX_BYTES} bytes")
    try:
        files = _read_zip(data, source)
    except zipfile.BadZipFile as exc:
        raise ConfigError(f"{source}: not a wheel (not a zip archive: {exc})") from None
    sig = path.with_name(path.name + WHEEL_SIGNATURE_SUFFIX)
    return Package(source, "wheel", files, _read_text(sig) if sig.exists() else None)


def _read_text(path: Path) -> str:
    try:
        return _read_regular(path, path.name, str(path.parent)).decode("utf-8")
    except UnicodeDecodeError:
        raise SignatureInvalid(f"{path}: not UTF-8 text") from None


def _read_regular(path: Path, rel: str, source: str) -> bytes:
    """A regular file's bytes, opened without following a symlink (one swapped in after the listing
    is refused too)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if os.path.islink(path):
            raise SignatureInvalid(f"{source}: {rel!r} is a symlink: a package holds regular files only") from None
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise SignatureInvalid(f"{source}: {rel!r} is not a regular file")
        return f.read(MAX_BYTES + 1)


def _read_dir(root: Path, source: str) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    total = 0
    stack: list[tuple[Path, str]] = [(root, "")]
    while stack:
        directory, prefix = stack.pop()
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            rel = f"{prefix}{e.name}"
            if e.is_symlink():
                raise SignatureInvalid(f"{source}: {rel!r} is a symlink: a package holds regular files only")
            if e.is_dir(follow_symlinks=False):
                if e.name != "__pycache__":
                    stack.append((Path(e.path), rel + "/"))
                continue
            if not e.is_file(follow_symlinks=False):
                raise SignatureInvalid(f"{source}: {rel!r} is not a regular file (a package holds regular files "
                                       "only)")
            if _ignored(rel) or rel == SIGNATURE_FILE:
                continue
            check_path(rel, source)
            data = files[rel] = _read_regular(Path(e.path), rel, source)
            total += len(data)
            if len(files) > MAX_FILES or total > MAX_BYTES:
                raise SignatureInvalid(f"{source}: more than {MAX_FILES} files or {MAX_BYTES} bytes")
    return files


def _read_zip(data: bytes, source: str) -> dict[str, bytes]:
    """A zip's regular files (a wheel, or a package packed for the wire); BadZipFile if it is none."""
    files: dict[str, bytes] = {}
    total = 0
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_FILES:
            raise SignatureInvalid(f"{source}: more than {MAX_FILES} entries")
        for info in infos:
            name = info.filename
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind == stat.S_IFLNK:
                raise SignatureInvalid(f"{source}: {name!r} is a symlink: a package holds regular files only")
            if info.is_dir() or kind == stat.S_IFDIR:
                check_path(name.rstrip("/"), source)
                continue
            if kind not in (0, stat.S_IFREG):
                raise SignatureInvalid(f"{source}: {name!r} is not a regular file")
            check_path(name, source)
            if _ignored(name):
                continue
            if name in files:
                raise SignatureInvalid(f"{source}: {name!r} appears twice")
            total += info.file_size
            if total > MAX_BYTES:
                raise SignatureInvalid(f"{source}: more than {MAX_BYTES} bytes unpacked")
            with zf.open(info) as f:
                files[name] = f.read(MAX_BYTES + 1)
    _check_tree(files, source)
    return files


def pack(pkg: Package) -> bytes:
    """The package's files as a zip (for the wire): sorted, fixed dates, regular files 0644."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(pkg.files):
            info = zipfile.ZipInfo(path, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, pkg.files[path])
    return buf.getvalue()


def unpack(data: bytes, *, kind: Kind, signature: str | None, source: str) -> Package:
    """A package sent in a load request (the zip from :func:`pack`) back in memory, every path checked."""
    try:
        files = _read_zip(data, source)
    except zipfile.BadZipFile as exc:
        raise InvalidMessage(f"{source}: the package is not a zip archive ({exc})") from None
    if kind == "dir":
        files.pop(SIGNATURE_FILE, None)  # the signature travels beside the files, never among them
    return Package(source, kind, files, signature)


# -- the manifest, signing, verifying ----------------------------------------------------------

def canonical_manifest(key: str, hashes: Mapping[str, str]) -> bytes:
    """What is signed: the domain prefix, ``key <key id>``, then ``<sha256> <path>`` per file, sorted by path."""
    return DOMAIN + f"key {key}\n".encode() + _listing(hashes)


@dataclass(frozen=True)
class SignatureDoc:
    """A signature document (``mesh-signature.json`` / ``<wheel>.sig``)."""

    key_id: str
    files: dict[str, str]
    signature: bytes

    def render(self) -> str:
        return json.dumps({"format": FORMAT, "key_id": self.key_id,
                           "signature": base64.b64encode(self.signature).decode(),
                           "files": dict(sorted(self.files.items()))}, indent=2) + "\n"

    @classmethod
    def parse(cls, text: str, *, source: str, name: str) -> SignatureDoc:
        def bad(why: str) -> SignatureInvalid:
            return SignatureInvalid(f"{source}: {name} is not a valid signature: {why}")

        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise bad(f"not JSON ({exc.msg})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise bad(f"format is not {FORMAT!r}")
        ident, sig, files = data.get("key_id"), data.get("signature"), data.get("files")
        if not isinstance(ident, str) or not KEY_ID_RE.match(ident):
            raise bad("key_id is not 16 hex digits")
        if not isinstance(files, dict) or not all(isinstance(v, str) and SHA256_RE.match(v) for v in files.values()):
            raise bad("files is not an object of path: sha256")
        for path in files:
            check_path(path, source)
        _check_tree(files, source)
        try:
            raw = base64.b64decode(sig if isinstance(sig, str) else "", validate=True)
        except binascii.Error:
            raw = b""
        if len(raw) != 64:
            raise bad("signature is not 64 bytes of base64")
        return cls(ident, dict(files), raw)


@dataclass(frozen=True)
class Verified:
    """A package whose signature checked out: by which key, over how many files."""

    key_id: str
    signer: str
    files: int


def sign_package(path: Path, private: Ed25519PrivateKey) -> tuple[Path, int]:
    """Sign the package at ``path`` (writing its signature document); returns (that file, files covered)."""
    pkg = read_package(path)
    if not pkg.files:
        raise ValueError(f"{path}: no files to sign")
    plugin_entry(pkg)  # a package that could not run is not worth signing
    ident = key_id(private.public_key())
    hashes = pkg.hashes()
    doc = SignatureDoc(ident, hashes, private.sign(canonical_manifest(ident, hashes)))
    target = path / SIGNATURE_FILE if pkg.kind == "dir" else path.with_name(path.name + WHEEL_SIGNATURE_SUFFIX)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(doc.render(), encoding="utf-8")
    os.replace(tmp, target)  # (replacing a symlink, never writing through one)
    return target, len(hashes)


def verify(pkg: Package, trust: TrustStore) -> Verified:
    """Check ``pkg`` against ``trust``: SignatureInvalid naming the key or the file, else who signed it."""
    if pkg.signature is None:
        raise SignatureInvalid(f"{pkg.source} is not signed (no {pkg.signature_name})")
    doc = SignatureDoc.parse(pkg.signature, source=pkg.source, name=pkg.signature_name)
    trusted = trust.get(doc.key_id)
    if trusted is None:
        raise SignatureInvalid(f"{pkg.source} is signed by key {doc.key_id}, which is not in the trust store "
                               f"{trust.directory}")
    try:
        trusted.public.verify(doc.signature, canonical_manifest(doc.key_id, doc.files))
    except InvalidSignature:
        raise SignatureInvalid(f"{pkg.source}: {pkg.signature_name} does not verify with key {doc.key_id} (it was "
                               "altered, or not made by that key)") from None
    actual = pkg.hashes()
    problems = []
    for path in sorted(set(doc.files) | set(actual)):
        if path not in actual:
            problems.append(f"file {path!r} was removed")
        elif path not in doc.files:
            problems.append(f"file {path!r} was added")
        elif actual[path] != doc.files[path]:
            problems.append(f"file {path!r} changed")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise SignatureInvalid(f"{pkg.source}: {', '.join(problems[:5])}{more} since it was signed by key "
                               f"{doc.key_id}")
    return Verified(doc.key_id, trusted.info.name, len(actual))


def check_package(pkg: Package, trust: TrustStore, *, required: bool, who: str) -> Verified | None:
    """:func:`verify`, except that an unsigned package is let through (``None``) when not ``required``.

    A signed package is always verified: a bad signature is refused whatever ``required`` says.
    """
    if pkg.signature is None and not required:
        return None
    if pkg.signature is None:
        raise SignatureInvalid(f"{pkg.source} is not signed (no {pkg.signature_name}), and {who} requires "
                               "signatures (mesh sign it, and mesh keys trust its key there)")
    return verify(pkg, trust)


# -- the entry, the store copy, the import check -------------------------------------------------

def plugin_entry(pkg: Package) -> tuple[str, str | None]:
    """``(REF, config)``: ``entry`` from plugin.toml, and the rest of that file as a config for ``mesh run
    --config`` (``None`` without a plugin.toml). A wheel without one names its plugin by its single
    entry point in group ``groundhog.plugins``."""
    source = f"{pkg.source}/{PLUGIN_TOML}"
    raw = pkg.files.get(PLUGIN_TOML)
    if raw is None:
        if pkg.kind == "wheel":
            return _wheel_entry_point(pkg), None
        raise ConfigError(f"{pkg.source}: no {PLUGIN_TOML} (a plugin package holds one, with "
                          "entry = \"module:Class\")")
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    entry = data.pop("entry", None)
    if entry is None:
        if pkg.kind == "wheel":
            return _wheel_entry_point(pkg), text
        raise ConfigError(f"{source}: no entry (add entry = \"module:Class\", the plugin class, at the top)")
    if not isinstance(entry, str) or not ENTRY_RE.match(entry):
        raise ConfigError(f"{source}: entry must be \"module:Class\", not {entry!r}")
    # The rest goes to the config loader, which refuses unknown keys: the same text without the entry line.
    lines = text.splitlines(keepends=True)
    first_table = next((i for i, line in enumerate(lines) if line.lstrip().startswith("[")), len(lines))
    kept = [line for i, line in enumerate(lines) if i >= first_table or not re.match(r"^\s*entry\s*=", line)]
    rest = "".join(kept)
    try:
        same = tomllib.loads(rest) == data
    except tomllib.TOMLDecodeError:
        same = False
    if not same:
        raise ConfigError(f"{source}: write entry = \"module:Class\" on a line of its own, before any [table]")
    return entry, rest


def _wheel_entry_point(pkg: Package) -> str:
    found: list[str] = []
    for path in sorted(pkg.files):
        parts = path.split("/")
        if len(parts) == 2 and parts[0].endswith(".dist-info") and parts[1] == "entry_points.txt":
            parser = configparser.ConfigParser(interpolation=None)
            parser.optionxform = str  # type: ignore[assignment,method-assign]  # (names are case-sensitive)
            try:
                parser.read_string(pkg.files[path].decode("utf-8"))
            except (UnicodeDecodeError, configparser.Error) as exc:
                raise ConfigError(f"{pkg.source}: {path} is not valid: {exc}") from None
            if parser.has_section("groundhog.plugins"):
                found += [v.split("[")[0].strip() for v in parser["groundhog.plugins"].values()]
    if len(found) != 1:
        what = "none" if not found else ", ".join(found)
        raise ConfigError(f"{pkg.source}: a wheel without {PLUGIN_TOML} must have exactly one entry point in group "
                          f"groundhog.plugins (found {what})")
    if not ENTRY_RE.match(found[0]):
        raise ConfigError(f"{pkg.source}: entry point {found[0]!r} is not module:Class")
    return found[0]


def _write_tree(files: Mapping[str, bytes], dest: Path) -> None:
    """Write ``files`` under the (existing, empty) directory ``dest``."""
    for path in sorted(files):
        target = dest.joinpath(*path.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_new(target, files[path], 0o444)  # read-only: the copy is what was verified


def _matches(dest: Path, hashes: Mapping[str, str]) -> bool:
    try:
        found = _read_dir(dest, str(dest))
    except (SignatureInvalid, ValueError, OSError):
        return False
    return {p: hashlib.sha256(d).hexdigest() for p, d in found.items()} == dict(hashes)


def probe_config(ref: str, workdir: Path, config_path: Path | None) -> PluginConfig:
    """Import ``ref`` in a child Python whose working directory is ``workdir`` (as the host will) and
    return its config. A package's code never runs in the agent's own process."""
    script = (
        "import sys\n"
        "from plugin_sdk import ErrorInfo\n"
        "try:\n"
        "    from mesh._host import load_plugin_class, resolve_config\n"
        "    out = '{\"config\": ' + resolve_config(load_plugin_class(sys.argv[1]), sys.argv[2] or None)"
        ".model_dump_json() + '}'\n"
        "except Exception as exc:\n"
        "    out = '{\"error\": ' + ErrorInfo.from_exception(exc).model_dump_json() + '}'\n"
        "sys.stdout.write('\\n' + out + '\\n')\n")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    try:
        done = subprocess.run([sys.executable, "-c", script, ref, str(config_path.resolve()) if config_path else ""],
                              cwd=workdir, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=PROBE_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise InitializationError(f"cannot load {ref!r}: importing it took longer than {PROBE_TIMEOUT:g}s") from None
    lines = [line for line in done.stdout.decode(errors="replace").splitlines() if line.strip()]
    try:
        answer = json.loads(lines[-1])
        if "error" in answer:
            raise ErrorInfo.model_validate(answer["error"]).to_exception()
        return PluginConfig.model_validate(answer["config"])
    except ValidationError as exc:  # (the child runs another version of plugin_sdk than the agent)
        raise InitializationError(f"cannot load {ref!r}: its config as the host reads it is not this agent's: "
                                  f"{exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None
    except (IndexError, ValueError, KeyError, TypeError):
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        raise InitializationError(f"cannot load {ref!r}: checking it failed: {tail[0][:300]}") from None


def probe_package(pkg: Package, ref: str, config_text: str | None) -> PluginConfig:
    """:func:`probe_config` on a temporary copy of ``pkg`` (for planning, before any agent stores it)."""
    with tempfile.TemporaryDirectory(prefix="mesh-probe-") as tmp:
        root = Path(tmp)
        (root / "pkg").mkdir()
        _write_tree(pkg.files, root / "pkg")
        config_path = None
        if config_text is not None:
            config_path = root / PLUGIN_TOML
            config_path.write_text(config_text, encoding="utf-8")
        return probe_config(ref, root / "pkg", config_path)


def install_package(pkg: Package, store: Path, ref: str, config_path: Path | None) -> tuple[PluginConfig, Path]:
    """Copy ``pkg``'s (verified, in-memory) files into ``store/<name>-<version>-<digest>/`` and check its
    entry there; returns (its config, that directory). The same content loaded again reuses its copy."""
    store.mkdir(parents=True, exist_ok=True)
    digest, hashes = pkg.digest(), pkg.hashes()
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{digest}-", dir=store))
    try:
        _write_tree(pkg.files, staging)
        os.chmod(staging, 0o755)  # (mkdtemp makes it 0700)
        config = probe_config(ref, staging, config_path)
        final = store / f"{config.name}-{config.version}-{digest}"
        if final.exists() and not _matches(final, hashes):
            shutil.rmtree(final)  # a stale or damaged copy: replaced by the verified one
        if not final.exists():
            try:
                os.rename(staging, final)
            except OSError:  # a concurrent load of the same package got there first
                if not _matches(final, hashes):
                    raise
        return config, final
    finally:
        if staging.exists():
            shutil.rmtree(staging)
