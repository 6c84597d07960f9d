"""Failures that are not the worker's, and retries that multiply (hardening from an outside review, items 7 and
17)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Upstream, fake_config, gateway_in_process

HI: list[Any] = [{"role": "user", "content": "hi"}]


def fake_stats(fakes: dict[str, Upstream], model: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"{fakes[model].root}/fake/stats", timeout=5).json()
    return stats


async def test_long_streams_past_the_total_timeout_do_not_open_the_breaker(fakes: dict[str, Upstream],
                                                                         fake_reset: None) -> None:
    """Streams that run past `total_timeout_s` end with an error event, but a long answer is the request's, not
    the worker's failure: the breaker (2 failures here) stays closed and the next tenant is served."""
    cfg = fake_config(fakes, upstream={"total_timeout_s": 0.3}, reliability={"breaker_failures": 2})
    async with gateway_in_process(cfg) as gw:
        for _ in range(4):
            r = await gw.http.post("/v1/chat/completions", json={
                "model": "small", "messages": HI, "max_tokens": 100, "stream": True, "fake": {"itl_ms": 20}})
            assert "total timeout" in r.text and r.text.rstrip().endswith("data: [DONE]")
        breaker = (await gw.http.get("/readyz")).json()["workers"]["small"]["breaker"]
        after = await gw.http.post("/v1/chat/completions", json={"model": "small", "messages": HI,
                                                                 "max_tokens": 2})
    assert breaker == "closed"
    assert after.status_code == 200


async def test_the_sdk_does_not_repeat_what_the_gateway_already_retried(fakes: dict[str, Upstream],
                                                                        fake_reset: None) -> None:
    """A worker answering 500: the gateway retries once; the SDK, with its default two retries, would send the
    whole again twice more. `x-should-retry: false` says not to: the worker sees the gateway's two tries."""
    await asyncio.to_thread(httpx.post, f"{fakes['fake-small'].root}/fake/mode", json={"status": 500}, timeout=5)
    cfg = fake_config(fakes, reliability={"retries": 1, "breaker_failures": 10})
    async with gateway_in_process(cfg) as gw:
        sdk = gw.client.with_options(max_retries=2)
        with pytest.raises(openai.InternalServerError) as failed:
            await sdk.chat.completions.create(model="small", messages=HI, max_tokens=2)
    assert failed.value.response.headers["x-should-retry"] == "false"
    assert (await asyncio.to_thread(fake_stats, fakes, "fake-small"))["requests"] == 2


async def test_panic_mode_tries_the_least_recently_failed_worker(fakes: dict[str, Upstream], fake_reset: None) -> None:
    """The only worker of a model failed and its breaker is open for a minute; it has recovered since. Rather
    than refuse every request for that minute (`no_healthy_worker`), the gateway tries it (panic mode, counted),
    and its success closes the breaker."""
    cfg = fake_config(fakes, reliability={"retries": 0, "breaker_failures": 1, "breaker_open_s": 60},
                      server={"max_fallbacks": 0})
    async with gateway_in_process(cfg) as gw:
        await asyncio.to_thread(httpx.post, f"{fakes['fake-small'].root}/fake/mode", json={"status": 500},
                                timeout=5)
        failed = await gw.http.post("/v1/chat/completions", json={"model": "small", "messages": HI, "max_tokens": 2})
        assert failed.status_code == 502
        assert (await gw.http.get("/readyz")).json()["workers"]["small"]["breaker"] == "open"
        await asyncio.to_thread(httpx.post, f"{fakes['fake-small'].root}/fake/mode", json={}, timeout=5)
        served = await gw.http.post("/v1/chat/completions", json={"model": "small", "messages": HI, "max_tokens": 2})
        assert served.status_code == 200, served.text
        assert (await gw.http.get("/readyz")).json()["workers"]["small"]["breaker"] == "closed"
        metrics = (await gw.http.get("/metrics")).text
    assert 'turnout_panic_sends_total{worker="small"} 1.0' in metrics
