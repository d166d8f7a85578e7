"""Tiny plugins the multi-process tests run with `mesh run testplugins:<Class>`."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from plugin_sdk import (
    HealthCheck,
    InitializationError,
    Message,
    Plugin,
    PluginConfig,
    PluginContext,
    ResourceError,
    command,
    on_event,
    query,
)


class Relay(Plugin):
    """Forwards its payload to the plugin named in payload['to'] and wraps the answer."""

    name = "relay"
    version = "1.0.0"

    async def handle_message(self, message: Message) -> Any:
        assert self.context is not None
        reply = await self.context.messaging.send_message(message.payload["to"], message.payload["body"],
                                                          operation=message.payload.get("op"))
        return {"via": self.context.runtime.instance_id, "reply": reply.result}


class Faulty(Plugin):
    """Misbehaves on request, to prove the caller gets a typed error and the plugin keeps serving."""

    name = "faulty"
    version = "0.3.0"

    @command("boom")
    async def boom(self, message: Message) -> Any:
        raise ValueError("kaboom")

    @command("full")
    async def full(self, message: Message) -> Any:
        raise ResourceError("disk full", plugin="faulty")

    @command("hang")
    async def hang(self, message: Message) -> Any:
        await asyncio.sleep(3600)

    @command("ok")
    async def ok(self, message: Message) -> Any:
        return {"ok": True}


class Recorder(Plugin):
    """Appends each lifecycle step to the file named by $RECORDER_LOG; stop() may be told to raise."""

    name = "recorder"
    version = "2.1.0"

    def _note(self, step: str) -> None:
        with open(os.environ["RECORDER_LOG"], "a") as f:
            f.write(json.dumps(step) + "\n")

    async def initialize(self, context: PluginContext) -> None:
        await super().initialize(context)
        self._note("initialize")

    async def start(self) -> None:
        self._note("start")

    async def handle_message(self, message: Message) -> Any:
        self._note("handle")
        if message.payload and message.payload.get("slow"):
            await asyncio.sleep(float(message.payload["slow"]))
            self._note("handled-slow")
        return "noted"

    async def stop(self) -> None:
        self._note("stop")
        if os.environ.get("RECORDER_STOP_RAISES"):
            raise RuntimeError("stop failed on purpose")

    async def cleanup(self) -> None:
        self._note("cleanup")


class Doomed(Plugin):
    """initialize always fails: the agent restarts it until its limit, then marks it failed."""

    name = "doomed"
    version = "0.0.1"

    async def initialize(self, context: PluginContext) -> None:
        raise RuntimeError("the database is unreachable")


class Licensed(Plugin):
    """Asks to be restarted (InitializationError outside a request) when its licence is revoked."""

    name = "licensed"
    version = "1.0.0"

    @on_event("license.revoked")
    async def revoked(self, event: Message) -> None:
        raise InitializationError("licence revoked; a fresh start reloads it")

    async def handle_message(self, message: Message) -> Any:
        return "licensed"


class FromTheFuture(Plugin):
    """Built for a protocol this mesh does not speak."""

    name = "future"
    protocol = "2"


class Lonely(Plugin):
    """Needs a plugin that never comes: its start-up fails after dependency_timeout."""

    name = "lonely"
    dependencies = ["nobody"]
    config = None

    @classmethod
    def default_config(cls) -> PluginConfig:
        return super().default_config().merged({"dependency_timeout": 0.6})


class Announcer(Plugin):
    """B in the traced flow: answers, and publishes an event about it (inside a span of its own)."""

    name = "announcer"
    version = "1.2.0"

    async def handle_message(self, message: Message) -> Any:
        from opentelemetry import trace

        assert self.context is not None
        with trace.get_tracer("announcer").start_as_current_span("compose announcement"):
            await self.context.messaging.publish_event("news.posted", {"text": message.payload})
        return {"announced": message.payload}


class Archivist(Plugin):
    """C in the traced flow: handles the event."""

    name = "archivist"

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[Any] = []

    @on_event("news.*")
    async def keep(self, event: Message) -> None:
        self.kept.append(event.payload)

    async def handle_message(self, message: Message) -> Any:
        return self.kept


class Moody(Plugin):
    """Reports the health it is told to (the ``feel`` command); ``reason: "raise"`` makes the check raise."""

    name = "moody"
    version = "1.1.0"

    def __init__(self) -> None:
        super().__init__()
        self.mood = HealthCheck()

    @command("feel")
    async def feel(self, message: Message) -> Any:
        self.mood = HealthCheck.model_validate(message.payload)
        return {"feeling": self.mood.status.value}

    @query("ping")
    async def ping(self, message: Message) -> Any:
        return "pong"

    @command("fail")
    async def fail(self, message: Message) -> Any:
        raise ValueError("bad mood")

    async def health_check(self) -> HealthCheck:
        if self.mood.reason == "raise":
            raise RuntimeError("sensor offline")
        return self.mood


class Chatty(Plugin):
    """Logs on request: ``flood`` writes one 100 KB line then about 300 KB more; ``mark`` logs its payload."""

    name = "chatty"

    @command("flood")
    async def flood(self, message: Message) -> Any:
        import logging

        log = logging.getLogger("chatty")
        log.warning("long line %s end", "x" * 100_000)
        for i in range(2500):  # ~120 bytes each: well past the ~200 KB a stalled pipe and reader take in
            log.warning("line %d %s", i, "y" * 80)
        return "flooded"

    @command("mark")
    async def mark(self, message: Message) -> Any:
        import logging

        logging.getLogger("chatty").warning("mark %s", message.payload)
        return message.payload


class Needy(Plugin):
    """Requires a plugin (tally >=1) that no test runs: it waits, starting, for dependency_timeout (30 s)."""

    name = "needy"
    dependencies = [{"name": "tally", "version": ">=1"}]


# Leaked on purpose by Hog (module level: a leak outlives the handler that made it).
_HOARD: list[Any] = []


class Hog(Plugin):
    """Goes past its [limits] on command; every loop is bounded, so it also stops by itself without limits.

    ``leak`` keeps 1 MiB blocks (written, so they are really used) until MemoryError, at most 1 GiB;
    ``spike`` asks for one 1 TiB block (it fails at once and keeps nothing); ``spin`` burns CPU for at
    most 30 s (``{"ignore_sigxcpu": true}`` first ignores SIGXCPU); ``hoard`` opens /dev/null until EMFILE,
    at most 100 000 times. With setting ``at_start`` = "leak" or "spike", ``initialize`` does that in
    the first ``runs`` runs (setting, default all; MESH_RESTARTS counts them), so the MemoryError
    escapes to the host.
    """

    name = "hog"
    version = "1.0.0"

    async def initialize(self, context: PluginContext) -> None:
        await super().initialize(context)
        how, runs = context.settings.get("at_start"), int(context.settings.get("runs", 1 << 30))
        if how and int(os.environ.get("MESH_RESTARTS", "0")) < runs:
            self._leak() if how == "leak" else bytearray(1 << 40)

    @staticmethod
    def _leak() -> int:
        for _ in range(1024):
            _HOARD.append(b"\x01" * (1 << 20))
        return len(_HOARD)

    @command("leak")
    async def leak(self, message: Message) -> Any:
        return self._leak()

    @command("spike")
    async def spike(self, message: Message) -> Any:
        return len(bytearray(1 << 40))

    @command("spin")
    async def spin(self, message: Message) -> Any:
        import signal
        import time

        if message.payload and message.payload.get("ignore_sigxcpu"):
            signal.signal(signal.SIGXCPU, signal.SIG_IGN)
        deadline = time.monotonic() + 30
        n = 0
        while time.monotonic() < deadline:
            n += 1
        return n

    @command("hoard")
    async def hoard(self, message: Message) -> Any:
        for _ in range(100_000):
            _HOARD.append(os.open(os.devnull, os.O_RDONLY))  # kept open on purpose
        return len(_HOARD)

    @command("ping")
    async def ping(self, message: Message) -> Any:
        return {"pid": os.getpid(), "restarts": os.environ.get("MESH_RESTARTS")}
