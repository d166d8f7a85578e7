"""NATS micro (ADR-32) discovery: every plugin instance answers ``$SRV.PING``, ``$SRV.INFO`` and ``$SRV.STATS``.

So standard NATS tooling (``nats micro ls``, ``nats micro info``, ``nats micro stats``) lists and
measures plugins. Each verb is answered on three subjects, like nats.go's ``micro`` package:
``$SRV.<VERB>`` (every service), ``$SRV.<VERB>.<name>`` (every instance of a plugin) and
``$SRV.<VERB>.<name>.<instance>`` (one instance). ``$SRV`` is global: an instance answers whatever
its mesh prefix, which it names in its metadata.

The wire contract is here in one place (subjects, type strings, field names); the responses are
built by pure functions from a :class:`~plugin_sdk.PluginInfo` and the runtime's per-endpoint
:class:`~plugin_sdk._metrics.EndpointStats`, and validated against the jsm.go schemas
(``io.nats.micro.v1.*_response``) in ``tests/sdk/test_micro.py``. Documented in
``docs/subjects.md`` (NATS micro discovery).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ._config import SEMVER_RE  # the schemas' ``semver`` pattern is SemVer 2.0.0's own
from ._wire import dumps, send_reply

if TYPE_CHECKING:
    from ._message import PluginInfo
    from ._metrics import EndpointStats
    from ._runtime import PluginRuntime

__all__ = [
    "API_PREFIX",
    "INFO_RESPONSE_TYPE",
    "PING_RESPONSE_TYPE",
    "STATS_RESPONSE_TYPE",
    "VERBS",
    "control_subject",
    "control_subjects",
    "endpoint_name",
    "info_response",
    "micro_version",
    "ping_response",
    "stats_response",
    "subscribe_micro",
]

#: The root of every micro control subject.
API_PREFIX: Final = "$SRV"
PING: Final = "PING"
INFO: Final = "INFO"
STATS: Final = "STATS"
VERBS: Final = (PING, INFO, STATS)

PING_RESPONSE_TYPE: Final = "io.nats.micro.v1.ping_response"
INFO_RESPONSE_TYPE: Final = "io.nats.micro.v1.info_response"
STATS_RESPONSE_TYPE: Final = "io.nats.micro.v1.stats_response"

#: Service and endpoint names (the schemas' ``basic_name``).
NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]+$")
_TOKEN_UNSAFE = re.compile(r"[.*>\s]")

# Metadata keys of the service (every response): where the instance runs and what it is.
META_PREFIX: Final = "mesh_prefix"
META_HOST: Final = "host"
META_PID: Final = "pid"
META_CAPABILITIES: Final = "capabilities"
META_PROTOCOL: Final = "mesh_protocol"
#: The plugin's own version, only when it is not SemVer and ``version`` holds its mapping.
META_PLUGIN_VERSION: Final = "plugin_version"


# ---------------------------------------------------------------------------------------------
# Subjects

def control_subject(verb: str, name: str | None = None, instance_id: str | None = None) -> str:
    """``$SRV.<VERB>``, ``$SRV.<VERB>.<name>`` or ``$SRV.<VERB>.<name>.<instance_id>``."""
    if verb not in VERBS:
        raise ValueError(f"unknown micro verb {verb!r}: expected one of {', '.join(VERBS)}")
    if instance_id is not None and name is None:
        raise ValueError("a micro control subject with an instance id needs the service name")
    subject = f"{API_PREFIX}.{verb}"
    for token in (name, instance_id):
        if token is None:
            break
        if not token or _TOKEN_UNSAFE.search(token):
            raise ValueError(f"invalid micro subject token {token!r}: no '.', '*', '>' or whitespace, not empty")
        subject += f".{token}"
    return subject


def control_subjects(verb: str, name: str, instance_id: str) -> tuple[str, str, str]:
    """The three subjects one instance answers ``verb`` on: all, by name, by id."""
    return (control_subject(verb), control_subject(verb, name), control_subject(verb, name, instance_id))


# ---------------------------------------------------------------------------------------------
# Names and versions

def endpoint_name(name: str) -> str:
    """``name`` with every character outside ``[A-Za-z0-9_-]`` replaced by ``_`` (never empty)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "endpoint"


def micro_version(version: str) -> str:
    """``version`` if it is SemVer, else a valid SemVer derived from it, deterministically.

    The leading numbers become ``major.minor.patch`` (missing ones are 0, leading zeros dropped),
    numbers past the third and anything after ``+`` become build metadata, the rest becomes
    pre-release identifiers: ``1.0`` → ``1.0.0``, ``v2`` → ``2.0.0``, ``1.0rc1`` → ``1.0.0-rc1``,
    ``1.2.3.4`` → ``1.2.3+4``, ``2024.01.05`` → ``2024.1.5``, ``latest`` → ``0.0.0-latest``.
    """
    if SEMVER_RE.match(version):
        return version
    m = re.match(r"^\s*[vV]?(\d+)(?:\.(\d+))?(?:\.(\d+))?((?:\.\d+)*)(.*)$", version, re.DOTALL)
    if m:
        core = ".".join(str(int(g or 0)) for g in m.group(1, 2, 3))
        extra, rest = m.group(4), m.group(5)
    else:
        core, extra, rest = "0.0.0", "", version
    pre, _, build = rest.partition("+")
    pre_ids = [str(int(t)) if t.isdigit() else t for t in re.split(r"[^0-9A-Za-z]+", pre) if t]
    build_ids = [t for t in extra.split(".") if t] + [t for t in re.split(r"[^0-9A-Za-z-]+", build) if t]
    mapped = core + ("-" + ".".join(pre_ids) if pre_ids else "") + ("+" + ".".join(build_ids) if build_ids else "")
    return mapped if SEMVER_RE.match(mapped) else core  # always matches; the fallback is a guard


