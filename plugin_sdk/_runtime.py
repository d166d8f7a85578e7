"""``PluginRuntime``: serves one plugin instance on a NATS connection.

This is what a plugin process runs (``mesh run`` wraps it with process concerns: loading,
signals, exit codes) and what ``plugin_sdk.testing`` runs in-process. It lives in the SDK so a
plugin author's tests need nothing but ``plugin_sdk`` and a nats-server.

Order: ``initialize(context) → start() → subscribe (serve) → register → heartbeats``; then on
``stop()``: heartbeat "stopping" → drain subscriptions → await in-flight handlers → ``stop()`` →
``cleanup()`` (always) → unregister.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from . import _otel_metrics, _tracing
from ._config import Dependency, PluginConfig
from ._context import PluginContext, PluginMetrics, RuntimeInfo
from ._durable import Retry
from ._errors import (
    CommunicationError,
    ConnectionFailed,
    DependencyError,
    InitializationError,
    PayloadTooLarge,
    PluginError,
    ProtocolMismatch,
    RequestTimeout,
    ResourceError,
)
from ._logs import BoundedLog
from ._message import SERVING, ErrorInfo, Health, HealthCheck, Message, MessageKind, PluginInfo, Response
from ._messaging import PluginMessaging
from ._metrics import EndpointStats, ResourceSampler, RuntimeStats
from ._micro import subscribe_micro
from ._plugin import Plugin, PluginState
from ._registry import PluginRegistry
from ._state import OPEN_RETRY, StateStore, open_bucket, passing_open
from ._tasks import TaskOwner, every
from ._wire import (
    E_KIND,
    E_TIMEOUT,
    PROTOCOL_VERSION,
    Subjects,
    bounded,
    drain_all,
    dumps,
    error_reply,
    event_from,
    flush_subscriptions,
    header_block,
    health_event,
    hpub_command,
    message_from,
    message_from_msg,
    parse_envelope,
    send_reply,
    success_reply,
)

__all__ = ["PluginRuntime", "check_protocol", "new_instance_id"]


def check_protocol(config: PluginConfig) -> None:
    """InitializationError unless the plugin was built for the protocol major this side speaks."""
    if config.protocol.split(".")[0] != PROTOCOL_VERSION:
        raise InitializationError(
            f"{config.name} was built for mesh protocol {config.protocol}; this host speaks "
            f"{PROTOCOL_VERSION} (see docs/migration.md)", plugin=config.name)


def new_instance_id(name: str) -> str:
    return f"{name}-{secrets.token_hex(4)}"


class PluginRuntime:
    """Run ``plugin`` on ``nc`` until :meth:`stop`. Use as ``async with PluginRuntime(...)``."""

    def __init__(self, plugin: Plugin, nc: NATS, *, config: PluginConfig | None = None, prefix: str = "mesh",
                 instance_id: str | None = None, heartbeat_interval: float = 2.0,
                 logger: logging.Logger | None = None, supervision: dict[str, Any] | None = None,
                 register: bool = True) -> None:
        self.plugin = plugin
        self.nc = nc
        self.config = config or plugin.default_config()
        self.subjects = Subjects(prefix)
        self.instance_id = instance_id or new_instance_id(self.config.name)
        self.heartbeat_interval = heartbeat_interval
        #: ``agent``, ``restarts``, ``last_error`` as told by a supervising agent; shown in the registry.
        self.supervision = supervision or {}
        #: Register and heartbeat with the registry (off in ``plugin_sdk.testing``, which runs none).
        self.register = register
        self.log = logger or logging.getLogger(f"mesh.plugin.{self.config.name}")
        self.metrics = PluginMetrics()
        #: What the runtime measures: messages, errors and latency by kind and endpoint.
        self.stats = RuntimeStats()
        self.resources = ResourceSampler()
        self._retry = Retry.from_env(self.config.retry_for)
        self.registry = PluginRegistry(nc, prefix=prefix, retry=self._retry)
        # Registering at start and unregistering at stop wait briefly: heartbeats register an
        # instance anyway, and the registry forgets a silent one; neither may hold a start or stop up.
        self._lifecycle_registry = self.registry.with_retry(Retry(within=min(LIFECYCLE_RETRY, self._retry.within)))
        self.messaging = PluginMessaging(nc, prefix=prefix, source=self.config.name,
                                         source_instance=self.instance_id, permissions=self.config.permissions,
                                         registry=self.registry)
        self.started_at = time.time()
        #: Set when someone asked this instance to stop over ``<prefix>.control.<id>.stop``, or
        #: when :meth:`handle_plugin_error` wants a restart (then ``restart_requested`` is true).
        self.stop_requested = asyncio.Event()
        self.restart_requested = False
        self._health = Health.STARTING
        self._health_reason = ""
        #: When the instance first served (seconds since the epoch), and how long it took to get there.
        self.healthy_at: float | None = None
        self._start_called = 0.0
        self._instruments: _otel_metrics.MeshInstruments | None = None  # when OTel metrics are on
        #: The one owner of this instance's loops: heartbeats, the deadline watchdog, the OTel refresher.
        #: (Handler tasks are request-scoped: each lives in ``_inflight`` until it has replied.)
        self._tasks = TaskOwner(f"plugin {self.instance_id}", self.log, on_failure=self._loop_died)
        self._refresher: asyncio.Task[None] | None = None
        self._subs: list[Subscription] = []
        self._lanes: list[_EventLane] = []  # @on_event subscriptions on the direct path
        self._prebuilt = getattr(nc, "send_prebuilt", None)  # (a MeshClient: replies as protocol lines)
        # A broadcast's successful reply names this instance, always in the same header block.
        self._broadcast_block = header_block(success_reply(None, instance=self.instance_id)[1] or {})
        self._inflight: dict[asyncio.Task[None], float] = {}  # handler task → deadline (loop time)
        self._queue: deque[_Job] = deque()  # requests waiting for a handler slot, oldest first
        self._stopping_queue = False  # stop() is answering what is left: start nothing more
        self._expired: set[asyncio.Task[None]] = set()  # cancelled by the watchdog
        self._abandoned: set[asyncio.Task[None]] = set()  # cancelled by stop() after its drain timeout
        self._watchdog: asyncio.Task[None] | None = None
        #: Logs about what callers sent: bounded in size (bounded()) and in rate (this).
        self._bad_input = BoundedLog(self.log)
        self._loop: asyncio.AbstractEventLoop  # the loop start() ran on
        self._heartbeat: asyncio.Task[None] | None = None
        self._deaf = False  # the connection was found closed under us
        self._started = False
        self._stopped = False
        self._announced = False  # registered as "starting" while waiting for dependencies
        self.context: PluginContext | None = None

    # -- identity --------------------------------------------------------------------------

    def info(self) -> PluginInfo:
        c = self.config
        return PluginInfo(id=self.instance_id, name=c.name, version=c.version, description=c.description,
                          capabilities=list(c.capabilities), dependencies=list(c.dependencies),
                          health=self._health, health_reason=self._health_reason, host=socket.gethostname(),
                          pid=os.getpid(),
                          protocol=PROTOCOL_VERSION, started_at=self.started_at,
                          heartbeat_interval=self.heartbeat_interval, **self.supervision)

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> PluginRuntime:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        """Initialize, start, serve and register. On failure, cleanup runs and the error propagates."""
        if self._started:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._start_called = time.time()
        name = self.config.name
        try:
            # Two instances starting at once on a cluster both create the R3 bucket: JetStream can be
            # too busy (or electing) to answer one of them in time; that passes (seen in CI).
            kv = await Retry(within=min(OPEN_RETRY, self._retry.within), max_pause=0.5).run(
                lambda n: open_bucket(self.nc.jetstream(), self.subjects.state_bucket(name), create=True,
                                      description=f"state of plugin {name}"),
                what=f"the state bucket of {name}", retry_on=passing_open)
            state = StateStore(kv, plugin=name, max_value_size=self.config.max_payload, retry=self._retry)
            runtime = RuntimeInfo(instance_id=self.instance_id, host=socket.gethostname(), pid=os.getpid(),
                                  prefix=self.subjects.prefix, nats_url=str(self.nc.connected_url or ""),
                                  started_at=self.started_at, protocol=PROTOCOL_VERSION)
            self.context = PluginContext(runtime=runtime, config=self.config, logger=self.log, metrics=self.metrics,
                                         messaging=self.messaging, state=state, registry=self.registry,
                                         report_error=self.handle_plugin_error)
            self._check_protocol()
            await self._step("initialize", self.plugin.initialize, self.context)
            self.plugin.state = PluginState.INITIALIZED
            await self._await_dependencies()
            await self._step("start", self.plugin.start)
            await self._subscribe()
            self.plugin.state = PluginState.RUNNING
            self._health = Health.HEALTHY
            self.healthy_at = time.time()
            if _otel_metrics.enabled():
                self._instruments = _otel_metrics.MeshInstruments(self.metrics_snapshot)
                self._instruments.refresh()
                instruments = self._instruments

                async def refresh() -> None:
                    instruments.refresh()

                self._refresher = self._tasks.spawn(every(1.0, refresh, log=self.log, what="OTel metrics refresh"),
                                                    name="metrics")
        except BaseException:
            self.plugin.state = PluginState.FAILED
            await self._teardown_after_failure()
            if self._announced:  # it told the registry it was starting: take that back
                with contextlib.suppress(CommunicationError, nats.errors.Error):
                    await self._lifecycle_registry.unregister_plugin(self.instance_id)
            raise
        if not self.register:
            return
        await self.check_health()
        try:
            await self._lifecycle_registry.register_plugin(self.info())
        except CommunicationError as exc:
            self.log.warning("registry unavailable (%s); heartbeats will register this instance", exc)
        self._heartbeat = self._tasks.spawn(every(self.heartbeat_interval, self._beat, log=self.log, what="heartbeat"),
                                            name="heartbeats")

    def _check_protocol(self) -> None:
        check_protocol(self.config)

    async def _await_dependencies(self) -> None:
        """Until every required dependency has a healthy instance in its range; DependencyError at the timeout."""
        needed = [d for d in self.config.dependencies if not d.optional]
        if not needed:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.dependency_timeout
        next_note = loop.time() + 2.0
        next_beat = loop.time()
        while True:
            missing: list[Dependency] = []
            problem = ""
            for dep in needed:
                try:
                    if not await self._lifecycle_registry.list_plugins(dep.name, version=dep.version or None,
                                                                       healthy_only=True):
                        missing.append(dep)
                except CommunicationError as exc:
                    missing.append(dep)
                    problem = f"; the registry did not answer: {exc}"
            if not missing:
                self._health_reason = ""
                return
            now = loop.time()
            if now >= deadline:
                raise DependencyError(await self._describe_missing(missing) + problem, plugin=self.config.name)
            waiting = f"waiting for {', '.join(str(d) for d in missing)} ({deadline - now:.0f}s left)"
            if now >= next_note:
                self.log.info("%s %s", self.config.name, waiting)
                next_note = now + 5.0
            if self.register and now >= next_beat:  # `mesh ls` / `mesh load` show what it waits for, and why
                reasons = [f"{dep} ({await self._why_missing(dep)})" for dep in missing]
                self._health_reason = f"waiting for {', '.join(reasons)} ({deadline - now:.0f}s left)"
                self._announced = True
                with contextlib.suppress(CommunicationError, nats.errors.Error):
                    await self.registry.heartbeat(self.info())
                next_beat = now + self.heartbeat_interval
            await asyncio.sleep(0.2)

    async def _describe_missing(self, missing: list[Dependency]) -> str:
        parts = [f"{self.config.name} -> {dep} ({await self._why_missing(dep)})" for dep in missing]
        return (f"dependencies not met after {self.config.dependency_timeout:g}s: " + "; ".join(parts))

    async def _why_missing(self, dep: Dependency) -> str:
        """``running: 2.0.0; none in range`` or ``no healthy instance``, as the registry sees it now."""
        try:
            infos = await self._lifecycle_registry.list_plugins(dep.name, healthy_only=True)
            running = sorted({i.version for i in infos})
        except CommunicationError:
            running = []
        return f"running: {', '.join(running)}; none in range" if running else "no healthy instance"

    async def _watch_dependencies(self) -> None:
        """Tell the plugin (hook) when an instance of a dependency changes health."""
        names = {d.name for d in self.config.dependencies}
        for name in sorted(names):
            self._subs.append(await self.nc.subscribe(self.subjects.event(health_event(name)),
                                                      cb=self._on_dependency_event))

    async def _on_dependency_event(self, msg: Msg) -> None:
        try:
            event = message_from_msg(msg, target=self.subjects.event_type(msg.subject), kind=MessageKind.EVENT)
            payload = event.payload if isinstance(event.payload, dict) else {}
            name, health = str(payload.get("name", "")), str(payload.get("health", ""))
            if health != "healthy":
                self.log.warning("dependency %s instance %s is %s%s", name, payload.get("id"), health,
                                 " (gone)" if payload.get("gone") else "")
            await self.plugin.on_dependency_health(name, health, event)
        except Exception as exc:  # the hook failing must not stop the subscription: handled by policy
            await self.handle_plugin_error(exc, where="on_dependency_health")

    async def handle_plugin_error(self, error: BaseException, *, where: str = "plugin code") -> None:
        """The specification's ``handle_plugin_error`` policy, for failures outside a request:

        - :class:`InitializationError` → restart: this instance stops and exits non-zero, and its
          agent starts it again (with backoff);
        - :class:`ConnectionFailed` (a :class:`CommunicationError` about the connection itself) →
          reset the connection: nats-py reconnects and resubscribes everything;
        - anything else → logged with context, and the plugin keeps serving.

        Plugins reach it as ``context.report_error(exc)`` for errors in their own background work.
        """
        if isinstance(error, InitializationError):
            self.log.error("restart requested from %s: %s: %s", where, type(error).__name__, error)
            self.restart_requested = True
            self.stop_requested.set()
        elif isinstance(error, ConnectionFailed):
            self.log.warning("resetting the NATS connection after %s in %s: %s", type(error).__name__, where, error)
            self.metrics.increment("connection_resets")
            await self.nc.force_reconnect()
        else:
            self.log.warning("%s raised %s: %s", where, type(error).__name__, error,
                             exc_info=self.log.isEnabledFor(logging.DEBUG))

    async def _step(self, what: str, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        try:
            await fn(*args)
        except InitializationError:
            raise
        except Exception as exc:  # re-raised, typed, with the plugin named
            raise InitializationError(f"{self.config.name}.{what}() failed: {type(exc).__name__}: {exc}",
                                      plugin=self.config.name) from exc

    async def _teardown_after_failure(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        self._subs.clear()
        await self.messaging.close()
        await self._cleanup()
        self._stopped = True

    async def _cleanup(self) -> bool:
        try:
            await self.plugin.cleanup()
            return True
        except Exception:  # cleanup must not mask the reason we are stopping; logged with traceback
            self.log.exception("%s.cleanup() raised", self.config.name)
            return False

    async def stop(self, *, drain_timeout: float = 10.0) -> bool:
        """Drain, stop, clean up, unregister. Returns ``False`` if ``stop`` or ``cleanup`` raised.

        Safe to call twice.
        """
        if self._stopped or not self._started:
            return True
        self._stopped = True
        self._health = Health.STOPPING
        self.plugin.state = PluginState.STOPPING
        await self._tasks.cancel(self._heartbeat)
        await self._tasks.cancel(self._refresher)
        if self._instruments is not None:
            self._instruments.latest = {}  # the meter keeps its callbacks: a stopped instance reports nothing
        if self.register:
            with contextlib.suppress(CommunicationError, nats.errors.Error):
                await self.registry.heartbeat(self.info())  # "stopping": broadcasts stop expecting us
        # Stop taking messages, let the subscriptions' queued callbacks run, then await handlers.
        if not await drain_all(self._subs, timeout=drain_timeout):
            self.log.warning("subscriptions did not drain within %.1fs; unsubscribed", drain_timeout)
        self._subs.clear()
        await self._finish_requests(drain_timeout)
        await self._finish_events(drain_timeout)
        await self._tasks.close()  # the deadline watchdog, last: deadlines hold while draining
        self._watchdog = None
        await self.messaging.close()
        ok = True
        try:
            await self.plugin.stop()
        except Exception:  # stop failing must not skip cleanup; logged with traceback
            self.log.exception("%s.stop() raised", self.config.name)
            ok = False
        ok = await self._cleanup() and ok
        self.plugin.state = PluginState.STOPPED
        if self.register:
            try:
                await self._lifecycle_registry.unregister_plugin(self.instance_id)
            except (CommunicationError, nats.errors.Error) as exc:
                self.log.warning("could not unregister %s: %s", self.instance_id, exc)
        return ok

    async def _finish_requests(self, timeout: float) -> None:
        """Let running and queued requests finish within ``timeout``; then answer the rest, typed."""
        deadline = self._loop.time() + timeout
        while self._inflight and (remaining := deadline - self._loop.time()) > 0:
            await asyncio.wait(set(self._inflight), timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        self._stopping_queue = True
        running = [t for t in self._inflight if not t.done()]
        for task in running:
            self._abandoned.add(task)
            task.cancel()
        left, self._queue = list(self._queue), deque()
        for job in left:
            self._start(job, refuse=CommunicationError(
                f"{self.config.name} ({self.instance_id}) stopped before handling the request",
                plugin=self.config.name))
        if running or left:
            self.log.warning("stopped with %d handlers still running after %.1fs and %d requests queued: "
                             "each was answered with an error", len(running), timeout, len(left))
        if self._inflight:
            await asyncio.wait(set(self._inflight))

    async def _finish_events(self, timeout: float) -> None:
        """Let the events already received run through their handlers within ``timeout``; then cancel."""
        running = [lane.task for lane in self._lanes if lane.task is not None and not lane.task.done()]
        if running:
            _, late = await asyncio.wait(running, timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                left = sum(len(lane.queue) for lane in self._lanes)
                self.log.warning("event handlers did not finish within %.1fs; cancelled (%d queued events not "
                                 "handled)", timeout, left)
                await asyncio.wait(late)
        self._lanes.clear()

    # -- serving ---------------------------------------------------------------------------

    async def _subscribe(self) -> None:
        s, name = self.subjects, self.config.name
        # One endpoint (NATS micro's word) per subscription that answers: counted separately. On a
        # MeshClient they are served on the direct path (the reader dispatches: no queue, no Msg).
        direct = getattr(self.nc, "subscribe_direct", None)
        for ep_name, subject, queue, broadcast in (
                ("plugin", s.plugin(name), name, False),
                ("instance", s.instance(name, self.instance_id), None, False),
                ("broadcast", s.broadcast, None, True),
                ("broadcast_to", s.broadcast_to(name), None, True)):
            ep = self.stats.endpoint(ep_name, subject, queue)
            if direct is not None:
                self._subs.append(await direct(subject, functools.partial(self._on_direct, ep, broadcast),
                                               queue=queue or ""))
            else:
                cb = self._on_broadcast if broadcast else self._on_request
                self._subs.append(await self.nc.subscribe(subject, queue=queue or "", cb=functools.partial(cb, ep)))
        self._subs.append(await self.nc.subscribe(s.control(self.instance_id, "*"), cb=self._on_control))
        await self._watch_dependencies()
        for attr, pattern in self.plugin._event_handlers.items():
            self.messaging.check_subscribe(pattern)
            handler = getattr(self.plugin, attr)
            ep = self.stats.endpoint(f"event_{attr}", s.event(pattern))
            lane = _EventLane(self, handler, ep, s.event(pattern))
            self._lanes.append(lane)
            if direct is not None:
                lane.sub = await direct(s.event(pattern), lane.on_direct)
            else:
                lane.sub = await self.nc.subscribe(s.event(pattern), cb=lane.on_msg)
            self._subs.append(lane.sub)
        # NATS micro (ADR-32) discovery: $SRV.PING/INFO/STATS, last so INFO lists every endpoint.
        self._subs += await subscribe_micro(self)
        await flush_subscriptions(self.nc)  # the server has every subscription before we call ourselves serving
        confirm = getattr(self.nc, "confirm_subscriptions", None)  # (a MeshClient: the server's word on each)
        if confirm is not None:
            await confirm([sub.subject for sub in self._subs])

    async def _on_request(self, ep: EndpointStats, msg: Msg) -> None:
        self._dispatch(msg.subject, msg.reply, msg.data, msg.headers, ep, broadcast=False)

    async def _on_broadcast(self, ep: EndpointStats, msg: Msg) -> None:
        if self.messaging.is_own_broadcast(msg.reply):
            return  # our own broadcast, known by the reply inbox we own (not by a field anyone can set)
        self._dispatch(msg.subject, msg.reply, msg.data, msg.headers, ep, broadcast=True)

    def _on_direct(self, ep: EndpointStats, broadcast: bool, subject: bytes, reply: bytes, data: bytes,
                   headers: dict[str, str] | None) -> None:
        """A request from the reader (the direct path: ``MeshClient.subscribe_direct``)."""
        reply_to = reply.decode()
        if broadcast and self.messaging.is_own_broadcast(reply_to):
            return
        self._dispatch(subject.decode(), reply_to, data, headers, ep, broadcast=broadcast)

    def _dispatch(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None, ep: EndpointStats, *,
                  broadcast: bool) -> None:
        """Start the request now if a handler slot is free, else queue it (bounded).

        nats-py runs one subscription's callbacks one at a time, so this never waits: each request
        gets its own task. Its deadline counts from *now*, its arrival: time spent queued behind
        ``max_concurrency`` busy handlers is the caller's time too, and a request whose deadline
        passed in the queue is answered RequestTimeout without running (``expired`` in the metrics).
        """
        env = parse_envelope(headers)
        timeout = min(_timeout(env.get(E_TIMEOUT), self.config.handler_timeout), self.config.handler_timeout)
        job = _Job(subject, reply, data, headers, env, ep, broadcast, timeout, self._loop.time() + timeout)
        if len(self._inflight) < self.config.max_concurrency and not self._queue:
            self._start(job)
        elif len(self._queue) < self.config.max_queued:
            self._queue.append(job)
        else:
            self.stats.refused += 1
            self._start(job, refuse=ResourceError(
                f"{self.config.name} is overloaded: {len(self._inflight)} handlers busy and {len(self._queue)} "
                f"requests queued (max_queued = {self.config.max_queued})", plugin=self.config.name))

    def _start(self, job: _Job, *, refuse: PluginError | None = None) -> None:
        """Run ``job`` in a task of its own; with ``refuse``, answer it with that error instead."""
        task = start_task(self._handle(job, refuse), self._loop)
        if not task.done():  # (3.12+: a handler that never waits has already finished, in place)
            self._inflight[task] = job.deadline
            task.add_done_callback(self._done)
            if self._watchdog is None:
                self._watchdog = self._tasks.spawn(self._watch_deadlines(), name="deadlines")

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task, None)
        self._expired.discard(task)
        self._abandoned.discard(task)
        self._start_queued()

    def _start_queued(self) -> None:
        while self._queue and len(self._inflight) < self.config.max_concurrency and not self._stopping_queue:
            self._start(self._queue.popleft())

    async def _watch_deadlines(self) -> None:
        """Cancel handlers past their deadline: one timer for all, rather than one per message.

        It ends once no handler runs and none is queued (an idle host does not wake 20 times a
        second for nothing); the next handler that has to wait starts it again."""
        while True:
            await asyncio.sleep(DEADLINE_TICK)
            if not self._inflight and not self._queue:
                self._watchdog = None
                return
            now = self._loop.time()
            for task, deadline in list(self._inflight.items()):
                if deadline <= now and task not in self._expired and not task.done():
                    self._expired.add(task)
                    task.cancel()
            while self._queue and self._queue[0].deadline <= now:  # expired while queued: answer, don't run
                self._start(self._queue.popleft())

    async def _handle(self, job: _Job, refuse: PluginError | None = None) -> None:
        """Answer one request: admit it, run its handler, count it, reply. Every failure is a typed reply."""
        started = time.perf_counter()
        kind = "broadcast" if job.broadcast else job.env.get(E_KIND, "command")
        if kind not in _KINDS:
            kind = "command"  # an unknown kind is refused by _admit; it must not grow the stats
        message_id = ""
        reply_headers: dict[str, str] | None
        try:
            message = self._admit(job, refuse)
            message_id = message.id
            if _tracing.enabled():
                result = await self._run(job, message)
            else:  # (_run without its span: the hot path)
                result = await self._invoke(message, job.timeout)
            body, reply_headers, failure = self._reply_to(result, message_id, job.broadcast)
        except Exception as exc:  # the handler's failure becomes the caller's typed error; we keep serving
            self._log_failure(exc, job.subject)
            info = ErrorInfo.from_exception(exc, plugin=self.config.name)
            failure = bounded(f"{info.type}: {info.message}")
            body, reply_headers = error_reply(info, message_id=message_id, instance=self.instance_id)
        elapsed = time.perf_counter() - started
        self.stats.record(job.ep, kind, elapsed, failure)
        if self._instruments is not None:
            self._instruments.record(kind, elapsed)
        if job.reply:
            try:
                if self._prebuilt is not None and failure is None:  # (send_reply's common cases inline)
                    if reply_headers is None and len(body) <= self.nc.max_payload:  # a direct success: no header
                        await self._prebuilt(f"PUB {job.reply}  {len(body)}\r\n".encode() + body + b"\r\n",
                                             len(body))
                        return
                    block = self._broadcast_block  # a broadcast's success: this instance's block, built once
                    if job.broadcast and len(block) + len(body) <= self.nc.max_payload:
                        await self._prebuilt(hpub_command(job.reply, "", block, body), len(body))
                        return
                await send_reply(self.nc, job.reply, body, reply_headers, message_id=message_id,
                                 instance=self.instance_id, plugin=self.config.name)
            except nats.errors.Error as exc:
                self._bad_input.warning("could not reply on %s: %s", bounded(job.subject, 200), exc)

    def _admit(self, job: _Job, refuse: PluginError | None) -> Message:
        """The request as a :class:`Message`, or the typed error that answers it without running it."""
        if refuse is not None:
            raise refuse
        if (now := self._loop.time()) >= job.deadline:
            self.stats.expired += 1
            raise RequestTimeout(f"{self.config.name} did not start the request within its {job.timeout:g}s "
                                 f"deadline: it waited {now - job.deadline + job.timeout:.2f}s for one of "
                                 f"{self.config.max_concurrency} handler slots", plugin=self.config.name)
        proto = job.env.get("v", PROTOCOL_VERSION)
        if proto.split(".")[0] != PROTOCOL_VERSION:
            raise ProtocolMismatch(f"{self.config.name} speaks mesh protocol {PROTOCOL_VERSION}, "
                                   f"the message uses {bounded(proto, 40)}", plugin=self.config.name)
        if len(job.data) > self.config.max_payload:
            raise PayloadTooLarge(f"message of {len(job.data)} bytes exceeds {self.config.name}'s "
                                  f"max_payload of {self.config.max_payload}", plugin=self.config.name)
        return message_from(job.data, job.headers, target=self.config.name, env=job.env)

    async def _run(self, job: _Job, message: Message) -> Any:
        """The plugin's handler, under a CONSUMER span when tracing is on."""
        if not _tracing.enabled():  # (the span's attributes are not worth building otherwise: the hot path)
            return await self._invoke(message, job.timeout)
        with _tracing.consume(job.subject, job.headers, link=job.broadcast, attributes={
                "messaging.consumer.group.name": job.ep.queue_group,  # (the plugin's endpoint: its name)
                "messaging.message.id": message.id,
                "mesh.operation": message.operation}):
            return await self._invoke(message, job.timeout)

    def _reply_to(self, result: Any, message_id: str,
                  broadcast: bool) -> tuple[bytes, dict[str, str] | None, str | None]:
        """Body, headers and failure text (``None`` on success) of the reply to a handler's ``result``."""
        if isinstance(result, Response) and result.error is not None:
            body, headers = error_reply(result.error, message_id=message_id, instance=self.instance_id)
            return body, headers, bounded(f"{result.error.type}: {result.error.message}")
        body, maybe_headers = self._success(result.result if isinstance(result, Response) else result, broadcast)
        return body, maybe_headers, None

    async def _invoke(self, message: Message, timeout: float) -> Any:
        try:
            return await self.plugin.handle_message(message)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task in self._expired:
                task.uncancel()  # the watchdog's cancel: answer it as a timeout
                raise RequestTimeout(f"{self.config.name} handler did not finish within {timeout:g}s",
                                     plugin=self.config.name) from None
            if task is not None and task in self._abandoned:
                task.uncancel()  # stop() gave up waiting: tell the caller now rather than let it time out
                raise CommunicationError(f"{self.config.name} ({self.instance_id}) stopped before its handler "
                                         "finished", plugin=self.config.name) from None
            raise

    def _success(self, result: Any, broadcast: bool) -> tuple[bytes, dict[str, str] | None]:
        # A direct reply needs no header (the caller knows what it asked); a broadcast reply names
        # its instance, so the sender can tell who answered and who is missing.
        # Its size is checked as it goes out (send_reply): too big becomes a PayloadTooLarge error reply.
        try:
            return success_reply(result, instance=self.instance_id if broadcast else None)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{self.config.name} returned a value that is not JSON-serialisable: {exc}") from None

    def _log_failure(self, exc: BaseException, subject: str) -> None:
        # Bounded: the text may echo what a caller sent (any NATS client can send anything).
        if isinstance(exc, PluginError):
            self._bad_input.info("%s on %s: %s", type(exc).__name__, bounded(subject, 200), bounded(str(exc)))
        else:
            self._bad_input.warning("handler raised %s on %s: %s", type(exc).__name__, bounded(subject, 200),
                                    bounded(str(exc)), exc_info=self.log.isEnabledFor(logging.DEBUG))

    async def _on_control(self, msg: Msg) -> None:
        verb = msg.subject.rsplit(".", 1)[-1]
        result: Any
        if verb == "health":
            await self.check_health()
            result = self.info().model_dump(mode="json")
        elif verb == "metrics":
            result = self.metrics_snapshot()
        elif verb == "stop":
            self.stop_requested.set()
            result = {"stopping": self.instance_id}
        else:
            body, headers = error_reply(ErrorInfo(type="UnknownOperation", code=404,
                                                  message=f"unknown control verb {bounded(verb, 80)!r}"),
                                        message_id="", instance=self.instance_id)
            if msg.reply:
                await send_reply(self.nc, msg.reply, body, headers, instance=self.instance_id, plugin=self.config.name)
            return
        if msg.reply:
            await send_reply(self.nc, msg.reply, dumps(result), None, instance=self.instance_id,
                             plugin=self.config.name)

    async def check_health(self) -> HealthCheck:
        """Run the plugin's health check (bounded in time) and take its verdict, while serving."""
        if self._health not in SERVING and self._health != Health.UNHEALTHY:
            return HealthCheck(status=self._health, reason=self._health_reason)  # starting, stopping
        limit = min(5.0, max(1.0, self.heartbeat_interval))
        try:
            async with asyncio.timeout(limit):
                check = await self.plugin.health_check()
            if not isinstance(check, HealthCheck):
                raise TypeError(f"health_check() returned {type(check).__name__}, not HealthCheck")
            if check.status not in (Health.HEALTHY, Health.DEGRADED, Health.UNHEALTHY):
                raise ValueError(f"health_check() may say healthy, degraded or unhealthy, not {check.status.value}")
        except TimeoutError:
            check = HealthCheck.unhealthy(f"health_check() did not answer within {limit:g}s")
        except Exception as exc:  # a failing check is an answer: unhealthy, with the error as the reason
            check = HealthCheck.unhealthy(f"health_check() raised {type(exc).__name__}: {exc}")
        if self._health not in SERVING and self._health != Health.UNHEALTHY:
            return HealthCheck(status=self._health, reason=self._health_reason)  # stop() began meanwhile
        if check.status == Health.HEALTHY and (saturated := self.saturation()):
            check = HealthCheck.degraded(saturated)
        if (check.status, check.reason) != (self._health, self._health_reason):
            log = self.log.info if check.status == Health.HEALTHY else self.log.warning
            log("%s is %s%s", self.instance_id, check.status.value, f": {check.reason}" if check.reason else "")
        self._health, self._health_reason = check.status, check.reason
        return check

    def saturation(self) -> str:
        """Why this instance is saturated (every handler slot busy, requests waiting), or ``""``."""
        if not self._queue:
            return ""
        oldest = self._loop.time() - (self._queue[0].deadline - self._queue[0].timeout)
        return (f"saturated: {len(self._inflight)}/{self.config.max_concurrency} handlers busy, "
                f"{len(self._queue)} requests queued (oldest {oldest:.1f}s)")

    def _dropped(self) -> dict[str, int]:
        """Messages each of our subscriptions lost as a slow consumer (counted by MeshClient)."""
        counts: dict[str, int] = getattr(self.nc, "dropped", {})
        return {sub.subject: counts[sub.subject] for sub in self._subs if counts.get(sub.subject)}

    def metrics_snapshot(self) -> dict[str, Any]:
        """What ``<prefix>.control.<instance>.metrics`` answers (see docs/subjects.md)."""
        c, now = self.config, time.time()
        healthy_at = self.healthy_at
        return {
            "instance": self.instance_id, "name": c.name, "version": c.version, "host": socket.gethostname(),
            "pid": os.getpid(), "health": self._health.value, "health_reason": self._health_reason,
            "started_at": self.started_at, "uptime_s": round(now - self.started_at, 3),
            # process start → serving (what an operator waits for), and start() → serving (the plugin's part)
            "load_time_s": round(healthy_at - self.resources.created, 3) if healthy_at else None,
            "start_time_s": round(healthy_at - self._start_called, 3) if healthy_at else None,
            "restarts": int(self.supervision.get("restarts", 0)), "agent": self.supervision.get("agent", ""),
            "inflight": len(self._inflight), "max_concurrency": c.max_concurrency, "queued": len(self._queue),
            "dropped": self._dropped(),
            "permission_denied": {f"{op} {subject}": n for (op, subject), n in getattr(self.nc, "denied", {}).items()},
            **self.stats.snapshot(), "resources": self.resources.sample(), "custom": self.metrics.snapshot(),
        }

    async def _beat(self) -> None:
        """One heartbeat: health check, then tell the registry (run by :func:`every`)."""
        if self.nc.is_closed:
            if not self._deaf:
                # Closed under us (not by stop()): alive but deaf is the one state we must not be in.
                self._deaf = True
                self.log.error("the NATS connection of %s is closed (%s); stopping so that it is restarted",
                               self.instance_id, getattr(self.nc, "last_error", None) or "no error given")
                self._restart(f"{self.instance_id}'s NATS connection is closed")
            return
        await self.check_health()
        try:
            await self.registry.heartbeat(self.info())
        except (nats.errors.Error, CommunicationError) as exc:  # reconnecting: the next beat will try again
            self.log.debug("heartbeat not sent: %s", exc)

    def _restart(self, why: str) -> None:
        """Stop this instance and exit so that its agent starts it again (exit code 75)."""
        self.log.warning("%s stops to be restarted: %s", self.instance_id, why)
        self.restart_requested = True
        self.stop_requested.set()

    def _loop_died(self, name: str, exc: BaseException) -> None:
        # A loop of ours ended by surprise (logged with its traceback by TaskOwner): without it this
        # instance cannot keep its promises (deadlines, heartbeats), so it stops, loudly, to be restarted.
        if not self._stopped:
            self._restart(f"{name} died")


