"""The registry service: the ``PluginRegistry`` API over NATS, all data in JetStream KV.

Stateless by design: every replica keeps a read cache fed by a KV watcher, writes go to the
bucket, and requests arrive through the queue group ``registry``, so any number of replicas can
run and a restart loses nothing. Health combines what each instance says of itself (its
``health_check``: healthy, degraded or unhealthy, with a reason, sent with every heartbeat) with
the time of its last heartbeat, computed when read: an instance that missed ``missed_beats`` beats
is ``unhealthy`` whatever it said; one silent for ``expire_after`` seconds is forgotten.

Bucket ``<prefix>_registry``:
  ``instances.<instance-id>`` → PluginInfo JSON (``last_seen`` = registry clock at the last beat)
  ``versions.<name>``         → {version: VersionRecord} for every version ever registered
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue
from pydantic import ValidationError

from plugin_sdk import (
    Health,
    InitializationError,
    InvalidMessage,
    PermissionDenied,
    PluginError,
    PluginInfo,
    StateError,
    VersionRecord,
)
from plugin_sdk.host import (
    OPEN_RETRY,
    SERVING,
    BoundedLog,
    DurableKV,
    Retry,
    Subjects,
    TaskOwner,
    bounded,
    check_range,
    drain_all,
    dumps,
    envelope_tail,
    event_headers,
    every,
    health_event,
    loads,
    open_bucket,
    passing_open,
    publish,
    registry_instance_key,
    registry_versions_key,
    too_few_nodes,
    version_matches,
)

from ._service import json_handler, subscribe_handler

__all__ = ["RegistryService"]

log = logging.getLogger("mesh.registry")

QUEUE = "registry"
#: The verbs that only read the cache: served side by side, on the direct path.
READS = frozenset({"get", "list", "versions"})
#: The registry's envelope tail: its events come from source ``registry``.
_TAIL = envelope_tail("registry", None)


class RegistryService:
    """Serve the registry API for one mesh prefix on ``nc``. ``async with`` or start/stop."""

    def __init__(self, nc: NATS, *, prefix: str = "mesh", missed_beats: float = 3.0,
                 expire_after: float = 60.0, sweep_interval: float = 1.0, replicas: int | None = None,
                 wait_for_nodes: float = 0.0) -> None:
        """``replicas``: copies of the registry's bucket (None: 3 on a cluster of 3+ servers, else 1;
        given explicitly, an existing bucket with another count refuses the start). ``wait_for_nodes``:
        seconds to wait for JetStream to have nodes enough for them (a cluster still starting)."""
        self.wait_for_nodes = wait_for_nodes
        self.nc = nc
        self.replicas = replicas
        self.subjects = Subjects(prefix)
        self.missed_beats = missed_beats
        self.expire_after = expire_after
        self.sweep_interval = sweep_interval
        self._kv: KeyValue | None = None
        # Writes retried briefly here (an answer must fit the caller's timeout); the caller retries
        # the call itself for longer (PluginRegistry), each call idempotent.
        self._retry = Retry(within=1.5, attempt_timeout=1.0)
        self._store: DurableKV | None = None
        self._cache = _Cache()
        self._subs: list[Subscription] = []
        self._reads: set[asyncio.Task[None]] = set()  # read requests being answered (subscribe_handler)
        #: The one owner of the KV watcher and the sweeper; either dying by surprise fails the service.
        self._tasks = TaskOwner("registry", log, on_failure=lambda name, exc: self.failed.set())
        #: Set when a loop of this replica died: it can no longer serve correctly (``mesh registry`` exits 1).
        self.failed = asyncio.Event()
        self._ready = asyncio.Event()
        self._watch_error = ""  # why the watcher last failed to (re)start, for start()'s error
        self._refused = BoundedLog(log)  # heartbeats refused: about what others sent, so bounded
        self._watcher: KeyValue.KeyWatcher | None = None
        self._watch_epoch = 0

    @property
    def instance_ids(self) -> set[str]:
        """The instance ids this replica currently knows (its cache, for diagnostics and tests)."""
        return set(self._cache.instances)

    async def __aenter__(self) -> RegistryService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, *, ready_timeout: float = 15.0) -> None:
        """Load the bucket into the cache, then serve. Raises InitializationError (and serves
        nothing) if the cache cannot be loaded within ``ready_timeout`` seconds."""
        def passing(exc: BaseException) -> bool:
            # JetStream busy or electing (a cluster just formed, a node just lost): always worth a
            # wait; too few nodes only while a cluster this process belongs to is still starting.
            return passing_open(exc) or (self.wait_for_nodes > 0 and too_few_nodes(exc))

        try:
            self._kv = await Retry(within=max(self.wait_for_nodes, OPEN_RETRY), max_pause=0.5).run(
                lambda n: open_bucket(self.nc.jetstream(), self.subjects.registry_bucket, create=True,
                                      description="groundhog mesh registry", replicas=self.replicas,
                                      strict=self.replicas is not None),
                what="the registry's bucket", retry_on=passing)
        except StateError as exc:
            raise InitializationError(f"the registry cannot start: {exc}") from None
        self._store = DurableKV(self._kv, self._retry)
        watcher = self._tasks.spawn(self._watch(), name="KV watcher")
        ready = asyncio.ensure_future(self._ready.wait())
        await asyncio.wait({ready, watcher}, timeout=ready_timeout, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            why = (f"its KV watcher died: {type(watcher.exception()).__name__}: {watcher.exception()}"
                   if watcher.done() and not watcher.cancelled() and watcher.exception() else
                   f"the bucket was not loaded within {ready_timeout:g}s"
                   + (f" ({self._watch_error})" if self._watch_error else ""))
            await self._tasks.close()
            raise InitializationError(f"the registry cannot start: {why}")
        handlers: dict[str, Callable[[Any], Awaitable[Any]]] = {
            "register": self._register, "unregister": self._unregister, "get": self._get,
            "list": self._list, "versions": self._list_versions,
        }
        for verb, fn in handlers.items():
            cb = json_handler(self.nc, "registry", verb, fn, instance="registry", log=log, group=QUEUE)
            subject = self.subjects.registry(verb)
            if verb in READS:  # (side by side, on the direct path: a broadcast's lookup is one of these)
                self._subs.append(await subscribe_handler(self.nc, subject, cb, queue=QUEUE, running=self._reads,
                                                          log=log))
            else:  # writes one at a time, in order, as nats-py runs a subscription's callbacks
                self._subs.append(await self.nc.subscribe(subject, queue=QUEUE, cb=cb))
        # An instance writes its own entry on <verb>.<its id> (the only registry writes a plugin's
        # credentials allow); the id in the subject must be the entry's. The plain subjects stay for
        # the admin (the agent marking an instance failed, the CLI) and for meshes without --secure.
        for verb in ("register", "unregister"):
            self._subs.append(await self.nc.subscribe(
                self.subjects.registry_own(verb, "*"), queue=QUEUE,
                cb=json_handler(self.nc, "registry", verb, self._own(verb, handlers[verb]), instance="registry",
                                log=log, group=QUEUE, with_subject=True, span_subject=self.subjects.registry(verb))))
        # Heartbeats are not traced (they carry no traceparent): see PluginRegistry.heartbeat.
        for subject in (self.subjects.registry("heartbeat"), self.subjects.registry_own("heartbeat", "*")):
            self._subs.append(await self.nc.subscribe(subject, queue=QUEUE, cb=self._on_heartbeat))
        self._tasks.spawn(every(self.sweep_interval, self._sweep, log=log, what="registry sweep"), name="sweeper")
        log.info("registry serving %s.registry.* (bucket %s)", self.subjects.prefix, self.subjects.registry_bucket)

    async def stop(self) -> None:
        """Stop serving; safe to call twice."""
        subs, self._subs = self._subs, []
        if not await drain_all(subs, timeout=5.0):
            log.warning("registry subscriptions did not drain within 5s; unsubscribed")
        if self._reads:  # reads handed over before the drain: answered, within the drain's bound
            _, late = await asyncio.wait(set(self._reads), timeout=5.0)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._tasks.close()

    # -- the cache ---------------------------------------------------------------------

    async def _watch(self) -> None:
        """Keep the cache equal to the bucket; rebuild it from a new watcher after a reconnect.

        A server restart loses the watcher's ephemeral consumer, and nats-py does not re-create
        it: the sweeper notices the reconnect and stops the watcher, and this loop starts afresh,
        replaying every key into a new cache that replaces the old one whole.
        """
        assert self._kv is not None
        retry = 0.5
        while True:
            self._watch_epoch = self.nc.stats["reconnects"]
            try:
                self._watcher = watcher = await self._kv.watchall()
            except (nats.errors.Error, OSError) as exc:  # JetStream away (e.g. reconnecting): try again
                self._watch_error = f"{type(exc).__name__}: {exc}"
                log.warning("registry watcher not started (%s); retrying in %.1fs", self._watch_error, retry)
                await asyncio.sleep(retry)
                retry = min(retry * 2, 5.0)
                continue
            retry, self._watch_error = 0.5, ""
            fresh: _Cache | None = _Cache()
            try:
                async for entry in watcher:
                    if entry is None:  # the initial values are all in: swap them in
                        if fresh is not None:
                            self._cache, fresh = fresh, None
                        self._ready.set()
                        continue
                    (fresh or self._cache).apply(entry.key, entry.value, entry.revision or 0, entry.operation)
            except nats.errors.Error as exc:  # the watcher's consumer failed: a new one replays everything
                self._watch_error = f"{type(exc).__name__}: {exc}"
                log.warning("registry watcher failed (%s); starting a new one", self._watch_error)
            finally:
                with contextlib.suppress(nats.errors.Error):
                    await watcher.stop()  # type: ignore[no-untyped-call]
            log.info("registry watcher restarted after a reconnect")

    def _late(self, info: PluginInfo, now: float) -> bool:
        return now - info.last_seen > self.missed_beats * info.heartbeat_interval + 0.5

    def _current(self, info: PluginInfo, now: float) -> PluginInfo:
        """``info`` with its health as of ``now``: as reported while it beats on time, else unhealthy."""
        if info.health in (Health.STOPPING, Health.STARTING, Health.FAILED) or not self._late(info, now):
            return info
        reason = f"no heartbeat for {now - info.last_seen:.1f}s"
        if info.health == Health.UNHEALTHY and info.health_reason.startswith("no heartbeat"):
            return info.model_copy(update={"health_reason": reason})
        return info.model_copy(update={"health": Health.UNHEALTHY, "health_reason": reason})

    # -- writes ------------------------------------------------------------------------

    async def _put_instance(self, info: PluginInfo, *, last: int | None = None) -> None:
        """Write ``info`` (only over revision ``last`` when given: KeyWrongLastSequenceError else)."""
        assert self._store is not None
        info = info.model_copy(update={"last_seen": time.time()})
        key, data = registry_instance_key(info.id), dumps(info.model_dump(mode="json"))
        rev = await (self._store.update(key, data, last=last) if last else self._store.put(key, data))
        # Read-your-writes on this replica, unless the watcher already saw something newer (an
        # unregister that overtook this write must win).
        self._cache.set_instance(info, rev)

    async def _delete_instance(self, ident: str, *, last: int | None = None) -> None:
        """Delete the key and forget it here, at the delete's own revision."""
        assert self._store is not None
        key = registry_instance_key(ident)
        rev = await self._store.delete(key, last=last)
        self._cache.apply(key, None, rev, "DEL")

    async def _record_version(self, info: PluginInfo) -> None:
        assert self._store is not None
        key = registry_versions_key(info.name)
        for _ in range(10):  # compare-and-set loop: replicas may record at the same time
            try:
                entry = await self._store.get(key)
                records = loads(entry.value or b"") or {}
                revision = entry.revision or 0
            except nats.js.errors.KeyNotFoundError:
                records, revision = {}, 0
            now = time.time()
            rec = records.get(info.version) or {"name": info.name, "version": info.version, "first_seen": now}
            rec.update(last_seen=now, capabilities=info.capabilities,
                       instances_seen=int(rec.get("instances_seen", 0)) + 1)
            records[info.version] = rec
            try:
                if revision:
                    await self._store.update(key, dumps(records), last=revision)
                else:
                    await self._store.create(key, dumps(records))
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
        log.warning("gave up recording version %s %s after 10 conflicting writes", info.name, info.version)

    # -- handlers ----------------------------------------------------------------------

    async def _register(self, body: Any) -> bool:
        info = PluginInfo.model_validate(body)
        before = self._cache.instances.get(info.id)
        await self._put_instance(info)
        await self._record_version(info)
        log.info("registered %s (%s %s, %s)", info.id, info.name, info.version, info.health.value)
        if before is None or before[0].health != info.health:
            await self._announce(info, previous=before[0].health.value if before else "absent")
        return True

    def _own(self, verb: str, fn: Callable[[Any], Awaitable[Any]]) -> Callable[[Any, str], Awaitable[Any]]:
        """``fn`` for ``<verb>.<instance>``: only for the entry of the instance the subject names."""
        async def handle(body: Any, subject: str) -> Any:
            named = subject.rsplit(".", 1)[-1]
            if _entry_id(body) != named:
                raise PermissionDenied(f"registry {verb} on {subject} may change only the entry of {named!r}, "
                                       f"not {_entry_id(body)!r}", subject=subject)
            return await fn(body)

        return handle

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            info = PluginInfo.model_validate_json(msg.data)
            named = msg.subject[len(self.subjects.registry("heartbeat")) + 1:]
            if named and named != info.id:  # a beat on <verb>.<instance> is for that instance only
                self._refused.warning("heartbeat on %s for another instance (%s) ignored", msg.subject,
                                      bounded(info.id, 80))
                return
            known = self._cache.instances.get(info.id)
            if known is None:
                if info.health == Health.STOPPING:
                    return  # a last beat that lost the race with its own unregister: do not resurrect
                await self._put_instance(info)  # first sight: the registry was down, or forgot it
                await self._record_version(info)
                await self._announce(info, previous="absent")
                return
            try:
                await self._put_instance(info, last=known[1])
                if known[0].health != info.health:  # e.g. unhealthy → healthy: it beats again
                    await self._announce(info, previous=known[0].health.value)
            except nats.js.errors.KeyWrongLastSequenceError:
                # Changed since this replica looked: deleted by an unregister on another replica,
                # or expired. A last ("stopping") beat must not bring it back; a live one must.
                if info.health != Health.STOPPING:
                    await self._put_instance(info)
        except (ValidationError, nats.errors.Error) as exc:  # a heartbeat has no reply: log and go on
            log.warning("heartbeat ignored: %s: %s", type(exc).__name__, exc)

    async def _unregister(self, body: Any) -> bool:
        assert self._kv is not None
        ident = _str_field(body, "id")
        known = self._cache.instances.get(ident)
        await self._delete_instance(ident)
        log.info("unregistered %s", ident)
        if known is not None:
            await self._announce(known[0].model_copy(update={"health": Health.STOPPING}),
                                 previous=known[0].health.value, gone=True)
        return known is not None

    async def _get(self, body: Any) -> Any:
        key = _str_field(body, "key")
        spec = _range_field(body)
        now = time.time()
        if key in self._cache.instances:
            return self._current(self._cache.instances[key][0], now).model_dump(mode="json")
        candidates = [self._current(i, now) for i, _ in self._cache.instances.values()
                      if i.name == key and (not spec or version_matches(i.version, spec))]
        if not candidates:
            return None
        best = max(candidates, key=lambda i: (i.health == Health.HEALTHY, i.health in SERVING, i.started_at))
        return best.model_dump(mode="json")

    async def _list(self, body: Any) -> list[Any]:
        body = body or {}
        name = body.get("name") if isinstance(body, dict) else None
        healthy_only = bool(body.get("healthy_only")) if isinstance(body, dict) else False
        ids = bool(body.get("ids")) if isinstance(body, dict) else False  # only the instance ids (broadcasts)
        spec = _range_field(body)
        now = time.time()
        out = []
        for info, _ in sorted(self._cache.instances.values(), key=lambda p: (p[0].name, p[0].started_at)):
            if (name and info.name != name) or (spec and not version_matches(info.version, spec)):
                continue
            info = self._current(info, now)
            if healthy_only and info.health not in SERVING:  # a degraded instance still serves
                continue
            out.append(info.id if ids else info.model_dump(mode="json"))
        return out

    async def _list_versions(self, body: Any) -> list[Any]:
        name = body.get("name") if isinstance(body, dict) else None
        out = []
        for plugin, records in sorted(self._cache.versions.items()):
            if name and plugin != name:
                continue
            out += [r.model_dump(mode="json") for r in sorted(records.values(), key=lambda r: r.first_seen)]
        return out

    async def _sweep(self) -> None:
        """One sweep (run by :func:`every`): restart the watcher after a reconnect, mark late
        instances unhealthy, forget those silent for ``expire_after`` (only if unchanged since we looked)."""
        assert self._kv is not None
        if self.nc.stats["reconnects"] != self._watch_epoch and self._watcher is not None and self.nc.is_connected:
            try:  # _watch then starts a new watcher (and resets the epoch)
                await self._watcher.stop()  # type: ignore[no-untyped-call]
            except nats.errors.Error as exc:
                log.debug("watcher restart deferred: %s", exc)  # retried at the next sweep
        now = time.time()
        for ident, (info, rev) in list(self._cache.instances.items()):
            if info.health in SERVING and self._late(info, now):
                await self._mark_unhealthy(info, rev)
            if now - info.last_seen > self.expire_after and info.health != Health.FAILED:
                # (a failed instance stays listed, with its reason, until its agent unloads it)
                try:
                    await self._delete_instance(ident, last=rev)
                    log.info("forgot %s: silent for %.0fs", ident, now - info.last_seen)
                    await self._announce(info, previous=info.health.value, gone=True)
                except nats.js.errors.APIError:
                    # The revision moved on: it beat meanwhile (the watcher brings the news),
                    # or it is gone already, and then this cache must forget it too.
                    await self._forget_if_gone(ident)
                except nats.errors.Error as exc:
                    log.debug("sweep deferred: %s", exc)

    async def _mark_unhealthy(self, info: PluginInfo, rev: int) -> None:
        """Store the transition once (compare-and-set: one replica wins) and announce it."""
        assert self._store is not None
        changed = info.model_copy(update={"health": Health.UNHEALTHY,
                                          "health_reason": f"no heartbeat for {time.time() - info.last_seen:.1f}s"})
        try:
            new_rev = await self._store.update(registry_instance_key(info.id), dumps(changed.model_dump(mode="json")),
                                            last=rev)
        except nats.js.errors.KeyWrongLastSequenceError:
            return  # it beat meanwhile, or another replica stored the transition first
        except nats.errors.Error as exc:
            log.debug("health transition deferred: %s", exc)
            return
        self._cache.set_instance(changed, new_rev)
        log.warning("%s (%s) is unhealthy: no heartbeat for %.1fs", info.id, info.name, time.time() - info.last_seen)
        await self._announce(changed, previous=info.health.value)

    async def _announce(self, info: PluginInfo, *, previous: str, gone: bool = False) -> None:
        """Publish event ``mesh.health.<name>`` so dependants learn of the change (at most once)."""
        payload = {"id": info.id, "name": info.name, "version": info.version, "health": info.health.value,
                   "reason": info.health_reason, "previous": previous, "gone": gone, "last_error": info.last_error}
        try:
            await publish(self.nc, self.subjects.event(health_event(info.name)), dumps(payload),
                          headers=event_headers(_TAIL), what="health event")
        except (nats.errors.Error, PluginError) as exc:
            log.debug("health event not sent: %s", exc)

    async def _forget_if_gone(self, ident: str) -> None:
        assert self._store is not None
        try:
            await self._store.get(registry_instance_key(ident))
        except nats.js.errors.KeyNotFoundError as gone:
            rev = gone.entry.revision if gone.entry is not None and gone.entry.revision else 0
            self._cache.apply(registry_instance_key(ident), None, max(rev, self._cache.revision(ident) + 1), "DEL")


