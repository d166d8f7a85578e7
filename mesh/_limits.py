"""Resource limits of the plugin hosts an agent starts, and how a host that went past one ended.

A plugin's ``[limits]`` (:class:`plugin_sdk.ResourceLimits`) are applied when the agent starts its
process (``docs/operations.md#resource-limits``):

- ``memory``: ``RLIMIT_DATA``, soft = hard = the limit. It counts the process's private writable
  memory (heap, anonymous mappings, thread stacks) as reserved, not as touched; an allocation past
  it fails, so Python raises ``MemoryError``. Not ``RLIMIT_AS``: that counts *address space*, and
  each thread costs ~72 MiB of it (an 8 MiB stack and a 64 MiB malloc arena reserved up front), so
  an idle host at 53 MiB of VmSize reaches 200 MiB with the OpenTelemetry exporter's one thread and
  500 MiB after six ``asyncio.to_thread`` workers, while its RSS stays at 47 MiB and its VmData at
  33-90 MiB. A limit of ``RLIMIT_AS`` would have to be ten times what the plugin uses.
  Where cgroup v2 is available and writable, the child also gets a cgroup of its own with
  ``memory.max`` = the limit (and ``memory.swap.max`` = 0, ``memory.oom.group`` = 1): that one
  counts the memory actually used, by the host *and* its own subprocesses, and the kernel's OOM
  killer ends the group when it is full.
- ``cpu_seconds``: ``RLIMIT_CPU``, soft = the limit, hard = the limit + :data:`CPU_GRACE`: the kernel
  sends SIGXCPU (which ends a Python process) at the soft limit, and SIGKILL at the hard one if
  SIGXCPU was handled or ignored. It is CPU time over the process's whole life, start-up included
  (about 0.45 s for a host), not a rate.
- ``open_files``: ``RLIMIT_NOFILE``, soft = hard = the limit (sockets and pipes count too; an idle
  host holds 7); an ``open()`` past it fails with EMFILE.

Rlimits are per process, inherited by the host's own subprocesses (each with a budget of its
own). A plugin running as root could raise them again (CAP_SYS_RESOURCE): they catch leaks and
runaways, they are not a boundary against hostile code running as root.

The agent then recognises an instance that went past a limit (:class:`LimitWatch`): killed by
SIGXCPU, or by SIGKILL once its CPU time had reached the limit; OOM-killed in its cgroup
(``memory.events``); or a ``MemoryError`` / EMFILE in its output. The kernel does not stop a
process whose allocation or ``open()`` failed: the error is raised in whatever code asked. So
when the output reports one and the process's usage (``/proc``) is still at the limit, the agent
stops the process itself (SIGTERM, then SIGKILL after :data:`STOP_GRACE`). Either way the
instance's ``last_error`` says ``ResourceError: <limit> limit of … exceeded (…)`` and the normal
supervision policy restarts it. A ``MemoryError`` that a handler raised and whose memory is free
again (a single allocation too big) only fails that request: the caller gets the error, and the
instance keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import re
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from plugin_sdk import ResourceLimits
from plugin_sdk.host import child_preexec

__all__ = ["CPU_GRACE", "STOP_GRACE", "CgroupSupport", "ChildGroup", "LimitWatch", "cgroup_support",
           "limits_preexec", "rlimit_plan"]

log = logging.getLogger("mesh.agent")

#: Seconds of CPU time between RLIMIT_CPU's soft limit (SIGXCPU) and its hard one (SIGKILL).
CPU_GRACE = 3
#: Seconds a host stopped for going past its limit (SIGTERM) has to exit before SIGKILL.
STOP_GRACE = 5.0
#: How often (s) the CPU time of a child with ``cpu_seconds`` is read: a SIGKILL at the hard limit
#: is told from another SIGKILL by the CPU time last read (the hard limit is CPU_GRACE beyond).
CPU_SAMPLE = 0.5
#: A child is "at" its memory / open_files limit when within this fraction of it (at least 4 MiB / 2 files).
AT_LIMIT = 1 / 8
#: A MemoryError / EMFILE explains a crash only if it was among the child's last this many lines of
#: output: one a handler survived long ago does not make a later, unrelated crash a limit.
SIGN_RECENT = 50

#: What a child's output says when it hit a limit enforced by an rlimit.
SIGNS = {
    "memory": re.compile(r"\bMemoryError\b|\[Errno 12\]|Cannot allocate memory"),
    "open_files": re.compile(r"\[Errno 24\]|Too many open files|\bEMFILE\b"),
}

_RLIMITS = {"memory": ("RLIMIT_DATA", resource.RLIMIT_DATA), "cpu_seconds": ("RLIMIT_CPU", resource.RLIMIT_CPU),
            "open_files": ("RLIMIT_NOFILE", resource.RLIMIT_NOFILE)}


def _mib(n: float) -> str:
    return f"{n / 1048576:.1f} MiB"


def describe_limit(name: str, value: int) -> str:
    """``memory limit of 67108864 bytes`` / ``cpu_seconds limit of 2 s`` / ``open_files limit of 64``."""
    unit = {"memory": " bytes", "cpu_seconds": " s"}.get(name, "")
    return f"{name} limit of {value}{unit}"


# -- rlimits ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rlimit:
    name: str  # the [limits] key
    label: str  # RLIMIT_DATA, ...
    resource: int
    soft: int
    hard: int


def rlimit_plan(limits: ResourceLimits) -> list[Rlimit]:
    """The rlimits a child gets for ``limits``. Computed here, before the fork: the child only sets them.

    A value above what this process may grant (its own hard limit, unless it is root; for open
    files also ``fs.nr_open``) is lowered to it, with a warning: the child could not get more anyway.
    """
    plan = []
    for name, value in limits.os_limits().items():
        label, res = _RLIMITS[name]
        soft, hard = value, value + CPU_GRACE if name == "cpu_seconds" else value
        _, own_hard = resource.getrlimit(res)
        ceiling = None if own_hard == resource.RLIM_INFINITY or os.geteuid() == 0 else own_hard
        if name == "open_files":
            with contextlib.suppress(OSError, ValueError):
                nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
                ceiling = nr_open if ceiling is None else min(ceiling, nr_open)
        if ceiling is not None and hard > ceiling:
            log.warning("%s: %s is above what this agent may grant (%d); the child gets %d", label, value, ceiling,
                        ceiling)
            soft, hard = min(soft, ceiling), ceiling
        plan.append(Rlimit(name, label, res, soft, hard))
    return plan


def limits_preexec(plan: list[Rlimit], cgroup_procs: str | None = None) -> Callable[[], None]:
    """The child's preexec function: :func:`child_preexec` (parent-death signal), then joining its
    cgroup (before anything is allocated), then the rlimits. It never raises: a failure is written
    to the child's stderr (the agent relays it), and the child starts without that limit."""

    def preexec() -> None:
        child_preexec()
        if cgroup_procs is not None:
            try:
                with open(cgroup_procs, "w") as f:
                    f.write(str(os.getpid()))
            except OSError as exc:
                os.write(2, f"[agent] could not join cgroup {cgroup_procs}: {exc}\n".encode())
        for r in plan:
            try:
                resource.setrlimit(r.resource, (r.soft, r.hard))
            except (OSError, ValueError) as exc:
                os.write(2, f"[agent] could not set {r.label} ({r.name} = {r.soft}): {exc}\n".encode())

    return preexec


