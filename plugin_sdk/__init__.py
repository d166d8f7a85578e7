"""plugin_sdk: what plugin authors import to write a groundhog mesh plugin.

It never imports ``mesh``; everything a plugin process needs to join the mesh is here.
"""

from ._config import Dependency, Permissions, PluginConfig, ResourceLimits, load_config_file
from ._context import PluginContext, PluginMetrics, RuntimeInfo
from ._errors import (
    CommunicationError,
    ConfigError,
    ConnectionFailed,
    DependencyError,
    HandlerError,
    InitializationError,
    InvalidMessage,
    PayloadTooLarge,
    PermissionDenied,
    PluginError,
    PluginNotFound,
    ProtocolMismatch,
    RequestTimeout,
    ResourceError,
    SignatureInvalid,
    StateConflict,
    StateError,
    StateNotFound,
    StateTimeout,
    StateTooLarge,
    StateUnavailable,
    UnknownOperation,
)
from ._message import BroadcastResult, ErrorInfo, Health, HealthCheck, Message, MessageKind, PluginInfo, Response
from ._messaging import EventSubscription, PluginMessaging
from ._plugin import Plugin, PluginState, command, on_event, query
from ._registry import PluginRegistry, VersionRecord
from ._runtime import PluginRuntime
from ._state import StateEntry, StateStore
from ._wire import PROTOCOL_VERSION

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "BroadcastResult",
    "CommunicationError",
    "ConfigError",
    "ConnectionFailed",
    "Dependency",
    "DependencyError",
    "ErrorInfo",
    "EventSubscription",
    "HandlerError",
    "Health",
    "HealthCheck",
    "InitializationError",
    "InvalidMessage",
    "Message",
    "MessageKind",
    "PayloadTooLarge",
    "PermissionDenied",
    "Permissions",
    "Plugin",
    "PluginConfig",
    "PluginContext",
    "PluginError",
    "PluginInfo",
    "PluginMessaging",
    "PluginMetrics",
    "PluginNotFound",
    "PluginRegistry",
    "PluginRuntime",
    "PluginState",
    "ProtocolMismatch",
    "RequestTimeout",
    "ResourceError",
    "ResourceLimits",
    "Response",
    "RuntimeInfo",
    "SignatureInvalid",
    "StateConflict",
    "StateEntry",
    "StateError",
    "StateNotFound",
    "StateStore",
    "StateTimeout",
    "StateTooLarge",
    "StateUnavailable",
    "UnknownOperation",
    "VersionRecord",
    "__version__",
    "command",
    "load_config_file",
    "on_event",
    "query",
]
