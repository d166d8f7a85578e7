"""Writes that survive a JetStream leader election: bounded retries, and each write stored once.

When the node leading a bucket's stream dies, JetStream needs a few seconds (a Raft election) to
elect another; meanwhile a write sees no responders or times out, and nats-py does not retry.
:class:`DurableKV` retries what is safe to retry for a bounded time (:class:`Retry`, tenacity),
then lets the last error through, to be translated into a typed ``StateError``.

A retry after a *lost acknowledgement* must not store the write twice (or, for a
compare-and-set, fail against its own first attempt). Each logical write carries one random
``Nats-Msg-Id`` across its attempts, so JetStream (its duplicate window is two minutes on KV
buckets) answers a repeat with the first attempt's acknowledgement instead of storing it again.
A clustered stream checks the id before the expected revision; a single server checks the
revision first, so there a repeated compare-and-set that fails on revision looks up the first
write after the expected revision and, when it is its own, succeeds with that revision.

The registry uses this too (its bucket is a KV like a plugin's state).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.kv import KV_MARKER_REASON, KV_OP, KeyValue

if TYPE_CHECKING:
    from tenacity import RetryCallState

from ._wire import H_EXPECTED_LAST_SUBJECT_SEQUENCE, H_MSG_ID, kv_delete_headers

__all__ = ["DEFAULT_RETRY_FOR", "DurableKV", "Retry", "transient"]

log = logging.getLogger("mesh.state")

T = TypeVar("T")

#: Seconds a write or registry call keeps retrying by default: a leader election after a hard
#: kill takes nats-server 4-9 s (its Raft election timeouts), plus the client's reconnect.
DEFAULT_RETRY_FOR = 20.0

#: JetStream API error codes that mean "try again soon": 10008 JetStream temporarily unavailable
#: (no meta leader), 10118 stream offline (no stream leader yet).
_TRANSIENT_CODES = {10008, 10118}


def _retry_for_env() -> float:
    raw = os.environ.get("MESH_RETRY_FOR")
    if raw is None:
        return DEFAULT_RETRY_FOR
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"MESH_RETRY_FOR={raw!r}: give seconds, e.g. 20") from None
    if value < 0:
        raise ValueError(f"MESH_RETRY_FOR={raw!r}: must be 0 or more")
    return value


@dataclass(frozen=True, slots=True)
class Retry:
    """How long to retry: ``within`` seconds in all (0: never retry), each attempt waiting at most
    ``attempt_timeout`` for its answer, with jittered exponential pauses from ``first_pause`` up to
    ``max_pause`` between attempts."""

    within: float = DEFAULT_RETRY_FOR
    attempt_timeout: float = 2.0
    first_pause: float = 0.05
    max_pause: float = 1.0

    @classmethod
    def from_env(cls, within: float | None = None) -> Retry:
        """``within`` if given, else ``MESH_RETRY_FOR`` from the environment, else the default."""
        return cls(within=_retry_for_env() if within is None else within)

    async def run(self, attempt: Callable[[int], Awaitable[T]], *, what: str,
                  retry_on: Callable[[BaseException], bool] | None = None) -> T:
        """``attempt(n)`` (n = 1, 2, …) until it returns, raises something not transient, or time is
        up; then the last error, with a note of how many attempts were made over how long.

        The first attempt runs without tenacity: nearly every call succeeds at once, and a plugin
        host that never retries need not import it (a third of a MiB of its idle RSS). The retries
        after a transient failure are tenacity's, over what is left of ``within``.
        """
        retry_on = retry_on or transient
        started = time.monotonic()
        try:
            return await attempt(1)
        except BaseException as exc:
            if self.within <= 0 or not retry_on(exc):
                raise
            log.info("%s: %s; retrying (attempt 1, %.1fs so far, up to %gs)", what, _describe(exc),
                     time.monotonic() - started, self.within)

        from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_random_exponential

        said = [time.monotonic() - started]

        def note(state: RetryCallState) -> None:  # at most one line every 5 s
            elapsed = time.monotonic() - started
            if elapsed - said[0] < 5.0:
                return
            said[0] = elapsed
            exc = state.outcome.exception() if state.outcome else None
            log.info("%s: %s; retrying (attempt %d, %.1fs so far, up to %gs)", what, _describe(exc),
                     state.attempt_number + 1, elapsed, self.within)

        await asyncio.sleep(random.uniform(0, min(self.max_pause, self.first_pause)))  # (the first pause)
        remaining = max(0.0, self.within - (time.monotonic() - started))
        # Attempt k of tenacity's is our k + 1: its pauses continue the exponential where the first left off.
        retrying = AsyncRetrying(stop=stop_after_delay(remaining),
                                 wait=wait_random_exponential(multiplier=2 * self.first_pause, max=self.max_pause),
                                 retry=retry_if_exception(retry_on), reraise=True, before_sleep=note)
        number = 1
        try:
            async for step in retrying:
                with step:
                    number = step.retry_state.attempt_number + 1
                    return await attempt(number)
        except BaseException as exc:
            exc.add_note(f"(gave up after {number} attempts over {self.within:g}s of retrying)")
            raise
        raise AssertionError("unreachable: tenacity ends with a result or the last error")  # pragma: no cover


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` may go away by itself within seconds (a leader election, a reconnect)."""
    if isinstance(exc, nats.errors.ConnectionClosedError | nats.errors.ConnectionDrainingError):
        return False  # closed for good (or closing on purpose): retrying cannot help
    if isinstance(exc, TimeoutError | nats.errors.NoRespondersError | nats.errors.ConnectionReconnectingError
                  | nats.errors.StaleConnectionError | nats.errors.OutboundBufferLimitError
                  | nats.js.errors.NoStreamResponseError | nats.js.errors.ServiceUnavailableError):
        return True
    if isinstance(exc, nats.js.errors.APIError):
        return getattr(exc, "code", None) == 503 or getattr(exc, "err_code", None) in _TRANSIENT_CODES
    return False


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no result"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


