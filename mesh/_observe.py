"""Reading the mesh's metrics: what ``mesh stats`` and ``mesh top`` show, as a library.

:func:`collect` asks the registry for the instances, then every instance for its metrics
(``<prefix>.control.<instance>.metrics``) at once; an instance that does not answer is listed with
the reason. :class:`Rates` turns two collections into per-second rates (msgs/s, errors/s).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS

from plugin_sdk import PluginError, PluginInfo, PluginRegistry
from plugin_sdk.host import Retry, Subjects, request, response_from_msg

__all__ = ["InstanceMetrics", "Rates", "collect"]


@dataclass
class InstanceMetrics:
    """One instance: what the registry says of it, and its own metrics (or why there are none)."""

    info: PluginInfo
    metrics: dict[str, Any] | None = None
    error: str | None = None
    #: Per-second rates since the previous collection (``mesh top``): ``messages``, ``errors``.
    rates: dict[str, float] = field(default_factory=dict)

    def figure(self, *path: str, default: Any = None) -> Any:
        """``metrics[path[0]][path[1]]...`` or ``default``."""
        node: Any = self.metrics
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return default
            node = node[key]
        return node

    def latency_ms(self, q: str, *, recent: bool = False) -> float | None:
        """The worst ``q`` (``p50``, ``p99``...) over the instance's message kinds, in ms."""
        kinds = self.figure("kinds", default={}) or {}
        values = [(k["recent"] if recent else k)["latency_ms"][q] for k in kinds.values()
                  if (k["recent"] if recent else k)["latency_ms"]["count"]]
        return max(values) if values else None

    def as_json(self) -> dict[str, Any]:
        return {"info": self.info.model_dump(mode="json"), "metrics": self.metrics, "error": self.error,
                **({"rates": self.rates} if self.rates else {})}


async def collect(nc: NATS, *, prefix: str = "mesh", name: str | None = None,
                  timeout: float = 2.0) -> list[InstanceMetrics]:
    """Every registered instance (of ``name``, if given) with its metrics, asked concurrently."""
    infos = await PluginRegistry(nc, prefix=prefix, retry=Retry(within=3.0)).list_plugins(name)
    subjects = Subjects(prefix)

    async def ask(info: PluginInfo) -> InstanceMetrics:
        subject = subjects.control(info.id, "metrics")
        try:
            msg = await request(nc, subject, b"", headers=None, timeout=timeout, plugin=info.name)
            result = response_from_msg(msg).raise_for_error().result
            if not isinstance(result, dict):
                return InstanceMetrics(info, error=f"unreadable metrics: {str(result)[:80]!r}")
            return InstanceMetrics(info, metrics=result)
        except PluginError as exc:  # an instance that is down or stuck is shown as such, not fatal
            return InstanceMetrics(info, error=f"{type(exc).__name__}: {exc}")

    return list(await asyncio.gather(*(ask(i) for i in infos)))


class Rates:
    """Per-second message and error rates between successive collections, per instance."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int, int]] = {}

    def update(self, rows: list[InstanceMetrics], now: float) -> None:
        seen = set()
        for row in rows:
            if row.metrics is None:
                continue
            seen.add(row.info.id)
            messages, errors = int(row.metrics.get("messages", 0)), int(row.metrics.get("errors", 0))
            before = self._last.get(row.info.id)
            if before is not None and now > before[0] and messages >= before[1]:
                dt = now - before[0]
                row.rates = {"messages": (messages - before[1]) / dt, "errors": max(0, errors - before[2]) / dt}
            self._last[row.info.id] = (now, messages, errors)
        for gone in set(self._last) - seen:
            del self._last[gone]
