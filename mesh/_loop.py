"""The event loop the mesh's processes run on: uvloop when it is installed, else asyncio's own.

``MESH_LOOP`` chooses: unset (or empty) means uvloop if it can be imported, asyncio if not;
``uvloop`` insists on it (an error, saying how to install it, where it is missing); ``asyncio``
opts out. Every command of the ``mesh`` command line starts its loop through :func:`run`, so one
rule holds everywhere (a short command gains little from uvloop, but loses nothing either), and an
agent's plugin hosts, which inherit its environment, run on the loop the agent runs on.

uvloop is the ``uvloop`` extra: ``pip install 'groundhog-mesh[uvloop]'``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

__all__ = ["ENV", "LoopError", "announce", "choose", "have_uvloop", "loop_name", "run"]

T = TypeVar("T")

#: The environment variable that chooses the loop.
ENV = "MESH_LOOP"
#: The values :data:`ENV` may take.
CHOICES = ("asyncio", "uvloop")
INSTALL = "pip install 'groundhog-mesh[uvloop]'"

log = logging.getLogger("mesh.loop")


class LoopError(ValueError):
    """``MESH_LOOP`` asks for something this process cannot do (printed as one line)."""


def have_uvloop() -> bool:
    """Whether uvloop can be imported here (without importing it)."""
    return importlib.util.find_spec("uvloop") is not None


def choose(env: Mapping[str, str], have_uvloop: bool) -> str:
    """The loop (``"uvloop"`` or ``"asyncio"``) that ``env`` asks for; raises :class:`LoopError`."""
    raw = env.get(ENV, "")
    wanted = raw.strip().lower()
    if wanted == "":
        return "uvloop" if have_uvloop else "asyncio"
    if wanted == "asyncio":
        return "asyncio"
    if wanted == "uvloop":
        if not have_uvloop:
            raise LoopError(f"{ENV}=uvloop, but uvloop is not installed: {INSTALL} (or unset {ENV})")
        return "uvloop"
    raise LoopError(f"{ENV}={raw!r}: use one of {', '.join(CHOICES)} (unset: uvloop when installed, else asyncio)")


def announce() -> None:
    """Log at INFO which loop this process runs on (a long-running service, once it serves: so a
    service that cannot start prints its one error line and nothing else)."""
    name = loop_name()
    version = ""
    if name == "uvloop":
        import uvloop

        version = f" {getattr(uvloop, '__version__', '')}".rstrip()
    log.info("event loop: %s%s", name, version)


def loop_name() -> str:
    """The loop this process runs (or :func:`run` would run) on: ``"uvloop"`` or ``"asyncio"``.

    Inside a running loop, the kind of that loop; outside one, what ``MESH_LOOP`` chooses."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return choose(os.environ, have_uvloop())
    return "uvloop" if type(loop).__module__.split(".")[0] == "uvloop" else "asyncio"


def run(coro: Coroutine[Any, Any, T], *, announce: int = logging.DEBUG) -> T:
    """``asyncio.run(coro)`` on the loop :func:`choose` picks, logging which at level ``announce``.

    A :class:`LoopError` is raised before anything runs (``coro`` is closed, never awaited)."""
    try:
        name = choose(os.environ, have_uvloop())
    except LoopError:
        coro.close()
        raise
    if name == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
        version = f" {getattr(uvloop, '__version__', '')}".rstrip()
    else:
        factory, version = None, ""  # exactly asyncio.run's loop (the policy's, made the current loop)
    log.log(announce, "event loop: %s%s", name, version)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)
