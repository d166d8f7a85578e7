"""mesh: the groundhog runtime — embedded nats-server, registry service, plugin host, CLI."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Imported when first used (PEP 562): a plugin host (`python -m mesh run`) needs the runtime only,
# not the registry, the agent, `mesh up` and what they import (cryptography, typer, rich): that
# costs a host about 0.2 s of CPU and 15 MiB of memory (docs/performance.md).
_LAZY = {
    "NatsCluster": "plugin_sdk.host", "NatsServer": "plugin_sdk.host", "NatsServerError": "plugin_sdk.host",
    "find_binary": "plugin_sdk.host", "free_port": "plugin_sdk.host",
    "close": "mesh._connect", "connect": "mesh._connect",
    "ENTRY_POINT_GROUP": "mesh._host", "load_plugin_class": "mesh._host", "run_plugin": "mesh._host",
    "RegistryService": "mesh._registry", "MeshFile": "mesh._up", "load_mesh_file": "mesh._up",
}

if TYPE_CHECKING:
    from plugin_sdk.host import NatsCluster, NatsServer, NatsServerError, find_binary, free_port

    from ._connect import close, connect
    from ._host import ENTRY_POINT_GROUP, load_plugin_class, run_plugin
    from ._registry import RegistryService
    from ._up import MeshFile, load_mesh_file


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mesh' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

__all__ = [
    "ENTRY_POINT_GROUP",
    "MeshFile",
    "NatsCluster",
    "NatsServer",
    "NatsServerError",
    "RegistryService",
    "__version__",
    "close",
    "connect",
    "find_binary",
    "free_port",
    "load_mesh_file",
    "load_plugin_class",
    "run_plugin",
]
