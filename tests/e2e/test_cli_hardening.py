"""Hardening of the `mesh` command line, each against a real nats-server and real processes."""

from __future__ import annotations

from pathlib import Path

from mesh import NatsServer
from tests.conftest import mesh_cli


def one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


async def test_state_put_over_the_payload_limit_is_one_typed_line(nats_server: NatsServer, prefix: str,
                                                                  tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_text('"' + "x" * 5_000_000 + '"')
    r = await mesh_cli("state", "put", "demo", "big", f"@{big}", url=nats_server.url, prefix=prefix)
    assert r.code == 1 and r.out == "" and one_line(r.err), r.err
    assert "StateTooLarge" in r.err and f"{prefix}_state_demo" in r.err and "'big'" in r.err, r.err
    assert "5000002 bytes" in r.err and "1048576" in r.err, r.err
