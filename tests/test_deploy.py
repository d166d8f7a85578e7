"""deploy/: the docker-compose files wire every mesh process to NATS (and Jaeger), the plugins they
run exist, the NATS configs pass nats-server's own check, the Kubernetes manifests and systemd units
say what a reader would check. (Docker is not needed: the files are read, not run.)"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from mesh import load_mesh_file, load_plugin_class
from plugin_sdk.host import find_binary, parse_urls
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
    assert re.search(r'^RUN pip install "\.\[grpc,uvloop\]"', text, re.M)  # gRPC OTLP and uvloop too
    for part in ("pyproject.toml", "plugin_sdk", "mesh", "examples"):
        assert re.search(rf"^COPY .*\b{re.escape(part)}\b", text, re.M), part
    assert 'ENTRYPOINT ["mesh"]' in text


# --------------------------------------------------------------------------------------------
# Beyond one machine: the three-node compose cluster, Kubernetes, systemd

CLUSTER = DEPLOY / "docker-compose.cluster.yml"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
NODES = ("nats-1", "nats-2", "nats-3")


def test_every_yaml_file_parses() -> None:
    files = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
    assert {COMPOSE, CLUSTER, K8S / "nats-values.yaml", K8S / "registry.yaml", K8S / "agent.yaml"} <= set(files)
    for path in files:
        docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        assert docs and all(isinstance(d, dict) for d in docs), path


_TOKEN = re.compile(r'\s*(?:(?P<punct>[{}\[\],;])|"(?P<quoted>[^"]*)"|(?P<word>[^\s,;{}\[\]"]+))')


def read_nats_conf(path: Path) -> dict[str, Any]:
    """The nats-server config file as a dict: enough of its syntax (``key: value``, ``key { }``,
    ``[ ]`` arrays, ``#`` comments) for the files under deploy/. Whether nats-server accepts the
    file is :func:`test_nats_configs_pass_the_servers_own_check`'s job."""
    text = "\n".join(re.sub(r"(^|\s)(#|//).*$", "", line) for line in path.read_text(encoding="utf-8").splitlines())
    tokens = [(m["punct"], m["quoted"], m["word"]) for m in _TOKEN.finditer(text) if m.group().strip()]
    pos = 0

    def scalar(word: str) -> Any:
        return {"true": True, "false": False}.get(word, int(word) if word.isdigit() else word)

    def value() -> Any:
        nonlocal pos
        punct, quoted, word = tokens[pos]
        pos += 1
        if punct == "{":
            return block("}")
        if punct == "[":
            items = []
            while tokens[pos][0] != "]":
                if tokens[pos][0] == ",":
                    pos += 1
                else:
                    items.append(value())
            pos += 1
            return items
        assert punct is None, f"{path}: unexpected {punct!r}"
        return quoted if quoted is not None else scalar(word)

    def block(end: str | None) -> dict[str, Any]:
        nonlocal pos
        out: dict[str, Any] = {}
        while pos < len(tokens) and (end is None or tokens[pos][0] != end):
            punct, _, word = tokens[pos]
            pos += 1
            if punct in (",", ";"):
                continue
            key, sep, rest = re.fullmatch(r"([A-Za-z_][\w-]*)([:=]?)(.*)", word).groups()  # type: ignore[union-attr]
            if rest:
                out[key] = scalar(rest)
                continue
            if not sep and tokens[pos][2] in (":", "="):
                pos += 1
            out[key] = value()
        pos += 1
        return out

    return block(None)


def check_config(path: Path) -> None:
    """``nats-server -t -c PATH``: the real server's own test of a config file."""
    done = subprocess.run([find_binary(), "-t", "-c", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"{path.name}: {(done.stderr or done.stdout).strip()}"


NATS_CONFIGS = sorted(DEPLOY.rglob("*.conf"))


@pytest.mark.parametrize("path", NATS_CONFIGS, ids=[str(p.relative_to(DEPLOY)) for p in NATS_CONFIGS])
def test_nats_configs_pass_the_servers_own_check(path: Path) -> None:
    check_config(path)


def test_the_server_check_catches_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("cluster { nmae: mesh }\n")
    with pytest.raises(AssertionError, match="unknown field"):
        check_config(bad)


def test_every_nats_config_is_checked() -> None:
    """The compose nodes' and the systemd sample: all ``.conf`` files under deploy/ (checked above)."""
    assert {DEPLOY / "nats" / f"{n}.conf" for n in NODES} | {SYSTEMD / "nats-server.conf"} <= set(NATS_CONFIGS)


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return load_compose(CLUSTER)


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """target → (source, mode) of a compose service's short-syntax volumes."""
    out = {}
    for spec in service.get("volumes", []):
        source, target, *mode = spec.split(":")
        out[target] = (source, mode[0] if mode else "rw")
    return out


def _node_conf(cluster: dict[str, Any], name: str) -> tuple[Path, dict[str, Any]]:
    service = cluster["services"][name]
    command = service["command"]
    inside = command[command.index("--config") + 1]
    source, mode = _mounts(service)[inside]
    assert mode == "ro", f"{name}: its config is mounted read-only"
    path = (DEPLOY / source).resolve()
    assert path.parent == DEPLOY / "nats", name
    return path, read_nats_conf(path)


def test_cluster_has_three_nats_nodes_routed_to_each_other(cluster: dict[str, Any]) -> None:
    services = cluster["services"]
    nats_nodes = [n for n, s in services.items() if str(s.get("image", "")).startswith("nats:")]
    assert sorted(nats_nodes) == list(NODES)
    confs = {n: _node_conf(cluster, n)[1] for n in NODES}
    assert len({c["server_name"] for c in confs.values()}) == 3  # JetStream needs distinct names
    assert {c["cluster"]["name"] for c in confs.values()} == {"mesh"}
    for name, conf in confs.items():
        m = re.fullmatch(r"nats:(\d+)\.(\d+)(\.\d+)?(-\w+)?", services[name]["image"])
        assert m and (int(m[1]), int(m[2])) >= (2, 10), services[name]["image"]
        routes = {urlsplit(r).hostname: urlsplit(r).port for r in conf["cluster"]["routes"]}
        others = set(NODES) - {name}
        assert set(routes) == others, name  # explicit routes, to the other two
        for other, port in routes.items():
            assert port == int(confs[other]["cluster"]["listen"].rsplit(":", 1)[1]), (name, other)
            assert all(urlsplit(r).scheme == "nats-route" for r in conf["cluster"]["routes"])


def test_cluster_nodes_run_jetstream_each_on_its_own_volume(cluster: dict[str, Any]) -> None:
    volumes = []
    for name in NODES:
        conf = _node_conf(cluster, name)[1]
        store = conf["jetstream"]["store_dir"]
        source, mode = _mounts(cluster["services"][name])[store]
        assert source in cluster["volumes"] and mode == "rw", name  # a named volume, not the container's layer
        volumes.append(source)
    assert len(set(volumes)) == 3


def _nats_url(service: dict[str, Any]) -> str:
    command = service["command"]
    if "--nats" in command:
        return str(command[command.index("--nats") + 1])
    return str(service["environment"]["MESH_NATS_URL"])


def test_cluster_registry_and_agents_get_every_node(cluster: dict[str, Any]) -> None:
    services = cluster["services"]
    client_ports = {n: int(_node_conf(cluster, n)[1]["listen"].rsplit(":", 1)[1]) for n in NODES}
    every = {f"nats://{n}:{p}" for n, p in client_ports.items()}
    mesh = {n: s for n, s in services.items() if s.get("image") == "groundhog-mesh:local"}
    registries = [n for n, s in mesh.items() if s["command"][0] == "registry"]
    agents = [n for n, s in mesh.items() if s["command"][0] == "agent"]
    assert registries == ["registry"] and len(agents) == 3
    assert set(mesh) == {*registries, *agents}
    for name, s in mesh.items():
        assert set(_nats_url(s).split(",")) == every, name
        assert not any("://" in part for part in s["command"]), f"{name}: the URL goes in MESH_NATS_URL"
        assert set(NODES) <= _needs(cluster, name), name
    command = services["registry"]["command"]
    assert command[command.index("--replicas") + 1] == "3"
    names = [services[a]["command"][services[a]["command"].index("--name") + 1] for a in agents]
    assert sorted(names) == ["host-1", "host-2", "host-3"]
    for agent, name in zip(agents, names, strict=True):
        assert services[agent]["hostname"] == name  # `mesh agents` shows it as the agent's host
        assert "registry" in _needs(cluster, agent)  # its -f plugins wait for a registry


def _agent_file(service: dict[str, Any]) -> Path:
    """The deploy/ file an agent service gets as ``-f`` (relative to the image's WORKDIR, /app)."""
    command = service["command"]
    inside = command[command.index("-f") + 1]
    target = inside if inside.startswith("/") else f"/app/{inside}"
    source, mode = _mounts(service)[target]
    assert mode == "ro" and Path(target).parent == Path("/app")  # the plugins run in /app, beside examples/
    return (DEPLOY / source).resolve()


def test_cluster_agents_data_dirs_are_volumes(cluster: dict[str, Any]) -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"install -d -o mesh -g mesh -m 0700 /var/lib/groundhog", dockerfile)  # writable as mesh
    for name, s in cluster["services"].items():
        if s.get("image") == "groundhog-mesh:local" and s["command"][0] == "agent":
            data = s["command"][s["command"].index("--data-dir") + 1]
            source, _ = _mounts(s)["/var/lib/groundhog"]
            assert data.startswith("/var/lib/groundhog/") and source in cluster["volumes"], name


def test_cluster_plugins_placed_with_the_agents_load(cluster: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # as in the image: WORKDIR holds examples/
    placed: dict[str, list[str]] = {}
    for name, s in cluster["services"].items():
        if s.get("image") == "groundhog-mesh:local" and s["command"][0] == "agent":
            mesh_file = load_mesh_file(_agent_file(s))
            placed[name] = [load_plugin_class(p.ref).default_config().name for p in mesh_file.plugins if p.ref]
            assert placed[name], f"{name} runs no plugin"
    assert {p for names in placed.values() for p in names} == {"echo", "counter", "listener"}


# --- Kubernetes ---------------------------------------------------------------------------

def _k8s(name: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")))


def test_helm_values_cluster_of_three_with_jetstream_on_file_storage() -> None:
    values = yaml.safe_load((K8S / "nats-values.yaml").read_text(encoding="utf-8"))
    cluster = values["config"]["cluster"]
    assert cluster["enabled"] is True and cluster["replicas"] == 3 and cluster["merge"]["name"] == "mesh"
    js = values["config"]["jetstream"]
    assert js["enabled"] is True
    assert js["fileStore"]["enabled"] is True and js["fileStore"]["pvc"]["enabled"] is True
    assert re.fullmatch(r"\d+[GT]i", js["fileStore"]["pvc"]["size"])


def _pod(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, container


def _argv(container: dict[str, Any]) -> list[str]:
    return [*container.get("command", ["mesh"]), *container.get("args", [])]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _check_pod(doc: dict[str, Any]) -> dict[str, Any]:
    """What both manifests share: the mesh image, MESH_NATS_URL to the chart's service, requests and a
    memory limit, a non-root user and no privilege escalation, the selector matching the pod."""
    spec, container = _pod(doc)
    assert doc["spec"]["selector"]["matchLabels"].items() <= doc["spec"]["template"]["metadata"]["labels"].items()
    assert container["image"].startswith("groundhog-mesh")
    assert _env(container)["MESH_NATS_URL"] == "nats://nats:4222"
    assert not any("://" in a for a in _argv(container))  # the URL is in the environment
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    return container


def test_k8s_registry_is_a_deployment_of_two_asking_for_three_replicas() -> None:
    (doc,) = _k8s("registry.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("apps/v1", "Deployment") and doc["spec"]["replicas"] == 2
    argv = _argv(_check_pod(doc))
    assert argv[:2] == ["mesh", "registry"] and argv[argv.index("--replicas") + 1] == "3"


def test_k8s_agent_is_a_daemonset_named_after_its_node() -> None:
    (doc,) = _k8s("agent.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("apps/v1", "DaemonSet")
    container = _check_pod(doc)
    argv = _argv(container)
    # Named after the node through MESH_AGENT_NAME (sanitized by the agent: dots are fine), not --name
    # (checked strictly, so a node name with dots would be refused).
    assert argv[:2] == ["mesh", "agent"] and "--name" not in argv
    assert _env(container)["MESH_AGENT_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    data = argv[argv.index("--data-dir") + 1]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert any(data.startswith(m + "/") for m in mounts)  # the root filesystem is read-only
    assert _pod(doc)[0]["terminationGracePeriodSeconds"] > 20  # the agent kills a slow host after 20 s


# --- systemd ------------------------------------------------------------------------------

UNITS = sorted(SYSTEMD.glob("*.service"))
SECRET = re.compile(r"://[^/\s@]*@|--creds|password|token|\.creds|\.nk\b", re.I)


def read_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)  # repeated keys (SystemCallFilter=)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    unit.read_string(path.read_text(encoding="utf-8"), source=str(path))
    return unit


def test_systemd_units_are_the_three_expected() -> None:
    assert [p.name for p in UNITS] == ["mesh-agent.service", "mesh-registry.service", "nats-server.service"]


@pytest.mark.parametrize("path", UNITS, ids=[p.name for p in UNITS])
def test_systemd_unit_runs_its_binary_hardened_without_secrets(path: Path) -> None:
    unit = read_unit(path)
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).is_absolute() and Path(argv[0]).name == ("nats-server" if path.name.startswith("nats")
                                                                   else "mesh")
    assert not SECRET.search(service["ExecStart"]), service["ExecStart"]
    assert service["Restart"] == "on-failure"
    assert service["User"] not in ("", "root", "0") and service["Group"] == service["User"]
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] == "yes" and service["PrivateTmp"] == "yes"
    assert service["CapabilityBoundingSet"] == ""
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    writable = service["ReadWritePaths"].split()
    if argv[1:2] == ["agent"]:  # what it writes is under a writable path
        data = argv[argv.index("--data-dir") + 1]
        assert any(Path(data).is_relative_to(w) for w in writable), data
    if path.name.startswith("mesh"):
        assert service["EnvironmentFile"] == "/etc/groundhog/mesh.env"  # MESH_NATS_URL, MESH_CREDS, …
        assert not any("://" in a for a in argv)  # the URL is in the file, not on the command line
        assert "AF_UNIX" in service["RestrictAddressFamilies"]  # asyncio's self-pipe is a socketpair
        assert Path(service["WorkingDirectory"]).is_relative_to(writable[0])


def test_systemd_mesh_units_ask_for_three_replicas() -> None:
    argv = shlex.split(read_unit(SYSTEMD / "mesh-registry.service")["Service"]["ExecStart"])
    assert argv[1] == "registry" and argv[argv.index("--replicas") + 1] == "3"
    agent = read_unit(SYSTEMD / "mesh-agent.service")["Service"]
    assert shlex.split(agent["ExecStart"])[1] == "agent"
    assert agent["KillMode"] == "mixed"  # SIGTERM to the agent only: it stops its hosts in order


def test_systemd_nats_server_unit_uses_the_sample_config() -> None:
    service = read_unit(SYSTEMD / "nats-server.service")["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[argv.index("-c") + 1] == "/etc/nats/nats-server.conf"
    assert "/etc/nats/nats-server.conf" in (SYSTEMD / "nats-server.conf").read_text(encoding="utf-8")
    conf = read_nats_conf(SYSTEMD / "nats-server.conf")
    assert Path(conf["jetstream"]["store_dir"]).is_relative_to(service["ReadWritePaths"])
    assert service["KillSignal"] == "SIGUSR2"  # lame duck: clients move to the other nodes first
    lame_duck = int(conf["lame_duck_duration"].rstrip("s"))
    assert lame_duck + 5 < int(service["TimeoutStopSec"])


def test_systemd_nats_config_is_a_three_machine_cluster() -> None:
    conf = read_nats_conf(SYSTEMD / "nats-server.conf")
    assert conf["server_name"] and conf["listen"] == "0.0.0.0:4222"
    assert conf["jetstream"]["store_dir"].startswith("/")
    assert conf["cluster"]["name"] == "mesh" and conf["cluster"]["listen"] == "0.0.0.0:6222"
    routes = [urlsplit(r) for r in conf["cluster"]["routes"]]
    assert len({r.hostname for r in routes}) == 3 and {(r.scheme, r.port) for r in routes} == {("nats-route", 6222)}


def test_systemd_env_file_sample() -> None:
    """deploy/systemd/mesh.env.example: what /etc/groundhog/mesh.env holds (0600), every node's URL."""
    text = (SYSTEMD / "mesh.env.example").read_text(encoding="utf-8")
    assert "install -m 0600" in text
    settings = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert set(settings) == {"MESH_NATS_URL"}
    assert len(parse_urls(settings["MESH_NATS_URL"])) == 3
    commented = set(re.findall(r"^#(MESH_[A-Z_]+)=", text, re.M))
    assert {"MESH_CREDS", "MESH_TLS_CA"} <= commented


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` on each unit, its ExecStart binary pointed at the real one here (verify
    insists it exists): no unknown key, no bad value."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    mesh_bin = Path(sys.executable).parent / "mesh"
    if not mesh_bin.is_file():
        pytest.skip(f"no mesh script beside {sys.executable} to stand in for /opt/groundhog/venv/bin/mesh")
    for path in UNITS:
        text = path.read_text(encoding="utf-8")
        binary = shlex.split(read_unit(path)["Service"]["ExecStart"])[0]
        real = find_binary() if Path(binary).name == "nats-server" else str(mesh_bin)
        (tmp_path / path.name).write_text(text.replace(binary, real), encoding="utf-8")
        done = subprocess.run([analyze, "verify", str(tmp_path / path.name)], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)
        out = (done.stdout + done.stderr).strip()
        mine = [line for line in out.splitlines() if path.name in line]
        assert done.returncode == 0 and not mine, f"{path.name}: {out}"


# --- the table --------------------------------------------------------------------------------

def test_readme_names_every_file_under_deploy() -> None:
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([^`]+)` \|", readme, re.M))
    files = {str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*") if p.is_file() and p.name != "README.md"}
    assert files == rows, f"missing from the table: {sorted(files - rows)}; not a file: {sorted(rows - files)}"
