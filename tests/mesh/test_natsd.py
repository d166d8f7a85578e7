"""The embedded nats-server wrapper and `mesh up`'s refusal of a busy port."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh import NatsServer, NatsServerError
from tests.conftest import mesh_cli


def test_busy_port_is_refused_naming_the_cause(nats_server: NatsServer, tmp_path: Path) -> None:
    with pytest.raises(NatsServerError, match="address already in use"):
        NatsServer(tmp_path, port=nats_server.port).start()
    assert nats_server.running()


def test_start_stop_are_idempotent(tmp_path: Path) -> None:
    server = NatsServer(tmp_path)
    assert server.start() is server.start()
    pid = server.pid
    server.stop()
    server.stop()
    assert not server.running() and pid is not None


async def test_mesh_up_on_a_busy_port_says_so(nats_server: NatsServer, tmp_path: Path, prefix: str) -> None:
    r = await mesh_cli("up", "--port", str(nats_server.port), "--data-dir", str(tmp_path), url="", prefix=prefix)
    assert r.code == 1
    assert "address already in use" in r.err and "another mesh running" in r.err and "Traceback" not in r.err
