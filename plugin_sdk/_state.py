"""A plugin's persisted state: a JetStream key-value bucket per plugin name.

Values are JSON. Every write returns once JetStream has acknowledged it (file storage), so an
acknowledged write survives a plugin crash and a nats-server restart. ``compare_and_set`` gives
optimistic concurrency between instances of one plugin.

Every failure is a :class:`StateError` subclass naming the bucket and key: ``StateTimeout`` (no
answer in time; a write may still have landed), ``StateUnavailable`` (the connection is closed or
reconnecting, or no JetStream answers), ``StateNotFound`` (no such bucket), ``StateTooLarge``
(checked before sending), ``StateConflict`` (compare-and-set lost).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from ._durable import DurableKV, Retry, transient
from ._errors import StateConflict, StateError, StateNotFound, StateTimeout, StateTooLarge, StateUnavailable
from ._wire import dumps, loads

__all__ = ["StateEntry", "StateStore", "cluster_size", "default_replicas", "open_bucket", "too_few_nodes"]

log = logging.getLogger("mesh.state")

_KEY_RE = re.compile(r"^[-/_=.a-zA-Z0-9]+$")

T = TypeVar("T")

#: The header nats-py sends with an update/create ("NATS/1.0\r\n" + "Name: value\r\n" + "\r\n"),
#: with room for a 20-digit revision: NATS counts headers and body against max_payload.
_EXPECT_HEADER_BYTES = len("NATS/1.0\r\n") + len("Nats-Expected-Last-Subject-Sequence: \r\n") + 20 + len("\r\n")
#: Every write's "Nats-Msg-Id: <24 hex>" (with the status line, when it is the only header).
_WRITE_HEADER_BYTES = len("NATS/1.0\r\n") + len("Nats-Msg-Id: \r\n") + 24 + len("\r\n")

#: nats-py errors that mean "JetStream cannot be reached now" (nothing was sent, or nothing answers).
_UNAVAILABLE = (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError,
                nats.errors.ConnectionDrainingError, nats.errors.OutboundBufferLimitError,
                nats.errors.NoRespondersError, nats.errors.StaleConnectionError, nats.errors.NoServersError,
                nats.js.errors.NoStreamResponseError, nats.js.errors.ServiceUnavailableError)


#: JetStream's answers to more replicas than it has nodes for: no suitable peers, insufficient
#: resources, replicas > 1 on a server that is not clustered.
_TOO_FEW = (10005, 10023, 10074)


@dataclass(frozen=True, slots=True)
class StateEntry:
    key: str
    value: Any
    revision: int


def _check_key(key: str, bucket: str | None = None) -> str:
    if not _KEY_RE.match(key) or key.startswith(".") or key.endswith("."):
        raise StateError(f"invalid state key {key!r}: use letters, digits and - / _ = . (not at the ends)",
                         bucket=bucket, key=key)
    return key


def _connection_state(js: JetStreamContext) -> str:
    nc = getattr(js, "_nc", None)
    if nc is None or nc.is_connected:
        return ""
    if nc.is_closed:
        return "; the NATS connection is closed"
    return "; the NATS connection is down (reconnecting)"


def _translate(exc: Exception, *, op: str, bucket: str, key: str | None, plugin: str | None,
               js: JetStreamContext, write: bool) -> StateError:
    """The typed :class:`StateError` for a nats-py failure of ``op`` on ``bucket``/``key``."""
    what = f"state {op} {key!r} in bucket {bucket}" if key is not None else f"state {op} on bucket {bucket}"
    kw: dict[str, Any] = {"plugin": plugin, "bucket": bucket, "key": key}
    down = _connection_state(js)
    if isinstance(exc, TimeoutError):  # nats.errors.TimeoutError is one too
        after = "; the write may or may not have been stored: re-read before retrying" if write else ""
        return StateTimeout(f"{what}: JetStream did not answer in time{down}{after}",
                            **kw)
    if isinstance(exc, _UNAVAILABLE):
        why = {nats.errors.ConnectionClosedError: "the NATS connection is closed",
               nats.errors.ConnectionReconnectingError: "the NATS connection is reconnecting",
               nats.errors.ConnectionDrainingError: "the NATS connection is draining",
               nats.errors.OutboundBufferLimitError: "the NATS connection is down and its buffer is full",
               }.get(type(exc), f"no JetStream answered ({type(exc).__name__}: is JetStream enabled?)")
        return StateUnavailable(f"{what}: {why}", **kw)
    if isinstance(exc, nats.js.errors.BucketNotFoundError):
        return StateNotFound(f"{what}: the bucket does not exist", **kw)
    if isinstance(exc, nats.errors.MaxPayloadError):
        return StateTooLarge(f"{what}: over the NATS server's max_payload", **kw)
    if getattr(exc, "err_code", None) in _TOO_FEW:
        said = getattr(exc, "description", None) or exc
        return StateError(f"{what}: the NATS cluster has too few JetStream nodes for the replicas asked for "
                          f"({said}): start more nodes, or ask for fewer replicas (--replicas)", **kw)
    detail = getattr(exc, "description", None) or str(exc) or type(exc).__name__
    return StateError(f"{what}: {type(exc).__name__}: {detail}", **kw)


async def _guard(aw: Awaitable[T], *, op: str, bucket: str, key: str | None, plugin: str | None,
                 js: JetStreamContext, write: bool = False) -> T:
    try:
        return await aw
    except (nats.errors.Error, TimeoutError) as exc:
        error = _translate(exc, op=op, bucket=bucket, key=key, plugin=plugin, js=js, write=write)
        notes = " ".join(getattr(exc, "__notes__", ()))
        if notes:  # how long it was retried (plugin_sdk._durable)
            error = type(error)(f"{error} {notes}", plugin=plugin, bucket=bucket, key=key)
        raise error from exc


#: Seconds a start retries opening its bucket while JetStream is busy or electing (a cluster just formed).
OPEN_RETRY = 10.0


def passing_open(exc: BaseException) -> bool:
    """Whether opening a bucket failed for a reason that passes by itself (JetStream busy or electing)."""
    cause = exc.__cause__ if isinstance(exc, StateError) and exc.__cause__ is not None else exc
    return transient(cause)


def too_few_nodes(exc: BaseException) -> bool:
    """Whether ``exc`` is JetStream saying it has fewer nodes than the replicas asked for."""
    return isinstance(exc, StateError) and getattr(exc.__cause__, "err_code", None) in _TOO_FEW


def cluster_size(nc: Any) -> int:
    """How many servers the cluster ``nc`` is connected to has, as its INFO says (1 if not clustered)."""
    info = getattr(nc, "_server_info", None) or {}
    if not info.get("cluster"):
        return 1
    return max(1, len(set(info.get("connect_urls") or ())))


def default_replicas(nc: Any) -> int:
    """3 on a cluster of 3 or more servers, else 1 (``MESH_REPLICAS`` in the environment overrides)."""
    raw = os.environ.get("MESH_REPLICAS")
    if raw:
        try:
            return max(1, int(raw))
        except ValueError:
            raise StateError(f"MESH_REPLICAS={raw!r}: give a number of replicas, e.g. 3") from None
    return 3 if cluster_size(nc) >= 3 else 1


async def open_bucket(js: JetStreamContext, bucket: str, *, create: bool, description: str = "",
                      history: int = 1, replicas: int | None = None, strict: bool = False) -> KeyValue:
    """Open ``bucket``; with ``create``, make it (file storage, ``replicas`` copies: default
    :func:`default_replicas`) if it does not exist yet.

    A bucket that exists with another replica count than an explicit ``replicas`` is reported: a
    warning, or with ``strict`` a :class:`StateError` naming both counts. Asked for more replicas
    than the cluster has JetStream nodes, the create fails with a :class:`StateError` saying so.
    Raises :class:`StateNotFound` when it does not exist and ``create`` is false, and the other
    :class:`StateError` subclasses when JetStream cannot be reached.
    """
    wanted = replicas
    try:
        kv = await _guard(js.key_value(bucket), op="open", bucket=bucket, key=None, plugin=None, js=js)
    except StateNotFound:
        if not create:
            raise
    else:
        if wanted is not None:
            await _check_replicas(js, bucket, wanted, strict=strict)
        else:  # the automatic count: a bucket with fewer copies than the cluster could keep is reported
            await _check_replicas(js, bucket, default_replicas(getattr(js, "_nc", None)), strict=False, auto=True)
        return kv
    count = wanted if wanted is not None else default_replicas(getattr(js, "_nc", None))
    config = KeyValueConfig(bucket=bucket, description=description, history=history, storage=StorageType.FILE,
                            replicas=count)
    try:
        kv = await _guard(js.create_key_value(config), op="create", bucket=bucket, key=None, plugin=None, js=js)
        if count > 1:
            log.info("created bucket %s with %d replicas", bucket, count)
        return kv
    except StateError as exc:
        cause = exc.__cause__
        if not isinstance(cause, nats.js.errors.BadRequestError) or getattr(cause, "err_code", None) in _TOO_FEW:
            raise
    # Another process created it between our look-up and our create.
    kv = await _guard(js.key_value(bucket), op="open", bucket=bucket, key=None, plugin=None, js=js)
    if wanted is not None:
        await _check_replicas(js, bucket, wanted, strict=strict)
    return kv


async def _check_replicas(js: JetStreamContext, bucket: str, wanted: int, *, strict: bool, auto: bool = False) -> None:
    try:
        info = await _guard(js.stream_info(f"KV_{bucket}"), op="open", bucket=bucket, key=None, plugin=None, js=js)
    except StateError as exc:
        if auto:  # only a report: never a reason not to start
            log.debug("replicas of bucket %s not checked: %s", bucket, exc)
            return
        raise
    have = info.config.num_replicas or 1
    if have == wanted or (auto and have > wanted):
        return
    asked = f"the cluster's nodes could keep {wanted}" if auto else f"{wanted} were asked for"
    text = (f"bucket {bucket} exists with {have} replica{'s' if have != 1 else ''}, and {asked}: "
            f"change it with `nats stream edit KV_{bucket} --replicas {wanted}`, or ask for {have} (--replicas)")
    if strict:
        raise StateError(text, bucket=bucket)
    log.warning("%s", text)


class StateStore:
    """``context.state``: get / put / delete / keys / compare_and_set on the plugin's bucket.

    Every operation is retried through a leader election or a reconnect for ``retry.within``
    seconds (default 20, env ``MESH_RETRY_FOR``), each write stored at most once (see
    ``plugin_sdk._durable``); then a typed :class:`StateError`.
    """

    def __init__(self, kv: KeyValue, *, plugin: str, max_value_size: int | None = None,
                 retry: Retry | None = None) -> None:
        self._kv = kv
        self._durable = DurableKV(kv, retry)
        self._plugin = plugin
        self._max = max_value_size

    @property
    def bucket(self) -> str:
        return str(self._kv._name)

    async def _do(self, aw: Awaitable[T], op: str, key: str | None, *, write: bool = False) -> T:
        return await _guard(aw, op=op, bucket=self.bucket, key=key, plugin=self._plugin, js=self._kv._js,
                            write=write)

    async def get(self, key: str, default: Any = None) -> Any:
        entry = await self.get_entry(key)
        return default if entry is None else entry.value

    async def get_entry(self, key: str) -> StateEntry | None:
        """The value and its revision, or ``None`` when the key does not exist."""
        try:
            e = await self._do(self._durable.get(_check_key(key, self.bucket)), "get", key)
        except StateError as exc:
            if isinstance(exc.__cause__, nats.js.errors.KeyNotFoundError):  # KeyDeletedError is one too
                return None
            raise
        return StateEntry(key, loads(e.value or b"", what=f"state {key!r}"), e.revision or 0)

    async def put(self, key: str, value: Any) -> int:
        """Store ``value`` (JSON) and return the new revision once JetStream has it."""
        data = self._encode(key, value, headers=_WRITE_HEADER_BYTES)
        return await self._do(self._durable.put(_check_key(key, self.bucket), data), "put", key, write=True)

    async def compare_and_set(self, key: str, value: Any, *, revision: int) -> int:
        """Store ``value`` only if ``key`` is still at ``revision`` (0: only if it does not exist).

        Returns the new revision; raises :class:`StateConflict` when someone wrote in between.
        """
        data = self._encode(key, value, headers=_WRITE_HEADER_BYTES + _EXPECT_HEADER_BYTES)
        _check_key(key, self.bucket)
        write = (self._durable.create(key, data) if revision == 0
                 else self._durable.update(key, data, last=revision))
        try:
            return await self._do(write, "compare_and_set", key, write=True)
        except StateError as exc:
            if isinstance(exc.__cause__, nats.js.errors.KeyWrongLastSequenceError):
                raise StateConflict(f"state {key!r} of {self._plugin!r} is no longer at revision {revision}",
                                    plugin=self._plugin, bucket=self.bucket, key=key) from None
            raise

    async def delete(self, key: str) -> None:
        await self._do(self._durable.delete(_check_key(key, self.bucket)), "delete", key, write=True)

    async def keys(self) -> list[str]:
        return sorted(await self._do(self._durable.keys(), "keys", None))

    def _encode(self, key: str, value: Any, *, headers: int) -> bytes:
        """JSON, checked against the plugin's limit and the server's ``max_payload`` before sending
        (the server counts headers too; a message over it would make the server close the connection)."""
        data = dumps(value)
        nc = getattr(self._kv._js, "_nc", None)
        server_max: int | None = nc.max_payload if nc is not None and nc.max_payload else None
        where = f"state {key!r} of plugin {self._plugin!r} (bucket {self.bucket})"
        if self._max is not None and len(data) > self._max:
            raise StateTooLarge(f"{where} is {len(data)} bytes, over the limit of {self._max} (the plugin's "
                                "max_payload)", plugin=self._plugin, bucket=self.bucket, key=key)
        if server_max is not None and len(data) + headers > server_max:
            raise StateTooLarge(f"{where} is {len(data)} bytes ({len(data) + headers} with its headers), over the "
                                f"limit of {server_max} (the NATS server's max_payload)", plugin=self._plugin,
                                bucket=self.bucket, key=key)
        return data
