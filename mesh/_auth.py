"""NATS decentralized auth for ``mesh up --secure``: operator → account → user JWTs, signed with nkeys.

Why decentralized auth (not static users in the server config): the agent can give every
instance it starts an identity of its own, carrying exactly that plugin's permissions and an
expiry, *without touching or reloading the server*: nats-server checks each user JWT against the
account it names (whose JWT, preloaded, lists the keys allowed to sign users). A plugin cannot
widen its own permissions: they are signed into its JWT, and it holds no signing key.

What is made, once, under ``<data dir>/auth/`` (directory 0700, every seed and ``.creds`` 0600):

- an **operator** (the root of trust; its JWT goes in the server config),
- a **system account** (nats-server wants one in operator mode) and the **mesh account**
  (JetStream on), whose JWT lists one **signing key**: the key the agent mints users with;
- an **admin** user (everything allowed): ``admin.creds``, for the CLI, the registry and the agent.

JWTs are built here (about 60 lines: header, claims, ed25519 signature over ``header.payload``, the
``jti`` a hash of the claims) rather than with a library, because no maintained Python library
for NATS JWTs exists; ``nkeys`` (the NATS project's own) does the keys and signatures, and
``tests/mesh/test_auth.py`` checks that a real nats-server accepts what we sign and enforces it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

from plugin_sdk import ConfigError

__all__ = ["AuthStore", "Identity", "Permissions", "creds_text", "decode_jwt"]

#: Seconds a plugin instance's credentials are valid; the agent renews them well before that.
DEFAULT_USER_TTL = 3600.0

_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _new_key(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def _public(kp: nkeys.KeyPair) -> str:
    return bytes(kp.public_key).decode()


def encode_jwt(nats: dict[str, Any], *, subject: str, issuer: nkeys.KeyPair, name: str,
               expires: float | None = None) -> str:
    """A NATS v2 JWT: ``nats`` (the type-specific claims) about ``subject``, signed by ``issuer``."""
    claims: dict[str, Any] = {"iat": int(time.time()), "iss": _public(issuer), "name": name, "sub": subject,
                              "nats": {**nats, "version": 2}}
    if expires is not None:
        claims["exp"] = int(expires)
    # As nats.go's jwt does: the id is a hash of the claims without it (base32, unpadded).
    claims["jti"] = base64.b32encode(hashlib.sha512(json.dumps(claims, sort_keys=True).encode()).digest()[:32]
                                     ).decode().rstrip("=")
    signing_input = f"{_b64(json.dumps(_HEADER).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(issuer.sign(signing_input.encode()))}"


def decode_jwt(token: str) -> dict[str, Any]:
    """The claims of a JWT (not verified: for showing and tests)."""
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


def creds_text(token: str, seed: bytes) -> str:
    """The ``.creds`` file format nats-py (``user_credentials=``) and the nats CLI read."""
    return ("-----BEGIN NATS USER JWT-----\n" + token + "\n------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n"
            "NKEYs are sensitive and should be treated as secrets.\n\n"
            "-----BEGIN USER NKEY SEED-----\n" + seed.decode() + "\n------END USER NKEY SEED------\n\n"
            "*************************************************************\n")


@dataclass(frozen=True, slots=True)
class Permissions:
    """Subject allow (and deny) lists for one identity; ``responses``: it may answer requests."""

    pub_allow: tuple[str, ...] = (">",)
    sub_allow: tuple[str, ...] = (">",)
    pub_deny: tuple[str, ...] = ()
    sub_deny: tuple[str, ...] = ()
    responses: bool = True

    def claims(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pub": {"allow": list(self.pub_allow)}, "sub": {"allow": list(self.sub_allow)},
                               "subs": -1, "data": -1, "payload": -1}
        if self.pub_deny:
            out["pub"]["deny"] = list(self.pub_deny)
        if self.sub_deny:
            out["sub"]["deny"] = list(self.sub_deny)
        if self.responses:
            out["resp"] = {"max": 1, "ttl": 0}  # one reply per request received, any time
        return out


@dataclass(frozen=True, slots=True)
class Identity:
    """A user made by :meth:`AuthStore.mint`: where its ``.creds`` file is, and its public key."""

    name: str
    public_key: str
    creds: Path
    expires: float | None


def _write_secret(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 from the first byte (then rename into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


class AuthStore:
    """The mesh's operator, accounts, signing key and admin, under ``directory`` (made once, reused)."""

    def __init__(self, directory: Path, *, create: bool = True) -> None:
        """With ``create=False`` (an agent joining a mesh), the store must exist already."""
        if not create and not (directory / "mesh-account-signer.nk").is_file():
            raise ConfigError(f"no mesh auth store in {directory} (mesh up --secure makes one in <data dir>/auth)")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.users_dir = self.dir / "users"
        self.users_dir.mkdir(exist_ok=True)
        os.chmod(self.users_dir, 0o700)
        self.operator = self._key("operator", nkeys.PREFIX_BYTE_OPERATOR)
        self.system = self._key("system-account", nkeys.PREFIX_BYTE_ACCOUNT)
        self.account = self._key("mesh-account", nkeys.PREFIX_BYTE_ACCOUNT)
        self.signer = self._key("mesh-account-signer", nkeys.PREFIX_BYTE_ACCOUNT)
        self.account_public = _public(self.account)
        self.system_public = _public(self.system)
        self.admin = self.mint("admin", Permissions(), ttl=None, file=self.dir / "admin.creds")

    def _key(self, name: str, prefix: int) -> nkeys.KeyPair:
        path = self.dir / f"{name}.nk"
        if path.exists():
            return nkeys.from_seed(path.read_bytes().strip())
        kp = _new_key(prefix)
        _write_secret(path, bytes(kp.seed).decode() + "\n")
        return kp

    # -- what the server is told ---------------------------------------------------------

    def server_config(self) -> str:
        """nats-server configuration for operator mode with the accounts preloaded (no resolver service)."""
        op = encode_jwt({"type": "operator", "system_account": self.system_public}, subject=_public(self.operator),
                        issuer=self.operator, name="groundhog")
        sys_jwt = encode_jwt({"type": "account", "limits": _unlimited(jetstream=False)}, subject=self.system_public,
                             issuer=self.operator, name="SYS")
        acc_jwt = encode_jwt({"type": "account", "limits": _unlimited(jetstream=True),
                              "signing_keys": [_public(self.signer)], "default_permissions": {"pub": {}, "sub": {}}},
                             subject=self.account_public, issuer=self.operator, name="mesh")
        return (f"operator: {op}\nsystem_account: {self.system_public}\nresolver: MEMORY\n"
                f"resolver_preload: {{\n  {self.system_public}: {sys_jwt}\n  {self.account_public}: {acc_jwt}\n}}\n")

    # -- users ---------------------------------------------------------------------------

    def mint(self, name: str, permissions: Permissions, *, ttl: float | None = DEFAULT_USER_TTL,
             file: Path | None = None) -> Identity:
        """A new user of the mesh account with ``permissions``, valid ``ttl`` seconds (None: no expiry);
        its ``.creds`` written (0600) to ``file`` or ``users/<name>.creds``."""
        path = file or self.users_dir / f"{name}.creds"
        if file is not None and path.exists():  # (the admin's: made once, then reused)
            return Identity(name, _creds_public(path), path, None)
        user = _new_key(nkeys.PREFIX_BYTE_USER)
        expires = time.time() + ttl if ttl is not None else None
        nats = {"type": "user", "issuer_account": self.account_public, **permissions.claims()}
        token = encode_jwt(nats, subject=_public(user), issuer=self.signer, name=name, expires=expires)
        _write_secret(path, creds_text(token, bytes(user.seed)))
        return Identity(name, _public(user), path, expires)


def _creds_public(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    token = text.split("-----BEGIN NATS USER JWT-----\n", 1)[1].split("\n", 1)[0]
    return str(decode_jwt(token)["sub"])


def _unlimited(*, jetstream: bool) -> dict[str, Any]:
    limits: dict[str, Any] = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                              "wildcards": True, "conn": -1, "leaf": -1}
    if jetstream:
        limits.update({"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1})
    return limits