#: Seconds the server keeps the consumer of a ``keys()`` listing once nobody reads it (as nats-py's
#: ``keys()``, the listing unsubscribes and leaves the consumer to expire; see ``DurableKV._keys``).
KEYS_INACTIVE = 5.0


def new_msg_id() -> str:
    return secrets.token_hex(12)


class DurableKV:
    """A nats-py :class:`KeyValue`'s writes and reads, each retried per :class:`Retry`, each write
    with one ``Nats-Msg-Id`` for all its attempts. Raises what nats-py raises (after the retries)."""

    def __init__(self, kv: KeyValue, retry: Retry | None = None) -> None:
        self.kv = kv
        self.retry = retry or Retry.from_env()

    @property
    def name(self) -> str:
        return str(self.kv._name)

    def _subject(self, key: str) -> str:
        return f"{self.kv._pre}{key}"

    async def _publish(self, key: str, value: bytes, headers: dict[str, str], *, what: str) -> int:
        headers = {**headers, H_MSG_ID: new_msg_id()}
        js = self.kv._js

        async def attempt(n: int) -> int:
            ack = await js.publish(self._subject(key), value, headers=headers, timeout=self.retry.attempt_timeout)
            if ack.duplicate:
                log.info("%s: a retry found its first attempt stored (revision %d)", what, ack.seq)
            return int(ack.seq)

        return await self.retry.run(attempt, what=what)

    async def put(self, key: str, value: bytes) -> int:
        return await self._publish(key, value, {}, what=f"put {key!r} in {self.name}")

    async def update(self, key: str, value: bytes, *, last: int) -> int:
        """Store only if ``key`` is at revision ``last`` (0: only if absent); KeyWrongLastSequenceError else."""
        headers = {H_EXPECTED_LAST_SUBJECT_SEQUENCE: str(last), H_MSG_ID: new_msg_id()}
        js = self.kv._js
        what = f"compare-and-set {key!r} in {self.name}"

        async def attempt(n: int) -> int:
            try:
                ack = await js.publish(self._subject(key), value, headers=headers,
                                       timeout=self.retry.attempt_timeout)
            except nats.js.errors.APIError as exc:
                if exc.err_code not in (10071, 10164):
                    raise
                if n > 1:  # maybe our own first attempt (a single server checks revisions before ids)
                    mine = await self._own_write_after(key, last, headers[H_MSG_ID])
                    if mine is not None:
                        log.info("%s: a retry found its first attempt stored (revision %d)", what, mine)
                        return mine
                raise nats.js.errors.KeyWrongLastSequenceError(description=exc.description) from None
            return int(ack.seq)

        return await self.retry.run(attempt, what=what)

    async def create(self, key: str, value: bytes) -> int:
        """Store only if ``key`` has no value (absent, or deleted: as nats-py's ``create``)."""
        try:
            return await self.update(key, value, last=0)
        except nats.js.errors.KeyWrongLastSequenceError:
            try:
                await self.get(key)
            except nats.js.errors.KeyDeletedError as deleted:  # a delete marker: create over it
                if deleted.entry is None or deleted.entry.revision is None:
                    raise
                return await self.update(key, value, last=deleted.entry.revision)
            raise

    async def delete(self, key: str, *, last: int | None = None) -> int:
        return await self._publish(key, b"", kv_delete_headers(last=last), what=f"delete {key!r} in {self.name}")

    async def get(self, key: str) -> KeyValue.Entry:
        return await self.retry.run(lambda n: self.kv.get(key), what=f"get {key!r} in {self.name}")

    async def keys(self) -> list[str]:
        return await self.retry.run(lambda n: self._keys(), what=f"keys of {self.name}")

    async def _keys(self) -> list[str]:
        """The bucket's live keys, counted rather than guessed: nats-py's ``keys()`` is not used.

        nats-py's ``keys()`` ends its watch on an "initial marker" put when the consumer reports
        nothing pending *and* its subscription has received nothing yet; an entry already sent
        but not yet read (in flight behind the consumer-info reply) makes a bucket with keys look
        empty. `mesh state keys` printed ``[]`` in CI under load after `mesh state get` read a key,
        and asking a second time raced the same way in a loaded CI run. Here an ephemeral push
        consumer (the last entry per key, headers only, no acks) is asked how many messages it
        has delivered and has still to deliver; exactly that many are read (each within the
        JetStream timeout), and the keys whose last entry is not a delete or purge are returned.
        """
        kv, js = self.kv, self.kv._js
        config = ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, ack_policy=AckPolicy.NONE,
                                headers_only=True, inactive_threshold=KEYS_INACTIVE)
        sub = await js.subscribe(f"{kv._pre}>", stream=kv._stream, config=config, manual_ack=True)
        try:
            info = await sub.consumer_info()
            expected = (info.delivered.consumer_seq if info.delivered else 0) + (info.num_pending or 0)
            keys: list[str] = []
            for _ in range(expected):
                msg = await sub.next_msg(timeout=js._timeout)
                headers = msg.headers or {}
                if KV_OP not in headers and KV_MARKER_REASON not in headers:  # (not a delete, purge or expiry)
                    keys.append(msg.subject[len(kv._pre):])
                if msg.metadata.num_pending == 0:
                    break  # the last one (there were fewer than counted: a key purged meanwhile)
            return keys
        finally:
            await sub.unsubscribe()  # (the server removes the consumer once it has no interest: KEYS_INACTIVE)

    async def _own_write_after(self, key: str, last: int, msg_id: str) -> int | None:
        """The revision of the first write to ``key`` after revision ``last`` if it carries ``msg_id``."""
        try:
            msg = await self.kv._js.get_msg(self.kv._stream, seq=last + 1, subject=self._subject(key), next=True)
        except nats.js.errors.NotFoundError:
            return None
        headers = msg.headers or {}
        return int(msg.seq) if headers.get(H_MSG_ID) == msg_id and msg.seq is not None else None
