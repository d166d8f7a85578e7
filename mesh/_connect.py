"""Connecting to NATS the way every mesh process does: ``plugin_sdk.host.connect`` with the
mesh's defaults (``MESH_NATS_URL``, ``MESH_PREFIX``) and its hint for an unreachable server."""

from __future__ import annotations

import os

from plugin_sdk.host import MeshClient, close, redact
from plugin_sdk.host import connect as _connect

__all__ = ["DEFAULT_URL", "MeshClient", "close", "connect", "default_prefix", "default_url", "redact"]

DEFAULT_URL = "nats://127.0.0.1:4222"

HINT = "; start one with `mesh up`, or point --nats / MESH_NATS_URL at a server"


def default_url() -> str:
    return os.environ.get("MESH_NATS_URL") or DEFAULT_URL


def default_prefix() -> str:
    return os.environ.get("MESH_PREFIX") or "mesh"


async def connect(url: str | None = None, *, name: str = "mesh", wait: float = 0.0,
                  reconnect_wait: float = 0.25) -> MeshClient:
    """Connect to ``url`` (default ``MESH_NATS_URL``), trying for ``wait`` seconds at start.

    Once connected, the client reconnects forever (and resubscribes) when the server goes away or
    closes the connection. Raises :class:`~plugin_sdk.ConnectionFailed` saying what failed (invalid
    URL, authorization, TLS, or no server), never with the URL's password.
    """
    return await _connect(url or default_url(), name=name, wait=wait, reconnect_wait=reconnect_wait, hint=HINT)
