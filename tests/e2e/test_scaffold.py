"""`mesh new plugin NAME` writes a package whose own test passes straight away."""

from __future__ import annotations

import asyncio
import sys
import tomllib
from pathlib import Path

from tests.conftest import child_env, mesh_cli


async def test_scaffold_passes_its_own_test(tmp_path: Path) -> None:
    target = tmp_path / "greeter"
    r = await mesh_cli("new", "plugin", "greeter", "--dir", str(target), url="", prefix="mesh")
    assert r.code == 0, r.err
    assert "pip install -e '.[test]'" in r.err
    project = tomllib.loads((target / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["groundhog.plugins"] == {"greeter": "greeter_plugin.plugin:Greeter"}
    assert (target / "plugin.toml").exists()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=target, env=child_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, out.decode()
    assert "2 passed" in out.decode()


async def test_scaffold_refuses_bad_names_and_existing_dirs(tmp_path: Path) -> None:
    r = await mesh_cli("new", "plugin", "Bad Name", "--dir", str(tmp_path / "x"), url="", prefix="mesh")
    assert r.code == 1 and "invalid plugin name 'Bad Name'" in r.err
    r = await mesh_cli("new", "plugin", "fine", "--dir", str(tmp_path), url="", prefix="mesh")
    assert r.code == 1 and "already exists" in r.err
