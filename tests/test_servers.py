"""tests/_servers.py: which nats-server the tests get (MESH_TEST_DOCKER), the Docker probe, the binary path."""

from __future__ import annotations

import contextlib
import io
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg

from mesh import NatsServer, free_port
from tests import _servers
from tests._servers import (
    ContainerServer,
    DockerRequiredError,
    announce,
    choose_backend,
    docker_reachable,
    have_testcontainers,
    notice,
    start_server,
)

# --- the decision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("env", [{}, {"MESH_TEST_DOCKER": "0"}, {"MESH_TEST_DOCKER": ""},
                                 {"MESH_TEST_DOCKER": "false"}, {"MESH_TEST_DOCKER": " 0 "}])
@pytest.mark.parametrize("reachable", [True, False])
@pytest.mark.parametrize("tc", [True, False])
def test_unset_or_0_is_the_binary_whatever_docker_says(env: dict[str, str], reachable: bool, tc: bool) -> None:
    backend, reason = choose_backend(env, reachable, testcontainers=tc)
    assert backend == "binary"
    assert reason and "\n" not in reason
    assert notice(env, (backend, reason)) is None  # the default says nothing


@pytest.mark.parametrize("value", ["1", "true", "yes", "require", "REQUIRE"])
def test_docker_when_asked_reachable_and_installed(value: str) -> None:
    env = {"MESH_TEST_DOCKER": value}
    backend, reason = choose_backend(env, True, testcontainers=True)
    assert backend == "docker"
    assert "nats:2.10" in reason and "\n" not in reason


def test_image_can_be_chosen() -> None:
    env = {"MESH_TEST_DOCKER": "1", "MESH_TEST_NATS_IMAGE": "nats:2.11-alpine"}
    assert "nats:2.11-alpine" in choose_backend(env, True, testcontainers=True)[1]


def test_asked_but_docker_unreachable_falls_back_and_says_why() -> None:
    env = {"MESH_TEST_DOCKER": "1", "DOCKER_HOST": "unix:///nowhere/docker.sock"}
    backend, reason = choose_backend(env, False, testcontainers=True)
    assert backend == "binary"
    assert "not reachable" in reason and "DOCKER_HOST=unix:///nowhere/docker.sock" in reason
    assert "bundled nats-server" in reason
    line = notice(env, (backend, reason))
    assert line is not None and line.startswith("nats-server: binary (") and "\n" not in line


def test_asked_docker_reachable_but_testcontainers_missing_falls_back_and_says_why() -> None:
    env = {"MESH_TEST_DOCKER": "1"}
    backend, reason = choose_backend(env, True, testcontainers=False)
    assert backend == "binary"
    assert "testcontainers is not installed" in reason and ".[docker]" in reason
    assert notice(env, (backend, reason)) is not None


def test_neither_names_docker_first() -> None:
    backend, reason = choose_backend({"MESH_TEST_DOCKER": "1"}, False, testcontainers=False)
    assert backend == "binary" and "not reachable" in reason


@pytest.mark.parametrize(("reachable", "tc", "why"), [(False, True, "not reachable"),
                                                      (True, False, "testcontainers is not installed"),
                                                      (False, False, "not reachable")])
def test_require_fails_instead_of_falling_back(reachable: bool, tc: bool, why: str) -> None:
    with pytest.raises(DockerRequiredError, match=why):
        choose_backend({"MESH_TEST_DOCKER": "require"}, reachable, testcontainers=tc)


@pytest.mark.parametrize("value", ["2", "maybe", "docker"])
def test_an_unknown_value_is_an_error_not_off(value: str) -> None:
    with pytest.raises(ValueError, match="expected 0, 1 or require"):
        choose_backend({"MESH_TEST_DOCKER": value}, True, testcontainers=True)


def test_choose_backend_probes_testcontainers_only_when_not_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_servers, "have_testcontainers", lambda: False)
    assert choose_backend({"MESH_TEST_DOCKER": "1"}, True)[0] == "binary"
    monkeypatch.setattr(_servers, "have_testcontainers", lambda: True)
    assert choose_backend({"MESH_TEST_DOCKER": "1"}, True)[0] == "docker"


