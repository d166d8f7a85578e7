"""What a plugin instance measures about itself, cheaply enough to do on every message.

:class:`RuntimeStats` is fed by the runtime, one :meth:`~RuntimeStats.record` per handled message
(about a microsecond: a few additions and a logarithm), and read on demand: by the
``<prefix>.control.<instance>.metrics`` request, by NATS micro ``$SRV.STATS``, and by the
OpenTelemetry observable instruments in :mod:`plugin_sdk._otel_metrics`. Nothing is sent anywhere
until someone asks.

Latencies go into a log-bucketed histogram (buckets 10 % wide from 1 µs to ~30 min), so p50 / p95 /
p99 are known within 5 % with constant memory, since start and over the last 10 to 20 seconds.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EndpointStats", "LatencyHistogram", "ResourceSampler", "RuntimeStats"]

_GROWTH = 1.1
_MIN = 1e-6  # seconds: the first bucket holds everything faster than a microsecond
_INV_LOG_GROWTH = 1.0 / math.log(_GROWTH)
_BUCKETS = 225  # 1 µs · 1.1**225 ≈ 2000 s; slower ones land in the last bucket
#: The window that "recent" figures cover: between WINDOW and 2 * WINDOW seconds.
WINDOW = 10.0


def bucket(seconds: float) -> int:
    """The histogram bucket of a latency."""
    if seconds <= _MIN:
        return 0
    i = int(math.log(seconds / _MIN) * _INV_LOG_GROWTH)
    return i if i < _BUCKETS else _BUCKETS - 1


class LatencyHistogram:
    """Counts of latencies in buckets ``[1µs·1.1^i, 1µs·1.1^(i+1))``."""

    __slots__ = ("count", "counts", "max", "total")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def record(self, seconds: float, i: int | None = None) -> None:
        """Count one latency (``i``: its bucket, when the caller computed it already)."""
        if i is None:
            i = bucket(seconds)
        self.counts[i] += 1
        self.count += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def merged(self, other: LatencyHistogram) -> LatencyHistogram:
        out = LatencyHistogram()
        out.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        out.count = self.count + other.count
        out.total = self.total + other.total
        out.max = max(self.max, other.max)
        return out

    def percentile(self, q: float) -> float:
        """The ``q``-quantile (0 < q ≤ 1) in seconds: the middle of its bucket, capped at the max seen."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                middle = _MIN * _GROWTH ** (i + 0.5) if i else _MIN / 2
                return min(middle, self.max)
        return self.max

    def summary_ms(self) -> dict[str, float]:
        """``count``, ``mean``, ``p50``, ``p95``, ``p99`` and ``max``, in milliseconds (count aside)."""
        def ms(s: float) -> float:
            return round(s * 1000, 3)
        return {"count": self.count, "mean": ms(self.total / self.count) if self.count else 0.0,
                "p50": ms(self.percentile(0.50)), "p95": ms(self.percentile(0.95)),
                "p99": ms(self.percentile(0.99)), "max": ms(self.max)}


@dataclass(slots=True)
class EndpointStats:
    """Per endpoint (subscription) counts, as NATS micro ``$SRV.STATS`` reports them."""

    name: str
    subject: str
    queue_group: str | None = None
    num_requests: int = 0
    num_errors: int = 0
    processing_time: float = 0.0  # seconds, summed
    last_error: str = ""


@dataclass(slots=True)
class _KindStats:
    errors: int = 0
    total: LatencyHistogram = field(default_factory=LatencyHistogram)
    current: LatencyHistogram = field(default_factory=LatencyHistogram)
    previous: LatencyHistogram = field(default_factory=LatencyHistogram)
    recent_errors: list[int] = field(default_factory=lambda: [0, 0])  # current, previous window