_KINDS = frozenset({"command", "query", "event"})

#: How often the deadline watchdog looks: handler timeouts are precise to about this.
DEADLINE_TICK = 0.05
#: Seconds the registry calls of a start or a stop (register, unregister, dependency polls) retry.
LIFECYCLE_RETRY = 2.0


def start_task(coro: Coroutine[Any, Any, None], loop: asyncio.AbstractEventLoop) -> asyncio.Task[None]:
    """A task that, on Python 3.12+, runs eagerly: a handler that never waits finishes in place.

    Through ``asyncio.eager_task_factory(loop, coro)``, which passes the loop: ``asyncio.Task(coro,
    eager_start=True)`` without ``loop=`` fails on 3.12 and 3.13 inside nats-py's callback, where
    nobody sees it (no plugin answered anything there once).
    """
    if _EAGER is not None:
        task: asyncio.Task[None] = _EAGER(loop, coro)
        return task
    return loop.create_task(coro)


#: ``asyncio.eager_task_factory`` (Python 3.12+), else None.
_EAGER: Callable[[asyncio.AbstractEventLoop, Coroutine[Any, Any, None]], asyncio.Task[None]] | None = getattr(
    asyncio, "eager_task_factory", None)


#: Successful events an event lane counts at once (see :meth:`_EventLane._run`).
_BURST = 256