def _entry_id(body: Any) -> str:
    """The instance id a register or unregister body is about."""
    ident = body.get("id") if isinstance(body, dict) else None
    return ident if isinstance(ident, str) else ""


def _str_field(body: Any, field: str) -> str:
    if not isinstance(body, dict) or not isinstance(body.get(field), str):
        raise InvalidMessage(f"request body must be a JSON object with a string {field!r}")
    return str(body[field])


class _Cache:
    """A replica's view of the bucket. Every change carries its KV revision; older news loses."""

    def __init__(self) -> None:
        self.instances: dict[str, tuple[PluginInfo, int]] = {}  # id → (info, revision)
        self.versions: dict[str, dict[str, VersionRecord]] = {}
        self._revs: dict[str, int] = {}  # instance id → newest revision seen, deletes included

    def revision(self, ident: str) -> int:
        return self._revs.get(ident, 0)

    def set_instance(self, info: PluginInfo, revision: int) -> None:
        if revision > self._revs.get(info.id, 0):
            self._revs[info.id] = revision
            self.instances[info.id] = (info, revision)

    def apply(self, key: str, value: bytes | None, revision: int, operation: str | None) -> None:
        kind, _, ident = key.partition(".")
        deleted = operation in ("DEL", "PURGE")
        try:
            if kind == "instances":
                if revision and revision <= self._revs.get(ident, 0):
                    return  # already know something newer
                self._revs[ident] = revision
                if deleted:
                    self.instances.pop(ident, None)
                else:
                    self.instances[ident] = (PluginInfo.model_validate_json(value or b"{}"), revision)
            elif kind == "versions":
                if deleted:
                    self.versions.pop(ident, None)
                else:
                    raw = loads(value or b"")
                    self.versions[ident] = {v: VersionRecord.model_validate(r) for v, r in raw.items()}
        except (ValidationError, InvalidMessage, AttributeError) as exc:
            log.warning("ignored a malformed registry entry %s: %s", key, exc)


def _range_field(body: Any) -> str:
    spec = body.get("version") if isinstance(body, dict) else None
    if spec is None:
        return ""
    if not isinstance(spec, str):
        raise InvalidMessage("'version' must be a version range string such as '>=1.2,<2'")
    try:
        return check_range(spec)
    except ValueError as exc:
        raise InvalidMessage(str(exc)) from None
