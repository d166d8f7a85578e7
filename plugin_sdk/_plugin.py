"""The :class:`Plugin` base class and the routing decorators."""

from __future__ import annotations

import enum
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import ValidationError

from ._config import Dependency, PluginConfig
from ._errors import ConfigError, UnknownOperation
from ._message import HealthCheck, Message, MessageKind

if TYPE_CHECKING:
    from ._context import PluginContext

__all__ = ["Plugin", "PluginState", "command", "on_event", "query"]

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class PluginState(enum.StrEnum):
    """Where a plugin instance is in its lifecycle."""

    CREATED = "created"  # constructed, nothing run yet
    INITIALIZED = "initialized"  # initialize(context) returned
    RUNNING = "running"  # start() returned; subscriptions are live
    STOPPING = "stopping"  # draining in-flight messages, then stop()
    STOPPED = "stopped"  # stop() and cleanup() ran
    FAILED = "failed"  # a lifecycle step raised


def command(name: str) -> Callable[[F], F]:
    """Route messages whose operation is ``name`` to the decorated ``async def (self, message)``."""
    return _route(name, MessageKind.COMMAND)


def query(name: str) -> Callable[[F], F]:
    """Like :func:`command`, for operations that only read."""
    return _route(name, MessageKind.QUERY)


def on_event(pattern: str) -> Callable[[F], F]:
    """Deliver events matching ``pattern`` (``orders.*``, ``orders.>``) to ``async def (self, event)``.

    The runtime subscribes when the plugin starts and unsubscribes when it stops; events for one
    pattern are handled in order, one at a time.
    """

    def deco(fn: F) -> F:
        _require_async(fn)
        fn.__mesh_event__ = pattern  # type: ignore[attr-defined]
        return fn

    return deco


def _route(name: str, kind: MessageKind) -> Callable[[F], F]:
    def deco(fn: F) -> F:
        _require_async(fn)
        fn.__mesh_route__ = (name, kind)  # type: ignore[attr-defined]
        return fn

    return deco


def _require_async(fn: Callable[..., Any]) -> None:
    if not inspect.iscoroutinefunction(fn):
        raise TypeError(f"{fn.__qualname__} must be an async def")


class Plugin:
    """Base class for plugins.

    Declare identity as class attributes (or a full ``config = PluginConfig(...)``)::

        class Echo(Plugin):
            name = "echo"
            version = "1.0.0"
            capabilities = ["echo"]

            async def handle_message(self, message):
                return message.payload

    Lifecycle, driven by the host: ``initialize(context) → start() → (serving) → stop() →
    cleanup()``. ``cleanup`` always runs, even if ``stop`` raised. ``handle_message`` returns a
    :class:`~plugin_sdk.Response` or any JSON-serialisable value; raising sends a typed error to
    the caller and the plugin keeps serving.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "0.1.0"
    description: ClassVar[str] = ""
    capabilities: ClassVar[list[str]] = []
    dependencies: ClassVar[list[Dependency | dict[str, Any] | str]] = []
    #: The mesh protocol (major version) this plugin was written against.
    protocol: ClassVar[str] = "1"
    config: ClassVar[PluginConfig | None] = None

    _routes: ClassVar[dict[str, tuple[str, MessageKind]]] = {}
    _event_handlers: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        routes: dict[str, tuple[str, MessageKind]] = {}
        events: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            for attr, fn in vars(klass).items():
                if hasattr(fn, "__mesh_route__"):
                    op, kind = fn.__mesh_route__
                    routes[op] = (attr, kind)
                if hasattr(fn, "__mesh_event__"):
                    events[attr] = fn.__mesh_event__
        cls._routes = routes
        cls._event_handlers = events

    def __init__(self) -> None:
        self.context: PluginContext | None = None
        self.state: PluginState = PluginState.CREATED

    # -- identity --------------------------------------------------------------------------

    @classmethod
    def default_config(cls) -> PluginConfig:
        """The config this class declares (``config`` if set, else the class attributes)."""
        if cls.config is not None:
            return cls.config
        own_doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")  # not the base class's docstring
        data = {"name": cls.name or cls.__name__.lower(), "version": cls.version,
                "description": cls.description or own_doc.split("\n")[0], "capabilities": list(cls.capabilities),
                "dependencies": [d.model_dump() if isinstance(d, Dependency) else {"name": d} if isinstance(d, str)
                                 else d for d in cls.dependencies],
                "protocol": cls.protocol}
        try:
            return PluginConfig.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"{cls.__module__}.{cls.__qualname__}: {problems}", plugin=cls.name or None) from None

    # -- lifecycle (override what you need) ------------------------------------------------

    async def initialize(self, context: PluginContext) -> None:
        """Called once, before anything is served. Keep ``context``; open resources here."""
        self.context = context

    async def start(self) -> None:
        """Called after ``initialize``; messages are served once this returns."""

    async def stop(self) -> None:
        """Called after in-flight messages have drained; no new messages arrive."""

    async def cleanup(self) -> None:
        """Called last, always (even when ``initialize``, ``start`` or ``stop`` failed)."""

    async def on_dependency_health(self, dependency: str, health: str, event: Message) -> None:
        """Called when an instance of a declared dependency changes health (``unhealthy``,
        ``healthy`` again, ``failed``, or gone: ``event.payload["gone"]``). The plugin keeps
        running; this is the place to degrade gracefully. ``event.payload`` has ``id``, ``name``,
        ``version``, ``health``, ``previous``, ``gone`` and ``last_error``."""

    async def health_check(self) -> HealthCheck:
        """Say how this instance is: :meth:`HealthCheck.healthy`, ``.degraded(reason)`` or
        ``.unhealthy(reason)``. Called before every heartbeat (and for ``mesh.control.<id>.health``),
        with a timeout; raising or timing out counts as unhealthy with the error as the reason. The
        registry combines it with heartbeats: an instance whose beats stop is unhealthy whatever it
        said. A degraded instance still serves; an unhealthy one is left out of ``healthy_only``
        listings (dependency waits). The default: healthy while running."""
        return HealthCheck()

    async def handle_message(self, message: Message) -> Any:
        """Answer one direct or broadcast message.

        The default routes by ``message.operation`` to methods decorated with
        :func:`command` / :func:`query`, and raises :class:`UnknownOperation` otherwise.
        """
        op = message.operation
        route = self._routes.get(op) if op else None
        if route is None:
            known = ", ".join(sorted(self._routes)) or "none"
            raise UnknownOperation(f"{self.default_config().name} has no operation {op!r} (known: {known})",
                                   plugin=self.default_config().name)
        return await getattr(self, route[0])(message)

