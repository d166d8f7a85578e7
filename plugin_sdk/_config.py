"""Plugin configuration: :class:`PluginConfig`, :class:`Dependency`, :class:`Permissions`.

A config comes from the plugin class's attributes, optionally overridden by a ``plugin.toml``
(``mesh run REF --config plugin.toml``). Unknown keys, wrong types and bad version strings are
refused before anything starts, naming the file and the field.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._errors import ConfigError

__all__ = [
    "NAME_RE",
    "Dependency",
    "Permissions",
    "PluginConfig",
    "check_range",
    "load_config_file",
    "load_config_text",
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


class PluginConfig(_Model):
    """Everything that describes one plugin: identity, needs, settings and limits."""

    name: str
    version: str = "0.1.0"
    description: str = ""
    capabilities: list[str] = Field(default_factory=list)
    dependencies: list[Dependency] = Field(default_factory=list)
    settings: dict[str, Any] = Field(default_factory=dict)
    permissions: Permissions = Field(default_factory=Permissions)
    #: Messages handled at once by one instance.
    max_concurrency: int = Field(default=64, ge=1, le=100_000)
    #: Requests that may wait for a handler slot when all ``max_concurrency`` are busy; past it a
    #: request is refused at once with ResourceError ("overloaded") instead of queueing without end.
    max_queued: int = Field(default=1000, ge=0, le=1_000_000)
    #: Largest request body this plugin accepts, in bytes (the server's own limit also applies).
    max_payload: int = Field(default=1024 * 1024, ge=1)
    #: The mesh protocol (major) this plugin was built for; a host that speaks another refuses it.
    protocol: str = "1"
    #: Seconds to wait, before start(), for every dependency to have a healthy matching instance.
    dependency_timeout: float = Field(default=30.0, ge=0)
    #: Most seconds a handler may run; a caller's shorter timeout (the envelope's t=) cuts it shorter.
    handler_timeout: float = Field(default=30.0, gt=0)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validate_name(v)

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        return validate_semver(v)

    def merged(self, overrides: dict[str, Any], *, source: str = "config") -> PluginConfig:
        """A new config with ``overrides`` applied on top, validated."""
        data = self.model_dump()
        data.update(overrides)
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
