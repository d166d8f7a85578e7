"""mesh: the groundhog runtime — embedded nats-server, registry service, plugin host, CLI."""

from plugin_sdk.host import NatsCluster, NatsServer, NatsServerError, find_binary, free_port

from ._connect import close, connect
from ._host import ENTRY_POINT_GROUP, load_plugin_class, run_plugin
from ._registry import RegistryService
from ._up import MeshFile, load_mesh_file

__version__ = "0.1.0"

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