def test_testcontainers_missing_is_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "testcontainers" or m.startswith("testcontainers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "testcontainers", None)  # import testcontainers -> ImportError
    assert have_testcontainers() is False


def test_have_testcontainers_answers_without_raising() -> None:
    assert isinstance(have_testcontainers(), bool)


# --- the session's one line -----------------------------------------------------------------------


class _Reporter:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write_line(self, line: str) -> None:
        self.lines.append(line)


def _config(reporter: _Reporter | None) -> Any:
    return SimpleNamespace(pluginmanager=SimpleNamespace(get_plugin=lambda name: reporter))


def test_announce_prints_one_line_through_the_terminal_reporter() -> None:
    reporter = _Reporter()
    announce(_config(reporter), {"MESH_TEST_DOCKER": "1", "DOCKER_HOST": "unix:///nowhere/docker.sock"})
    assert len(reporter.lines) == 1
    assert reporter.lines[0].startswith("nats-server: binary (MESH_TEST_DOCKER=1 but Docker is not reachable")


def test_announce_falls_back_to_a_stream_without_a_reporter() -> None:
    out = io.StringIO()
    announce(_config(None), {"MESH_TEST_DOCKER": "1", "DOCKER_HOST": "unix:///nowhere/docker.sock"}, stream=out)
    assert out.getvalue().count("\n") == 1 and "bundled nats-server" in out.getvalue()


def test_announce_says_nothing_by_default() -> None:
    reporter = _Reporter()
    announce(_config(reporter), {})
    assert reporter.lines == []


def test_announce_ends_the_session_under_require() -> None:
    with pytest.raises(pytest.UsageError, match="MESH_TEST_DOCKER=require but Docker is not reachable"):
        announce(_config(_Reporter()), {"MESH_TEST_DOCKER": "require", "DOCKER_HOST": "unix:///nowhere/x.sock"})
    with pytest.raises(pytest.UsageError, match="expected 0, 1 or require"):
        announce(_config(_Reporter()), {"MESH_TEST_DOCKER": "maybe"})


# --- the Docker probe -----------------------------------------------------------------------------


def test_probe_is_false_quickly_here_without_raising(tmp_path: Path) -> None:
    t0 = time.monotonic()
    assert docker_reachable({}, sockets=[str(tmp_path / "docker.sock")]) is False
    assert docker_reachable({"DOCKER_HOST": f"unix://{tmp_path}/none.sock"}) is False
    assert docker_reachable({"DOCKER_HOST": f"tcp://127.0.0.1:{free_port()}"}) is False  # refused
    assert docker_reachable({"DOCKER_HOST": "ssh://user@host"}) is False  # not probed
    assert docker_reachable({"DOCKER_HOST": "tcp://127.0.0.1:notaport"}) is False
    assert time.monotonic() - t0 < 3


def test_probe_of_this_machine_is_false_quickly() -> None:
    """No Docker engine here (no socket): the real probe, on the real environment, says so at once."""
    t0 = time.monotonic()
    assert docker_reachable() is False
    assert time.monotonic() - t0 < 3


@contextlib.contextmanager
def _serve_unix(path: Path, answer: bytes | None) -> Iterator[None]:
    """A fake Engine API on a unix socket: answers each request with ``answer`` (None: never answers)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    stop = threading.Event()
    held: list[socket.socket] = []

    def loop() -> None:
        server.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.recv(1024)
            if answer is None:
                held.append(conn)
                continue
            conn.sendall(answer)
            conn.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(2)
        server.close()
        for conn in held:
            conn.close()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory for unix sockets (pytest's tmp_path can pass the 108-byte limit)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tc") as d:
        yield Path(d)


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="unix sockets")
def test_probe_is_true_when_the_engine_answers_its_ping(short_tmp: Path) -> None:
    sock = short_tmp / "docker.sock"
    with _serve_unix(sock, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK"):
        assert docker_reachable({"DOCKER_HOST": f"unix://{sock}"}) is True
        assert docker_reachable({}, sockets=[str(short_tmp / "absent.sock"), str(sock)]) is True


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="unix sockets")
def test_probe_is_false_for_a_socket_that_is_not_docker(short_tmp: Path) -> None:
    sock = short_tmp / "other.sock"
    with _serve_unix(sock, b"HTTP/1.1 404 Not Found\r\n\r\n"):
        assert docker_reachable({"DOCKER_HOST": f"unix://{sock}"}) is False


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="unix sockets")
def test_probe_gives_up_on_a_socket_that_never_answers(short_tmp: Path) -> None:
    sock = short_tmp / "mute.sock"
    with _serve_unix(sock, None):
        t0 = time.monotonic()
        assert docker_reachable({"DOCKER_HOST": f"unix://{sock}"}, timeout=0.3) is False
        assert time.monotonic() - t0 < 2


# --- the two backends -----------------------------------------------------------------------------


async def _round_trip(url: str) -> bytes:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        async def echo(msg: Msg) -> None:
            await msg.respond(msg.data)

        sub = await nc.subscribe("servers.echo", cb=echo)
        reply = await nc.request("servers.echo", b"ping", timeout=5)
        await sub.unsubscribe()
        js = nc.jetstream()
        await js.account_info()  # JetStream is on (-js)
        return reply.data
    finally:
        await nc.close()


async def test_binary_path_is_a_real_nats_server_a_client_can_use(tmp_path: Path) -> None:
    server = start_server(tmp_path, env={})
    try:
        assert isinstance(server, NatsServer)  # what every other test was written against
        assert server.running() and server.monitor_port
        assert server.url == f"nats://127.0.0.1:{server.port}"
        assert await _round_trip(server.url) == b"ping"
    finally:
        server.stop()
    assert not server.running()


async def test_asked_for_docker_here_gets_the_binary(tmp_path: Path) -> None:
    env = {"MESH_TEST_DOCKER": "1", "DOCKER_HOST": f"unix://{tmp_path}/none.sock"}
    server = start_server(tmp_path, env=env)
    try:
        assert isinstance(server, NatsServer)
        assert await _round_trip(server.url) == b"ping"
    finally:
        server.stop()


def test_require_here_does_not_start_anything(tmp_path: Path) -> None:
    env = {"MESH_TEST_DOCKER": "require", "DOCKER_HOST": f"unix://{tmp_path}/none.sock"}
    with pytest.raises(DockerRequiredError):
        start_server(tmp_path, env=env)


def test_container_server_touches_nothing_before_start() -> None:
    server = ContainerServer("nats:2.10")
    assert server.running() is False
    assert server.monitor_port is None
    server.stop()  # safe before start


class _FakeWrapped:
    def __init__(self) -> None:
        self.status = "running"

    def reload(self) -> None:
        pass


class _FakeNatsContainer:
    """testcontainers' NatsContainer as far as ContainerServer uses it: what Docker would do, recorded."""

    made: list[_FakeNatsContainer] = []

    def __init__(self, image: str, *, client_port: int, management_port: int, ready_timeout_secs: int) -> None:
        self.image, self.ports = image, (client_port, management_port)
        self.ready_timeout_secs = ready_timeout_secs
        self.command: list[str] | None = None
        self.started = self.removed = False
        self.fail_on_start = False
        self.wrapped = _FakeWrapped()
        _FakeNatsContainer.made.append(self)

    def with_command(self, command: list[str]) -> _FakeNatsContainer:
        self.command = command
        return self

    def start(self) -> _FakeNatsContainer:
        if self.fail_on_start:
            raise TimeoutError("Server is ready never logged")
        self.started = True
        return self

    def get_container_host_ip(self) -> str:
        return "localhost"

    def get_exposed_port(self, port: int) -> str:
        return {4222: "32768", 8222: "32769"}[port]  # some testcontainers versions give strings

    def get_wrapped_container(self) -> _FakeWrapped:
        return self.wrapped

    def stop(self) -> None:
        self.removed = True
        self.wrapped.status = "exited"


@pytest.fixture
def fake_container(monkeypatch: pytest.MonkeyPatch) -> type[_FakeNatsContainer]:
    _FakeNatsContainer.made = []
    monkeypatch.setattr(_servers, "_import_nats_container", lambda: _FakeNatsContainer)
    return _FakeNatsContainer


def test_container_server_runs_jetstream_with_monitoring(fake_container: type[_FakeNatsContainer]) -> None:
    server = ContainerServer("nats:2.10").start()
    (c,) = fake_container.made
    assert c.image == "nats:2.10" and c.ports == (4222, 8222) and c.started
    assert c.command == ["-js", "-m", "8222"]  # JetStream, and the monitoring port it exposes
    assert (server.url, server.port, server.monitor_port) == ("nats://localhost:32768", 32768, 32769)
    assert server.running()
    assert server.start() is server and len(fake_container.made) == 1  # already running: the same one
    server.stop()
    assert c.removed and not server.running()
    server.stop()  # twice is fine


def test_a_container_that_never_gets_ready_is_removed(fake_container: type[_FakeNatsContainer],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real_init = _FakeNatsContainer.__init__

    def failing(self: _FakeNatsContainer, *a: Any, **kw: Any) -> None:
        real_init(self, *a, **kw)
        self.fail_on_start = True

    monkeypatch.setattr(_FakeNatsContainer, "__init__", failing)
    server = ContainerServer("nats:2.10")
    with pytest.raises(TimeoutError):
        server.start()
    assert fake_container.made[0].removed and not server.running()


def test_start_server_starts_the_container_when_docker_is_chosen(fake_container: type[_FakeNatsContainer],
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    monkeypatch.setattr(_servers, "docker_reachable", lambda env: True)
    monkeypatch.setattr(_servers, "have_testcontainers", lambda: True)
    server = start_server(tmp_path, env={"MESH_TEST_DOCKER": "1", "MESH_TEST_NATS_IMAGE": "nats:2.11"})
    assert isinstance(server, ContainerServer) and server.port == 32768
    assert fake_container.made[0].image == "nats:2.11"
    server.stop()


def test_the_real_nats_container_takes_what_we_pass() -> None:
    """Where testcontainers is installed (the docker extra): its NatsContainer has the arguments we use."""
    if not have_testcontainers():
        pytest.skip("testcontainers not installed (pip install -e '.[docker]')")
    import inspect

    cls = _servers._import_nats_container()
    params = inspect.signature(cls.__init__).parameters
    assert {"client_port", "management_port", "ready_timeout_secs"} <= set(params)
    for method in ("with_command", "start", "stop", "get_container_host_ip", "get_exposed_port",
                   "get_wrapped_container"):
        assert callable(getattr(cls, method))
