"""`mesh broadcast` to a plugin nobody runs says so, instead of reporting a phantom reply."""

from __future__ import annotations

from mesh import NatsServer, RegistryService
from tests.conftest import mesh_cli


async def test_broadcast_to_a_name_with_no_instances_is_an_error(nats_server: NatsServer, prefix: str,
                                                                 registry: RegistryService) -> None:
    r = await mesh_cli("broadcast", "{}", "--to", "ghost", url=nats_server.url, prefix=prefix)
    # It printed {"instance": null, "result": null, "error": null} and "1 replied, 0 missing", exit 0.
    assert r.code == 1, r
    assert r.out == ""
    assert r.err.strip().splitlines() == [
        f"error: PluginNotFound: no plugin instance serves broadcasts to 'ghost' (no responders on "
        f"{prefix}.broadcast.ghost)"]
