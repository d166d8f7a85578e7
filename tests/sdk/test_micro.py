"""NATS micro (ADR-32): every instance answers $SRV.PING/INFO/STATS, and the answers match jsm.go's schemas."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from jsonschema import FormatChecker
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from nats.aio.client import Client as NATS
from referencing import Registry, Resource

from plugin_sdk import Message, Plugin, PluginConfig, PluginInfo, PluginRuntime, on_event
from plugin_sdk._metrics import EndpointStats
from plugin_sdk._micro import (
    INFO_RESPONSE_TYPE,
    PING_RESPONSE_TYPE,
    STATS_RESPONSE_TYPE,
    control_subject,
    info_response,
    micro_version,
    ping_response,
    stats_response,
)
from tests.conftest import eventually

# -- the schemas (vendored from nats-io/jsm.go, see tests/schemas/micro/v1/README.md) ----------

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas" / "micro" / "v1"
FORMATS = FormatChecker()
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _date_time(value: object) -> bool:
    # jsonschema checks date-time only with an optional package; this is RFC 3339 as Go reads it.
    if not isinstance(value, str):
        return True
    if not _RFC3339.match(value):
        raise ValueError(f"not RFC 3339: {value!r}")
    dt.datetime.fromisoformat(value)  # a real date and time (month 13 fails)
    return True


FORMATS.checks("date-time", raises=ValueError)(_date_time)


def _validators() -> dict[str, Validator]:
    schemas = [json.loads(p.read_text()) for p in sorted(SCHEMA_DIR.glob("*.json"))]
    registry: Registry[Any] = Registry().with_resources(
        (s["$id"], Resource.from_contents(s)) for s in schemas)
    return {s["title"]: validator_for(s)(s, registry=registry, format_checker=FORMATS) for s in schemas}


VALIDATORS = _validators()


def schema_errors(response: dict[str, Any]) -> list[str]:
    validator = VALIDATORS[response["type"]]
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(response))


def assert_valid(response: dict[str, Any]) -> None:
    errors = schema_errors(response)
    assert not errors, f"{response['type']} does not match its schema:\n" + "\n".join(errors)


# -- a plugin and helpers ----------------------------------------------------------------------

class Calc(Plugin):
    name = "calc"
    version = "1.2.3"
    description = "Echoes, slowly if asked, and fails on 'boom'"
    capabilities = ["math", "echo"]

    @on_event("calc.*")
    async def on_calc(self, event: Message) -> None:
        if event.payload == "bad":
            raise ValueError("bad event")

    async def handle_message(self, message: Message) -> Any:
        if message.payload == "boom":
            raise ValueError("boom!")
        if isinstance(message.payload, dict) and "work" in message.payload:
            await asyncio.sleep(message.payload["work"])  # the handler's work, measured by STATS
        return message.payload


def unique_config(*, version: str | None = None) -> PluginConfig:
    config = Calc.default_config().merged({"name": f"calc-{secrets.token_hex(4)}"})
    if version is not None:
        config = config.model_copy(update={"version": version})  # past validation, like an old plugin's
    return config


@contextlib.asynccontextmanager
async def serving(nc: NATS, prefix: str, config: PluginConfig) -> AsyncIterator[PluginRuntime]:
    async with PluginRuntime(Calc(), nc, prefix=prefix, config=config, register=False) as runtime:
        yield runtime


async def ask(nc: NATS, subject: str) -> dict[str, Any]:
    """One reply (the subject is one plugin's or one instance's)."""
    msg = await nc.request(subject, b"", timeout=5)
    body: dict[str, Any] = json.loads(msg.data)
    return body


async def gather(nc: NATS, subject: str, *, want: set[str] | None = None, window: float = 5.0) -> list[dict[str, Any]]:
    """Every reply to one request on ``subject``: until each instance id in ``want`` has answered
    (other tests' plugins may answer too), or, without ``want``, for the whole ``window`` seconds."""
    inbox = nc.new_inbox()
    replies: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def on_reply(msg: Any) -> None:
        replies.append(json.loads(msg.data))
        if want is not None and want <= {r.get("id") for r in replies}:
            done.set()

    sub = await nc.subscribe(inbox, cb=on_reply)
    try:
        await nc.publish(subject, b"", reply=inbox)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(window):
                await done.wait()
    finally:
        await sub.unsubscribe()
    return replies


def endpoints_by_name(response: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {ep["name"]: ep for ep in response["endpoints"]}


# -- tests against a real nats-server ----------------------------------------------------------

@pytest.mark.parametrize(("verb", "kind"), [("PING", PING_RESPONSE_TYPE), ("INFO", INFO_RESPONSE_TYPE),
                                            ("STATS", STATS_RESPONSE_TYPE)])
async def test_each_verb_answers_to_all_by_name_and_by_id(nc: NATS, prefix: str, verb: str, kind: str) -> None:
    config = unique_config()
    async with serving(nc, prefix, config) as runtime:
        everyone = await gather(nc, control_subject(verb), want={runtime.instance_id})
        ours = [r for r in everyone if r["id"] == runtime.instance_id]
        by_name = await ask(nc, control_subject(verb, config.name))
        by_id = await ask(nc, control_subject(verb, config.name, runtime.instance_id))
    assert len(ours) == 1, everyone
    for response in (ours[0], by_name, by_id):
        assert_valid(response)
        assert (response["type"], response["name"], response["id"], response["version"]) == (
            kind, config.name, runtime.instance_id, "1.2.3")
        meta = response["metadata"]
        assert (meta["mesh_prefix"], meta["capabilities"], meta["mesh_protocol"]) == (prefix, "math,echo", "1")
        assert meta["host"] == runtime.info().host and meta["pid"] == str(runtime.info().pid)
        assert "plugin_version" not in meta  # SemVer already: nothing mapped


async def test_info_lists_the_endpoints_with_subjects_and_queue_groups(nc: NATS, prefix: str) -> None:
    config = unique_config()
    name = config.name
    async with serving(nc, prefix, config) as runtime:
        info = await ask(nc, control_subject("INFO", name, runtime.instance_id))
    assert_valid(info)
    assert info["description"] == Calc.description
    assert endpoints_by_name(info) == {
        "plugin": {"name": "plugin", "subject": f"{prefix}.plugin.{name}", "queue_group": name, "metadata": {}},
        "instance": {"name": "instance", "subject": f"{prefix}.plugin.{name}.{runtime.instance_id}",
                     "queue_group": "", "metadata": {}},
        "broadcast": {"name": "broadcast", "subject": f"{prefix}.broadcast", "queue_group": "", "metadata": {}},
        "broadcast_to": {"name": "broadcast_to", "subject": f"{prefix}.broadcast.{name}", "queue_group": "",
                         "metadata": {}},
        "event_on_calc": {"name": "event_on_calc", "subject": f"{prefix}.event.calc.*", "queue_group": "",
                          "metadata": {}},
    }


async def test_stats_count_requests_errors_and_nanoseconds_per_endpoint(nc: NATS, prefix: str) -> None:
    config = unique_config()
    name = config.name
    ok, failing, work = 3, 2, 0.02
    async with serving(nc, prefix, config) as runtime:
        stats_subject = control_subject("STATS", name, runtime.instance_id)
        fresh = await ask(nc, stats_subject)
        for _ in range(ok):
            await nc.request(f"{prefix}.plugin.{name}", json.dumps({"work": work}).encode(), timeout=5)
        for _ in range(failing):
            reply = await nc.request(f"{prefix}.plugin.{name}", b'"boom"', timeout=5)
            assert reply.headers and reply.headers.get("Nats-Service-Error")
        await nc.request(f"{prefix}.plugin.{name}.{runtime.instance_id}", b'"direct"', timeout=5)
        for payload in ("good", "bad"):
            await nc.publish(f"{prefix}.event.calc.x", json.dumps(payload).encode())

        async def events_counted() -> dict[str, Any] | None:
            stats = await ask(nc, stats_subject)
            return stats if endpoints_by_name(stats)["event_on_calc"]["num_requests"] == 2 else None

        counted = await eventually(events_counted, timeout=10, what="both events in STATS")
    assert counted is not None
    stats = counted
    for response in (fresh, stats):
        assert_valid(response)
    assert all(ep["num_requests"] == 0 and ep["processing_time"] == 0 for ep in fresh["endpoints"])
    started = dt.datetime.fromisoformat(stats["started"].replace("Z", "+00:00"))
    assert started.tzinfo is not None
    assert abs(started.timestamp() - runtime.started_at) < 0.001

    eps = endpoints_by_name(stats)
    plugin = eps["plugin"]
    assert (plugin["num_requests"], plugin["num_errors"]) == (ok + failing, failing)
    assert plugin["last_error"] == "ValueError: boom!"
    assert isinstance(plugin["processing_time"], int) and isinstance(plugin["average_processing_time"], int)
    # nanoseconds: at least the handlers' own work, and not absurdly more (seconds or µs would fail)
    assert ok * work * 1e9 <= plugin["processing_time"] < 10e9
    assert plugin["average_processing_time"] == plugin["processing_time"] // (ok + failing)
    assert plugin["queue_group"] == name and plugin["subject"] == f"{prefix}.plugin.{name}"
    instance = eps["instance"]
    assert (instance["num_requests"], instance["num_errors"], instance["last_error"]) == (1, 0, "")
    assert 0 < instance["processing_time"] < work * 1e9
    event = eps["event_on_calc"]
    assert (event["num_requests"], event["num_errors"], event["last_error"]) == (2, 1, "ValueError: bad event")
    assert eps["broadcast"]["num_requests"] == eps["broadcast_to"]["num_requests"] == 0


async def test_a_version_that_is_not_semver_is_mapped_and_still_valid(nc: NATS, prefix: str) -> None:
    config = unique_config(version="1.0")
    async with serving(nc, prefix, config) as runtime:
        responses = [await ask(nc, control_subject(verb, config.name, runtime.instance_id))
                     for verb in ("PING", "INFO", "STATS")]
    for response in responses:
        assert_valid(response)
        assert response["version"] == "1.0.0"
        assert response["metadata"]["plugin_version"] == "1.0"


async def test_by_name_reaches_every_instance_and_by_id_only_one(nc: NATS, prefix: str) -> None:
    config = unique_config()
    async with serving(nc, prefix, config) as one, serving(nc, prefix, config) as two:
        ids = {one.instance_id, two.instance_id}
        by_name = await gather(nc, control_subject("PING", config.name), want=ids)
        by_id = await gather(nc, control_subject("PING", config.name, one.instance_id), window=0.3)
    assert sorted(r["id"] for r in by_name) == sorted(ids)
    assert [r["id"] for r in by_id] == [one.instance_id]


async def test_a_stopped_instance_no_longer_answers(nc: NATS, prefix: str) -> None:
    config = unique_config()
    async with serving(nc, prefix, config) as runtime:
        await ask(nc, control_subject("PING", config.name))
    assert runtime.stats.endpoints  # it did serve
    for verb in ("PING", "INFO", "STATS"):
        for subject in (control_subject(verb, config.name), control_subject(verb, config.name, runtime.instance_id)):
            with pytest.raises(nats.errors.NoRespondersError):
                await nc.request(subject, b"", timeout=5)


# -- the pure functions --------------------------------------------------------------------------

INFO = PluginInfo(id="odd-1", name="odd", version="2024.01", description="", host="h", pid=1)


@pytest.mark.parametrize(("given", "expected"), [
    ("1.2.3", "1.2.3"), ("1.0.0-rc.1+build.5", "1.0.0-rc.1+build.5"), ("1.0", "1.0.0"), ("v2", "2.0.0"),
    ("1.0rc1", "1.0.0-rc1"), ("1.2.3.4", "1.2.3+4"), ("2024.01.05", "2024.1.5"), ("latest", "0.0.0-latest"),
    ("", "0.0.0"), ("1.0.0-01", "1.0.0-1"), ("1.0-beta_2+build.7", "1.0.0-beta.2+build.7"),
    ("1.2.3.04.5-x", "1.2.3-x+04.5"), ("1!2.0.post1 dev", "1.0.0-2.0.post1.dev"),
])
def test_micro_version_maps_anything_to_semver(given: str, expected: str) -> None:
    assert micro_version(given) == expected
    assert_valid(ping_response(INFO.model_copy(update={"version": given}), prefix="p"))


def test_endpoint_names_are_made_valid_and_unique() -> None:
    endpoints = [EndpointStats("event_a.b c", "p.event.a"), EndpointStats("event_a_b_c", "p.event.b"),
                 EndpointStats("", "p.x", "q")]
    info = info_response(INFO, endpoints, prefix="p")
    stats = stats_response(INFO, endpoints, prefix="p", started=0.0)
    for response in (info, stats):
        assert_valid(response)
        assert [ep["name"] for ep in response["endpoints"]] == ["event_a_b_c", "event_a_b_c_2", "endpoint"]
    assert stats["started"] == "1970-01-01T00:00:00.000000Z"
    assert ping_response(INFO, prefix="p")["metadata"]["plugin_version"] == "2024.01"


def test_the_schemas_catch_the_usual_mistakes() -> None:
    """The validator really checks: what the GUIDE calls schema traps fails it."""
    ep = EndpointStats("plugin", "p.plugin.odd", "odd", num_requests=2, processing_time=0.5)
    good = stats_response(INFO, [ep], prefix="p", started=0.0)
    assert not schema_errors(good) and good["endpoints"][0]["processing_time"] == 500_000_000
    assert good["endpoints"][0]["average_processing_time"] == 250_000_000
    bad: list[dict[str, Any]] = [
        {**info_response(INFO, [ep], prefix="p"), "description": None},
        {**good, "endpoints": [{**good["endpoints"][0], "processing_time": 0.5}]},
        {**good, "endpoints": [{**good["endpoints"][0], "name": "a.b"}]},
        {**good, "started": "yesterday"},
        {**good, "version": "1.0"},
    ]
    for response in bad:
        assert schema_errors(response), response


def test_control_subjects() -> None:
    assert control_subject("PING") == "$SRV.PING"
    assert control_subject("INFO", "echo") == "$SRV.INFO.echo"
    assert control_subject("STATS", "echo", "echo-1a2b3c4d") == "$SRV.STATS.echo.echo-1a2b3c4d"
    for bad in [("PONG", None, None), ("PING", None, "id"), ("PING", "a.b", None), ("PING", "a", "*"),
                ("PING", "", None)]:
        with pytest.raises(ValueError):
            control_subject(*bad)
