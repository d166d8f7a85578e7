"""The public surface of plugin_sdk, config validation and the wire's pure parts."""

from __future__ import annotations

import ast
import subprocess
import sys
import types
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import plugin_sdk
from plugin_sdk import (
    ConfigError,
    Dependency,
    ErrorInfo,
    HandlerError,
    PluginConfig,
    PluginError,
    PluginNotFound,
    RequestTimeout,
    load_config_file,
)
from plugin_sdk._messaging import subject_matches
from plugin_sdk._wire import dumps, loads


def test_all_lists_exactly_the_public_names() -> None:
    # (submodules such as plugin_sdk.host and plugin_sdk.testing are imported by name, not exported)
    public = {n for n in dir(plugin_sdk) if not n.startswith("_")
              and not isinstance(getattr(plugin_sdk, n), types.ModuleType)} - {"annotations"}
    assert set(plugin_sdk.__all__) - {"__version__"} == public
    for name in ["Plugin", "PluginContext", "PluginMessaging", "Message", "PluginInfo", "PluginConfig",
                 "PluginError", "InitializationError", "CommunicationError", "DependencyError", "ResourceError",
                 "Response", "PluginRegistry"]:
        assert name in plugin_sdk.__all__


def test_plugin_sdk_never_imports_mesh() -> None:
    code = "import sys, plugin_sdk, plugin_sdk._runtime; print([m for m in sys.modules if m.split('.')[0]=='mesh'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def sdk_private_imports(source: str) -> list[str]:
    """Every ``plugin_sdk._x`` module (or ``_x`` name of ``plugin_sdk``) that ``source`` imports."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("plugin_sdk._")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "plugin_sdk":
            if node.module.startswith("plugin_sdk._"):
                found.append(node.module)
            found += [f"{node.module}.{a.name}" for a in node.names
                      if a.name.startswith("_") and a.name != "__version__"]
    return found


def test_mesh_uses_only_the_sdks_supported_surface() -> None:
    # mesh builds on plugin_sdk (its public API) and plugin_sdk.host (the documented host surface),
    # never on the SDK's underscore modules.
    root = Path(__file__).resolve().parents[2] / "mesh"
    offenders = {str(p.relative_to(root.parent)): found for p in sorted(root.rglob("*.py"))
                 if (found := sdk_private_imports(p.read_text(encoding="utf-8")))}
    assert offenders == {}
    assert sdk_private_imports("from plugin_sdk._wire import dumps\nfrom plugin_sdk import _tracing") == [
        "plugin_sdk._wire", "plugin_sdk._tracing"]


def test_the_host_surface_exports_what_it_lists() -> None:
    import plugin_sdk.host as host

    assert sorted(host.__all__) == sorted(set(host.__all__))
    missing = [name for name in host.__all__ if not hasattr(host, name)]
    assert missing == []


def test_error_tree_and_round_trip() -> None:
    assert issubclass(PluginNotFound, plugin_sdk.CommunicationError)
    assert issubclass(RequestTimeout, plugin_sdk.CommunicationError)
    for exc in [PluginNotFound("gone", plugin="x"), plugin_sdk.ResourceError("full"), ValueError("bad")]:
        back = ErrorInfo.from_exception(exc, plugin="x").to_exception(subject="s")
        assert isinstance(back, PluginError)
        assert back.plugin == "x" and back.subject == "s"
        if isinstance(exc, PluginError):
            assert type(back) is type(exc) and str(back) == str(exc)
        else:
            assert isinstance(back, HandlerError) and back.remote_type == "ValueError"
            assert "bad" in str(back)


def test_config_file_errors_name_file_and_field(tmp_path: Path) -> None:
    base = PluginConfig(name="demo")
    cases = {
        'colour = "red"\n': "colour: Extra inputs are not permitted",
        'max_concurrency = "many"\n': "max_concurrency",
        'version = "1.0"\n': "version: Value error, invalid version '1.0'",
        'name = "Bad Name"\n': "invalid plugin name",
        'dependencies = [{name = "auth", version = "~~1"}]\n': "invalid version range",
        "this is = not toml": "not valid TOML",
    }
    for text, expected in cases.items():
        f = tmp_path / "plugin.toml"
        f.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config_file(f, base=base)
        assert str(f) in str(info.value) and expected in str(info.value), str(info.value)
    with pytest.raises(ConfigError, match="no such file"):
        load_config_file(tmp_path / "absent.toml")


def test_config_file_overrides_class_declaration(tmp_path: Path) -> None:
    f = tmp_path / "plugin.toml"
    f.write_text('[plugin]\nversion = "2.0.0"\nsettings = {greeting = "hej"}\n'
                 'dependencies = [{name = "auth", version = ">=1.2,<2"}]\n')
    config = load_config_file(f, base=PluginConfig(name="demo", capabilities=["x"]))
    assert (config.name, config.version, config.capabilities) == ("demo", "2.0.0", ["x"])
    assert config.settings == {"greeting": "hej"}
    assert config.dependencies[0].accepts("1.5.0") and not config.dependencies[0].accepts("2.0.0")


def test_dependency_ranges() -> None:
    d = Dependency(name="auth", version=">=1.2,<2")
    assert [d.accepts(v) for v in ["1.1.9", "1.2.0", "1.9.9-rc.1", "2.0.0", "junk"]] == [
        False, True, True, False, False]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(), lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@given(json_values)
def test_payloads_survive_the_wire(value: object) -> None:
    assert loads(dumps(value)) == value


tokens = st.sampled_from(["a", "b", "orders", "x1"])


@given(st.lists(tokens, min_size=1, max_size=4), st.lists(tokens, min_size=1, max_size=4))
def test_subject_matching_follows_nats_rules(pattern: list[str], subject: list[str]) -> None:
    s = ".".join(subject)
    assert subject_matches(".".join(subject), s)
    assert subject_matches(".".join([*pattern[:-1], ">"]), s) == (
        len(subject) >= len(pattern) and subject[: len(pattern) - 1] == pattern[:-1])
    star = [("*" if i % 2 else t) for i, t in enumerate(pattern)]
    expected = len(star) == len(subject) and all(p in ("*", t) for p, t in zip(star, subject, strict=False))
    assert subject_matches(".".join(star), s) == expected


def test_hot_path_models_equal_validated_ones() -> None:
    from plugin_sdk import Message, MessageKind
    from plugin_sdk._message import fast_model, new_id

    fields = {"id": new_id(), "source": "a", "target": "b", "payload": {"x": [1]}, "metadata": {"k": "v"},
              "kind": MessageKind.QUERY, "operation": "op", "source_instance": "a-1"}
    fast = fast_model(Message, dict(fields))
    assert fast == Message(**fields)
    assert fast.model_dump() == Message(**fields).model_dump()
    assert len({new_id() for _ in range(1000)}) == 1000


def test_class_declarations_are_validated_with_a_clear_error() -> None:
    from typing import Any, ClassVar

    from plugin_sdk import Plugin

    class Documented(Plugin):
        """Does one thing well."""

        name = "documented"

    class Undocumented(Plugin):
        name = "undocumented"

    class BadRange(Plugin):
        name = "bad-range"
        dependencies: ClassVar[list[Any]] = [{"name": "auth", "version": "~~1"}]

    assert Documented.default_config().description == "Does one thing well."
    assert Undocumented.default_config().description == ""  # not the base class's docstring
    with pytest.raises(ConfigError, match=r"BadRange: dependencies\.0\.version: Value error, invalid version range"):
        BadRange.default_config()