# -- cgroup v2 --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CgroupSupport:
    """Where children's cgroups go (``parent``), or None and why not (``reason``)."""

    parent: Path | None
    reason: str


def _cgroup2_mount() -> Path | None:
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return Path(left.split()[4])
    return None


def _own_cgroup() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    return None


@functools.cache
def cgroup_support() -> CgroupSupport:
    """Whether this agent can give each child a cgroup v2 group with ``memory.max``; looked at once, and said."""
    support = _detect_cgroup()
    if support.parent is not None:
        log.info("memory limits: RLIMIT_DATA, and memory.max in a cgroup per child (%s)", support.reason)
    else:
        log.info("memory limits: RLIMIT_DATA only, no cgroup: %s", support.reason)
    return support


def _detect_cgroup() -> CgroupSupport:
    """:func:`cgroup_support`, looking.

    The parent group is ``MESH_CGROUP_PARENT`` if set (a group delegated to the agent), else the
    cgroup v2 root if the agent itself runs in it. (cgroup v2 lets a group either hold processes or
    hand controllers to child groups, not both; so an agent in some other group needs a parent
    named for it.) The parent must offer the memory controller, and the agent must be able to
    enable it for the children and create one.
    """
    mount = _cgroup2_mount()
    if mount is None:
        return CgroupSupport(None, "no cgroup v2 filesystem is mounted")
    explicit = os.environ.get("MESH_CGROUP_PARENT")
    if explicit:
        parent = Path(explicit)
    else:
        own = _own_cgroup()
        if own != "/":
            return CgroupSupport(None, f"the agent runs in cgroup {own} (under {mount}), not the root: set "
                                 "MESH_CGROUP_PARENT to a cgroup v2 group delegated to it")
        parent = mount
    try:  # read first: a directory that is not a cgroup must never get a mkdir
        controllers = (parent / "cgroup.controllers").read_text().split()
        enabled = (parent / "cgroup.subtree_control").read_text().split()
    except OSError as exc:
        return CgroupSupport(None, f"{parent} is not a cgroup v2 group this agent can read ({exc.strerror})")
    if "memory" not in controllers:
        return CgroupSupport(None, f"the memory controller is not available in {parent} (its controllers: "
                             f"{' '.join(controllers) or 'none'}; it may be bound to a cgroup v1 hierarchy)")
    probe = parent / f"mesh-probe-{os.getpid()}"
    try:
        if "memory" not in enabled:
            (parent / "cgroup.subtree_control").write_text("+memory")
        probe.mkdir()
        try:
            (probe / "memory.max").write_text("max")
        finally:
            probe.rmdir()
    except OSError as exc:
        return CgroupSupport(None, f"cannot create a group with memory.max under {parent}: {exc.strerror}")
    return CgroupSupport(parent, f"cgroup v2 groups under {parent}")


