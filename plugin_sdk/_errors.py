"""The error tree of the mesh.

Every error a plugin author or a caller sees is a :class:`PluginError`. Errors cross the wire: a
handler that raises one of these makes the caller raise the *same* class, with the same message
and context (see ``docs/subjects.md``, "Errors"). Any other exception raised by a handler arrives
as :class:`HandlerError`, carrying the remote exception's type name and message.

::

    PluginError                       .plugin, .subject, .code (an HTTP-like status)
    ├── InitializationError           a plugin failed to load, configure or initialize
    │   └── ConfigError               an invalid plugin.toml / mesh.toml / PluginConfig
    ├── CommunicationError            a message could not be delivered or answered
    │   ├── PluginNotFound            no instance serves the target (NATS "no responders")
    │   ├── RequestTimeout            no reply within the timeout
    │   ├── ConnectionFailed          no NATS server reachable / connection closed
    │   ├── InvalidMessage            the body is not JSON, or the envelope is malformed
    │   ├── UnknownOperation          the plugin has no handler for this operation
    │   └── ProtocolMismatch          the envelope's protocol version is not understood
    ├── DependencyError               a dependency is missing, unhealthy or out of range
    ├── ResourceError                 a limit was hit
    │   └── PayloadTooLarge           the message exceeds the server's or plugin's limit
    ├── PermissionDenied              the plugin's permissions refuse the operation
    │   └── SignatureInvalid          a plugin package is unsigned, signed by an untrusted key, or altered
    ├── StateError                    the plugin's KV state failed (.bucket, .key)
    │   ├── StateConflict             compare-and-set lost: the revision moved on
    │   ├── StateTimeout              JetStream did not answer in time (a write may have landed)
    │   ├── StateUnavailable          no JetStream: connection closed/reconnecting, no responders
    │   ├── StateNotFound             the bucket does not exist
    │   └── StateTooLarge             the value exceeds a payload limit (also a PayloadTooLarge)
    └── HandlerError                  the remote handler raised something else
                                      (.remote_type names the remote exception class)
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "CommunicationError",
    "ConfigError",
    "ConnectionFailed",
    "DependencyError",
    "HandlerError",
    "InitializationError",
    "InvalidMessage",
    "PayloadTooLarge",
    "PermissionDenied",
    "PluginError",
    "PluginNotFound",
    "ProtocolMismatch",
    "RequestTimeout",
    "ResourceError",
    "SignatureInvalid",
    "StateConflict",
    "StateError",
    "StateNotFound",
    "StateTimeout",
    "StateTooLarge",
    "StateUnavailable",
    "UnknownOperation",
    "error_class",
]


class PluginError(Exception):
    """Base of every mesh error.

    ``plugin`` names the plugin concerned (target or source), ``subject`` the NATS subject, and
    ``code`` an HTTP-like status that travels as ``Nats-Service-Error-Code``.
    """

    code: ClassVar[int] = 500

    def __init__(self, message: str, *, plugin: str | None = None, subject: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.plugin = plugin
        self.subject = subject

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.plugin, self.subject, self.__dict__))


def _rebuild(cls: type[PluginError], message: str, plugin: str | None, subject: str | None,
             state: dict[str, Any]) -> PluginError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class InitializationError(PluginError):
    """A plugin could not be loaded, configured or initialized."""


class ConfigError(InitializationError):
    """A configuration file or object is invalid; the message names the file and field."""

    code = 400


class CommunicationError(PluginError):
    """A message could not be delivered or answered."""

    code = 502


class PluginNotFound(CommunicationError):
    """No live instance serves the target subject."""

    code = 404


class RequestTimeout(CommunicationError):
    """No reply arrived within the timeout."""

    code = 504


class ConnectionFailed(CommunicationError):
    """No NATS server could be reached, or the connection is closed."""

    code = 503


class InvalidMessage(CommunicationError):
    """The message body is not valid JSON or its envelope is malformed."""

    code = 400


class UnknownOperation(CommunicationError):
    """The plugin has no handler for the requested operation."""

    code = 404


class ProtocolMismatch(CommunicationError):
    """The message's protocol version is not one this side understands."""

    code = 505


class DependencyError(PluginError):
    """A dependency is missing, unhealthy, out of the version range, or part of a cycle."""

    code = 424


class ResourceError(PluginError):
    """A resource limit was hit."""

    code = 507


class PayloadTooLarge(ResourceError):
    """The message exceeds the NATS server's or the plugin's payload limit."""

    code = 413


class PermissionDenied(PluginError):
    """The plugin's declared permissions refuse this operation."""

    code = 403


class StateError(PluginError):
    """Reading or writing the plugin's persisted state failed.

    ``bucket`` and ``key`` name what was being read or written (``None`` when not known, e.g. on
    the far side of the wire, where the message still names them).
    """

    def __init__(self, message: str, *, plugin: str | None = None, subject: str | None = None,
                 bucket: str | None = None, key: str | None = None) -> None:
        super().__init__(message, plugin=plugin, subject=subject)
        self.bucket = bucket
        self.key = key


class StateConflict(StateError):
    """A compare-and-set was refused because the key's revision had moved on."""

    code = 409


class StateTimeout(StateError):
    """JetStream did not answer within the timeout.

    For a write this means *unknown*, not *failed*: JetStream may have stored it and the
    acknowledgement been lost. Re-read before retrying; ``compare_and_set`` retries safely.
    """

    code = 504


class StateUnavailable(StateError):
    """The state store cannot be reached: the NATS connection is closed or reconnecting, or no
    JetStream answers (not enabled, or no responders)."""

    code = 503


class StateNotFound(StateError):
    """The state bucket does not exist (and was not to be created)."""

    code = 404


class StateTooLarge(StateError, PayloadTooLarge):
    """The value exceeds the plugin's or the NATS server's payload limit; nothing was sent.

    Also a :class:`PayloadTooLarge`, so code catching that still catches this.
    """

    code = 413


class HandlerError(PluginError):
    """The remote handler raised an exception that is not a :class:`PluginError`.

    ``remote_type`` is the remote exception's class name (e.g. ``"ValueError"``).
    """

    def __init__(self, message: str, *, remote_type: str = "Exception", plugin: str | None = None,
                 subject: str | None = None) -> None:
        super().__init__(message, plugin=plugin, subject=subject)
        self.remote_type = remote_type


def _all_subclasses(cls: type[PluginError]) -> dict[str, type[PluginError]]:
    found = {cls.__name__: cls}
    for sub in cls.__subclasses__():
        found.update(_all_subclasses(sub))
    return found


def error_class(name: str) -> type[PluginError] | None:
    """The :class:`PluginError` subclass called ``name``, or ``None``.

    Looked up at call time so that subclasses defined by plugin packages are found too.
    """
    return _all_subclasses(PluginError).get(name)


class SignatureInvalid(PermissionDenied):
    """A plugin package was refused: unsigned (where signatures are required), signed by a key not
    in the trust store, or not what was signed (a file changed, added or removed; a symlink; a path
    outside the package). The message names the package and the key or the file."""

    code = 403
