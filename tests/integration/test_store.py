"""The store's operations are atomic and agree between the memory and Redis implementations (a real
`redis-server`); Redis being away is reported as `StoreUnavailable`, fast."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from server.store.base import Hold, Store, StoreUnavailable
from server.store.memory import MemoryStore
from server.store.redis_store import RedisStore
from testkit.clock import fresh_period_wait_s
from testkit.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis") / "redis.log") as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, redis_server: RedisServer) -> AsyncIterator[Store]:
    s: Store = MemoryStore() if request.param == "memory" else RedisStore(redis_server.url)
    if isinstance(s, RedisStore):
        await s.client.flushdb()
    yield s
    await s.aclose()


async def test_window_admits_exactly_the_limit_under_concurrency(store: Store) -> None:
    await asyncio.sleep(fresh_period_wait_s(margin_s=5.0))  # windows are calendar minutes: all of it in one
    results = await asyncio.gather(*(store.window_add("rl:k", 1, 25, 60) for _ in range(100)))
    admitted = [r for r in results if r is None]
    assert len(admitted) == 25
    assert all(r is not None and 0 < r <= 61 for r in results if r is not None), "retry-after is the window's end"
    # Token windows: a correction after the fact can take the total back below the limit.
    assert await store.window_add("tpm:k", 90, 100, 60) is None
    assert await store.window_add("tpm:k", 20, 100, 60) is not None
    await store.window_adjust("tpm:k", -50, 60)
    assert await store.window_add("tpm:k", 20, 100, 60) is None


def hold(amounts: tuple[float, ...], budget: float = 3.0) -> Hold:
    return Hold("b:k", amounts, budget, 60)


async def test_budget_holds_never_overspend(store: Store) -> None:
    got = await asyncio.gather(*(store.admit([], 60, hold((0.3,))) for _ in range(50)))
    assert sum(a.ok for a in got) == 10 and all(a.over_budget for a in got if not a.ok)
    state = await store.budget("b:k")
    assert state.held == pytest.approx(3.0) and state.spent == 0
    # Settling at less than the hold frees room; the spend is what was actually used.
    for _ in range(10):
        await store.settle("b:k", 0.3, 0.1, 60)
    state = await store.budget("b:k")
    assert state.spent == pytest.approx(1.0) and state.held == pytest.approx(0.0, abs=1e-9)
    assert (await store.admit([], 60, hold((2.0,)))).held == 2.0
    assert (await store.admit([], 60, hold((0.01,)))).over_budget


async def test_admit_holds_the_dearest_amount_that_fits(store: Store) -> None:
    first = await store.admit([], 60, hold((2.5, 1.0, 0.25)))
    assert first.held == 2.5 and first.state.held == 0
    second = await store.admit([], 60, hold((2.5, 1.0, 0.25)))
    assert second.held == 0.25 and second.state.held == pytest.approx(2.5), "only the cheapest fits the 0.5 left"
    await store.settle("b:k", 2.0, 0.0, 60)  # part of a hold given back
    assert (await store.budget("b:k")).held == pytest.approx(0.75)
    # Not even the cheapest fits: refused, and the request's windows are not counted either.
    refused = await store.admit([("rpm:k", 1, 10)], 60, hold((2.5, 2.4)))
    assert refused.over_budget and not refused.ok and refused.state.held == pytest.approx(0.75)
    assert (await store.admit([("rpm:k", 1, 1)], 60, None)).ok, "the refused request took no slot"


async def test_writes_sent_together_each_get_their_reply(store: Store) -> None:
    """Off-path writes (settles, token corrections, values) issued in one turn all land, concurrently."""
    await asyncio.sleep(fresh_period_wait_s(margin_s=5.0))  # the token corrections and the check in one minute
    await store.admit([], 60, hold((0.01,) * 1, budget=100.0))
    await asyncio.gather(*(store.admit([], 60, hold((0.01,), budget=100.0)) for _ in range(199)))
    await asyncio.gather(*(store.settle("b:k", 0.01, 0.02, 60) for _ in range(200)),
                         *(store.put(f"v:{i}", str(i).encode(), 60) for i in range(200)),
                         *(store.window_adjust("tpm:k", 1, 60) for _ in range(200)))
    state = await store.budget("b:k")
    assert state.spent == pytest.approx(4.0) and state.held == pytest.approx(0.0, abs=1e-9)
    assert [await store.get(f"v:{i}") for i in (0, 199)] == [b"0", b"199"]
    assert await store.window_add("tpm:k", 800, 1000, 60) is None and await store.window_add("tpm:k", 1, 1000, 60)
    if isinstance(store, RedisStore):
        assert store.later.writes == 600 and store.later.batches < 10, "writes of one turn share a pipeline"


async def test_values_claims_and_blob_hashes(store: Store) -> None:
    await store.put("v", b"abc", 60)
    assert await store.get("v") == b"abc" and await store.get("missing") is None
    await store.put("short", b"x", 0.05)
    await asyncio.sleep(0.1)
    assert await store.get("short") is None, "values expire"
    assert await store.claim("c", 60) and not await store.claim("c", 60)
    await store.hset_blob("h", "replica-1", b"\x00\x01", 60)
    await store.hset_blob("h", "replica-2", b"\x02", 60)
    await store.hset_blob("h", "replica-1", b"\x03", 60)
    assert await store.hgetall_blobs("h") == {"replica-1": b"\x03", "replica-2": b"\x02"}
    assert await store.hgetall_blobs("nothing") == {}


async def test_a_dead_redis_is_reported_fast(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis.log")
    server.start()
    store = RedisStore(server.url, timeout_s=0.3)
    await store.ping()
    server.stop(kill=True)
    t = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await store.window_add("k", 1, 10, 60)
    with pytest.raises(StoreUnavailable):
        await store.admit([], 60, Hold("b", (1.0,), 10, 60))
    with pytest.raises(StoreUnavailable):  # a write sent with others
        await asyncio.gather(store.settle("b", 1, 1, 60), store.put("v", b"x", 60))
    assert time.monotonic() - t < 5, "no call waits for a Redis that is gone"
    server.start()  # back on the same port: the pool reconnects by itself
    assert await store.window_add("k", 1, 10, 60) is None
    await store.aclose()
    server.stop()


async def test_admit_counts_all_windows_or_none_and_reads_the_budget(store: Store) -> None:
    await asyncio.sleep(fresh_period_wait_s(margin_s=5.0))  # its windows' counts must all fall in one minute
    await store.admit([], 60, Hold("b:a", (0.25,), 1.0, 60))
    await store.settle("b:a", 0.25, 0.125, 60)
    windows = [("rpm:a", 1, 3), ("tpm:a", 40, 100)]
    for _ in range(2):
        got = await store.admit(windows, 60, Hold("b:a", (0.0,), 1.0, 60))
        assert got.ok and got.wait_s == 0 and got.state.spent == pytest.approx(0.125) and got.state.held == 0
    # The token window would pass 100: nothing is counted, the request count included.
    got = await store.admit(windows, 60, Hold("b:a", (0.0,), 1.0, 60))
    assert got.window == 1 and 0 < got.wait_s <= 61 and got.state.spent == pytest.approx(0.125)
    got = await store.admit([("rpm:a", 1, 3)], 60, None)
    assert got.ok, "the refused admission left the request window at 2"
    got = await store.admit([("rpm:a", 1, 3)], 60, None)
    assert got.window == 0 and got.state.spent == 0
