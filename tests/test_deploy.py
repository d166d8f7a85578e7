"""deploy/: the docker-compose file wires every mesh process to NATS and Jaeger, and the plugins
it runs exist. (Docker is not needed: the file is read, not run.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh import load_plugin_class
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"


def load_compose(path: Path = COMPOSE) -> dict[str, Any]:
    """The compose file as docker compose reads it (YAML, with the ``x-mesh`` anchor merged in)."""
    doc: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return doc


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def mesh_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if s.get("image") == "groundhog-mesh:local"}


def test_services_and_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"nats", "jaeger", "registry", "echo", "counter", "listener"} <= set(services)
    assert services["nats"]["image"] == "nats:2.10"
    assert services["nats"]["command"] == ["-js", "-sd", "/data"]  # JetStream on, stored in the volume
    volume = services["nats"]["volumes"][0].split(":")
    assert volume[1] == "/data" and volume[0] in compose["volumes"]
    assert re.fullmatch(r"(cr\.jaegertracing\.io/)?jaegertracing/jaeger:2\.\d+\.\d+", services["jaeger"]["image"])


def test_ports_exposed(compose: dict[str, Any]) -> None:
    def published(service: str) -> set[int]:
        return {int(p.split(":")[-1]) for p in compose["services"][service].get("ports", [])}

    assert published("nats") >= {4222}  # the host's `mesh` CLI talks to the mesh
    assert published("jaeger") >= {16686, 4317, 4318}  # UI and query API, OTLP gRPC, OTLP HTTP


def test_every_mesh_process_uses_nats_and_exports_to_jaeger(compose: dict[str, Any]) -> None:
    services = mesh_services(compose)
    assert set(services) == {"registry", "echo", "counter", "listener"}
    for name, s in services.items():
        command = s["command"]
        assert command[command.index("--nats") + 1] == "nats://nats:4222", name
        env = s["environment"]
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318", name
        assert "OTEL_SERVICE_NAME" not in env, name  # the service name is the plugin's own
        assert s["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}, name
        assert (DEPLOY / s["build"]["context"] / s["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        assert "nats" in _needs(compose, name) and "jaeger" in _needs(compose, name), name
    assert services["registry"]["command"][0] == "registry"


def _needs(compose: dict[str, Any], name: str) -> set[str]:
    """Every service ``name`` starts after, directly or not."""
    out: set[str] = set()
    todo = list(compose["services"][name].get("depends_on", []))
    while todo:
        dep = todo.pop()
        if dep not in out:
            out.add(dep)
            todo += compose["services"][dep].get("depends_on", [])
    return out


def test_the_plugins_it_runs_exist(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # as in the image: WORKDIR holds examples/
    for name, s in mesh_services(compose).items():
        command = s["command"]
        if command[0] != "run":
            continue
        cls = load_plugin_class(command[1])
        assert cls.default_config().name == name  # the compose service is named as the plugin


def test_dockerfile_installs_this_project_and_the_examples() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.1[1-9]", text, re.M)
    assert re.search(r'^RUN pip install "\.\[grpc\]"', text, re.M)  # OTLP over gRPC works in the image too
    for part in ("pyproject.toml", "plugin_sdk", "mesh", "examples"):
        assert re.search(rf"^COPY .*\b{re.escape(part)}\b", text, re.M), part
    assert 'ENTRYPOINT ["mesh"]' in text
