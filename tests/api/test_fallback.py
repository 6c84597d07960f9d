"""Cross-model fallback: a chosen model that fails before its first byte hands the request to the policy's
next candidate; the client sees one successful answer, and headers, metrics and the log say what happened."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest

from server.errors import no_worker_available
from tests.conftest import Upstream, fake_config, gateway_in_process

HI: list[Any] = [{"role": "user", "content": "hi"}]


def set_mode(fakes: dict[str, Upstream], model: str, mode: dict[str, Any]) -> None:
    httpx.post(f"{fakes[model].root}/fake/mode", json=mode, timeout=5).raise_for_status()


def requests_seen(fakes: dict[str, Upstream]) -> int:
    return sum(httpx.get(f"{u.root}/fake/stats", timeout=5).json()["requests"] for u in fakes.values())


def sample(text: str, name: str, labels: dict[str, str]) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    want = ",".join(f"{k}=\"{v}\"" for k, v in sorted(labels.items()))  # the exposition sorts labels
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("stream", [False, True])
async def test_a_failing_chosen_model_falls_back_to_the_next_candidate(
    fakes: dict[str, Upstream], fake_reset: None, stream: bool
) -> None:
    await asyncio.to_thread(set_mode, fakes, "fake-small", {"status": 500})
    async with gateway_in_process(fake_config(fakes)) as gw:
        fell_back = 0
        for _ in range(12):  # `split` picks either worker: some requests choose the failing one
            raw = await gw.client.chat.completions.with_raw_response.create(
                model="turnout/split", messages=HI, max_tokens=3, stream=stream)
            assert raw.headers["x-turnout-model"] == "big", "every answer comes from the healthy model"
            if raw.headers.get("x-turnout-fallback-from") == "fake-small":
                fell_back += 1
            parsed = raw.parse()
            if isinstance(parsed, openai.AsyncStream):
                assert "".join([c.choices[0].delta.content or "" async for c in parsed if c.choices])
            else:
                assert parsed.choices[0].message.content
        assert fell_back > 0
        text = (await gw.http.get("/metrics")).text
        labels = {"policy": "split", "from_model": "fake-small", "to_model": "fake-big", "reason": "upstream_error"}
        assert sample(text, "turnout_fallbacks_total", labels) == fell_back
        # Every failed attempt is an upstream error: each fallback's, and each retry's before it (one retry per
        # request until small's breaker opened).
        retries = sample(text, "turnout_retries_total", {"model": "fake-small", "reason": "upstream_error"})
        assert 0 < retries <= fell_back
        errors = {"worker": "small", "reason": "upstream_error"}
        assert sample(text, "turnout_upstream_errors_total", errors) == fell_back + retries
        ok = {"policy": "split", "model": "fake-big", "worker": "big", "status": "ok"}
        assert sample(text, "turnout_requests_total", ok) == 12, "each request counted once, as answered"


async def test_no_fallback_without_a_next_candidate_or_when_disabled(fakes: dict[str, Upstream],
                                                                    fake_reset: None) -> None:
    await asyncio.to_thread(set_mode, fakes, "fake-small", {"status": 500})
    async with gateway_in_process(fake_config(fakes)) as gw:
        # `cheap` has one candidate: its failure is the client's answer (502, OpenAI format).
        with pytest.raises(openai.APIStatusError) as err:
            await gw.client.chat.completions.create(model="turnout/cheap", messages=HI, max_tokens=3)
        assert err.value.status_code == 502 and "small" in err.value.message
    cfg = fake_config(fakes)
    cfg["server"]["max_fallbacks"] = 0
    async with gateway_in_process(cfg) as gw:
        codes = set()
        for _ in range(12):
            resp = await gw.http.post("/v1/chat/completions",
                                      json={"model": "turnout/split", "messages": HI, "max_tokens": 3})
            codes.add(resp.status_code)
            assert "x-turnout-fallback-from" not in resp.headers
        assert codes == {200, 502}


async def test_a_client_error_does_not_fall_back(fakes: dict[str, Upstream], fake_reset: None) -> None:
    for model in fakes:
        await asyncio.to_thread(set_mode, fakes, model, {"status": 400})
    async with gateway_in_process(fake_config(fakes)) as gw:
        resp = await gw.http.post("/v1/chat/completions", json={"model": "turnout/split", "messages": HI})
        assert resp.status_code == 400 and "x-turnout-fallback-from" not in resp.headers
        assert await asyncio.to_thread(requests_seen, fakes) == 1, "the request went to one worker only"


async def test_a_chosen_model_left_without_a_worker_falls_back(fakes: dict[str, Upstream], fake_reset: None) -> None:
    # Under load a model's last breaker can open between routing and sending: the chosen target then has no worker
    # to pick at all. That must fall back like a failed worker (it once crashed with a 500), and count no worker
    # failure, since no worker was tried.
    async with gateway_in_process(fake_config(fakes)) as gw:
        registry = gw.app.state.gateway.live.registry
        real_pick = registry.pick

        def pick(target: str, avoid: frozenset[str] = frozenset(), panic: bool = True) -> Any:
            if registry.resolve(target)[0].model == "fake-small":
                raise no_worker_available(target)
            return real_pick(target, avoid, panic)

        registry.pick = pick
        fell_back = 0
        for _ in range(12):
            raw = await gw.client.chat.completions.with_raw_response.create(
                model="turnout/split", messages=HI, max_tokens=3)
            assert raw.headers["x-turnout-model"] == "big"
            fell_back += raw.headers.get("x-turnout-fallback-from") == "fake-small"
        assert fell_back > 0
        text = (await gw.http.get("/metrics")).text
        labels = {"policy": "split", "from_model": "fake-small", "to_model": "fake-big",
                  "reason": "no_healthy_worker"}
        assert sample(text, "turnout_fallbacks_total", labels) == fell_back
        assert "turnout_upstream_errors_total{" not in text
        assert await asyncio.to_thread(requests_seen, fakes) == 12, "only the healthy model's worker was sent to"


async def test_a_full_worker_hands_the_request_on_without_a_worker_failure(fakes: dict[str, Upstream],
                                                                          fake_reset: None) -> None:
    # `small` takes one request at a time and no line; the retry budget is zero. A request that finds `small`
    # full was never sent to it: it goes to the fallback without spending the budget (nothing is re-sent) and
    # without counting an upstream error against `small` (it once crashed with a 500 here).
    cfg = fake_config(fakes, reliability={"max_queue": 0, "retry_budget_ratio": 0.0, "retry_budget_min_per_s": 0.0})
    cfg["workers"][0]["max_concurrency"] = 1
    async with gateway_in_process(cfg) as gw:
        busy = asyncio.create_task(gw.http.post("/v1/chat/completions", json={
            "model": "small", "messages": HI, "max_tokens": 2, "fake": {"latency_ms": 1500}}))
        await asyncio.sleep(0.3)  # `small` is now taken
        raws = await asyncio.gather(*(gw.client.chat.completions.with_raw_response.create(
            model="turnout/split", messages=HI, max_tokens=3) for _ in range(8)))
        assert all(raw.headers["x-turnout-model"] == "big" for raw in raws)
        fell_back = sum(raw.headers.get("x-turnout-fallback-from") == "fake-small" for raw in raws)
        assert fell_back > 0
        assert (await busy).status_code == 200
        text = (await gw.http.get("/metrics")).text
        labels = {"policy": "split", "from_model": "fake-small", "to_model": "fake-big",
                  "reason": "worker_overloaded"}
        assert sample(text, "turnout_fallbacks_total", labels) == fell_back
        assert "turnout_upstream_errors_total{" not in text
        assert "\nturnout_retry_budget_exhausted_total 0.0\n" in text
