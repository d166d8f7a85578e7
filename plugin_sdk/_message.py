"""The data that travels: :class:`Message`, :class:`Response`, :class:`PluginInfo`."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nats.nuid import NUID
from pydantic import BaseModel, ConfigDict, Field

from ._config import Dependency
from ._errors import HandlerError, PluginError, error_class

M = TypeVar("M", bound=BaseModel)

__all__ = [
    "BroadcastResult",
    "ErrorInfo",
    "Health",
    "HealthCheck",
    "Message",
    "MessageKind",
    "PluginInfo",
    "Response",
    "new_id",
]


_ID_PREFIX = NUID().next().decode()[:12]
_ID_COUNTER = itertools.count(1)


def new_id() -> str:
    """A unique message id: a random per-process prefix and a counter (cheap on the hot path)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):x}"


def fast_model(cls: type[M], fields: dict[str, Any], names: set[str] | None = None) -> M:
    """Build a model from ``fields`` that are known to be complete and of the right types.

    Like ``model_construct`` without its per-field default handling; used on the message hot path
    where every field is given. Callers pass every field of ``cls``; ``names``, the set of them,
    if the caller keeps one (it is copied: cheaper than a set of the dict). The slots are set
    through their descriptors, found once: a quarter cheaper than ``object.__setattr__`` by name.
    """
    obj = _new(cls)
    _set_dict(obj, fields)
    _set_fields_set(obj, set(fields) if names is None else names.copy())
    _set_extra(obj, None)
    _set_private(obj, None)
    return obj


_new = object.__new__


def _slot_setter(name: str) -> Callable[[Any, Any], None]:
    descriptor = BaseModel.__dict__.get(name)
    if descriptor is None or not hasattr(descriptor, "__set__"):  # (another pydantic: by name, as before)
        return lambda obj, value: object.__setattr__(obj, name, value)
    return descriptor.__set__  # type: ignore[no-any-return]


def _set_dict(obj: Any, fields: dict[str, Any]) -> None:
    object.__setattr__(obj, "__dict__", fields)


_set_fields_set = _slot_setter("__pydantic_fields_set__")
_set_extra = _slot_setter("__pydantic_extra__")
_set_private = _slot_setter("__pydantic_private__")


class MessageKind(enum.StrEnum):
    """What a message asks for (the specification's Command / Query / Event)."""

    COMMAND = "command"  # do something; may change state
    QUERY = "query"  # answer something; changes nothing
    EVENT = "event"  # something happened; nobody replies


class Message(BaseModel):
    """One message between plugins.

    ``payload`` is the JSON body; the rest travels in NATS headers. ``target`` is a plugin name,
    ``name.instance`` for one instance, or an event type for events. ``operation`` selects a
    handler when the plugin routes by name (``@command("increment")``).
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=new_id)
    source: str = ""
    target: str = ""
    payload: Any = None
    metadata: dict[str, str] = Field(default_factory=dict)
    kind: MessageKind = MessageKind.COMMAND
    operation: str | None = None
    #: The sending instance, when the sender is a plugin instance.
    source_instance: str | None = None


class ErrorInfo(BaseModel):
    """A failure as it travels back to the caller."""

    type: str
    message: str
    code: int = 500
    #: The plugin where the error was raised first.
    plugin: str | None = None
    #: The plugins it came back through on its way to this caller, nearest last (A → B → C raising
    #: gives the caller of A ``plugin="C", via=["B", "A"]``). Empty for a direct error.
    via: list[str] = Field(default_factory=list)

    @classmethod
    def from_exception(cls, exc: BaseException, *, plugin: str | None = None) -> ErrorInfo:
        if isinstance(exc, HandlerError):
            # A remote handler's failure passing through: keep its type and message once
            # (not "HandlerError: OutOfStock: …"), and note the hop.
            prefix = f"{exc.remote_type}: "
            message = exc.message[len(prefix):] if exc.message.startswith(prefix) else exc.message
            return cls(type=exc.remote_type, message=message, code=exc.code, plugin=exc.plugin or plugin,
                       via=_via(exc, plugin))
        if isinstance(exc, PluginError):
            return cls(type=type(exc).__name__, message=exc.message, code=exc.code,
                       plugin=exc.plugin or plugin, via=_via(exc, plugin))
        return cls(type=type(exc).__name__, message=str(exc) or type(exc).__name__, code=500, plugin=plugin)

    def to_exception(self, *, subject: str | None = None) -> PluginError:
        """The typed error to raise on the caller's side (``.via`` names the hops, if any)."""
        cls = error_class(self.type)
        err: PluginError | None = None
        if cls is not None and cls is not HandlerError:
            try:
                err = cls(self.message, plugin=self.plugin, subject=subject)
            except TypeError:  # a plugin-defined subclass with its own signature
                err = None
        if err is None:
            err = HandlerError(f"{self.type}: {self.message}", remote_type=self.type,
                               plugin=self.plugin, subject=subject)
        err.via = list(self.via)  # type: ignore[attr-defined]  # (set: this error came over the wire)
        return err