class RuntimeStats:
    """Message counts, errors and latencies by message kind, and per endpoint.

    The kinds are ``command``, ``query``, ``event`` and ``broadcast`` (a broadcast is counted
    under ``broadcast`` whatever its message kind).
    """

    def __init__(self) -> None:
        self.kinds: dict[str, _KindStats] = {}
        self.endpoints: dict[str, EndpointStats] = {}
        self.window_started = time.monotonic()
        self.reset_at = time.time()
        #: Requests answered RequestTimeout without running: their deadline passed while queued.
        self.expired = 0
        #: Requests refused at once (ResourceError): max_concurrency busy and max_queued waiting.
        self.refused = 0

    def endpoint(self, name: str, subject: str, queue_group: str | None = None) -> EndpointStats:
        ep = self.endpoints.get(name)
        if ep is None:
            ep = self.endpoints[name] = EndpointStats(name, subject, queue_group)
        return ep

    def record(self, ep: EndpointStats | None, kind: str, seconds: float, error: str | None) -> None:
        """Count one handled message of ``kind`` that took ``seconds``; ``error`` is its failure, if any."""
        ks = self._kind(kind)
        i = bucket(seconds)
        ks.total.record(seconds, i)
        ks.current.record(seconds, i)
        if ep is not None:
            ep.num_requests += 1
            ep.processing_time += seconds
        if error is not None:
            ks.errors += 1
            ks.recent_errors[0] += 1
            if ep is not None:
                ep.num_errors += 1
                ep.last_error = error

    def record_many(self, ep: EndpointStats | None, kind: str, durations: list[float]) -> None:
        """:meth:`record` of each of ``durations`` (successes of one ``kind``), in one call: the
        event lanes count a burst at its end, not each event as it goes."""
        if len(durations) < 2:
            if durations:
                self.record(ep, kind, durations[0], None)
            return
        ks = self._kind(kind)
        total, current = ks.total, ks.current
        t_counts, c_counts = total.counts, current.counts
        log, last = math.log, _BUCKETS - 1
        for seconds in durations:
            if seconds <= _MIN:
                i = 0
            else:
                i = int(log(seconds / _MIN) * _INV_LOG_GROWTH)
                if i > last:
                    i = last
            t_counts[i] += 1
            c_counts[i] += 1
        n, spent, biggest = len(durations), sum(durations), max(durations)
        for histogram in (total, current):
            histogram.count += n
            histogram.total += spent
            if biggest > histogram.max:
                histogram.max = biggest
        if ep is not None:
            ep.num_requests += n
            ep.processing_time += spent

    def _kind(self, kind: str) -> _KindStats:
        """The stats of ``kind``, its window rotated first if it is over."""
        ks = self.kinds.get(kind)
        if ks is None:
            ks = self.kinds[kind] = _KindStats()
        now = time.monotonic()
        if now - self.window_started >= WINDOW:
            self._rotate(now)
        return ks

    def _rotate(self, now: float) -> None:
        stale = now - self.window_started >= 2 * WINDOW  # nothing at all in the last window
        for ks in self.kinds.values():
            ks.previous = LatencyHistogram() if stale else ks.current
            ks.current = LatencyHistogram()
            ks.recent_errors = [0, 0 if stale else ks.recent_errors[0]]
        self.window_started = now

    def reset(self) -> None:
        """Forget every count (NATS micro ``STATS`` may be reset by the service's owner)."""
        self.kinds.clear()
        self.expired = self.refused = 0
        for ep in self.endpoints.values():
            ep.num_requests = ep.num_errors = 0
            ep.processing_time = 0.0
            ep.last_error = ""
        self.window_started = time.monotonic()
        self.reset_at = time.time()

    def count(self, kind: str) -> int:
        """Messages of ``kind`` handled since start (or the last reset)."""
        ks = self.kinds.get(kind)
        return ks.total.count if ks else 0

    def errors_of(self, kind: str) -> int:
        ks = self.kinds.get(kind)
        return ks.errors if ks else 0

    @property
    def messages(self) -> int:
        return sum(ks.total.count for ks in self.kinds.values())

    @property
    def errors(self) -> int:
        return sum(ks.errors for ks in self.kinds.values())

    def snapshot(self) -> dict[str, Any]:
        """Totals since start and the recent window, per kind (JSON-ready)."""
        now = time.monotonic()
        if now - self.window_started >= WINDOW:
            self._rotate(now)
        span = WINDOW + (now - self.window_started)
        kinds: dict[str, Any] = {}
        for kind, ks in sorted(self.kinds.items()):
            recent = ks.current.merged(ks.previous)
            kinds[kind] = {
                "count": ks.total.count, "errors": ks.errors, "latency_ms": ks.total.summary_ms(),
                "recent": {"window_s": round(span, 1), "count": recent.count, "errors": sum(ks.recent_errors),
                           "rate": round(recent.count / span, 2), "latency_ms": recent.summary_ms()}}
        messages, errors = self.messages, self.errors
        return {"messages": messages, "errors": errors,
                "error_rate": round(errors / messages, 4) if messages else 0.0,
                "expired": self.expired, "refused": self.refused, "kinds": kinds}


