"""Three "hosts" on one machine: Linux network namespaces, each with a veth pair onto a bridge.

Everything is created by :class:`Hosts` and removed when it closes: the namespaces, the veth
pairs, the bridge. Addresses come from a private /24 no interface of this machine uses; traffic goes
only between the namespaces and the bridge's own address (where the test process talks from).
Where namespaces cannot be made (not root, no ``ip``), :func:`netns_unavailable` says why and the
tests use :func:`loopback_hosts` instead: three "hosts" on 127.0.0.1 with their own ports.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field

from mesh import free_port


@dataclass
class Host:
    """One host: its address, its ports, and (in a namespace) how to run a command there."""

    name: str
    addr: str
    port: int = 4222
    route_port: int = 6222
    netns: str | None = None
    veth: str | None = None  # the bridge's end of its link (down = the link is cut)

    @property
    def url(self) -> str:
        return f"nats://{self.addr}:{self.port}"

    @property
    def route(self) -> str:
        return f"nats-route://{self.addr}:{self.route_port}"

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside this host's namespace (as it is on loopback)."""
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else list(argv)

    def cut(self) -> None:
        assert self.veth, "only a namespace host has a link to cut"
        _ip("link", "set", self.veth, "down")

    def restore(self) -> None:
        assert self.veth
        _ip("link", "set", self.veth, "up")


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")


def netns_unavailable() -> str:
    """Why network namespaces cannot be used here ("" if they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (these tests run on loopback instead)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) to make network namespaces"
    probe = f"ghprobe{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except OSError as exc:
        return f"cannot make a network namespace: {exc}"
    _ip("netns", "del", probe)
    return ""


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 that overlaps no address or route of this machine."""
    used = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True,
                          timeout=10, check=False).stdout
    taken = []
    for word in used.split():
        try:
            taken.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            continue
    for _ in range(50):  # bounded: pick at random until one is free
        net = ipaddress.ip_network(f"10.{secrets.randbelow(200) + 50}.{secrets.randbelow(250) + 1}.0/24")
        if not any(net.overlaps(t) for t in taken if t.prefixlen > 0):
            return net
    raise OSError("no free 10.x.y.0/24 for the test hosts")


@dataclass
class Hosts:
    """``count`` namespaces on one bridge; use as a context manager (removes all it made)."""

    count: int = 3
    hosts: list[Host] = field(default_factory=list)
    _made: list[tuple[str, ...]] = field(default_factory=list)

    def __enter__(self) -> Hosts:
        tag = secrets.token_hex(2)
        net = _free_subnet()
        addrs = list(net.hosts())
        bridge = f"ghbr{tag}"
        try:
            _ip("link", "add", bridge, "type", "bridge")
            self._made.append(("link", "del", bridge))
            _ip("addr", "add", f"{addrs[-1]}/24", "dev", bridge)
            _ip("link", "set", bridge, "up")
            for i in range(self.count):
                ns, outside, inside = f"gh{tag}-{i}", f"gh{tag}h{i}", f"gh{tag}n{i}"
                _ip("netns", "add", ns)
                self._made.append(("netns", "del", ns))
                _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
                self._made.append(("link", "del", outside))  # (its peer goes with it)
                _ip("link", "set", outside, "master", bridge, "up")
                _ip("link", "set", inside, "netns", ns)
                _ip("-n", ns, "addr", "add", f"{addrs[i]}/24", "dev", inside)
                _ip("-n", ns, "link", "set", inside, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                self.hosts.append(Host(f"host-{i}", str(addrs[i]), netns=ns, veth=outside))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for args in reversed(self._made):
            try:
                _ip(*args)
            except OSError:
                continue  # (a veth goes away with its namespace)
        self._made.clear()

    def __exit__(self, *exc: object) -> None:
        self.close()


def loopback_hosts(count: int = 3) -> list[Host]:
    """``count`` "hosts" on 127.0.0.1, each with ports of its own."""
    return [Host(f"host-{i}", "127.0.0.1", port=free_port(), route_port=free_port()) for i in range(count)]
