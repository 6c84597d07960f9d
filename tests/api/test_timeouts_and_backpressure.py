"""Time limits of a stream (first event, silence, total, per-worker overrides), the retry budget, and a
worker's concurrency limit with its bounded line, through the app in process and the fake workers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest

from tests.api.test_fallback import sample, set_mode
from tests.api.test_hardening import fake_stats
from tests.conftest import Upstream, fake_config, gateway_in_process

pytestmark = pytest.mark.usefixtures("fake_reset")
HI: list[Any] = [{"role": "user", "content": "hi"}]


async def sse_events(gw: Any, body: dict[str, Any]) -> tuple[int, list[str]]:
    async with gw.http.stream("POST", "/v1/chat/completions", json={"messages": HI, "stream": True, **body}) as r:
        events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
        return r.status_code, events


async def test_a_stream_that_does_not_start_in_time_is_a_504_before_anything_was_sent(
        fakes: dict[str, Upstream]) -> None:
    cfg = fake_config(fakes, reliability={"retries": 0})
    cfg["workers"][0]["timeouts"] = {"ttft_timeout_s": 0.3}  # small only: big, the fallback, has the default
    async with gateway_in_process(cfg) as gw:
        status, events = await sse_events(gw, {"model": "small", "max_tokens": 3, "fake": {"ttft_ms": 2000}})
        assert status == 504 and events == []
        # Behind a policy, its fallback takes the request instead: the client never sees the slow worker.
        await asyncio.to_thread(set_mode, fakes, "fake-small", {"ttft_ms": 2000})
        fell_back = 0
        for _ in range(6):
            raw = await gw.client.chat.completions.with_raw_response.create(
                model="turnout/split", messages=HI, max_tokens=3, stream=True)
            assert raw.status_code == 200 and raw.headers["x-turnout-model"] == "big"
            fell_back += raw.headers.get("x-turnout-fallback-from") == "fake-small"
            async for _ in raw.parse():
                pass
        assert fell_back > 0


@pytest.mark.parametrize(("fake", "says"), [({"itl_ms": 1500}, "idle timeout"), ({"itl_ms": 150}, "total timeout")])
async def test_a_stream_that_stalls_or_runs_too_long_ends_with_an_error_event(
        fakes: dict[str, Upstream], fake: dict[str, Any], says: str) -> None:
    cfg = fake_config(fakes, upstream={"idle_timeout_s": 0.5, "total_timeout_s": 1.0})
    async with gateway_in_process(cfg) as gw:
        status, events = await sse_events(gw, {"model": "small", "max_tokens": 20, "fake": fake})
        assert status == 200 and events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "upstream_stream_error" and says in error["message"]
        assert len(events) >= 3, "the chunks before the stall reached the client"
        text = (await gw.http.get("/metrics")).text
        assert sample(text, "turnout_requests_total",
                      {"policy": "", "model": "fake-small", "worker": "small", "status": "stream_error"}) == 1


async def test_a_worker_may_have_longer_timeouts_than_the_rest(fakes: dict[str, Upstream]) -> None:
    cfg = fake_config(fakes, upstream={"ttft_timeout_s": 0.3})
    cfg["workers"][0]["timeouts"] = {"ttft_timeout_s": 5}
    async with gateway_in_process(cfg) as gw:
        status, events = await sse_events(gw, {"model": "small", "max_tokens": 2, "fake": {"ttft_ms": 800}})
        assert status == 200 and events[-1] == "[DONE]" and "error" not in events[-2]
        status, _ = await sse_events(gw, {"model": "big", "max_tokens": 2, "fake": {"ttft_ms": 800}})
        assert status == 504


async def test_the_retry_budget_caps_retries_during_an_outage(fakes: dict[str, Upstream]) -> None:
    await asyncio.to_thread(set_mode, fakes, "fake-small", {"status": 500})
    cfg = fake_config(fakes, reliability={"retries": 1, "retry_budget_ratio": 0, "retry_budget_min_per_s": 0.2,
                                          "breaker_failures": 100})
    async with gateway_in_process(cfg) as gw:
        for _ in range(10):
            with pytest.raises(openai.APIStatusError) as err:
                await gw.client.chat.completions.create(model="small", messages=HI, max_tokens=2)
            assert err.value.status_code == 502
        text = (await gw.http.get("/metrics")).text
    # 0.2 per second over the 10 s window: two retries, then none; the worker saw 10 requests + 2 retries.
    assert sample(text, "turnout_retries_total", {"model": "fake-small", "reason": "upstream_error"}) == 2
    assert "turnout_retry_budget_exhausted_total 8.0" in text
    assert (await fake_stats(fakes["fake-small"]))["requests"] == 12


async def test_a_full_worker_queues_briefly_then_refuses_with_retry_after(fakes: dict[str, Upstream]) -> None:
    cfg = fake_config(fakes, reliability={"max_queue": 2, "queue_timeout_s": 0.5})
    cfg["workers"][0]["max_concurrency"] = 2
    async with gateway_in_process(cfg) as gw:
        async def call(latency_ms: int) -> int:
            raw = await gw.http.post("/v1/chat/completions", json={
                "model": "small", "messages": HI, "max_tokens": 2, "fake": {"latency_ms": latency_ms}})
            if raw.status_code != 200:
                assert raw.json()["error"]["code"] == "worker_overloaded" and raw.headers["retry-after"]
            return raw.status_code

        # Two run for a second; two wait 0.5 s in line and give up; two find the line full at once.
        codes = await asyncio.gather(*(call(1000) for _ in range(6)))
        assert sorted(codes) == [200, 200, 503, 503, 503, 503]
        # Short answers: the line moves fast enough, and all four are served, two at a time.
        codes = await asyncio.gather(*(call(100) for _ in range(4)))
        assert codes == [200] * 4
        text = (await gw.http.get("/metrics")).text
        assert 'turnout_worker_queued_requests{model="fake-small",worker="small"} 0.0' in text
