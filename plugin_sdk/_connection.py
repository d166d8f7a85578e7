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
- Security settings are file paths (``tls_ca``, ``tls_cert``, ``tls_key``, ``creds``, ``nkey_seed``),
  checked before connecting. A client that asked for TLS never talks plaintext (nats-py would, to
  a server without TLS), and a refusal says what to give: the CA (``--tls-ca``), a client
  certificate (``--tls-cert``/``--tls-key``) or credentials (``--creds``).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import math
import re
import ssl
from collections import Counter
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import nats.errors
from nats.aio.client import DEFAULT_BUFFER_SIZE, Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.protocol.parser import AUTHORIZATION_VIOLATION, PERMISSIONS_ERR, STALE_CONNECTION

from ._errors import ConnectionFailed, PermissionDenied
from ._logs import BoundedLog
from ._parser import MeshParser
from ._wire import H_ENVELOPE, bounded, flush_subscriptions, hpub_command, parse_header_lines

__all__ = ["MeshClient", "close", "connect", "parse_urls", "redact"]

log = logging.getLogger("mesh.nats")

SCHEMES = ("nats", "tls", "ws", "wss")

#: Seconds a close may take before the client is abandoned.
CLOSE_TIMEOUT = 2.0


class _QuietTlsEof(logging.Filter):
    """asyncio warns on every TLS connection the server ends, because nats-py's stream protocol
    asks to keep a half-closed socket open, which TLS cannot do: noise, not news (and on stderr
    of a CLI command that has no logging set up)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_QuietTlsEof())

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
    each subscription lost as a slow consumer (its pending queue full), by subscription subject,
    and :attr:`denied` the server's permission violations, by subject. A violation fails the call
    that caused it at once with :class:`PermissionDenied` (nats-py would let a request time out):
    :meth:`request` (every request: the SDK's, the registry's, JetStream's) watches for a
    violation of its subject while it waits, and :meth:`check_subscribed` raises one for a
    subscription after the flush that follows it.
    """

    def __init__(self) -> None:
        super().__init__()
        _raise_mmap_threshold()
        self._ps = MeshParser(self)  # (nats-py's, with messages parsed in one pass: _parser.py)
        #: Messages dropped because the subscription's pending queue was full, by subscription subject.
        self.dropped: Counter[str] = Counter()
        #: Permission violations the server reported, by (operation, subject): ("publish", "x.y"). The
        #: subject as nats-py reports it: lowercased (so ``$js.api…``).
        self.denied: Counter[tuple[str, str]] = Counter()
        self._enforced: bool | None = None
        #: Futures failed with PermissionDenied when the server reports a violation of their subject
        #: (lowercased, as nats-py reports it), each with the subject as given.
        self._waiting: dict[str, dict[asyncio.Future[Any], str]] = {}
        #: Subscriptions served on the direct path (see :meth:`subscribe_direct`): sid → handler.
        self._direct: dict[int, DirectHandler] = {}
        # The reply inbox of every request (one wildcard subscription, like nats-py's), by token.
        self._reply_prefix = ""
        self._reply_prefix_len = 0
        self._replies: dict[int, asyncio.Future[tuple[bytes, dict[str, str] | None]]] = {}
        self._gathers: dict[int, Callable[[bytes, dict[str, str] | None], None]] = {}
        self._reply_seq = itertools.count(1)
        self._direct_log = BoundedLog(log, burst=3, period=10.0)
        self._async_log = BoundedLog(log, burst=1, period=10.0)  # once per burst, then a count
        self._denied_log = BoundedLog(log, burst=5, period=10.0)

    @property
    def enforced(self) -> bool:
        """Whether this client connected with an identity the server may hold to permissions (then its
        requests watch for violations). Anonymous clients have none to break, and neither has a
        ``.creds`` identity whose JWT allows publishing everything (the admin's): watching costs a
        task per request, so only restricted identities pay it."""
        if self._enforced is None:
            o = self.options  # (nats-py keeps the key-based credentials in attributes, the rest in options)
            creds = getattr(self, "_user_credentials", None)
            self._enforced = bool(creds or getattr(self, "_nkeys_seed", None)
                                  or getattr(self, "_nkeys_seed_str", None) or getattr(self, "_user_jwt_cb", None)
                                  or o.get("user") or o.get("token"))
            if isinstance(creds, str | Path) and _publishes_everything(Path(creds)):
                self._enforced = False
        return self._enforced

    # -- the direct path ---------------------------------------------------------------------
    #
    # nats-py hands every message to a subscription's own task through a queue, builds a ``Msg``
    # for it, and gives every request a future, a random token (``os.urandom``), a done callback
    # and an ``asyncio.wait_for``. On the mesh's own hot subscriptions (requests to a plugin, and
    # the replies to our requests) that is most of the per-message cost that is not the socket's,
    # and an event-loop iteration more per message on each end. So here:
    #
    # - :meth:`subscribe_direct`: the reader calls the handler as the message is parsed (no queue,
    #   no ``Msg``, no task hop). The handler must not block: the runtime starts a task (eager on
    #   3.12+) per request, bounded by its own ``max_concurrency``/``max_queued``.
    # - :meth:`request_direct`: one wildcard inbox like nats-py's, a counter for the token, one
    #   timer for the timeout, the future resolved by the reader.
    # - :meth:`send_prebuilt`: a protocol line built by ``_wire.pub_command``, the bytes nats-py's
    #   publish would have built (property-tested), appended to the same pending buffer.
    #
    # Everything else (reconnects, resubscribing, the flusher, drains) is nats-py's, unchanged.

    async def subscribe_direct(self, subject: str, handler: DirectHandler, *, queue: str = "") -> Subscription:
        """Subscribe with ``handler(subject, reply, data, headers)`` called by the reader for each message."""

        async def fallback(msg: Msg) -> None:  # (only if a message slips past the direct path)
            handler(msg.subject.encode(), (msg.reply or "").encode(), msg.data, msg.headers)

        sub = await self.subscribe(subject, queue=queue, cb=fallback)
        self._direct[sub._id] = handler
        return sub

    def deliver_direct(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> bool:
        """Hand a message for a subscription on the direct path to its handler, now; False if it is
        not one (or its header block needs nats-py's parse, a status line): then :meth:`_process_msg`."""
        handler = self._direct.get(sid)
        if handler is None or sid not in self._subs:
            return False
        if not headers:
            hdr = None
        elif headers.startswith(_ENVELOPE_ONLY) and headers.endswith(b"\r\n\r\n") and (
                (eol := headers.find(b"\r\n", _ENVELOPE_AT)) == len(headers) - 4
                or (headers.startswith(_TRACEPARENT_LINE, eol + 2)
                    and headers.find(b"\r\n", eol + 2) == len(headers) - 4)):
            # (a request's or an event's block: its envelope alone, or with the sender's trace context)
            hdr = {H_ENVELOPE: headers[_ENVELOPE_AT:eol].strip().decode("utf-8", "replace")}
            if eol != len(headers) - 4:
                hdr["traceparent"] = headers[eol + 2 + len(_TRACEPARENT_LINE):-4].strip().decode("utf-8", "replace")
        elif headers[8:10] == b"\r\n" and len(headers) > 10:  # (the usual block: _process_headers, inline)
            hdr = parse_header_lines(headers[10:]) or None
        else:
            return False
        self._call_direct(handler, subject, reply, data, hdr)
        return True

    async def _read_loop(self) -> None:
        """nats-py's read loop, except that while nothing is buffered a read is parsed where asyncio
        hands it over (the stream protocol's ``data_received``), in the same event-loop turn as the
        socket read, rather than one turn later in this task: one loop iteration (and one
        ``epoll_wait``) less per read, on every path. Reads are parsed in the order they came: a
        parse that has to wait (inside nats-py: a callback that awaits) is finished by this task,
        and what arrives meanwhile is buffered and read the usual way. EOF, a transport error and
        a parser error end the loop as nats-py's does (its exception ladder, repeated here: nats-py's
        loop has no hook to reuse). On asyncio's own event loops only."""
        reader = getattr(self._transport, "_io_reader", None)
        if (not isinstance(reader, asyncio.StreamReader) or "feed_data" in vars(reader)
                or not isinstance(asyncio.get_running_loop(), asyncio.BaseEventLoop)):
            # Another transport (websocket), a loop already on this reader, or another event loop
            # than asyncio's own: on uvloop, where a read's callback is already cheap, parsing there
            # cost 6-9 % of 64-in-flight throughput in A/B runs (docs/performance.md).
            await super()._read_loop()
            return
        inline = _InlineReads(self, reader)
        try:
            while True:
                try:
                    if self.is_closed or self.is_reconnecting or self._transport is None:
                        break
                    if self._transport.at_eof():
                        err = nats.errors.UnexpectedEOF()
                        await self._error_cb(err)
                        await self._process_op_err(err)
                        break
                    if reader._buffer:  # type: ignore[attr-defined]  # (bytes that came while a parse waited)
                        await self._ps.parse(await self._transport.read(DEFAULT_BUFFER_SIZE))
                        continue
                    rest = await inline.park()
                    if rest is not None:
                        await rest
                except nats.errors.ProtocolError:
                    await self._process_op_err(nats.errors.ProtocolError())
                    break
                except OSError as e:
                    await self._process_op_err(e)
                    break
                except asyncio.CancelledError:
                    break
                except Exception as ex:  # (as nats-py's read loop: logged, and the loop ends)
                    log.error("nats: encountered error", exc_info=ex)
                    break
        finally:
            inline.end()

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        if self.deliver_direct(sid, subject, reply, data, headers):
            return
        handler = self._direct.get(sid)
        if handler is None or sid not in self._subs:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        self._call_direct(handler, subject, reply, data, await self._process_headers(headers))

    def _call_direct(self, handler: DirectHandler, subject: bytes, reply: bytes, data: bytes,
                     hdr: dict[str, str] | None) -> None:
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        try:
            handler(subject, reply, data, hdr)
        except Exception as exc:  # a bug of ours must not stop the reader (nats-py would reconnect); logged
            self._direct_log.error("direct handler for %s raised %s: %s", bounded(subject.decode("utf-8", "replace"),
                                   200), type(exc).__name__, bounded(str(exc)), exc_info=True)

    async def _process_headers(self, headers: bytes) -> dict[str, str] | None:
        # nats-py's, without its generic line parser, for the usual block (no inline status)
        if headers and headers[8:10] == b"\r\n" and headers.startswith(b"NATS/1.0"):
            return (parse_header_lines(headers[10:]) or None) if len(headers) > 10 else None
        try:
            return await super()._process_headers(headers)
        except (UnicodeDecodeError, ValueError, IndexError) as exc:
            # nats-py's status-line parse fails on some bytes (``NATS/1.0 503`` + non-UTF-8), in its
            # reader, which then stops for good: one message anyone can send would leave us deaf.
            self._direct_log.warning("ignored the headers of a message nats-py cannot parse (%s: %s)",
                                     type(exc).__name__, bounded(str(exc), 120))
            return None

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        self._direct.pop(sid, None)
        super()._remove_sub(sid, max_msgs)

    async def _open_replies(self) -> None:
        prefix = f"{self._inbox_prefix.decode()}.{self._nuid.next().decode()}."
        self._reply_prefix, self._reply_prefix_len = prefix, len(prefix)
        await self.subscribe_direct(prefix + "*", self._on_reply)

    def _on_reply(self, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None) -> None:
        try:
            token = int(subject[self._reply_prefix_len:], 16)
        except ValueError:
            return  # not one of our tokens (anyone may publish to an inbox they can name)
        future = self._replies.pop(token, None)
        if future is not None:
            if not future.done():
                future.set_result((data, headers))
            return
        gather = self._gathers.get(token)
        if gather is not None:
            gather(data, headers)

    async def gather_inbox(self, on_reply: Callable[[bytes, dict[str, str] | None], None]) -> tuple[int, str]:
        """An inbox whose every reply goes to ``on_reply(data, headers)`` until :meth:`end_gather`: a
        broadcast's, on the requests' wildcard subscription (no SUB and UNSUB per broadcast)."""
        if not self._reply_prefix:
            await self._open_replies()
        token = next(self._reply_seq)
        self._gathers[token] = on_reply
        return token, f"{self._reply_prefix}{token:x}"

    def end_gather(self, token: int) -> None:
        self._gathers.pop(token, None)

    async def request_direct(self, subject: str, block: bytes | None, body: bytes,
                             timeout: float) -> tuple[bytes, dict[str, str] | None]:
        """Publish ``body`` (with the header ``block`` of ``_wire.header_block``) to ``subject``, which the
        caller has checked, and return the reply's body and headers. Raises what nats-py's request
        does: ``NoRespondersError``, ``TimeoutError``, the connection's errors; and, for a subject
        the server does not let this client publish to, :class:`PermissionDenied`."""
        _, data, headers = await self._round_trip(subject, timeout, body, block=block)
        return data, headers

    async def _round_trip(self, subject: str, timeout: float, body: bytes, *, block: bytes | None = None,
                          headers: dict[str, Any] | None = None,
                          checked: bool = True) -> tuple[str, bytes, dict[str, str] | None]:
        """One request on the reply inbox: the inbox it used, the reply's body and headers. ``checked``:
        the caller checked ``subject`` and built ``block`` (a protocol line goes out as is); else
        nats-py's ``publish`` checks and encodes ``headers``."""
        token, inbox, future = await self._reply_slot(subject)
        timer = future.get_loop().call_later(timeout, _expire, future)
        try:
            if not checked:
                await self.publish(subject, body, reply=inbox, headers=headers)
            elif block is None:
                await self.send_prebuilt(f"PUB {subject} {inbox} {len(body)}\r\n".encode() + body + b"\r\n",
                                         len(body))
            else:
                await self.send_prebuilt(hpub_command(subject, inbox, block, body), len(body))
            data, hdr = await future
        finally:
            timer.cancel()
            self._release(token, subject, future)
        if hdr and hdr.get("Status") == "503":
            raise nats.errors.NoRespondersError
        return inbox, data, hdr

    async def _reply_slot(self, subject: str) -> tuple[int, str, asyncio.Future[tuple[bytes, dict[str, str] | None]]]:
        if not self._reply_prefix:
            await self._open_replies()
        token = next(self._reply_seq)
        future: asyncio.Future[tuple[bytes, dict[str, str] | None]] = asyncio.get_running_loop().create_future()
        self._replies[token] = future
        if self.enforced:
            self._waiting.setdefault(subject.lower(), {})[future] = subject
        return token, f"{self._reply_prefix}{token:x}", future

    def _release(self, token: int, subject: str, future: asyncio.Future[Any]) -> None:
        self._replies.pop(token, None)
        if self._enforced:
            key = subject.lower()
            waiting = self._waiting.get(key)
            if waiting is not None:
                waiting.pop(future, None)
                if not waiting:
                    del self._waiting[key]

    async def send_prebuilt(self, cmd: bytes, payload_size: int) -> None:
        """Queue a protocol line from ``_wire.pub_command`` as nats-py's ``publish`` would (same checks,
        counters, pending buffer and flusher kick); the caller has checked the subject and the size."""
        stats = self.stats
        if self._status != Client.CONNECTED:  # closed, draining, reconnecting: nats-py's own steps, in full
            if self.is_closed:
                raise nats.errors.ConnectionClosedError
            if self.is_draining_pubs:
                raise nats.errors.ConnectionDrainingError
            if not self.is_connected and (self._max_pending_size <= 0
                                          or payload_size + self._pending_data_size > self._max_pending_size):
                raise nats.errors.OutboundBufferLimitError
            stats["out_msgs"] += 1
            stats["out_bytes"] += payload_size
            await self._send_command(cmd)
            if self._flush_queue is not None and self._flush_queue.empty():
                await self._flush_pending()
            return
        # Connected: ``_send_command`` and ``_flush_pending`` inline (two coroutines and a Future less).
        stats["out_msgs"] += 1
        stats["out_bytes"] += payload_size
        self._pending.append(cmd)
        self._pending_data_size += len(cmd)
        if 0 < self._max_pending_size < self._pending_data_size:
            await self._flush_pending(force_flush=True)
        queue = self._flush_queue
        if queue is not None and queue.empty():
            flusher = self._flusher_task
            if flusher is not None and not flusher.done():
                queue.put_nowait(_KICK)  # (the flusher sets what it takes unless done: nobody waits on this one)
            else:
                await self._flush_pending()

    async def request(self, subject: str, payload: bytes = b"", timeout: float = 0.5, old_style: bool = False,
                      headers: dict[str, Any] | None = None) -> Any:
        """nats-py's request (a ``Msg``), on the direct reply path; under permissions a violation of
        ``subject`` fails it at once with :class:`PermissionDenied` rather than letting it time out."""
        if old_style:
            return await super().request(subject, payload, timeout=timeout, old_style=True, headers=headers)
        # (nats-py's publish checks the subject and encodes the headers: any caller may be here)
        inbox, data, hdr = await self._round_trip(subject, timeout, payload, headers=headers, checked=False)
        return self.msg_class(subject=inbox, reply="", data=data, headers=hdr, _client=self, _sid=0)

    async def confirm_subscriptions(self, subjects: list[str]) -> None:
        """Raise :class:`PermissionDenied` if the server refused a subscription to one of ``subjects``
        (made before this call). Costs a round trip, and only when permissions are enforced.

        After ``_wire.flush_subscriptions`` (the SUBs written, then two round trips: one is not
        enough, see there) the server's -ERR for a refused one has been read.
        """
        if not self.enforced:
            return
        await flush_subscriptions(self)
        for subject in subjects:
            self.check_subscribed(subject)

    def check_subscribed(self, subject: str) -> None:
        """Raise :class:`PermissionDenied` if the server has refused a subscription to ``subject``."""
        if self.denied.get(("subscribe", subject.lower())):
            raise PermissionDenied(f"the NATS server refused to let this client subscribe to {subject!r} "
                                   "(its credentials do not allow it)", subject=subject)

    def _note_violation(self, text: str) -> bool:
        """Count a permissions violation (``nats: permissions violation for publish to "x"``) and fail
        the requests waiting on its subject; False if ``text`` is not one."""
        match = _VIOLATION.search(text)
        if match is None:
            return False
        operation = "publish" if match["op"].lower() == "publish" else "subscribe"
        subject = match["subject"].lower()
        self.denied[(operation, subject)] += 1
        if self.denied[(operation, subject)] == 1:  # once per subject (and bounded in rate)
            self._denied_log.warning("permission denied by the NATS server: %s to %s", operation, subject)
        for waiter, given in list(self._waiting.get(subject, {}).items()):
            if not waiter.done():
                waiter.set_exception(PermissionDenied(
                    f"the NATS server refused to let this client publish to {given!r} (its credentials do not "
                    f"allow it): {text}", subject=given))
        return True

    def note_async_error(self, exc: Exception) -> None:
        """Count and log (at WARNING, once per burst) an error nats-py reported asynchronously."""
        if self._note_violation(str(exc)):
            return
        if isinstance(exc, nats.errors.SlowConsumerError):
            subject = exc.sub.subject if exc.sub is not None else exc.subject
            self.dropped[subject] += 1
            self._async_log.warning("slow consumer: messages dropped on subscription %s (%d so far); its handler "
                                    "is not keeping up", subject, self.dropped[subject])
        else:
            self._async_log.warning("NATS reported: %s", _describe(exc))

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        await super()._process_info(info, initial_connection)
        # nats-py keeps the first INFO only; the cluster's later ones say which servers joined or left
        # (``connect_urls``), which is what ``cluster_size`` reads.
        if not initial_connection and "connect_urls" in info and self._server_info is not None:
            self._server_info["connect_urls"] = info["connect_urls"]

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


#: ``handler(subject, reply, data, headers)`` of a direct subscription, called by the reader: must not block.
#: A header block of our envelope alone (``NATS/1.0``, ``Mesh: …``), as requests and events carry:
#: read as ``parse_header_lines`` reads it, in one slice (property-tested).
_ENVELOPE_ONLY: Final = f"NATS/1.0\r\n{H_ENVELOPE}: ".encode()
_ENVELOPE_AT: Final = len(_ENVELOPE_ONLY)
_TRACEPARENT_LINE: Final = b"traceparent:"  # (the line a traced request adds to its envelope)

DirectHandler = Callable[[bytes, bytes, bytes, "dict[str, str] | None"], None]


class _InlineReads:
    """The read loop's half of :meth:`MeshClient._read_loop`: the reader's ``feed_data``, replaced on
    this one ``StreamReader`` while the loop is parked, parses each read as it comes."""

    __slots__ = ("nc", "parked", "reader")

    def __init__(self, nc: MeshClient, reader: asyncio.StreamReader) -> None:
        self.nc, self.reader = nc, reader
        self.parked: asyncio.Future[Any] | None = None
        reader.feed_data = self.feed  # type: ignore[method-assign, assignment]

    def park(self) -> asyncio.Future[Any]:
        """Until a parse has to wait (its rest, for the loop's task to finish), or the reader has
        bytes buffered, EOF or an error (``None``, or the error raised): the reader's own waiter."""
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.reader._waiter = waiter  # type: ignore[attr-defined]  # (EOF and errors wake it, as they wake a read)
        self.parked = waiter
        return waiter

    def feed(self, data: bytes) -> None:
        waiter = self.parked
        reader = self.reader
        if waiter is None or waiter.done() or reader._buffer or not data:  # type: ignore[attr-defined]
            asyncio.StreamReader.feed_data(reader, data)  # (the loop reads it from the buffer)
            return
        coro = self.nc._ps.parse(data)
        try:
            yielded = coro.send(None)
        except StopIteration:
            return  # parsed, every message handed over: the loop stays parked
        except Exception as exc:  # the read loop's to handle (ProtocolError: a reconnect), as a read's would be
            self._wake(waiter, exc)
            return
        self._wake(waiter, _Rest(coro, yielded))

    def _wake(self, waiter: asyncio.Future[Any], result: Any) -> None:
        self.parked = None
        if self.reader._waiter is waiter:  # type: ignore[attr-defined]
            self.reader._waiter = None  # type: ignore[attr-defined]
        if isinstance(result, BaseException):
            waiter.set_exception(result)
        else:
            waiter.set_result(result)

    def end(self) -> None:
        self.parked = None
        vars(self.reader).pop("feed_data", None)


class _Rest:
    """The rest of a parse that had to wait: awaited by the read loop's task, it goes on where the
    parse stopped (the future it was waiting on first)."""

    __slots__ = ("coro", "yielded")

    def __init__(self, coro: Coroutine[Any, Any, None], yielded: Any) -> None:
        self.coro, self.yielded = coro, yielded

    def __await__(self) -> Generator[Any, Any, None]:
        coro, yielded = self.coro, self.yielded
        try:
            while True:
                try:
                    sent = yield yielded
                except BaseException as exc:  # (cancelled while it waited: into the parse, as a task would)
                    yielded = coro.throw(exc)
                else:
                    yielded = coro.send(sent)
        except StopIteration:
            return


class _Done:
    """What :meth:`MeshClient.send_prebuilt` puts in nats-py's flusher queue to kick it: a finished
    future's interface (``done()`` true), so the flusher writes and leaves it be."""

    __slots__ = ()

    def done(self) -> bool:
        return True


_KICK: Any = _Done()


#: asyncio's socket transport receives every read into a new 256 KiB ``bytes`` (``recv(max_size)``,
#: then shrunk to what came). glibc's malloc maps a block that large afresh when its heap cannot
#: serve it and the block is above its mmap threshold, which starts at 128 KiB and rises to the size
#: of the largest mapped block freed so far (mallopt(3), "dynamic mmap threshold"). Whether a process
#: ever freed one larger than 256 KiB depends on everything it did before: a plugin host answering
#: broadcasts on 3.11 had not, and paid an ``mmap``, a ``mremap``, a ``munmap`` and two page faults
#: for every message it read. Freeing one mapped block above that size, once per process, raises the
#: threshold (and the heap's trim threshold with it) as any such free would: reads then stay in the
#: heap. Where the allocator is not glibc's (musl, macOS) this is one short-lived allocation.
_MMAP_FLOOR: Final = 512 * 1024
_mmap_raised = False


def _raise_mmap_threshold() -> None:
    global _mmap_raised
    if not _mmap_raised:
        _mmap_raised = True
        block = bytes(_MMAP_FLOOR)  # mapped (above the initial threshold), freed at once
        del block


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(nats.errors.TimeoutError())


def _publishes_everything(creds: Path) -> bool:
    """Whether the user JWT in a ``.creds`` file allows publishing to every subject (``>``, no deny)."""
    try:
        token = creds.read_text(encoding="utf-8").split("-----BEGIN NATS USER JWT-----", 1)[1].split("---", 1)[0]
        payload = token.strip().split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        pub = claims.get("nats", {}).get("pub", {})
    except (OSError, IndexError, ValueError, AttributeError):
        return False  # unreadable or unusual: watch, to be safe
    return pub.get("allow") in (None, [], [">"]) and not pub.get("deny")


_VIOLATION = re.compile(r'permissions violation for (?P<op>publish|subscription) to "(?P<subject>[^"]*)"', re.I)


def _is_auth(exc: BaseException | None) -> bool:
    if exc is None:
        return False
    text = str(exc).lower()
    return isinstance(exc, nats.errors.AuthorizationError) or AUTHORIZATION_VIOLATION in text or (
        "user authentication" in text)  # 'User Authentication Expired' / 'Revoked' (JWT credentials)


def _is_fatal(exc: BaseException, info: dict[str, Any]) -> bool:
    """What retrying within the connect deadline will not fix."""
    # Under mTLS, a client certificate the server refuses ends in a reset just after the handshake.
    return _is_auth(exc) or isinstance(exc, ssl.SSLError) or (
        bool(info.get("tls_verify")) and isinstance(exc, ConnectionError))


@dataclass(frozen=True)
class _Security:
    """What this client brings, for the failure messages: file paths and flags, never a secret."""

    tls: bool = False  # TLS asked for: a tls:// URL, or any tls_* option
    tls_ca: str | None = None
    tls_cert: str | None = None
    creds: str | None = None
    nkey_seed: str | None = None
    token: bool = False

    def refused(self, cause: BaseException, info: dict[str, Any]) -> str:
        said = str(cause).removeprefix("nats: ").strip("'\" ")
        said = f" ({said})" if said and AUTHORIZATION_VIOLATION not in said.lower() else ""
        if self.creds:
            return f"the server refused the credentials in {self.creds}{said}"
        if self.nkey_seed:
            return f"the server refused the nkey in {self.nkey_seed}{said}"
        if self.token:
            return f"the server refused the token{said}"
        if info.get("auth_required") and not said:
            return ("the server requires credentials: give --creds (env MESH_CREDS), or user:password@ in the URL "
                    "(if these are there, it refused them)")
        return f"the server refused the user and password (or token){said}"


def _read_secret(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConnectionFailed(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _no_password() -> bytes:
    return b""  # an encrypted key fails to load instead of prompting on the terminal


def _tls_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """Verifies the server against ``ca`` (default: the system's CAs); presents ``cert`` if given."""
    try:
        context = ssl.create_default_context(cafile=ca)
    except ssl.SSLError as exc:
        raise ConnectionFailed(f"TLS CA file {ca} holds no usable PEM certificate ({exc.reason or exc})") from None
    except OSError as exc:
        raise ConnectionFailed(f"cannot read TLS CA file {ca}: {exc.strerror or exc}") from None
    if cert is not None:
        try:
            context.load_cert_chain(cert, key, password=_no_password)
        except ssl.SSLError as exc:
            raise ConnectionFailed(f"TLS client certificate {cert} with key {key or cert} does not load "
                                   f"({exc.reason or exc}): both PEM, the key unencrypted and the certificate's own"
                                   ) from None
        except OSError as exc:
            raise ConnectionFailed(f"cannot read TLS client certificate {cert} or its key {key or cert}: "
                                   f"{exc.strerror or exc}") from None
    return context


def _security_options(servers: list[str], *, tls_ca: str | Path | None, tls_cert: str | Path | None,
                      tls_key: str | Path | None, creds: str | Path | None, nkey_seed: str | Path | None,
                      token: str | None) -> tuple[dict[str, Any], _Security]:
    """nats-py options for the given files, each checked first (:class:`ConnectionFailed` saying which)."""
    ca, cert, key = (str(v) if v is not None else None for v in (tls_ca, tls_cert, tls_key))
    if key is not None and cert is None:
        raise ConnectionFailed(f"a TLS client key ({key}) without its certificate: give --tls-cert too")
    opts: dict[str, Any] = {}
    wants_tls = ca is not None or cert is not None or any(urlsplit(s).scheme.lower() == "tls" for s in servers)
    if ca is not None or cert is not None:
        opts["tls"] = _tls_context(ca, cert, key)
    creds_file = str(creds) if creds is not None else None
    if creds_file is not None:
        text = _read_secret(creds_file, "credentials file")
        # nats-py would fail on (or loop over) a file without both blocks: say so here instead.
        if b"BEGIN NATS USER JWT" not in text or b"BEGIN USER NKEY SEED" not in text:
            raise ConnectionFailed(f"cannot read credentials file {creds_file}: not a NATS .creds file (it needs "
                                   "a NATS USER JWT and a USER NKEY SEED block)")
        opts["user_credentials"] = creds_file
    seed_file = str(nkey_seed) if nkey_seed is not None else None
    if seed_file is not None:
        import nkeys

        try:
            nkeys.from_seed(bytearray(_read_secret(seed_file, "nkey seed file").strip())).wipe()
        except nkeys.NkeysError:
            raise ConnectionFailed(f"nkey seed file {seed_file} holds no valid nkey seed") from None
        opts["nkeys_seed"] = seed_file
    if token is not None:
        opts["token"] = token
    return opts, _Security(tls=wants_tls, tls_ca=ca, tls_cert=cert, creds=creds_file, nkey_seed=seed_file,
                           token=token is not None)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text and text != type(exc).__name__ else type(exc).__name__


def _failure(shown: str, exc: BaseException, seen: BaseException | None, *, deadline: float, hint: str,
             security: _Security, info: dict[str, Any], first: str) -> str:
    cause = seen or exc
    if _is_auth(cause):
        return f"authorization failed at {shown}: {security.refused(cause, info)}"
    if info.get("tls_required") and not security.tls and isinstance(cause, OSError):
        # nats-py upgrades to TLS by itself, trusting the system's CAs only: verifying fails.
        return (f"the server at {shown} requires TLS: use tls://{_where(first)} and --tls-ca (env MESH_TLS_CA) "
                "with the CA that signed its certificate")
    if info.get("tls_verify") and security.tls_cert is None and isinstance(cause, OSError) and not isinstance(
            cause, ssl.SSLCertVerificationError):
        return (f"the server at {shown} requires a client certificate (mTLS): give --tls-cert and --tls-key "
                "(env MESH_TLS_CERT, MESH_TLS_KEY)")
    if isinstance(cause, ssl.SSLCertVerificationError):
        trust = (f"it is not signed by the CA in {security.tls_ca}" if security.tls_ca
                 else "give the CA that signed it with --tls-ca, env MESH_TLS_CA")
        return (f"TLS: certificate verify failed for {shown}: {cause.verify_message or cause.reason} "
                f"(the server's certificate is not trusted by this client: {trust})")
    if info.get("tls_verify") and isinstance(cause, ConnectionError | ssl.SSLError):
        return (f"TLS: the server at {shown} refused this client's certificate ({security.tls_cert}): it must be "
                "signed by a CA the server trusts")
    if isinstance(cause, ssl.SSLError):
        return f"TLS: handshake with {shown} failed: {cause.reason or cause}"
    if isinstance(cause, nats.errors.SecureConnRequiredError | nats.errors.SecureConnWantedError):
        return f"TLS: {shown}: {cause}"
    if isinstance(exc, TimeoutError) and seen is None:
        return f"cannot reach NATS at {shown}: no connection within {deadline:g}s{hint}"
    return f"cannot reach NATS at {shown} ({_describe(cause)}){hint}"


async def connect(url: str, *, name: str, wait: float = 0.0, reconnect_wait: float = 0.25,
                  connect_timeout: float = 2.0, deadline: float | None = None, hint: str = "",
                  tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                  tls_key: str | Path | None = None, creds: str | Path | None = None,
                  nkey_seed: str | Path | None = None, token: str | None = None,
                  **options: Any) -> MeshClient:
    """Connect to ``url``, trying for ``wait`` seconds at start, within ``deadline`` seconds overall
    (default ``wait`` plus a few connect timeouts).

    Security, every secret as a file path: ``tls_ca`` (verify the server against this CA, else the
    system's), ``tls_cert`` and ``tls_key`` (present a client certificate, for mTLS), ``creds`` (a
    NATS ``.creds`` file: user JWT and nkey seed), ``nkey_seed`` (a file holding a user nkey seed);
    ``token`` is the one value. Giving a TLS file (or a ``tls://`` URL) means TLS or nothing.

    Raises :class:`ConnectionFailed` saying what failed: an invalid URL, an unreadable file, a
    refused authorization, TLS (the server requires it, a certificate nobody trusts, a missing
    client certificate), or no server answering (``hint`` is appended to that last one). Once
    connected, the client reconnects forever.
    """
    servers = parse_urls(url)
    shown = redact(url)
    secure, security = _security_options(servers, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, creds=creds,
                                         nkey_seed=nkey_seed, token=token)
    total = deadline if deadline is not None else wait + 2 * connect_timeout + 1.0
    nc = MeshClient()
    seen: list[BaseException] = []
    limit: list[asyncio.Timeout] = []
    closing: set[asyncio.Future[None]] = set()
    connecting = True

    async def on_error(exc: Exception) -> None:
        if not connecting:
            nc.note_async_error(exc)
            return
        log.debug("nats: %s", _describe(exc))  # while connecting: the failure message says it
        seen.append(exc)
        if _is_fatal(exc, nc._server_info) and limit:  # waiting will not help: end the connect now
            limit[0].reschedule(asyncio.get_running_loop().time())

    async def on_disconnect() -> None:
        if not (nc.is_closed or nc.is_draining):  # a close of our own is not news
            log.warning("disconnected from NATS; reconnecting")

    async def on_reconnect() -> None:
        where = _where(nc.connected_url.geturl()) if nc.connected_url else _where(servers[0])
        if _plaintext(nc, security):  # a server without TLS where there was one: never carry on in plaintext
            log.error("reconnected to NATS at %s without TLS, which this client asked for: closing the connection",
                      where)
            closing.add(asyncio.ensure_future(nc.close()))  # not awaited here: close cancels this callback's task
            return
        log.warning("reconnected to NATS at %s", where)

    attempts = max(1, math.ceil(wait / reconnect_wait))
    # (nats-py annotates both seconds options as int; it takes floats.)
    opts: dict[str, Any] = {"ping_interval": 10, "max_outstanding_pings": 3, "reconnect_time_wait": reconnect_wait,
                            "connect_timeout": connect_timeout, **secure, **options}
    try:
        async with asyncio.timeout(total) as timeout:
            limit.append(timeout)
            await nc.connect(servers, name=name, max_reconnect_attempts=attempts, error_cb=on_error,
                             disconnected_cb=on_disconnect, reconnected_cb=on_reconnect, **opts)
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        connecting = False
        info = dict(nc._server_info or {})
        await _abandon(nc)
        raise ConnectionFailed(_failure(shown, exc, seen[-1] if seen else None, deadline=total, hint=hint,
                                        security=security, info=info, first=servers[0])) from None
    connecting = False
    if _plaintext(nc, security):
        await _abandon(nc)  # nats-py upgrades only when the server asks: this one talks plaintext
        raise ConnectionFailed(f"TLS: the server at {shown} does not use TLS, and this client asked for it "
                               "(tls://, --tls-ca or --tls-cert): refusing a plaintext connection")
    # From now on, never give up reconnecting: a restarted server must not orphan a plugin.
    nc.options["max_reconnect_attempts"] = -1
    return nc


def _plaintext(nc: Client, security: _Security) -> bool:
    """Connected without TLS although TLS was asked for (nats-py upgrades only when the server asks)."""
    return security.tls and not nc._server_info.get("tls_required") and (
        nc.connected_url is None or nc.connected_url.scheme in ("nats", "tls"))


async def _abandon(nc: Client) -> None:
    """Close a half-open client within :data:`CLOSE_TIMEOUT`; past that, drop its socket."""
    try:
        await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT)
    except (TimeoutError, OSError, nats.errors.Error, TypeError, RuntimeError) as exc:
        # (TypeError/RuntimeError: nats-py's close writes what is pending to a socket that is already
        # closed; on Python 3.13 asyncio's transport then fails with "'NoneType' object is not
        # callable". Nothing can be sent then anyway: the socket is dropped below.)
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
