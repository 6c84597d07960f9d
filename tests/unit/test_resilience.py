"""The circuit breaker, the concurrency gate and the retry budget, on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from server.config import ReliabilityConfig, UpstreamConfig, WorkerConfig
from server.errors import GatewayError
from server.upstream.resilience import Breaker, BreakerState, EffectiveTimeouts, Gate, RetryBudget


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def state(b: Breaker) -> BreakerState:
    return b.state  # read through a call: the state changes under the checker's narrowing


def test_breaker_opens_after_failures_in_a_row_and_closes_on_a_probe() -> None:
    clock = Clock()
    seen: list[tuple[BreakerState, BreakerState]] = []
    b = Breaker(3, 10.0, clock, on_change=lambda old, new: seen.append((old, new)))
    b.failure()
    b.failure()
    b.success()  # the count is of failures in a row
    b.failure()
    b.failure()
    assert state(b) is BreakerState.CLOSED and b.available()
    b.failure()
    assert state(b) is BreakerState.OPEN and not b.available()
    clock.now += 9.9
    assert not b.available()
    clock.now += 0.2
    assert state(b) is BreakerState.HALF_OPEN and b.available()
    b.begin()  # the probe
    assert not b.available(), "one probe at a time"
    b.release()  # the probe's client went away: the next request probes
    assert b.available()
    b.begin()
    b.failure()  # a failed probe opens it again at once
    assert state(b) is BreakerState.OPEN
    clock.now += 10.0
    b.begin()
    b.success()
    assert state(b) is BreakerState.CLOSED and b.available()
    assert [new for _, new in seen] == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.OPEN,
                                        BreakerState.HALF_OPEN, BreakerState.CLOSED]


async def test_gate_queues_in_order_bounded_and_with_a_deadline() -> None:
    gate = Gate(2)
    await gate.acquire(2, 1.0, "m")
    await gate.acquire(2, 1.0, "m")
    assert not gate.has_room()
    order: list[int] = []

    async def wait(i: int) -> None:
        await gate.acquire(2, 5.0, "m")
        order.append(i)

    waiters = [asyncio.create_task(wait(i)) for i in range(2)]
    await asyncio.sleep(0.01)
    assert gate.waiting == 2
    with pytest.raises(GatewayError) as full:
        await gate.acquire(2, 5.0, "m")  # the line is full: refused at once
    assert full.value.status == 503 and full.value.code == "worker_overloaded"
    assert full.value.headers["retry-after"] == "5"
    gate.release()
    gate.release()
    await asyncio.gather(*waiters)
    assert order == [0, 1] and gate.active == 2 and gate.waiting == 0
    with pytest.raises(GatewayError):  # no place frees within the wait
        await gate.acquire(2, 0.05, "m")
    assert gate.waiting == 0 and gate.active == 2
    # A waiter cancelled in line leaves it; the place it would have had goes to the next.
    first = asyncio.create_task(gate.acquire(2, 5.0, "m"))
    second = asyncio.create_task(gate.acquire(2, 5.0, "m"))
    await asyncio.sleep(0.01)
    first.cancel()
    await asyncio.sleep(0.01)
    gate.release()
    await second
    assert gate.active == 2 and gate.waiting == 0
    for _ in range(2):
        gate.release()
    assert gate.active == 0 and gate.has_room()


async def test_no_limit_means_no_waiting() -> None:
    gate = Gate(None)
    for _ in range(1000):
        await gate.acquire(0, 0, "m")
    assert gate.has_room()


def test_retry_budget_is_a_share_of_recent_requests() -> None:
    clock = Clock()
    budget = RetryBudget(ReliabilityConfig(retry_budget_ratio=0.1, retry_budget_min_per_s=0.5), clock)
    # With no traffic, the floor: 0.5/s over 10 s = 5 re-sends.
    assert sum(budget.try_spend() for _ in range(20)) == 5
    clock.now += 10  # the window has passed
    for _ in range(200):
        budget.request()
    assert sum(budget.try_spend() for _ in range(100)) == 25  # 0.1 x 200 + 5
    clock.now += 10
    assert budget.try_spend()


def test_worker_timeouts_override_the_upstream_defaults() -> None:
    worker = WorkerConfig.model_validate({"name": "w", "model": "m", "base_url": "http://x/v1",
                                          "timeouts": {"ttft_timeout_s": 120}})
    t = EffectiveTimeouts.of(UpstreamConfig(idle_timeout_s=7), worker)
    assert (t.connect_s, t.ttft_s, t.idle_s, t.total_s) == (5.0, 120.0, 7.0, 600.0)
    assert (t.for_client().read, t.for_client().connect, t.for_client().pool) == (600.0, 5.0, 10.0)
