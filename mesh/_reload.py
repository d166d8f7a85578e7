"""``mesh run REF --reload``: restart the plugin when its source changes (the development loop).

This process watches the plugin's source folder (watchfiles) and runs the plugin in a child
``mesh run`` with a fixed instance id; on a change it stops the child (the full drain / stop /
cleanup path) and starts a new one, so the new code is imported afresh. State lives in KV and is
kept; the instance keeps its id.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import watchfiles

from plugin_sdk.host import child_preexec, new_instance_id

from ._host import load_plugin_class, resolve_config
from ._service import stop_on_signals

__all__ = ["run_with_reload", "source_folder"]


def source_folder(ref: str) -> Path:
    """The folder holding the plugin's module (its package's folder when it is in one)."""
    cls = load_plugin_class(ref)
    module = sys.modules[cls.__module__]
    file = Path(module.__file__ or ".").resolve()
    package = cls.__module__.split(".")[0]
    root = sys.modules[package].__file__ if package in sys.modules else None
    return Path(root).resolve().parent if root and Path(root).name == "__init__.py" else file.parent


_DEFAULT_FILTER = watchfiles.DefaultFilter()


def _source_filter(change: watchfiles.Change, path: str) -> bool:
    """Python sources and TOML configs (a plugin.toml beside the code), minus editor droppings."""
    return path.endswith((".py", ".toml")) and _DEFAULT_FILTER(change, path)


async def run_with_reload(ref: str, child_args: list[str], *, config_path: str | None,
                          say: Callable[[str], None], watch: Path | None = None,
                          instance_id: str | None = None, nats_url: str | None = None) -> int:
    """Run ``mesh run REF`` as a child, restarting it on every source change, until SIGINT/SIGTERM.

    ``nats_url`` reaches the child as ``MESH_NATS_URL`` (never on its command line, where any user
    could read a password). Each start is reported once it serves, or as failed when the child
    exits first; either way this keeps watching.
    """
    folder = watch or source_folder(ref)
    name = resolve_config(load_plugin_class(ref), config_path).name
    instance_id = instance_id or new_instance_id(name)
    cmd = [sys.executable, "-m", "mesh", "run", ref, "--instance-id", instance_id, *child_args]
    env = dict(os.environ)
    if nats_url:
        env["MESH_NATS_URL"] = nats_url
    child: asyncio.subprocess.Process | None = None
    report: asyncio.Task[None] | None = None
    with stop_on_signals() as stop:
        try:
            say(f"watching {folder} for changes to {ref}")
            child, ready = await _start(cmd, env)
            report = asyncio.create_task(_report(child, ready, say, ok=f"serving {ref} as {instance_id}",
                                                 failed=f"{ref} failed to start"))
            async for changes in watchfiles.awatch(folder, watch_filter=_source_filter, stop_event=stop):
                changed = ", ".join(sorted({Path(p).name for _, p in changes}))
                report.cancel()
                await _stop(child)
                child, ready = await _start(cmd, env)
                report = asyncio.create_task(_report(
                    child, ready, say, ok=f"reloaded {ref} as {instance_id} (changed: {changed})",
                    failed=f"reload of {ref} failed (changed: {changed})"))
            return await _stop(child)
        finally:
            if report is not None:
                report.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await report
            if child is not None:
                await _stop(child)


async def _start(cmd: list[str], env: dict[str, str]) -> tuple[asyncio.subprocess.Process, _Ready]:
    """Start the child with a pipe it writes one byte to once it serves (``MESH_READY_FD``)."""
    read_fd, write_fd = os.pipe()
    try:
        child = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
                                                     preexec_fn=child_preexec, pass_fds=(write_fd,),
                                                     env={**env, "MESH_READY_FD": str(write_fd)})
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)  # the child has its copy: its exit closes the pipe
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                os.fdopen(read_fd, "rb"))
    return child, _Ready(reader, transport)


class _Ready:
    """The read end of a child's readiness pipe."""

    def __init__(self, reader: asyncio.StreamReader, transport: asyncio.ReadTransport) -> None:
        self.reader = reader
        self.transport = transport


async def _report(child: asyncio.subprocess.Process, ready: _Ready, say: Callable[[str], None], *,
                  ok: str, failed: str) -> None:
    """Say ``ok`` once the child serves, or ``failed`` (with its exit code) if it exits first."""
    try:
        if await ready.reader.read(1):
            say(ok)
            return
        code = await child.wait()
        say(f"{failed}: the plugin exited with code {code}; still watching for changes")
    finally:
        ready.transport.close()


async def _stop(child: asyncio.subprocess.Process, timeout: float = 20.0) -> int:
    if child.returncode is None:
        child.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(child.wait(), timeout)
        except TimeoutError:
            child.kill()
            await child.wait()
    code = child.returncode or 0
    return code if code >= 0 else 1  # killed by a signal
