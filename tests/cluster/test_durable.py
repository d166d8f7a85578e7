"""Writes through a leader election: retried for a bounded time, each stored once, then typed errors."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

import plugin_sdk._durable as durable
from mesh import NatsCluster, NatsServer, RegistryService, close, connect
from plugin_sdk import PluginInfo, PluginRegistry, StateError, StateTimeout, StateUnavailable
from plugin_sdk.host import OPEN_RETRY, DurableKV, Retry, open_bucket, passing_open
from plugin_sdk.testing import StateStore
from tests.cluster.conftest import stream_leader


async def _store(nc: NATS, bucket: str, retry: Retry, replicas: int | None = None) -> StateStore:
    kv = await open_bucket(nc.jetstream(), bucket, create=True, replicas=replicas)
    return StateStore(kv, plugin="demo", retry=retry)


async def test_a_write_during_a_leader_election_waits_for_the_new_leader(cluster: NatsCluster, cnc: NATS) -> None:
    store = await _store(cnc, "elect", Retry(within=30))
    await store.put("a", 1)
    leader = await stream_leader(cnc, "KV_elect")
    next(n for n in cluster.nodes if n.name == leader).kill()
    revision = await store.put("a", 2)  # no leader for seconds: retried until there is one
    assert await store.get_entry("a") is not None and (await store.get_entry("a")).revision == revision  # type: ignore[union-attr]
    assert await stream_leader(cnc, "KV_elect") != leader


async def test_without_retries_the_same_write_fails_typed(cluster: NatsCluster, cnc: NATS) -> None:
    # The first write is set-up, retried: right after a bucket is created, a node may not yet route
    # its subject (a loaded CI run got "no responders" here, before any node was killed).
    await (await _store(cnc, "noretry", Retry(within=10))).put("a", 1)
    store = await _store(cnc, "noretry", Retry(within=0))
    leader = await stream_leader(cnc, "KV_noretry")
    next(n for n in cluster.nodes if n.name == leader).kill()
    with pytest.raises((StateUnavailable, StateTimeout)) as caught:
        await store.put("a", 2)
    assert "noretry" in str(caught.value) and "'a'" in str(caught.value)


class _LoseFirstAck:
    """A JetStream context whose first publish reaches the server but whose acknowledgement is lost."""

    def __init__(self, js: Any) -> None:
        self._js, self.lost = js, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._js, name)

    async def publish(self, *args: Any, **kwargs: Any) -> Any:
        ack = await self._js.publish(*args, **kwargs)
        if not self.lost:
            self.lost += 1
            raise TimeoutError  # stored, but the caller never heard
        return ack


@pytest.fixture(params=["single server", "cluster"])
async def any_nc(request: pytest.FixtureRequest, nats_server: NatsServer, tmp_path: Path) -> Any:
    if request.param == "single server":
        nc = await connect(nats_server.url, name="test")
        yield nc, 1
    else:
        nodes = NatsCluster(tmp_path / "c").start()
        nc = await connect(nodes.urls, name="test")
        yield nc, 3
        await close(nc)
        nodes.stop()
        return
    await close(nc)


@pytest.mark.parametrize("op", ["put", "update", "create", "delete"])
async def test_a_retry_after_a_lost_acknowledgement_is_stored_once(any_nc: Any, op: str, prefix: str) -> None:
    nc, replicas = any_nc
    kv = await open_bucket(nc.jetstream(), f"{prefix}_{op}", create=True, replicas=replicas)
    store = DurableKV(kv, Retry(within=10))
    first = await store.put("k", b"0")
    kv._js = lossy = _LoseFirstAck(kv._js)
    if op == "put":
        revision = await store.put("k", b"1")
    elif op == "update":
        revision = await store.update("k", b"1", last=first)
    elif op == "create":
        revision = await store.create("other", b"1")
    else:
        revision = await store.delete("k")
    assert lossy.lost == 1
    info = await nc.jetstream().stream_info(f"KV_{prefix}_{op}")
    assert info.state.last_seq == revision == first + 1  # stored once (twice would make it first + 2), its revision


async def test_a_compare_and_set_that_really_lost_is_still_a_conflict(nats_server: NatsServer, prefix: str) -> None:
    nc = await connect(nats_server.url, name="test")
    try:
        kv = await open_bucket(nc.jetstream(), f"{prefix}_cas", create=True)
        store = DurableKV(kv, Retry(within=10))
        first = await store.put("k", b"0")
        await store.put("k", b"someone else")
        import nats.js.errors
        with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
            await store.update("k", b"mine", last=first)
    finally:
        await close(nc)


async def test_asking_for_more_replicas_than_nodes_is_refused_saying_so(nats_server: NatsServer, prefix: str) -> None:
    nc = await connect(nats_server.url, name="test")
    try:
        with pytest.raises(StateError, match="too few JetStream nodes"):
            await open_bucket(nc.jetstream(), f"{prefix}_r3", create=True, replicas=3)
        await open_bucket(nc.jetstream(), f"{prefix}_r1", create=True, replicas=1)
        with pytest.raises(StateError, match=r"exists with 1 replica, and 3 were asked for"):
            await open_bucket(nc.jetstream(), f"{prefix}_r1", create=True, replicas=3, strict=True)
    finally:
        await close(nc)


async def test_a_registry_call_waits_for_a_registry_that_is_failing_over(nats_server: NatsServer,
                                                                          prefix: str) -> None:
    nc = await connect(nats_server.url, name="test")
    try:
        client = PluginRegistry(nc, prefix=prefix, retry=Retry(within=20))
        info = PluginInfo(id="x-1", name="x", version="1.0.0")

        async def later() -> RegistryService:
            await asyncio.sleep(1.0)  # no registry answers for a second (one replica died, the next starts)
            return await RegistryService(nc, prefix=prefix).__aenter__()

        starting = asyncio.ensure_future(later())
        await client.register_plugin(info)  # retried until a registry answers
        service = await starting
        try:
            assert (await client.get_plugin("x-1")) is not None
        finally:
            await service.stop()
    finally:
        await close(nc)


def test_what_is_retried() -> None:
    import nats.errors
    import nats.js.errors

    assert durable.transient(nats.errors.NoRespondersError())
    assert durable.transient(nats.errors.TimeoutError())
    assert durable.transient(nats.js.errors.ServiceUnavailableError(code=503))
    assert durable.transient(nats.js.errors.APIError(code=500, err_code=10008))
    assert not durable.transient(nats.errors.ConnectionClosedError())
    assert not durable.transient(nats.js.errors.KeyWrongLastSequenceError())
    assert not durable.transient(nats.js.errors.BadRequestError(code=400, err_code=10005))


async def test_an_existing_bucket_with_fewer_copies_than_the_cluster_could_keep_is_reported(
        cnc: NATS, caplog: pytest.LogCaptureFixture) -> None:
    # Set-up, retried as a plugin's start retries it: the first stream a just-formed cluster creates
    # can take JetStream longer than a request's 5 s on a loaded run (CI, 3.13, once).
    await Retry(within=OPEN_RETRY, max_pause=0.5).run(
        lambda n: open_bucket(cnc.jetstream(), "few", create=True, replicas=1), what="bucket few",
        retry_on=passing_open)
    caplog.clear()
    await open_bucket(cnc.jetstream(), "few", create=True)  # the automatic count: 3 on this cluster
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "bucket few exists with 1 replica" in warned[0] and "could keep 3" in warned[0], warned
