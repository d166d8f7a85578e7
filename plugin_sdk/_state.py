"""A plugin's persisted state: a JetStream key-value bucket per plugin name.

Values are JSON. Every write returns once JetStream has acknowledged it (file storage), so an
acknowledged write survives a plugin crash and a nats-server restart. ``compare_and_set`` gives
optimistic concurrency between instances of one plugin.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from ._errors import PayloadTooLarge, StateConflict, StateError
from ._wire import dumps, loads

__all__ = ["StateEntry", "StateStore", "open_bucket"]

_KEY_RE = re.compile(r"^[-/_=.a-zA-Z0-9]+$")


@dataclass(frozen=True, slots=True)
class StateEntry:
    key: str
    value: Any
    revision: int


def _check_key(key: str) -> str:
    if not _KEY_RE.match(key) or key.startswith(".") or key.endswith("."):
        raise StateError(f"invalid state key {key!r}: use letters, digits and - / _ = . (not at the ends)")
    return key


async def open_bucket(js: JetStreamContext, bucket: str, *, create: bool, description: str = "",
                      history: int = 1) -> KeyValue:
    """Open ``bucket``; with ``create``, make it (file storage) if it does not exist yet."""
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        if not create:
            raise
    try:
        return await js.create_key_value(KeyValueConfig(bucket=bucket, description=description,
                                                        history=history, storage=StorageType.FILE))
    except nats.js.errors.BadRequestError:
        # Another process created it between our look-up and our create.
        return await js.key_value(bucket)


class StateStore:
    """``context.state``: get / put / delete / keys / compare_and_set on the plugin's bucket."""

    def __init__(self, kv: KeyValue, *, plugin: str, max_value_size: int | None = None) -> None:
        self._kv = kv
        self._plugin = plugin
        self._max = max_value_size

    @property
    def bucket(self) -> str:
        return str(self._kv._name)

    async def get(self, key: str, default: Any = None) -> Any:
        entry = await self.get_entry(key)
        return default if entry is None else entry.value

    async def get_entry(self, key: str) -> StateEntry | None:
        """The value and its revision, or ``None`` when the key does not exist."""
        try:
            e = await self._kv.get(_check_key(key))
        except nats.js.errors.KeyNotFoundError:
            return None
        return StateEntry(key, loads(e.value or b"", what=f"state {key!r}"), e.revision or 0)

    async def put(self, key: str, value: Any) -> int:
        """Store ``value`` (JSON) and return the new revision once JetStream has it."""
        return await self._kv.put(_check_key(key), self._encode(key, value))

    async def compare_and_set(self, key: str, value: Any, *, revision: int) -> int:
        """Store ``value`` only if ``key`` is still at ``revision`` (0: only if it does not exist).

        Returns the new revision; raises :class:`StateConflict` when someone wrote in between.
        """
        data = self._encode(key, value)
        try:
            if revision == 0:
                return await self._kv.create(_check_key(key), data)
            return await self._kv.update(_check_key(key), data, last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise StateConflict(f"state {key!r} of {self._plugin!r} is no longer at revision {revision}",
                                plugin=self._plugin) from None

    async def delete(self, key: str) -> None:
        await self._kv.delete(_check_key(key))

    async def keys(self) -> list[str]:
        try:
            return sorted(await self._kv.keys())
        except nats.js.errors.NoKeysError:
            return []

    def _encode(self, key: str, value: Any) -> bytes:
        data = dumps(value)
        if self._max is not None and len(data) > self._max:
            raise PayloadTooLarge(f"state {key!r} is {len(data)} bytes, over the limit of {self._max}",
                                  plugin=self._plugin)
        return data