def _rfc3339(epoch_seconds: float) -> str:
    """UTC, microseconds, ``Z``: what Go's ``time.Time`` reads (and writes, in nanoseconds)."""
    return dt.datetime.fromtimestamp(epoch_seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _nanos(seconds: float) -> int:
    return round(seconds * 1_000_000_000)


# ---------------------------------------------------------------------------------------------
# Responses

def _identity(kind: str, info: PluginInfo, prefix: str) -> dict[str, Any]:
    version = micro_version(info.version)
    metadata = {META_PREFIX: prefix, META_HOST: info.host, META_PID: str(info.pid),
                META_CAPABILITIES: ",".join(info.capabilities), META_PROTOCOL: info.protocol}
    if version != info.version:
        metadata[META_PLUGIN_VERSION] = info.version
    return {"type": kind, "name": info.name, "id": info.id, "version": version, "metadata": metadata}


def _endpoint_names(endpoints: Iterable[EndpointStats]) -> list[tuple[str, EndpointStats]]:
    """Each endpoint with a schema-valid name, unique within the instance."""
    seen: set[str] = set()
    out = []
    for ep in endpoints:
        base = name = endpoint_name(ep.name)
        n = 1
        while name in seen:
            n += 1
            name = f"{base}_{n}"
        seen.add(name)
        out.append((name, ep))
    return out


def ping_response(info: PluginInfo, *, prefix: str) -> dict[str, Any]:
    """The ``$SRV.PING`` answer: type, name, id, version and metadata."""
    return _identity(PING_RESPONSE_TYPE, info, prefix)


def info_response(info: PluginInfo, endpoints: Iterable[EndpointStats], *, prefix: str) -> dict[str, Any]:
    """The ``$SRV.INFO`` answer: the identity, the description and every endpoint's subject."""
    return {**_identity(INFO_RESPONSE_TYPE, info, prefix), "description": info.description,
            "endpoints": [{"name": name, "subject": ep.subject, "queue_group": ep.queue_group or "",
                           "metadata": {}} for name, ep in _endpoint_names(endpoints)]}


def stats_response(info: PluginInfo, endpoints: Iterable[EndpointStats], *, prefix: str,
                   started: float) -> dict[str, Any]:
    """The ``$SRV.STATS`` answer: counts per endpoint since ``started`` (epoch seconds); times in ns."""
    out = []
    for name, ep in _endpoint_names(endpoints):
        total = _nanos(ep.processing_time)
        out.append({"name": name, "subject": ep.subject, "queue_group": ep.queue_group or "",
                    "num_requests": ep.num_requests, "num_errors": ep.num_errors, "last_error": ep.last_error,
                    "processing_time": total,
                    "average_processing_time": total // ep.num_requests if ep.num_requests else 0})
    return {**_identity(STATS_RESPONSE_TYPE, info, prefix), "started": _rfc3339(started), "endpoints": out}


# ---------------------------------------------------------------------------------------------
# Serving

async def subscribe_micro(runtime: PluginRuntime) -> list[Subscription]:
    """Answer the three verbs on their nine subjects for ``runtime``; the caller drains the result.

    Subscribe after the runtime's endpoints, so INFO lists them all. No queue group: every
    instance answers, as ADR-32 wants.
    """
    prefix = runtime.subjects.prefix

    def started() -> float:
        # Like nats.go, a reset of the counts restarts the clock.
        return max(runtime.started_at, runtime.stats.reset_at)

    builders: dict[str, Callable[[], dict[str, Any]]] = {
        PING: lambda: ping_response(runtime.info(), prefix=prefix),
        INFO: lambda: info_response(runtime.info(), runtime.stats.endpoints.values(), prefix=prefix),
        STATS: lambda: stats_response(runtime.info(), runtime.stats.endpoints.values(), prefix=prefix,
                                      started=started()),
    }

    def answer(build: Callable[[], dict[str, Any]]) -> Callable[[Msg], Awaitable[None]]:
        async def on_request(msg: Msg) -> None:
            if not msg.reply:
                return
            try:
                await send_reply(runtime.nc, msg.reply, dumps(build()), None, plugin=runtime.config.name)
            except nats.errors.Error as exc:  # closing or reconnecting: the asker times out
                runtime.log.debug("no micro reply on %s: %s", msg.subject, exc)

        return on_request

    subs: list[Subscription] = []
    try:
        for verb, build in builders.items():
            cb = answer(build)
            for subject in control_subjects(verb, runtime.config.name, runtime.instance_id):
                subs.append(await runtime.nc.subscribe(subject, cb=cb))
    except BaseException:  # not returned, so nobody else would close them
        for sub in subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        raise
    return subs
