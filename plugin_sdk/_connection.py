"""Connecting to NATS the way every mesh process does (``mesh`` and ``plugin_sdk.testing`` alike).

- The URL is checked first (``nats``, ``tls``, ``ws`` or ``wss``, with a host): a typo is an
  "invalid NATS URL", not "cannot reach".
- Connecting has an overall deadline, and gives up at once on what waiting cannot fix (a refused
  password, a certificate the client cannot verify), saying which. A half-open client is closed
  within a bounded wait, and abandoned if nats-py's close hangs (it does, on a failed TLS upgrade).
- Once connected, the client reconnects forever (and resubscribes) when the server goes away,
  and also when the server closes the connection with an ``-ERR`` (say a "maximum payload
  violation"), where nats-py would close the client for good: see :class:`MeshClient`.
- The password of a URL never appears in a message or a log line (``user:***@host``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import ssl
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import nats.errors
from nats.aio.client import Client
from nats.protocol.parser import AUTHORIZATION_VIOLATION, PERMISSIONS_ERR, STALE_CONNECTION

from ._errors import ConnectionFailed
from ._logs import BoundedLog

__all__ = ["MeshClient", "close", "connect", "parse_urls", "redact"]

log = logging.getLogger("mesh.nats")

SCHEMES = ("nats", "tls", "ws", "wss")

#: Seconds a close may take before the client is abandoned.
CLOSE_TIMEOUT = 2.0

_HOST_PORT = re.compile(r"^[^\s/:@]+:\d+$")


# scheme://userinfo@ : userinfo is "user:password" or a bare token (nats://TOKEN@host).
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^@/\s,]+)@")


def _hide(match: re.Match[str]) -> str:
    user, colon, _ = match["userinfo"].partition(":")
    return f"{match['scheme']}{user}:***@" if colon else f"{match['scheme']}***@"


def redact(text: str) -> str:
    """Every URL in ``text`` with its credentials hidden: ``nats://u:pw@h`` → ``nats://u:***@h``.

    A URL holding a bare token (``nats://s3cret@h``) becomes ``nats://***@h``. Works on one URL,
    several comma-separated ones, or a whole log line; text without credentials is kept as it is.
    """
    if "@" not in text:  # the common case, and a cheap one: relayed log lines pass through here
        return text
    return _USERINFO.sub(_hide, text)


def parse_urls(url: str) -> list[str]:
    """The server URLs in ``url`` (comma-separated), each checked; :class:`ConnectionFailed` if invalid.

    ``host:port`` alone means ``nats://host:port`` (as nats-py has it).
    """
    servers = []
    for raw in (u.strip() for u in url.split(",")):
        candidate = raw
        if "://" not in candidate and _HOST_PORT.match(candidate):
            candidate = f"nats://{candidate}"
        problem = _url_problem(candidate)
        if problem:
            raise ConnectionFailed(f"invalid NATS URL {redact(url)!r}: {problem} (expected nats://host:port; "
                                   f"schemes: {', '.join(SCHEMES)})")
        servers.append(candidate)
    return servers


def _url_problem(url: str) -> str:
    if not url:
        return "empty"
    if "://" not in url:
        return "no scheme"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return str(exc)
    if parts.scheme.lower() not in SCHEMES:
        return f"unknown scheme {parts.scheme!r}"
    if not parts.hostname:
        return "no host"
    return ""


def _where(url: str) -> str:
    """host:port of a URL, for log lines (never its credentials)."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


class MeshClient(Client):
    """nats-py's client, except that a connection the server closes is never left dead.

    On a server ``-ERR`` other than a stale connection or a permissions violation (which nats-py
    handles itself, by reconnecting or by reporting), nats-py closes the client for good. Here,
    any such error but an authorization error is logged at ERROR and goes through nats-py's own
    reconnect path instead: the same client object reconnects and resubscribes.

    It also keeps what nats-py reports only to ``error_cb``: :attr:`dropped` counts the messages
    each subscription lost as a slow consumer (its pending queue full), by subscription subject.
    """

    def __init__(self) -> None:
        super().__init__()
        #: Messages dropped because the subscription's pending queue was full, by subscription subject.
        self.dropped: Counter[str] = Counter()
        self._async_log = BoundedLog(log, burst=1, period=10.0)  # once per burst, then a count

    def note_async_error(self, exc: Exception) -> None:
        """Count and log (at WARNING, once per burst) an error nats-py reported asynchronously."""
        if isinstance(exc, nats.errors.SlowConsumerError):
            subject = exc.sub.subject if exc.sub is not None else exc.subject
            self.dropped[subject] += 1
            self._async_log.warning("slow consumer: messages dropped on subscription %s (%d so far); its handler "
                                    "is not keeping up", subject, self.dropped[subject])
        else:
            self._async_log.warning("NATS reported: %s", _describe(exc))

    async def _process_err(self, err_msg: str) -> None:
        text = err_msg.strip().strip("'")
        low = text.lower()
        if (self.is_connecting or STALE_CONNECTION in low or PERMISSIONS_ERR in low
                or AUTHORIZATION_VIOLATION in low or "authentication" in low):
            await super()._process_err(err_msg)
            return
        error = nats.errors.Error(f"nats: {text}")
        self._err = error
        log.error("NATS server closed the connection: %s; reconnecting", text)
        await self._error_cb(error)
        await self._process_op_err(error)


def _is_auth(exc: BaseException | None) -> bool:
    return isinstance(exc, nats.errors.AuthorizationError) or (
        exc is not None and AUTHORIZATION_VIOLATION in str(exc).lower())


def _is_fatal(exc: BaseException) -> bool:
    """What retrying within the connect deadline will not fix."""
    return _is_auth(exc) or isinstance(exc, ssl.SSLCertVerificationError)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text and text != type(exc).__name__ else type(exc).__name__


def _failure(shown: str, exc: BaseException, seen: BaseException | None, *, deadline: float, hint: str) -> str:
    cause = seen or exc
    if _is_auth(cause):
        return f"authorization failed at {shown}: the server refused the user and password (or token)"
    if isinstance(cause, ssl.SSLCertVerificationError):
        return (f"TLS: certificate verify failed for {shown}: {cause.verify_message or cause.reason} "
                "(the server's certificate is not trusted by this client)")
    if isinstance(cause, ssl.SSLError):
        return f"TLS: handshake with {shown} failed: {cause.reason or cause}"
    if isinstance(cause, nats.errors.SecureConnRequiredError | nats.errors.SecureConnWantedError):
        return f"TLS: {shown}: {cause}"
    if isinstance(exc, TimeoutError) and seen is None:
        return f"cannot reach NATS at {shown}: no connection within {deadline:g}s{hint}"
    return f"cannot reach NATS at {shown} ({_describe(cause)}){hint}"


async def connect(url: str, *, name: str, wait: float = 0.0, reconnect_wait: float = 0.25,
                  connect_timeout: float = 2.0, deadline: float | None = None, hint: str = "",
                  **options: Any) -> MeshClient:
    """Connect to ``url``, trying for ``wait`` seconds at start, within ``deadline`` seconds overall
    (default ``wait`` plus a few connect timeouts).

    Raises :class:`ConnectionFailed` saying what failed: an invalid URL, a refused authorization,
    TLS, or no server answering (``hint`` is appended to that last one). Once connected, the
    client reconnects forever.
    """
    servers = parse_urls(url)
    shown = redact(url)
    total = deadline if deadline is not None else wait + 2 * connect_timeout + 1.0
    nc = MeshClient()
    seen: list[BaseException] = []
    limit: list[asyncio.Timeout] = []
    connecting = True

    async def on_error(exc: Exception) -> None:
        if not connecting:
            nc.note_async_error(exc)
            return
        log.debug("nats: %s", _describe(exc))  # while connecting: the failure message says it
        seen.append(exc)
        if _is_fatal(exc) and limit:  # waiting will not help: end the connect now
            limit[0].reschedule(asyncio.get_running_loop().time())

    async def on_disconnect() -> None:
        if not (nc.is_closed or nc.is_draining):  # a close of our own is not news
            log.warning("disconnected from NATS; reconnecting")

    async def on_reconnect() -> None:
        log.warning("reconnected to NATS at %s", _where(nc.connected_url.geturl()) if nc.connected_url
                    else _where(servers[0]))

    attempts = max(1, math.ceil(wait / reconnect_wait))
    # (nats-py annotates both seconds options as int; it takes floats.)
    opts: dict[str, Any] = {"ping_interval": 10, "max_outstanding_pings": 3, "reconnect_time_wait": reconnect_wait,
                            "connect_timeout": connect_timeout, **options}
    try:
        async with asyncio.timeout(total) as timeout:
            limit.append(timeout)
            await nc.connect(servers, name=name, max_reconnect_attempts=attempts, error_cb=on_error,
                             disconnected_cb=on_disconnect, reconnected_cb=on_reconnect, **opts)
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        connecting = False
        await _abandon(nc)
        raise ConnectionFailed(_failure(shown, exc, seen[-1] if seen else None, deadline=total, hint=hint)) from None
    connecting = False
    # From now on, never give up reconnecting: a restarted server must not orphan a plugin.
    nc.options["max_reconnect_attempts"] = -1
    return nc


async def _abandon(nc: Client) -> None:
    """Close a half-open client within :data:`CLOSE_TIMEOUT`; past that, drop its socket."""
    try:
        await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        log.debug("abandoning a half-open NATS client (%s)", _describe(exc))
    _drop_transport(nc)


def _drop_transport(nc: Client) -> None:
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    transport = getattr(writer, "transport", None)
    if transport is not None and not transport.is_closing():
        transport.abort()


async def close(nc: Client) -> None:
    """Drain and close, within a bounded time; safe on a connection that is already closed or
    still reconnecting (then closed without draining)."""
    if nc.is_closed:
        return
    try:
        await asyncio.wait_for(nc.drain(), CLOSE_TIMEOUT + float(nc.options.get("drain_timeout", 30)))
        return
    except (nats.errors.Error, OSError, TimeoutError) as exc:  # reconnecting, or the server went away
        log.debug("drain skipped: %s", _describe(exc))
    await _abandon(nc)  # pending data cannot be flushed to a lost connection: dropped
