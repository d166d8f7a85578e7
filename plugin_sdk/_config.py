"""Plugin configuration: :class:`PluginConfig`, :class:`Dependency`, :class:`Permissions`, :class:`ResourceLimits`.

A config comes from the plugin class's attributes, optionally overridden by a ``plugin.toml``
(``mesh run REF --config plugin.toml``). Unknown keys, wrong types and bad version strings are
refused before anything starts, naming the file and the field.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ._errors import ConfigError

__all__ = [
    "NAME_RE",
    "Dependency",
    "Permissions",
    "PluginConfig",
    "ResourceLimits",
    "check_range",
    "load_config_file",
    "load_config_text",
    "parse_size",
    "validate_name",
    "version_matches",
]

#: Plugin names become NATS subject tokens and KV bucket names.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")

#: SemVer 2.0.0 (https://semver.org), the official regular expression (NATS micro's schemas use it too).
SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)


def validate_name(name: str, *, what: str = "plugin name") -> str:
    if not NAME_RE.match(name) or len(name) > 64:
        raise ValueError(
            f"invalid {what} {name!r}: use lowercase letters, digits, '-' and '_', "
            "starting with a letter or digit (at most 64 characters)"
        )
    return name


def validate_semver(version: str) -> str:
    if not SEMVER_RE.match(version):
        raise ValueError(f"invalid version {version!r}: expected SemVer such as '1.2.3' or '2.0.0-rc.1'")
    return version


def check_range(spec: str) -> str:
    """A PEP 440 version range such as ``">=1.2,<2"`` (``""`` accepts everything)."""
    try:
        SpecifierSet(spec)
    except InvalidSpecifier:
        raise ValueError(f"invalid version range {spec!r}: expected e.g. '>=1.2,<2'") from None
    return spec


def version_matches(version: str, spec: str) -> bool:
    """Whether ``version`` satisfies the range ``spec`` (pre-releases included; ``""`` accepts any)."""
    if not spec.strip():
        return True
    try:
        return SpecifierSet(spec).contains(Version(version), prereleases=True)
    except (InvalidVersion, InvalidSpecifier):
        return False


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Dependency(_Model):
    """Another plugin this one needs: a name and a PEP 440 version range (``">=1.2,<2"``)."""

    name: str
    version: str = ""
    optional: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validate_name(v)

    @field_validator("version")
    @classmethod
    def _range(cls, v: str) -> str:
        return check_range(v)

    def accepts(self, version: str) -> bool:
        """Whether ``version`` satisfies this dependency's range (pre-releases included)."""
        return version_matches(version, self.version)

    def __str__(self) -> str:
        return f"{self.name}{' ' + self.version if self.version else ''}"


class Permissions(_Model):
    """What a plugin may do on the mesh, as NATS-style patterns (``*`` one token, ``>`` the rest).

    ``send``: plugin names it may send to; ``publish``/``subscribe``: event types. The default
    allows everything; a refusal raises :class:`~plugin_sdk.PermissionDenied` naming the rule.
    """

    send: list[str] = Field(default_factory=lambda: [">"])
    publish: list[str] = Field(default_factory=lambda: [">"])
    subscribe: list[str] = Field(default_factory=lambda: [">"])


