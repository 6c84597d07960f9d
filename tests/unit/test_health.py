"""The health monitor: failures never escape it, and a worker that was up survives one failed check."""

from __future__ import annotations

import httpx

from server.config import parse_config
from server.upstream.workers import Health, HealthMonitor, WorkerRegistry


def registry() -> WorkerRegistry:
    return WorkerRegistry(parse_config({"workers": [{"name": "a", "model": "m", "base_url": "http://w/v1"}]}))


async def test_any_exception_is_a_failed_check() -> None:
    def boom(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("not an httpx error")

    reg = registry()
    mon = HealthMonitor(reg, 1, 1, 2, client=httpx.AsyncClient(transport=httpx.MockTransport(boom)))
    await mon.visit_all()
    assert reg.workers["a"].health is Health.DOWN
    assert "RuntimeError" in (reg.workers["a"].last_error or "")
    await mon.stop()


async def test_one_failure_does_not_take_an_up_worker_down() -> None:
    answers = iter([200, 500, 200, 500, 500])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(answers))

    reg = registry()
    mon = HealthMonitor(reg, 1, 1, 2, client=httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    seen = []
    for _ in range(5):
        await mon.visit_all()
        seen.append(reg.workers["a"].health)
    assert seen == [Health.UP, Health.UP, Health.UP, Health.UP, Health.DOWN]
    await mon.stop()
