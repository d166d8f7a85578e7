"""What every long-running mesh process shares: stopping on signals, answering JSON requests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry.trace import Span
from pydantic import ValidationError

from plugin_sdk import ConfigError, ErrorInfo, InvalidMessage, PluginError
from plugin_sdk.host import error_reply, loads, send_reply, start_task, success_reply, tracing

__all__ = ["json_handler", "stop_on_signals", "wait_any"]


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event | None = None) -> Iterator[asyncio.Event]:
    """SIGINT and SIGTERM set ``stop`` (a new event unless given) while the block runs."""
    event = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, event.set)
    try:
        yield event
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def wait_any(*events: asyncio.Event) -> asyncio.Event:
    """Wait until one of ``events`` is set; return it (e.g. a stop signal or a service's ``failed``)."""
    waiters = {asyncio.ensure_future(e.wait()): e for e in events}
    try:
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        return waiters[next(iter(done))]
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


async def subscribe_handler(nc: NATS, subject: str, handler: Callable[[Msg], Coroutine[Any, Any, None]], *,
                            queue: str, running: set[asyncio.Task[None]], log: logging.Logger) -> Subscription:
    """Subscribe ``handler`` (a :func:`json_handler`) to ``subject``, for requests that may run side by
    side (reads). On a MeshClient it is served on the direct path: the reader hands each request
    over, and it runs in a task of its own (eager on 3.12+, so one that never waits answers in
    place), kept in ``running`` until it ends; no queue and no task hop of nats-py's. Elsewhere, as
    nats-py's callback."""
    direct = getattr(nc, "subscribe_direct", None)
    if direct is None:
        return await nc.subscribe(subject, queue=queue, cb=handler)
    loop = asyncio.get_running_loop()

    def ended(task: asyncio.Task[None]) -> None:
        running.discard(task)
        if not task.cancelled() and task.exception() is not None:  # (json_handler answers every failure)
            log.error("%s: handler raised", subject, exc_info=task.exception())

    def on_request(subj: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None) -> None:
        task = start_task(handler(Msg(_client=nc, subject=subj.decode(), reply=reply.decode(), data=data,
                                      headers=headers)), loop)
        if task.done():
            ended(task)
        else:
            running.add(task)
            task.add_done_callback(ended)

    sub: Subscription = await direct(subject, on_request, queue=queue)
    return sub


def json_handler(nc: NATS, service: str, verb: str, fn: Callable[..., Awaitable[Any]], *, instance: str,
                 log: logging.Logger, group: str | None = None, with_subject: bool = False,
                 span_subject: str | None = None) -> Callable[[Msg], Coroutine[Any, Any, None]]:
    """A subscription callback: JSON request in, ``fn``'s result out, every failure as a typed error.

    ``service`` names the answerer in errors (``ErrorInfo.plugin``); ``instance`` goes in the reply
    envelope's ``inst``. With tracing on, each request runs under a CONSUMER span
    (``process <subject>``), the child of the caller's ``traceparent``; ``group`` is the queue
    group it is served through (``messaging.consumer.group.name``). With ``with_subject``, ``fn``
    is called as ``fn(body, subject)`` (for handlers whose subject carries an argument), and
    ``span_subject`` names its spans instead of each message's subject (span names stay few).
    """

    async def answer(msg: Msg, span: Span | None) -> tuple[bytes, dict[str, str] | None]:
        try:
            body = loads(msg.data, what=f"{service} {verb} request")
            result = await (fn(body, msg.subject) if with_subject else fn(body))
            return success_reply(result, instance=instance)
        except Exception as exc:  # every failure becomes the caller's typed error (never a silent timeout)
            err: BaseException = exc
            if isinstance(exc, ValidationError):
                first = exc.errors()[0]
                err = InvalidMessage(f"{service} {verb}: {'.'.join(map(str, first['loc']))}: {first['msg']}")
            elif isinstance(exc, ValueError):
                err = ConfigError(str(exc))
            if isinstance(err, PluginError | nats.errors.Error):
                log.info("%s %s refused: %s: %s", service, verb, type(err).__name__, err)
            else:
                log.exception("%s %s failed", service, verb)
            tracing.failed(span, err)
            return error_reply(ErrorInfo.from_exception(err, plugin=service), message_id="", instance=instance)

    async def handler(msg: Msg) -> None:
        with tracing.consume(span_subject or msg.subject, msg.headers,  # (a no-op yielding None when tracing is off)
                              attributes={"messaging.consumer.group.name": group}) as span:
            body, headers = await answer(msg, span)
        if msg.reply:
            with contextlib.suppress(nats.errors.Error):  # closing or reconnecting: the asker times out
                await send_reply(nc, msg.reply, body, headers, instance=instance, plugin=service)

    return handler