def _via(exc: PluginError, here: str | None) -> list[str]:
    """The hops of an error that came from another plugin and is now passing through ``here``."""
    if not hasattr(exc, "via"):
        return []  # raised here, not received from another plugin
    hops = list(exc.via)
    if here and exc.plugin != here and (not hops or hops[-1] != here):
        hops.append(here)
    return hops


class Response(BaseModel):
    """The answer to a message: a ``result`` on success, an ``error`` otherwise."""

    message_id: str = ""
    result: Any = None
    error: ErrorInfo | None = None
    #: Which plugin instance answered: set on broadcast replies and on errors. A direct reply
    #: carries no header at all (it is the hot path); ask the plugin, or trace, to know more.
    source: str | None = None

    def is_success(self) -> bool:
        return self.error is None

    def raise_for_error(self) -> Response:
        """Raise the typed :class:`PluginError` this response carries; return self on success."""
        if self.error is not None:
            raise self.error.to_exception()
        return self


class Health(enum.StrEnum):
    HEALTHY = "healthy"  # heartbeats arrive on time and the plugin's health check passes
    DEGRADED = "degraded"  # serving, but its health check reports a problem (see the reason)
    UNHEALTHY = "unhealthy"  # heartbeats missed (dead or stuck), or its health check says so
    STARTING = "starting"  # registered, not yet serving
    STOPPING = "stopping"  # draining before a clean exit
    FAILED = "failed"  # crashed more often than its agent's restart limit allows; not restarted

    @property
    def serving(self) -> bool:
        """Whether an instance in this state takes messages: healthy or degraded."""
        return self in SERVING


class HealthCheck(BaseModel):
    """What :meth:`Plugin.health_check` returns: a status and, unless healthy, why."""

    status: Health = Health.HEALTHY
    reason: str = ""

    @classmethod
    def healthy(cls) -> HealthCheck:
        return cls()

    @classmethod
    def degraded(cls, reason: str) -> HealthCheck:
        return cls(status=Health.DEGRADED, reason=reason)

    @classmethod
    def unhealthy(cls, reason: str) -> HealthCheck:
        return cls(status=Health.UNHEALTHY, reason=reason)


#: The states in which an instance serves messages (a degraded one still does).
SERVING = frozenset({Health.HEALTHY, Health.DEGRADED})


class PluginInfo(BaseModel):
    """One running plugin instance, as the registry knows it."""

    model_config = ConfigDict(extra="ignore")

    id: str
    name: str
    version: str
    description: str = ""
    capabilities: list[str] = Field(default_factory=list)
    dependencies: list[Dependency] = Field(default_factory=list)
    health: Health = Health.HEALTHY
    #: Why the instance is not healthy: its health check's reason, or the registry's (missed beats).
    health_reason: str = ""
    host: str = ""
    pid: int = 0
    protocol: str = "1"
    started_at: float = Field(default_factory=time.time)
    #: When the registry last heard from the instance (registry clock, seconds since the epoch).
    last_seen: float = 0.0
    heartbeat_interval: float = 2.0
    #: The agent supervising this instance ("" when run by hand), how often it restarted it, and why.
    agent: str = ""
    restarts: int = 0
    last_error: str = ""

    @property
    def uptime(self) -> float:
        """Seconds since it started; for an instance that stopped beating (``unhealthy``, ``failed``),
        up to when it was last seen, so that a dead instance's uptime does not keep growing."""
        end = self.last_seen if self.health in (Health.UNHEALTHY, Health.FAILED) and self.last_seen else time.time()
        return max(0.0, end - self.started_at)


@dataclass
class BroadcastResult:
    """What a broadcast gathered: every reply, and the instances that did not answer in time.

    Iterates, indexes and counts like the list of :class:`Response` the specification returns.
    """

    responses: list[Response] = field(default_factory=list)
    #: Instance ids the registry listed as live that did not reply before the timeout.
    missing: list[str] = field(default_factory=list)
    #: Whether the expected set of instances was known (the registry answered).
    expected_known: bool = True

    def __iter__(self) -> Iterator[Response]:
        return iter(self.responses)

    def __len__(self) -> int:
        return len(self.responses)

    def __getitem__(self, i: int) -> Response:
        return self.responses[i]
