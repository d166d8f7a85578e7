"""Connecting to NATS the way every mesh process does: ``plugin_sdk.host.connect`` with the
mesh's defaults (``MESH_NATS_URL``, ``MESH_PREFIX``, and the security files ``MESH_CREDS``,
``MESH_TLS_CA``, ``MESH_TLS_CERT``, ``MESH_TLS_KEY``) and its hint for an unreachable server.

The security settings are read from the environment of the process, so every command and every
process the mesh starts (a plugin host under an agent, the child of ``mesh run --reload``) uses the
same ones without passing them on: a child's environment is its parent's, plus what the parent
sets for it (an agent may give a plugin its own ``MESH_CREDS`` or client certificate, which wins).
The CLI's ``--creds`` / ``--tls-*`` options set these variables for the command they are given to.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from plugin_sdk.host import MeshClient, close, redact
from plugin_sdk.host import connect as _connect

__all__ = ["DEFAULT_URL", "ENV", "ClientSecurity", "MeshClient", "close", "connect", "default_prefix", "default_url",
           "redact"]

DEFAULT_URL = "nats://127.0.0.1:4222"

HINT = "; start one with `mesh up`, or point --nats / MESH_NATS_URL at a server"

#: The environment variable of each security setting (each a file path, never the secret itself).
ENV = {"creds": "MESH_CREDS", "tls_ca": "MESH_TLS_CA", "tls_cert": "MESH_TLS_CERT", "tls_key": "MESH_TLS_KEY"}


def default_url() -> str:
    return os.environ.get("MESH_NATS_URL") or DEFAULT_URL


def default_prefix() -> str:
    return os.environ.get("MESH_PREFIX") or "mesh"


@dataclass(frozen=True)
class ClientSecurity:
    """How a client proves itself and checks the server: file paths only.

    ``creds``: a NATS ``.creds`` file; ``tls_ca``: the CA to verify the server with (else the
    system's CAs, for a ``tls://`` URL); ``tls_cert`` / ``tls_key``: a client certificate (mTLS).
    """

    creds: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientSecurity:
        env = os.environ if environ is None else environ
        return cls(**{f: Path(env[var]) if env.get(var) else None for f, var in ENV.items()})

    def env(self) -> dict[str, str]:
        """The settings as environment variables (those that are set), absolute paths, for a child."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[ENV[f.name]] = str(Path(value).absolute())
        return out


async def connect(url: str | None = None, *, name: str = "mesh", wait: float = 0.0,
                  reconnect_wait: float = 0.25, security: ClientSecurity | None = None) -> MeshClient:
    """Connect to ``url`` (default ``MESH_NATS_URL``), trying for ``wait`` seconds at start, with
    ``security`` (default: from ``MESH_CREDS`` and ``MESH_TLS_*``).

    Once connected, the client reconnects forever (and resubscribes) when the server goes away or
    closes the connection. Raises :class:`~plugin_sdk.ConnectionFailed` saying what failed (invalid
    URL, an unreadable file, authorization, TLS, or no server), never with a secret.
    """
    chosen = security if security is not None else ClientSecurity.from_env()
    # An instance started by an agent under --secure has its own reply inbox prefix, the only one its
    # credentials let it read (MESH_INBOX_PREFIX, set by the agent beside MESH_CREDS).
    inbox = os.environ.get("MESH_INBOX_PREFIX") or "_INBOX"
    return await _connect(url or default_url(), name=name, wait=wait, reconnect_wait=reconnect_wait, hint=HINT,
                          creds=chosen.creds, tls_ca=chosen.tls_ca, tls_cert=chosen.tls_cert, tls_key=chosen.tls_key,
                          inbox_prefix=inbox)