class ResourceSampler:
    """This process's RSS, CPU use, open file descriptors and threads.

    Read from ``/proc/self`` on Linux; elsewhere through psutil (imported only there). psutil
    costs a plugin host almost 1 MiB of its idle RSS for four numbers that Linux gives in two
    small files (``tests/sdk/test_metrics.py`` holds the two readings equal).
    """

    def __init__(self) -> None:
        self._proc = _ProcSelf.open()
        self.process: Any = None
        if self._proc is None:
            import psutil  # (not Linux: psutil knows the platform)

            self.process = psutil.Process()
            self.created = self.process.create_time()
            cpu = self.process.cpu_times()
            used = cpu.user + cpu.system
        else:
            self.created = self._proc.created
            used = self._proc.sample()[0]
        self._last = (time.monotonic(), used)
        self._percent = 0.0

    def sample(self) -> dict[str, Any]:
        """Current figures; ``cpu_percent`` is over the time since the previous sample (≥ 0.5 s)."""
        if self._proc is not None:
            used, rss, threads, fds = self._proc.sample()
        else:
            p = self.process
            with p.oneshot():
                cpu = p.cpu_times()
                rss = p.memory_info().rss
                threads = p.num_threads()
                try:
                    fds = p.num_fds()
                except AttributeError:  # Windows has handles, not file descriptors
                    fds = -1
            used = cpu.user + cpu.system
        now = time.monotonic()
        elapsed = now - self._last[0]
        if elapsed >= 0.5:
            self._percent = 100.0 * (used - self._last[1]) / elapsed
            self._last = (now, used)
        return {"rss_bytes": rss, "cpu_percent": round(self._percent, 1), "cpu_seconds": round(used, 3),
                "open_fds": fds, "threads": threads}


class _ProcSelf:
    """``/proc/self``: CPU seconds (user + system), RSS, threads and open descriptors of this process."""

    def __init__(self, created: float) -> None:
        self.created = created
        self._tick = os.sysconf("SC_CLK_TCK")
        self._page = os.sysconf("SC_PAGE_SIZE")

    @classmethod
    def open(cls) -> _ProcSelf | None:
        """None where there is no Linux ``/proc`` to read."""
        try:
            with open("/proc/stat", "rb") as f:
                boot = next(float(line.split()[1]) for line in f if line.startswith(b"btime "))
            fields = _stat_fields()
            return cls(boot + int(fields[19]) / os.sysconf("SC_CLK_TCK"))
        except (OSError, StopIteration, ValueError, IndexError):
            return None

    def sample(self) -> tuple[float, int, int, int]:
        fields = _stat_fields()
        with open("/proc/self/statm", "rb") as f:
            rss_pages = int(f.read().split()[1])
        return ((int(fields[11]) + int(fields[12])) / self._tick, rss_pages * self._page, int(fields[17]),
                len(os.listdir("/proc/self/fd")))


def _stat_fields() -> list[bytes]:
    """``/proc/self/stat`` after the command name (which may hold spaces): field 3 onwards."""
    with open("/proc/self/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()
