"""``mesh new plugin NAME``: a plugin package whose own test passes straight away."""

from __future__ import annotations

from pathlib import Path

from plugin_sdk.host import validate_name

__all__ = ["scaffold_plugin"]

_PYPROJECT = '''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "{title}: a groundhog mesh plugin"
requires-python = ">=3.11"
dependencies = ["groundhog-mesh"]

[project.optional-dependencies]
test = ["pytest>=8", "pytest-asyncio>=0.24"]

# `mesh run {name}` and `mesh plugins` find the plugin through this entry point.
[project.entry-points."groundhog.plugins"]
{name} = "{package}.plugin:{cls}"

[tool.setuptools]
packages = ["{package}"]

[tool.pytest.ini_options]
asyncio_mode = "auto"
asyncio_default_fixture_loop_scope = "function"
pythonpath = ["."]
'''

_PLUGIN = '''\
"""{title}: a groundhog mesh plugin."""

from __future__ import annotations

from typing import Any

from plugin_sdk import Message, Plugin, PluginContext, command, query


class {cls}(Plugin):
    """Counts greetings, keeps the count in its state, and announces each one."""

    name = "{name}"
    version = "0.1.0"
    capabilities = ["greet"]

    async def initialize(self, context: PluginContext) -> None:
        await super().initialize(context)
        context.logger.info("%s initialized with settings %s", self.name, context.settings)

    @command("greet")
    async def greet(self, message: Message) -> dict[str, Any]:
        assert self.context is not None
        who = (message.payload or {{}}).get("name", "world")
        greeting = self.context.settings.get("greeting", "hello")  # plugin.toml's [settings]
        count = await self.context.state.get("greeted", 0) + 1
        await self.context.state.put("greeted", count)
        await self.context.messaging.publish_event("{name}.greeted", {{"name": who, "count": count}})
        return {{"greeting": f"{{greeting}} {{who}}", "count": count}}

    @query("count")
    async def count(self, message: Message) -> int:
        assert self.context is not None
        return int(await self.context.state.get("greeted", 0))
'''

_TOML = '''\
# Overrides for `mesh run {name} --config plugin.toml` (every key is optional).
version = "0.1.0"
capabilities = ["greet"]

[settings]
greeting = "hello"
'''

_TEST = '''\
"""Runs {cls} against a real, embedded nats-server (plugin_sdk.testing)."""

from {package}.plugin import {cls}
from plugin_sdk import UnknownOperation
from plugin_sdk.testing import MeshHarness


async def test_greet_counts_persists_and_announces() -> None:
    async with MeshHarness() as mesh:
        await mesh.start({cls})
        events = await mesh.events("{name}.greeted")
        reply = await mesh.send("{name}", {{"name": "ada"}}, operation="greet")
        assert reply.result == {{"greeting": "hello ada", "count": 1}}
        assert (await mesh.send("{name}", operation="count")).result == 1
        assert (await events.next(timeout=5)).payload == {{"name": "ada", "count": 1}}
        assert await (await mesh.state("{name}")).get("greeted") == 1


async def test_unknown_operation_is_a_typed_error() -> None:
    async with MeshHarness() as mesh:
        await mesh.start({cls})
        try:
            await mesh.send("{name}", operation="nope")
        except UnknownOperation as exc:
            assert "nope" in str(exc)
        else:
            raise AssertionError("expected UnknownOperation")
'''

_README = '''\
# {dist}

A groundhog mesh plugin.

```bash
pip install -e '.[test]'
python -m pytest                      # runs the plugin against an embedded nats-server
mesh run {name}                       # joins the mesh (entry point `{name}`)
mesh send {name} --op greet '{{"name": "ada"}}'
```
'''


def scaffold_plugin(name: str, directory: Path) -> list[Path]:
    """Write the package for plugin ``name`` into ``directory`` (which must not exist yet)."""
    validate_name(name)
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; choose another --dir")
    package = name.replace("-", "_") + "_plugin"
    cls = "".join(part.capitalize() for part in name.replace("-", "_").split("_")) or "Plugin"
    values = {"name": name, "package": package, "cls": cls, "dist": f"{name}-plugin", "title": cls}
    files = {
        "pyproject.toml": _PYPROJECT, f"{package}/__init__.py": '"""{title}: a groundhog mesh plugin."""\n',
        f"{package}/plugin.py": _PLUGIN, "plugin.toml": _TOML, "tests/test_plugin.py": _TEST, "README.md": _README,
    }
    written = []
    for rel, template in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**values), encoding="utf-8")
        written.append(path)
    return written
