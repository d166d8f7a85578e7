"""Connecting to NATS the way every mesh process does."""

from __future__ import annotations

import logging
import math
import os

import nats
import nats.errors
from nats.aio.client import Client as NATS

from plugin_sdk import ConnectionFailed

__all__ = ["DEFAULT_URL", "close", "connect", "default_prefix", "default_url"]

DEFAULT_URL = "nats://127.0.0.1:4222"

log = logging.getLogger("mesh.nats")


def default_url() -> str:
    return os.environ.get("MESH_NATS_URL") or DEFAULT_URL


def default_prefix() -> str:
    return os.environ.get("MESH_PREFIX") or "mesh"


async def connect(url: str | None = None, *, name: str = "mesh", wait: float = 0.0,
                  reconnect_wait: float = 0.25) -> NATS:
    """Connect to ``url`` (default ``MESH_NATS_URL``), trying for ``wait`` seconds at start.

    Once connected, the client reconnects forever (and resubscribes) when the server goes away.
    Raises :class:`ConnectionFailed` naming the URL when no server answers.
    """
    url = url or default_url()

    async def on_error(exc: Exception) -> None:
        log.debug("nats: %s: %s", type(exc).__name__, exc)

    async def on_disconnect() -> None:
        if not (nc.is_closed or nc.is_draining):  # a close of our own is not news
            log.warning("disconnected from NATS; reconnecting")

    async def on_reconnect() -> None:
        log.warning("reconnected to NATS at %s", nc.connected_url.netloc if nc.connected_url else url)

    attempts = max(1, math.ceil(wait / reconnect_wait))
    try:
        nc = await nats.connect(url, name=name, max_reconnect_attempts=attempts, reconnect_time_wait=reconnect_wait,
                                connect_timeout=2, error_cb=on_error, disconnected_cb=on_disconnect,
                                reconnected_cb=on_reconnect, ping_interval=10, max_outstanding_pings=3)
    except (nats.errors.NoServersError, OSError, TimeoutError) as exc:
        raise ConnectionFailed(f"cannot reach NATS at {url} ({type(exc).__name__}); start one with "
                               "`mesh up`, or point --nats / MESH_NATS_URL at a server") from None
    # From now on, never give up reconnecting: a restarted server must not orphan a plugin.
    nc.options["max_reconnect_attempts"] = -1
    return nc


async def close(nc: NATS) -> None:
    """Drain and close; safe on a connection that is already closed or still reconnecting."""
    if nc.is_closed:
        return
    try:
        await nc.drain()
    except nats.errors.Error as exc:  # reconnecting or already closing: close without draining
        log.debug("drain skipped: %s", exc)
        await nc.close()
