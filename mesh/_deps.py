"""Dependency order among the plugins of one ``mesh.toml``: cycles, ranges, start levels.

Checked before anything starts, so a bad file is refused whole rather than half-started.
Dependencies on plugins that the file does not list are left to the plugins themselves: each
waits, before ``start()``, for a healthy instance in range (``PluginConfig.dependency_timeout``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from plugin_sdk import DependencyError, PluginConfig

__all__ = ["Planned", "start_levels"]


@dataclass(frozen=True)
class Planned:
    """One mesh.toml entry, with the config its class (and plugin.toml) declares."""

    ref: str
    config: PluginConfig


def start_levels(entries: Sequence[Planned], *, source: str = "mesh.toml") -> list[list[Planned]]:
    """Group entries into levels: each level depends only on earlier ones, so it can start in parallel.

    Raises :class:`DependencyError` naming the chain for a cycle (``a -> b -> c -> a``) and for a
    version range that the listed plugin does not satisfy.
    """
    by_name: dict[str, list[Planned]] = {}
    for e in entries:
        by_name.setdefault(e.config.name, []).append(e)
    for e in entries:
        for dep in e.config.dependencies:
            provided = by_name.get(dep.name)
            if provided and not any(dep.accepts(p.config.version) for p in provided):
                versions = ", ".join(sorted({p.config.version for p in provided}))
                raise DependencyError(f"{source}: {e.config.name} -> {dep}: unsatisfiable, the file runs "
                                      f"{dep.name} {versions}", plugin=e.config.name)
    graph = {name: sorted({d.name for p in group for d in p.config.dependencies if d.name in by_name})
             for name, group in by_name.items()}
    cycle = _find_cycle(graph)
    if cycle:
        raise DependencyError(f"{source}: dependency cycle {' -> '.join(cycle)}", plugin=cycle[0])
    levels: list[list[Planned]] = []
    placed: set[str] = set()
    while len(placed) < len(graph):
        ready = sorted(n for n in graph if n not in placed and all(d in placed for d in graph[n]))
        levels.append([e for n in ready for e in by_name[n]])
        placed.update(ready)
    return levels


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """A cycle as a closed path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None