_group_serial = itertools.count(1)


@dataclass
class ChildGroup:
    """The cgroup of one run of one child: created before the start, removed once the child is gone."""

    path: Path

    @classmethod
    def create(cls, parent: Path, instance_id: str, memory: int) -> ChildGroup:
        path = parent / f"mesh-{instance_id}-{os.getpid()}-{next(_group_serial)}"
        path.mkdir()
        group = cls(path)
        try:
            (path / "memory.max").write_text(str(memory))
            for knob, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                if (path / knob).exists():  # no swap beyond the limit; an OOM kill ends the whole group
                    (path / knob).write_text(value)
        except OSError:
            group.remove_now()
            raise
        return group

    @property
    def procs(self) -> str:
        return str(self.path / "cgroup.procs")

    def holds(self, pid: int) -> bool:
        with contextlib.suppress(OSError):
            return str(pid) in (self.path / "cgroup.procs").read_text().split()
        return False

    def oom_kills(self) -> int:
        """``oom_kill`` of ``memory.events``: processes the kernel killed because the group was full."""
        with contextlib.suppress(OSError, ValueError):
            for line in (self.path / "memory.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def remove_now(self) -> bool:
        with contextlib.suppress(FileNotFoundError):
            try:
                self.path.rmdir()
            except OSError:
                return False
        return True

    async def remove(self, *, attempts: int = 40) -> None:
        """Kill what the child left in the group (its own subprocesses), then remove the group (bounded)."""
        if (self.path / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                (self.path / "cgroup.kill").write_text("1")
        for _ in range(attempts):
            if self.remove_now():
                return
            await asyncio.sleep(0.05)
        log.warning("cgroup %s still busy; left in place", self.path)


# -- one run of one child ---------------------------------------------------------------------


def _vm_data(pid: int) -> int | None:
    """The process's private writable memory in bytes (VmData: what RLIMIT_DATA counts), if readable."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return None


def _open_fds(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        return len(os.listdir(f"/proc/{pid}/fd"))
    return None


@dataclass
class LimitWatch:
    """The limits of one run of one child, what its output said about them, and how it ended."""

    limits: ResourceLimits
    group: ChildGroup | None = None
    pid: int = 0
    #: limit name -> how many lines of output showed it was hit (MemoryError, EMFILE); the last one in
    #: ``last_sign``, seen at line ``sign_line`` of ``lines`` so far
    signs: dict[str, int] = field(default_factory=dict)
    last_sign: str = ""
    sign_line: int = 0
    lines: int = 0
    #: CPU seconds the child had used when last read (only with cpu_seconds)
    cpu_used: float = 0.0
    #: Set when the agent stopped the child for going past a limit: the reason to record.
    exceeded: str = ""
    #: When the child started (wall clock), and whether it had registered when the agent stopped it.
    started_wall: float = 0.0
    served: bool = False

    def see(self, line: str) -> str | None:
        """Note a line of the child's output; the limit it reports hit (one that is set), if any."""
        self.lines += 1
        for name, pattern in SIGNS.items():
            if getattr(self.limits, name) is not None and pattern.search(line):
                self.signs[name] = self.signs.get(name, 0) + 1
                self.last_sign, self.sign_line = name, self.lines
                return name
        return None

    def at_limit(self, name: str) -> str | None:
        """If the child's usage is still at limit ``name`` (read in /proc), the reason to stop it; else None."""
        limit: int = getattr(self.limits, name)
        margin = max(int(limit * AT_LIMIT), 4 << 20 if name == "memory" else 2)
        if name == "memory":
            used = _vm_data(self.pid)
            if used is not None and used >= limit - margin:
                return self._reason(name, f"RLIMIT_DATA: MemoryError with {_mib(used)} in use; stopped by the agent")
        elif name == "open_files":
            used = _open_fds(self.pid)
            if used is not None and used >= limit - margin:
                return self._reason(name, f"RLIMIT_NOFILE: Too many open files, {used} open; stopped by the agent")
        return None

    async def sample_cpu(self) -> None:
        """Keep ``cpu_used`` current until cancelled (or the process is gone)."""
        try:
            proc = psutil.Process(self.pid)
            while True:
                times = proc.cpu_times()
                self.cpu_used = times.user + times.system
                await asyncio.sleep(CPU_SAMPLE)
        except psutil.Error:
            return

    def diagnose(self, code: int, *, how: str) -> str | None:
        """``ResourceError: <limit> limit of … exceeded (…)`` if the child ended by going past a limit, else None.

        ``code`` is its return code (negative: the signal); ``how`` says how it ended, in the agent's words
        (``exit code 1``, ``killed by SIGKILL``, ``no heartbeat for 10s ...``).
        """
        if self.exceeded:
            return self.exceeded
        cpu = self.limits.cpu_seconds
        if cpu is not None and code == -signal.SIGXCPU:
            return self._reason("cpu_seconds", "RLIMIT_CPU: killed by SIGXCPU")
        if cpu is not None and code == -signal.SIGKILL and self.cpu_used >= cpu:
            return self._reason("cpu_seconds", f"RLIMIT_CPU: SIGXCPU not heeded; killed by SIGKILL at "
                                f"{cpu + CPU_GRACE} s, {self.cpu_used:.1f} s of CPU time last seen")
        if self.group is not None and self.limits.memory is not None and (kills := self.group.oom_kills()):
            return self._reason("memory", f"cgroup memory.max: {kills} process(es) killed by the kernel's OOM "
                                f"killer in {self.group.path.name}")
        if code != 0 and self.last_sign and self.lines - self.sign_line < SIGN_RECENT:
            sign = "MemoryError" if self.last_sign == "memory" else "Too many open files"
            rlimit = _RLIMITS[self.last_sign][0]
            return self._reason(self.last_sign, f"{rlimit}: {sign}, then {how}")
        return None

    def _reason(self, name: str, detail: str) -> str:
        value: int = getattr(self.limits, name)
        return f"ResourceError: {describe_limit(name, value)} exceeded ({detail})"