#: Sizes: ``B``; ``K``/``KiB``/``Ki``, ``M``/``MiB``/``Mi``, ``G``/``GiB``/``Gi``, ``T``/``TiB``/``Ti`` are
#: powers of 1024 (as in ulimit, systemd, docker); ``kB``/``KB``, ``MB``, ``GB``, ``TB`` are powers of 1000.
_SIZE_UNITS = {"": 1, "b": 1} | {
    unit: (1000 if unit.endswith("b") and not unit.endswith("ib") else 1024) ** power
    for power, letter in enumerate("kmgt", start=1)
    for unit in (letter, f"{letter}i", f"{letter}ib", f"{letter}b")
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

#: The smallest memory limit accepted: a plugin host (Python, pydantic, nats-py) needs about 32 MiB of
#: private memory idle and does not start below ~36 MiB; a smaller number is almost surely a unit mistake.
MIN_MEMORY = 16 * 1024 * 1024
#: The fewest open files accepted: an idle host holds 7 (stdio, epoll, its NATS socket, ...).
MIN_OPEN_FILES = 16


def parse_size(value: Any) -> int:
    """Bytes, from an integer or a string such as ``"256MiB"``, ``"512M"`` (1024-based) or ``"1GB"`` (1000-based)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a number of bytes or a size such as '256MiB', got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{value!r} is not a whole number of bytes")
        return int(value)
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(value)
    if m is None:
        raise ValueError(f"{value!r} is not a size: expected e.g. 268435456, '256MiB', '512M' or '1GB'")
    unit = _SIZE_UNITS.get(m.group(2).lower())
    if unit is None:
        raise ValueError(f"unknown unit {m.group(2)!r} in {value!r}: use B, KiB, MiB, GiB, TiB (or K, M, G, T: "
                         "1024-based) or kB, MB, GB, TB (1000-based)")
    return int(float(m.group(1)) * unit) if "." in m.group(1) else int(m.group(1)) * unit


# The constraints of the three limits the runtime enforces, shared by their top-level and [limits] places.
_Concurrency = Annotated[int, Field(ge=1, le=100_000)]
_Payload = Annotated[int, Field(ge=1)]
_Timeout = Annotated[float, Field(gt=0)]
#: The limits that exist both as top-level PluginConfig fields and in [limits].
RUNTIME_LIMITS = ("max_concurrency", "handler_timeout", "max_payload")


class ResourceLimits(_Model):
    """The ``[limits]`` table: what one instance may use. Every limit is off (``None``) unless given.

    ``memory``, ``cpu_seconds`` and ``open_files`` are applied by the agent that starts the process
    (rlimits, and a cgroup where cgroup v2 is available: docs/operations.md#resource-limits); an
    instance that goes past one is stopped, reported as ``ResourceError: <limit> limit ...
    exceeded`` and restarted. ``max_concurrency``, ``handler_timeout`` and ``max_payload`` are the
    runtime's own (the top-level fields of the same names); given here, they win over the top-level
    values, and :class:`PluginConfig` carries them at the top level, where the runtime reads them.
    """

    #: Private memory (RLIMIT_DATA; and cgroup ``memory.max``), in bytes: an int, or ``"256MiB"``, ``"512M"``.
    memory: int | None = None
    #: CPU time over the process's life, start-up included (RLIMIT_CPU): SIGXCPU at this many seconds.
    cpu_seconds: int | None = Field(default=None, strict=True, ge=1, le=10**9)
    #: Open file descriptors, sockets and pipes included (RLIMIT_NOFILE).
    open_files: int | None = Field(default=None, strict=True, ge=MIN_OPEN_FILES, le=1 << 20)
    max_concurrency: _Concurrency | None = None
    handler_timeout: _Timeout | None = None
    max_payload: _Payload | None = None

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, v: Any) -> int | None:
        if v is None:
            return None
        n = parse_size(v)
        what = f"{n} bytes" if isinstance(v, int | float) else f"{v!r} ({n} bytes)"
        if n < MIN_MEMORY:
            raise ValueError(f"{what} is below the smallest memory limit, {MIN_MEMORY} bytes (16 MiB): a plugin "
                             "host needs about 32 MiB to run (a size without a unit is in bytes; e.g. '256MiB')")
        if n >= 1 << 62:
            raise ValueError(f"{what} is too large for a memory limit")
        return n

    def os_limits(self) -> dict[str, int]:
        """The limits the agent applies to the process (``memory``, ``cpu_seconds``, ``open_files``), as given."""
        return {k: v for k in ("memory", "cpu_seconds", "open_files") if (v := getattr(self, k)) is not None}


class PluginConfig(_Model):
    """Everything that describes one plugin: identity, needs, settings and limits."""

    name: str
    version: str = "0.1.0"
    description: str = ""
    capabilities: list[str] = Field(default_factory=list)
    dependencies: list[Dependency] = Field(default_factory=list)
    settings: dict[str, Any] = Field(default_factory=dict)
    permissions: Permissions = Field(default_factory=Permissions)
    #: Messages handled at once by one instance (``[limits] max_concurrency``, when given, wins).
    max_concurrency: _Concurrency = 64
    #: Requests that may wait for a handler slot when all ``max_concurrency`` are busy; past it a
    #: request is refused at once with ResourceError ("overloaded") instead of queueing without end.
    max_queued: int = Field(default=1000, ge=0, le=1_000_000)
    #: Largest request body this plugin accepts, in bytes (the server's own limit also applies;
    #: ``[limits] max_payload``, when given, wins).
    max_payload: _Payload = 1024 * 1024
    #: The mesh protocol (major) this plugin was built for; a host that speaks another refuses it.
    protocol: str = "1"
    #: Seconds to wait, before start(), for every dependency to have a healthy matching instance.
    dependency_timeout: float = Field(default=30.0, ge=0)
    #: Most seconds a handler may run; a caller's shorter timeout (the envelope's t=) cuts it shorter
    #: (``[limits] handler_timeout``, when given, wins).
    handler_timeout: _Timeout = 30.0
    #: Seconds a state operation or registry call keeps retrying through a JetStream leader
    #: election or a reconnect before it raises a typed error (None: ``MESH_RETRY_FOR``, else 20).
    retry_for: float | None = Field(default=None, ge=0, le=600)
    #: The ``[limits]`` table; no OS limit unless given.
    limits: ResourceLimits = Field(default_factory=ResourceLimits)

    @model_validator(mode="before")
    @classmethod
    def _limits_win(cls, data: Any) -> Any:
        """``[limits]`` max_concurrency / handler_timeout / max_payload, when given, are the values used:
        copied to the top-level fields (which the runtime reads). A bad ``[limits]`` is left for the
        normal validation, which names ``limits.<field>`` once."""
        if not isinstance(data, dict):
            return data
        raw = data.get("limits")
        if isinstance(raw, dict):
            try:
                raw = ResourceLimits.model_validate(raw)
            except ValidationError:
                return data
        if not isinstance(raw, ResourceLimits):
            return data
        given = {k: v for k in RUNTIME_LIMITS if (v := getattr(raw, k)) is not None}
        return {**data, **given} if given else data

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validate_name(v)

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        return validate_semver(v)

    def merged(self, overrides: dict[str, Any], *, source: str = "config") -> PluginConfig:
        """A new config with ``overrides`` applied on top, validated.

        ``limits`` merges key by key (a file that sets only ``cpu_seconds`` keeps the class's
        ``memory``); a top-level max_concurrency / handler_timeout / max_payload in ``overrides``
        beats the one an earlier ``[limits]`` gave, unless ``overrides`` has its own ``[limits]`` one.
        """
        data = self.model_dump()
        over = dict(overrides)
        new_limits = over.pop("limits", None)
        limits: Any = {k: v for k, v in data["limits"].items() if not (k in RUNTIME_LIMITS and k in over)}
        if isinstance(new_limits, dict):
            limits.update(new_limits)
        elif new_limits is not None:
            limits = new_limits  # not a table: refused by validation, naming "limits"
        data.update(over)
        data["limits"] = limits
        return _validated(data, source)


def _validated(data: dict[str, Any], source: str) -> PluginConfig:
    try:
        return PluginConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None


def load_config_file(path: str | Path, *, base: PluginConfig | None = None) -> PluginConfig:
    """Read a ``plugin.toml``; its keys override ``base`` (the class's own declaration)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    return load_config_text(text, base=base, source=str(p))


def load_config_text(text: str, *, base: PluginConfig | None = None, source: str = "plugin.toml") -> PluginConfig:
    """Like :func:`load_config_file`, from the file's text (``source`` names it in errors)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    # Accept both a flat file and one with a [plugin] table.
    if set(data) == {"plugin"} and isinstance(data["plugin"], dict):
        data = data["plugin"]
    if base is None:
        return _validated(data, source)
    return base.merged(data, source=source)
