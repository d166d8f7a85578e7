"""mesh/_limits.py on its own: the rlimits a child gets, the at-limit check on real processes, and how an
ended child is diagnosed (from its exit status, CPU time and output)."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from mesh._limits import CPU_GRACE, SIGN_RECENT, LimitWatch, cgroup_support, limits_preexec, rlimit_plan
from plugin_sdk import ResourceLimits

MIB = 1 << 20


def test_the_plan_and_the_preexec_give_the_child_its_rlimits() -> None:
    plan = rlimit_plan(ResourceLimits(memory="64MiB", cpu_seconds=7, open_files=32))
    assert [(r.label, r.soft, r.hard) for r in plan] == [
        ("RLIMIT_DATA", 64 * MIB, 64 * MIB), ("RLIMIT_CPU", 7, 7 + CPU_GRACE), ("RLIMIT_NOFILE", 32, 32)]
    code = ("import resource as r; print([r.getrlimit(x) for x in (r.RLIMIT_DATA, r.RLIMIT_CPU, r.RLIMIT_NOFILE)])")
    out = subprocess.run([sys.executable, "-c", code], preexec_fn=limits_preexec(plan), capture_output=True,
                         text=True, check=True, timeout=30).stdout
    assert out.strip() == str([(64 * MIB, 64 * MIB), (7, 7 + CPU_GRACE), (32, 32)])
    assert rlimit_plan(ResourceLimits(max_concurrency=4)) == []  # the runtime's limits are not rlimits


@contextmanager
def child(code: str, limits: ResourceLimits) -> Iterator[subprocess.Popen[str]]:
    """A real Python child under ``limits`` that runs ``code``, says 'ready', and waits (at most 60 s)."""
    with subprocess.Popen([sys.executable, "-c", code + "\nprint('ready', flush=True)\nimport time; time.sleep(60)"],
                          preexec_fn=limits_preexec(rlimit_plan(limits)), stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            yield proc
        finally:
            proc.kill()


def test_at_limit_reads_the_processs_usage() -> None:
    limits = ResourceLimits(memory="64MiB", open_files=64)
    # The child fills its data segment to 1 MiB under the limit, from what its own interpreter already
    # uses: that differs by Python (a fixed 58 MiB was a MemoryError on 3.12, where the baseline is larger).
    near = ("import os, re\n"
            "data = int(re.search(r'VmData:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) << 10\n"
            f"held = b'1' * ({64 * MIB} - data - (1 << 20))\n"
            "fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(58)]")
    with child(near, limits) as proc:
        watch = LimitWatch(limits, pid=proc.pid)
        memory = watch.at_limit("memory")
        assert memory is not None and memory.startswith(
            f"ResourceError: memory limit of {64 * MIB} bytes exceeded (RLIMIT_DATA: MemoryError with ")
        files = watch.at_limit("open_files")
        assert files is not None and files.startswith("ResourceError: open_files limit of 64 exceeded "
                                                      "(RLIMIT_NOFILE: Too many open files, ")
    with child("pass", limits) as proc:  # an idle interpreter is far from both
        watch = LimitWatch(limits, pid=proc.pid)
        assert watch.at_limit("memory") is None and watch.at_limit("open_files") is None
    assert LimitWatch(limits, pid=2**22 + 1).at_limit("memory") is None  # gone: nothing to stop


def test_diagnosis_from_the_exit_status_and_cpu_time() -> None:
    cpu = LimitWatch(ResourceLimits(cpu_seconds=2))
    assert cpu.diagnose(-signal.SIGXCPU, how="killed by SIGXCPU") == (
        "ResourceError: cpu_seconds limit of 2 s exceeded (RLIMIT_CPU: killed by SIGXCPU)")
    assert cpu.diagnose(-signal.SIGKILL, how="killed by SIGKILL") is None  # not (yet) at its budget
    cpu.cpu_used = 2.4
    reason = cpu.diagnose(-signal.SIGKILL, how="killed by SIGKILL")
    assert reason is not None and reason.startswith("ResourceError: cpu_seconds limit of 2 s exceeded (RLIMIT_CPU: "
                                                    f"SIGXCPU not heeded; killed by SIGKILL at {2 + CPU_GRACE} s")
    assert cpu.diagnose(1, how="exit code 1") is None
    assert LimitWatch(ResourceLimits(memory="64MiB")).diagnose(-signal.SIGXCPU, how="killed by SIGXCPU") is None


def test_diagnosis_from_the_output_counts_only_set_limits_and_recent_lines() -> None:
    watch = LimitWatch(ResourceLimits(memory="64MiB"))
    assert watch.see("OSError: [Errno 24] Too many open files") is None  # open_files is not limited
    assert watch.see("Traceback (most recent call last):") is None
    assert watch.see("MemoryError") == "memory"
    assert watch.diagnose(0, how="exit code 0") is None  # it stopped cleanly
    assert watch.diagnose(1, how="exit code 1") == (
        f"ResourceError: memory limit of {64 * MIB} bytes exceeded (RLIMIT_DATA: MemoryError, then exit code 1)")
    for n in range(SIGN_RECENT):
        watch.see(f"serving request {n}")
    assert watch.diagnose(1, how="exit code 1") is None  # a MemoryError survived long ago: not this crash
    files = LimitWatch(ResourceLimits(open_files=64))
    assert files.see("handler raised OSError on mesh.plugin.hog: [Errno 24] Too many open files") == "open_files"
    assert files.diagnose(-signal.SIGKILL, how="no heartbeat for 12s while running; killed and restarted") == (
        "ResourceError: open_files limit of 64 exceeded (RLIMIT_NOFILE: Too many open files, then no heartbeat for "
        "12s while running; killed and restarted)")
    stopped = LimitWatch(ResourceLimits(memory="64MiB"), exceeded="ResourceError: memory limit ... (stopped)")
    assert stopped.diagnose(0, how="exit code 0") == stopped.exceeded  # the agent's stop, however it exited


def test_cgroup_support_says_where_or_why_not() -> None:
    support = cgroup_support()
    assert support.reason
    if support.parent is None:
        assert any(word in support.reason for word in ("cgroup", "MESH_CGROUP_PARENT", "memory"))
    else:
        assert "memory" in (support.parent / "cgroup.subtree_control").read_text().split()
    assert resource.getrlimit(resource.RLIMIT_DATA)  # (the module needs POSIX rlimits; they are here)
