"""``PluginContext``: what a plugin gets in ``initialize(context)``."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ._config import PluginConfig
from ._messaging import PluginMessaging
from ._registry import PluginRegistry
from ._state import StateStore

__all__ = ["PluginContext", "PluginMetrics", "RuntimeInfo"]


@dataclass(frozen=True, slots=True)
class RuntimeInfo:
    """Where and as what this instance runs."""

    instance_id: str
    host: str
    pid: int
    prefix: str
    nats_url: str
    started_at: float
    protocol: str


class PluginMetrics:
    """Counters and running sums a plugin and its runtime keep (read with :meth:`snapshot`).

    The runtime counts ``messages``, ``errors`` and handler seconds; plugins may add their own.
    """

    def __init__(self) -> None:
        self._counters: dict[str, float] = {}

    def increment(self, name: str, value: float = 1) -> None:
        self._counters[name] = self._counters.get(name, 0) + value

    def get(self, name: str) -> float:
        return self._counters.get(name, 0)

    def snapshot(self) -> dict[str, float]:
        return dict(self._counters)


@dataclass
class PluginContext:
    """Everything a plugin needs from the mesh: ``runtime``, ``config``, ``logger``, ``metrics``,
    ``messaging`` (send / broadcast / events), ``state`` (KV) and ``registry``."""

    runtime: RuntimeInfo
    config: PluginConfig
    logger: logging.Logger
    metrics: PluginMetrics
    messaging: PluginMessaging
    state: StateStore
    registry: PluginRegistry
    #: ``await context.report_error(exc, where="...")``: the runtime's error policy (see
    #: ``PluginRuntime.handle_plugin_error``) for failures in the plugin's own background work.
    report_error: Callable[..., Awaitable[None]] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def settings(self) -> dict[str, Any]:
        """Shortcut for ``config.settings``."""
        return self.config.settings
