"""The plugin host: ``mesh run REF`` runs one plugin instance in this process.

Loads the plugin class (``module:Class`` or an entry point in group ``groundhog.plugins``),
applies ``--config plugin.toml``, connects, and runs :class:`plugin_sdk.PluginRuntime` until
SIGTERM/SIGINT or a control ``stop``; then drains, stops, cleans up and unregisters.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib
import logging
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from plugin_sdk import InitializationError, Plugin, PluginConfig, PluginRuntime, load_config_file

from ._connect import close, connect
from ._service import stop_on_signals
from ._telemetry import setup_metrics, setup_tracing

__all__ = ["ENTRY_POINT_GROUP", "installed_plugins", "load_plugin_class", "resolve_config", "run_plugin"]

ENTRY_POINT_GROUP = "groundhog.plugins"

#: Exit code of a host whose plugin asked for a restart (EX_TEMPFAIL): the agent restarts it.
EXIT_RESTART = 75

log = logging.getLogger("mesh.host")


def load_plugin_class(ref: str) -> type[Plugin]:
    """``module:Class`` or an entry-point name → the Plugin subclass; InitializationError otherwise."""
    if ":" in ref:
        module_name, _, attr = ref.partition(":")
        # Like `python -m`: plugins in the working directory are importable.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise InitializationError(f"cannot load {ref!r}: no module named {exc.name!r}") from None
        except Exception as exc:  # the plugin module itself failed to import: re-raised, typed
            raise InitializationError(f"cannot load {ref!r}: importing {module_name} raised "
                                      f"{type(exc).__name__}: {exc}") from exc
        obj = module
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise InitializationError(f"cannot load {ref!r}: {module_name} has no attribute {attr!r}") from None
    else:
        eps = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
        if ref not in eps:
            known = ", ".join(sorted(eps)) or "none installed"
            raise InitializationError(f"no plugin {ref!r}: not module:Class, and no entry point of that name "
                                      f"in group {ENTRY_POINT_GROUP!r} (known: {known})")
        try:
            obj = eps[ref].load()
        except Exception as exc:  # the entry point's module failed to import: re-raised, typed
            raise InitializationError(f"cannot load entry point {ref!r} ({eps[ref].value}): "
                                      f"{type(exc).__name__}: {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, Plugin)):
        raise InitializationError(f"{ref!r} is not a plugin_sdk.Plugin subclass")
    return obj


def installed_plugins() -> list[dict[str, str]]:
    """Entry points in ``groundhog.plugins``: name, ref, and the distribution that provides it."""
    rows = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        rows.append({"name": ep.name, "ref": ep.value, "distribution": dist.name if dist else "",
                     "version": dist.version if dist else ""})
    return sorted(rows, key=lambda r: r["name"])


def resolve_config(cls: type[Plugin], config_path: str | Path | None) -> PluginConfig:
    base = cls.default_config()
    return load_config_file(config_path, base=base) if config_path else base


def supervision_from_env() -> dict[str, object]:
    """What a supervising agent tells its child: ``MESH_AGENT``, ``MESH_RESTARTS``, ``MESH_LAST_ERROR``."""
    out: dict[str, object] = {}
    if os.environ.get("MESH_AGENT"):
        out["agent"] = os.environ["MESH_AGENT"]
    if os.environ.get("MESH_RESTARTS", "").isdigit():
        out["restarts"] = int(os.environ["MESH_RESTARTS"])
    if os.environ.get("MESH_LAST_ERROR"):
        out["last_error"] = os.environ["MESH_LAST_ERROR"][:500]
    return out


def release_startup_memory() -> bool:
    """Hand the heap pages that start-up used and freed (imports, model building, the connect) back
    to the OS: glibc keeps them mapped, and an idle host would carry them for its whole life. One
    ``malloc_trim(0)`` once the plugin serves: 1.85 MB of an idle host's RSS, in 0.4 ms (3.11 and
    3.13, docs/performance.md). False where the C library has none (musl, macOS): nothing to do."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


async def run_plugin(ref: str, *, config_path: str | None = None, nats_url: str | None = None,
                     prefix: str = "mesh", heartbeat_interval: float = 2.0, connect_wait: float = 10.0,
                     instance_id: str | None = None, ready: asyncio.Event | None = None) -> int:
    """Run one instance until asked to stop. Returns the process exit code (0 clean, 1 not)."""
    cls = load_plugin_class(ref)
    config = resolve_config(cls, config_path)
    plugin = cls()
    nc = await connect(nats_url, name=f"plugin {config.name}", wait=connect_wait)
    flush_traces = flush_metrics = None
    try:
        runtime = PluginRuntime(plugin, nc, config=config, prefix=prefix, heartbeat_interval=heartbeat_interval,
                                instance_id=instance_id, supervision=supervision_from_env())
        flush_traces = setup_tracing(config.name, version=config.version, instance_id=runtime.instance_id)
        flush_metrics = setup_metrics(config.name, version=config.version, instance_id=runtime.instance_id)
        # A signal and a control "stop" (or a restart the plugin asks for) set the same event.
        with stop_on_signals(runtime.stop_requested):
            await runtime.start()
            log.info("%s %s serving as %s", config.name, config.version, runtime.instance_id)
            release_startup_memory()
            if ready is not None:
                ready.set()
            await runtime.stop_requested.wait()
            log.info("stopping %s", runtime.instance_id)
            ok = await runtime.stop()
        if runtime.restart_requested:
            log.warning("exiting with code %d so that the agent restarts %s", EXIT_RESTART, runtime.instance_id)
            return EXIT_RESTART
        return 0 if ok else 1
    finally:
        await close(nc)
        # The spans and metrics still queued go out before we exit, together, within FLUSH_TIMEOUT.
        await asyncio.gather(*(asyncio.to_thread(flush) for flush in (flush_traces, flush_metrics) if flush))
