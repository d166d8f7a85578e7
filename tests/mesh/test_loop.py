"""mesh/_loop.py: which event loop the mesh's processes run on (uvloop when installed; MESH_LOOP)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys

import pytest

from mesh import _loop
from mesh._loop import LoopError, choose, loop_name

needs_uvloop = pytest.mark.skipif(not _loop.have_uvloop(), reason="uvloop not installed")


@pytest.mark.parametrize(("env", "have", "chosen"), [
    ({}, True, "uvloop"),
    ({}, False, "asyncio"),
    ({"MESH_LOOP": ""}, True, "uvloop"),
    ({"MESH_LOOP": ""}, False, "asyncio"),
    ({"MESH_LOOP": "asyncio"}, True, "asyncio"),
    ({"MESH_LOOP": "asyncio"}, False, "asyncio"),
    ({"MESH_LOOP": "uvloop"}, True, "uvloop"),
    ({"MESH_LOOP": " UVLoop "}, True, "uvloop"),
    ({"MESH_LOOP": "AsyncIO"}, True, "asyncio"),
])
def test_choose(env: dict[str, str], have: bool, chosen: str) -> None:
    assert choose(env, have) == chosen


def test_uvloop_asked_for_but_missing_says_how_to_install_it() -> None:
    with pytest.raises(LoopError) as caught:
        choose({"MESH_LOOP": "uvloop"}, False)
    assert str(caught.value) == ("MESH_LOOP=uvloop, but uvloop is not installed: pip install "
                                 "'groundhog-mesh[uvloop]' (or unset MESH_LOOP)")


def test_another_value_names_the_allowed_ones() -> None:
    for have in (True, False):
        with pytest.raises(LoopError) as caught:
            choose({"MESH_LOOP": "trio"}, have)
        assert str(caught.value) == ("MESH_LOOP='trio': use one of asyncio, uvloop (unset: uvloop when installed, "
                                     "else asyncio)")


def test_a_loop_error_is_a_value_error() -> None:
    """So every command prints it as one line (failure_line, _run), as it does other ValueErrors."""
    assert issubclass(LoopError, ValueError)


async def _which() -> tuple[str, str]:
    return loop_name(), type(asyncio.get_running_loop()).__module__


def test_asyncio_opts_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_LOOP", "asyncio")
    assert loop_name() == "asyncio"
    name, module = _loop.run(_which())
    assert name == "asyncio" and module.startswith("asyncio")


@needs_uvloop
@pytest.mark.parametrize("value", ["", "uvloop"])
def test_uvloop_when_installed(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MESH_LOOP", value)
    assert loop_name() == "uvloop"
    name, module = _loop.run(_which())
    assert name == "uvloop" and module.startswith("uvloop")


def test_a_wrong_value_runs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_LOOP", "tokio")
    coro = _which()
    with pytest.raises(LoopError):
        _loop.run(coro)
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED  # closed: no "never awaited" warning


def test_the_loop_is_logged_at_the_level_asked(monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MESH_LOOP", "asyncio")
    with caplog.at_level(logging.DEBUG, logger="mesh.loop"):
        _loop.run(_which(), announce=logging.INFO)
        _loop.run(_which())
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "mesh.loop"] == [
        (logging.INFO, "event loop: asyncio"), (logging.DEBUG, "event loop: asyncio")]


@needs_uvloop
@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are Python 3.12+")
def test_eager_tasks_on_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtime's handlers start eagerly (plugin_sdk._runtime.start_task): on a uvloop loop too,
    from a task and from a plain loop callback (where nats-py delivers a message)."""
    from plugin_sdk._runtime import start_task

    monkeypatch.setenv("MESH_LOOP", "uvloop")
    seen: list[str] = []

    async def quick() -> None:
        seen.append("quick" if asyncio.current_task() is not None else "no task")

    async def waits() -> None:
        seen.append("waits: started")
        await asyncio.sleep(0)
        seen.append("waits: done")

    async def main() -> tuple[bool, bool, bool]:
        loop = asyncio.get_running_loop()
        in_place = start_task(quick(), loop).done()
        waiting = start_task(waits(), loop)
        started_at_once = not waiting.done() and seen[-1] == "waits: started"
        await waiting
        from_callback: asyncio.Future[bool] = loop.create_future()
        loop.call_soon(lambda: from_callback.set_result(start_task(quick(), loop).done()))
        return in_place, started_at_once, await from_callback

    assert _loop.run(main()) == (True, True, True)
    assert seen == ["quick", "waits: started", "waits: done", "quick"]