class _EventLane:
    """One ``@on_event`` subscription: its events, handled one at a time and in order (as nats-py
    runs a subscription's callbacks), in a task that lives while there are any. On a MeshClient
    the reader hands them over directly; on another client, the subscription's callback does.

    The first event of a burst starts the task; the rest queue behind it. Bounded like a nats-py
    subscription's pending queue: past it events are dropped and counted as a slow consumer's
    (``dropped`` in the metrics).
    """

    __slots__ = ("ep", "handler", "pending_bytes", "queue", "runtime", "sub", "subject", "task")

    def __init__(self, runtime: PluginRuntime, handler: Callable[[Message], Awaitable[Any]], ep: EndpointStats,
                 subject: str) -> None:
        self.runtime, self.handler, self.ep, self.subject = runtime, handler, ep, subject
        self.queue: deque[tuple[str, bytes, dict[str, str] | None]] = deque()
        self.pending_bytes = 0
        self.task: asyncio.Task[None] | None = None
        self.sub: Subscription | None = None

    def on_direct(self, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None) -> None:
        if self.task is None:
            # Not eager (as requests are on 3.12+): the events behind this one in the same read
            # queue up before the task runs, and it takes them in one go (measured: eager, 3.13
            # made a task per event, and delivered a fifth fewer).
            self.task = self.runtime._loop.create_task(self._run(subject.decode(), data, headers))
            return
        sub = self.sub  # (its limits: nats-py's for a subscription, settable as on any)
        msgs_limit, bytes_limit = (sub._pending_msgs_limit, sub._pending_bytes_limit) if sub is not None else (0, 0)
        if (0 < msgs_limit <= len(self.queue)) or (0 < bytes_limit <= self.pending_bytes + len(data)):
            self._drop(subject, reply)
            return
        self.queue.append((subject.decode(), data, headers))
        self.pending_bytes += len(data)

    async def on_msg(self, msg: Msg) -> None:
        """The same from a nats-py subscription's callback (a client that is not a MeshClient)."""
        self.on_direct(msg.subject.encode(), (msg.reply or "").encode(), msg.data, msg.headers)

    async def _run(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        """Each event to the handler, in order: counted, traced when tracing is on, failures by policy.

        Successes are counted per burst (at its end, or every :data:`_BURST` events): one
        ``record_many`` instead of a ``record`` per event. A failure is counted as it happens."""
        runtime, handler, ep, queue = self.runtime, self.handler, self.ep, self.queue
        stats, offset, perf_counter = runtime.stats, runtime.subjects.event_offset, time.perf_counter
        done: list[float] = []
        try:
            while True:
                started = perf_counter()
                try:
                    event = event_from(data, headers, subject[offset:])
                    if _tracing.enabled():
                        with _tracing.consume(subject, headers, link=True,
                                              attributes={"messaging.message.id": event.id}):
                            await handler(event)
                    else:
                        await handler(event)
                    done.append(perf_counter() - started)
                except Exception as exc:  # one bad event must not stop the subscription: handled by policy
                    stats.record(ep, "event", perf_counter() - started, f"{type(exc).__name__}: {exc}")
                    await runtime.handle_plugin_error(
                        exc, where=f"event handler {handler.__name__} on {bounded(subject, 200)}")
                if not queue:
                    return
                if len(done) >= _BURST:
                    stats.record_many(ep, "event", done)
                    done.clear()
                subject, data, headers = queue.popleft()
                self.pending_bytes -= len(data)
        finally:
            stats.record_many(ep, "event", done)
            self.task = None

    def _drop(self, subject: bytes, reply: bytes) -> None:
        # Reported as nats-py reports a slow consumer: MeshClient counts it by subscription and logs per burst.
        note = getattr(self.runtime.nc, "note_async_error", None)
        if note is not None and self.sub is not None:
            note(nats.errors.SlowConsumerError(subject=subject.decode(), reply=reply.decode(), sid=self.sub._id,
                                               sub=self.sub))


@dataclass(slots=True)
class _Job:
    """One request on its way through the runtime: received, maybe queued, then handled."""

    subject: str
    reply: str
    data: bytes
    headers: dict[str, str] | None
    env: dict[str, str]
    ep: EndpointStats
    broadcast: bool
    timeout: float  # seconds it may take, from its arrival
    deadline: float  # loop time: arrival + timeout


def _timeout(raw: str | None, default: float) -> float:
    if raw:
        try:
            value = float(raw)
            if value > 0:
                return value
        except ValueError:
            pass
    return default
