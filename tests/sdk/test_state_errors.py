"""State failures are typed: every StateStore operation raises a StateError subclass naming the
bucket and key, during a nats-server outage and for values over a payload limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from nats.aio.client import Client as NATS

from mesh import NatsServer, close, connect
from plugin_sdk import (
    PayloadTooLarge,
    StateError,
    StateNotFound,
    StateTimeout,
    StateTooLarge,
    StateUnavailable,
)
from plugin_sdk._state import StateStore, open_bucket
from plugin_sdk.host import Retry

#: A hang guard, far above the JetStream timeout (5 s); not a timing assertion.
GUARD = 30.0


@pytest.fixture
async def own_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A nats-server of this test's own, which the test may stop (nothing shared is touched)."""
    server = await NatsServer(tmp_path / "nats", max_payload=4096).astart()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def own_nc(own_server: NatsServer) -> AsyncIterator[NATS]:
    conn = await connect(own_server.url, name="state-errors test")
    try:
        yield conn
    finally:
        await close(conn)


async def test_every_state_op_raises_a_typed_error_during_an_outage(own_server: NatsServer, own_nc: NATS) -> None:
    kv = await open_bucket(own_nc.jetstream(), "outage_state_demo", create=True)
    store = StateStore(kv, plugin="demo", retry=Retry(within=2))  # (the outage lasts: no need to wait 20 s)
    await store.put("k", 1)
    own_server.stop()

    ops: dict[str, Callable[[], Awaitable[Any]]] = {
        "get": lambda: store.get("k"),
        "get_entry": lambda: store.get_entry("k"),
        "put": lambda: store.put("k", 2),
        "compare_and_set": lambda: store.compare_and_set("k", 3, revision=1),
        "delete": lambda: store.delete("k"),
        "keys": store.keys,
        "open_bucket": lambda: open_bucket(own_nc.jetstream(), "outage_state_demo", create=False),
    }

    async def outcome(fn: Callable[[], Awaitable[Any]]) -> BaseException | None:
        try:
            await asyncio.wait_for(fn(), GUARD)
        except Exception as exc:
            return exc
        return None

    results = dict(zip(ops, await asyncio.gather(*(outcome(fn) for fn in ops.values())), strict=True))
    for op, exc in results.items():
        assert isinstance(exc, StateTimeout | StateUnavailable), (op, repr(exc))
        assert not isinstance(exc, nats.errors.Error), (op, repr(exc))
        assert exc.bucket == "outage_state_demo" and "outage_state_demo" in str(exc), (op, str(exc))
        if op != "open_bucket" and op != "keys":
            assert exc.key == "k" and "'k'" in str(exc), (op, str(exc))
    # A timed-out write says that it may have landed.
    put = results["put"]
    assert isinstance(put, StateTimeout) and "may or may not have been stored" in str(put)


async def test_values_over_a_limit_are_refused_before_sending(own_nc: NATS) -> None:
    kv = await open_bucket(own_nc.jetstream(), "big_state_demo", create=True)
    store = StateStore(kv, plugin="demo")

    with pytest.raises(StateTooLarge) as caught:
        await store.put("big", "x" * 5000)
    exc = caught.value
    assert isinstance(exc, PayloadTooLarge)  # code catching PayloadTooLarge still catches it
    assert (exc.bucket, exc.key) == ("big_state_demo", "big")
    assert all(part in str(exc) for part in ("big_state_demo", "'big'", "5002 bytes", "4096")), str(exc)

    # Under the limit alone, over it with the compare-and-set header (NATS counts both): refused
    # here, rather than sent and answered by the server closing the connection.
    body = "y" * (4096 - 2 - 20)
    with pytest.raises(StateTooLarge, match="4096"):
        await store.compare_and_set("edge", body, revision=0)
    assert own_nc.is_connected
    assert await store.put("small", 1) > 0

    limited = StateStore(kv, plugin="demo", max_value_size=100)
    with pytest.raises(StateTooLarge, match="over the limit of 100"):
        await limited.put("big", "x" * 200)


async def test_a_missing_bucket_is_state_not_found(own_nc: NATS) -> None:
    with pytest.raises(StateNotFound) as caught:
        await open_bucket(own_nc.jetstream(), "no_such_bucket", create=False)
    assert caught.value.bucket == "no_such_bucket" and isinstance(caught.value, StateError)
