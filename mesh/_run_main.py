"""`python -m mesh run REF …` without the command line's machinery: how an agent starts a plugin host.

The full CLI (typer, rich, and through its commands the registry, the agent, `mesh up`,
cryptography) costs a host ~0.2 s of CPU and ~15 MiB that it never uses. An agent's command line is
always the same few options, so :func:`main` parses exactly those; anything else (``--help``,
``--reload``, an option it does not know, a mistake) is left to the full CLI, which then says what
it always says. ``tests/e2e/test_run_main.py`` keeps the two in step.

The pieces both paths share live here: logging set-up, the readiness pipe of `mesh run --reload`,
and the one line a failure prints.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

__all__ = ["failure_line", "main", "ready_event", "setup_logging"]

#: The options :func:`main` takes; the rest go to the full CLI.
OPTIONS = ("--config", "-c", "--nats", "--prefix", "--heartbeat-interval", "--instance-id")


def setup_logging() -> None:
    level = os.environ.get("MESH_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class _FdReady(asyncio.Event):
    """Set once the plugin serves: also writes one byte to ``fd`` and closes it (how `mesh run
    --reload` learns that a reload worked; the pipe closing without a byte means it failed)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd: int | None = fd

    def set(self) -> None:
        super().set()
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.write(fd, b"1")
            except OSError:  # the watcher went away: nobody to tell
                pass
            finally:
                os.close(fd)


def ready_event() -> asyncio.Event | None:
    """``MESH_READY_FD`` (set by `mesh run --reload` for its child): the fd to signal readiness on."""
    raw = os.environ.pop("MESH_READY_FD", "")
    return _FdReady(int(raw)) if raw.isdigit() else None


def failure_line(exc: BaseException) -> str | None:
    """The one line a command prints for an expected failure (None: not one of those)."""
    import nats.errors

    from plugin_sdk import PluginError

    # (a NatsServerError comes only from the embedded server's module: not imported, not raised)
    natsd = sys.modules.get("plugin_sdk._natsd")
    if isinstance(exc, PluginError):
        where = f" (plugin {exc.plugin})" if exc.plugin and exc.plugin not in str(exc) else ""
        return f"{type(exc).__name__}: {exc}{where}"
    if (natsd is not None and isinstance(exc, natsd.NatsServerError)) or isinstance(exc, ValueError) \
            or type(exc).__name__ == "UserError":
        return str(exc)
    if isinstance(exc, nats.errors.Error):
        return f"NATS: {type(exc).__name__}: {exc}"
    return None


class _Unsupported(Exception):
    """An argument this parser leaves to the full CLI."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # never print or exit here: the full CLI will say it
        raise _Unsupported(message)


def main(argv: list[str]) -> int | None:
    """Run ``mesh run`` with ``argv`` (what follows ``run``) and return its exit code, or None
    when the full CLI should handle this command line."""
    if any(a in ("--help", "-h", "--reload") or a.startswith("--reload") for a in argv):
        return None
    parser = _Parser(prog="mesh run", add_help=False, allow_abbrev=False)
    parser.add_argument("ref")
    parser.add_argument("--config", "-c")
    parser.add_argument("--nats")
    parser.add_argument("--prefix")
    parser.add_argument("--heartbeat-interval", type=float)
    parser.add_argument("--instance-id")
    try:
        args = parser.parse_args(argv)
    except _Unsupported:
        return None
    heartbeat = args.heartbeat_interval
    if heartbeat is None:
        try:
            heartbeat = float(os.environ.get("MESH_HEARTBEAT_INTERVAL") or 2.0)
        except ValueError:
            return None
    if heartbeat < 0.05:
        return None  # (the full CLI refuses it, saying the range)

    from plugin_sdk.host import Subjects, validate_name

    from . import _loop
    from ._connect import default_prefix
    from ._host import run_plugin

    setup_logging()
    try:
        prefix = args.prefix or default_prefix()
        Subjects(prefix)
        if args.instance_id is not None:
            validate_name(args.instance_id, what="instance id")
        # (the loop is logged at DEBUG: one INFO line per plugin host would be noise in an agent's log)
        return _loop.run(run_plugin(args.ref, config_path=args.config, nats_url=args.nats, prefix=prefix,
                                    heartbeat_interval=heartbeat, instance_id=args.instance_id,
                                    ready=ready_event()))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        line = failure_line(exc)
        if line is None:
            raise
        sys.stderr.write(f"error: {line}\n")
        return 1
