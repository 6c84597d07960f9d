"""Budgets that cannot be overrun (issue: hardening from an outside review, items 1 and 2).

A key's budget covers a handful of requests; four times as many are sent at once, on every endpoint that
spends and on both stores. Whatever the body says, what was spent never passes the budget: the worst case
held for each request is what the worker will actually do on that endpoint (vLLM's text completions ignore
`max_completion_tokens` and generate their default 16 tokens, which a hold of one token did not cover), and a
request that spends past its hold anyway is counted in `turnout_hold_overruns_total`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from server.quota.keys import hash_key
from server.quota.limits import period, prompt_tokens_bound
from testkit.redis_server import RedisServer
from tests.api.test_fallback import sample
from tests.conftest import InProcess, Upstream, fake_config, gateway_in_process, start_fake

PRICE = {"input_per_1m": 1.0, "output_per_1m": 300.0}  # answers dear: an underestimated answer shows
KEY = "tk-spender"
WORDS = "hi"  # short: the prompt's generous bound (its bytes) cannot hide a wrong answer bound
#: Each endpoint's request, written to spend more than a careless worst case would hold.
BODIES: dict[str, tuple[str, dict[str, Any]]] = {
    # vLLM's completions read max_tokens only: this one generates its default 16 tokens.
    "completions": ("/v1/completions", {"model": "small", "prompt": WORDS, "max_completion_tokens": 1}),
    "completions batch": ("/v1/completions", {"model": "small", "prompt": [WORDS, WORDS], "max_tokens": 3, "n": 2}),
    "chat": ("/v1/chat/completions", {"model": "small", "messages": [{"role": "user", "content": WORDS}],
                                      "max_tokens": 50, "max_completion_tokens": 8}),
    "chat unbounded": ("/v1/chat/completions", {"model": "small", "messages": [{"role": "user", "content": WORDS}]}),
    "responses": ("/v1/responses", {"model": "small", "input": WORDS, "max_tokens": 1}),
    "messages": ("/v1/messages", {"model": "small", "max_tokens": 8,
                                  "messages": [{"role": "user", "content": WORDS}]}),
    "chat stream": ("/v1/chat/completions", {"model": "small", "stream": True, "max_tokens": 8,
                                             "messages": [{"role": "user", "content": WORDS}]}),
    "responses stream": ("/v1/responses", {"model": "small", "input": WORDS, "stream": True}),
    "messages stream": ("/v1/messages", {"model": "small", "max_tokens": 8, "stream": True,
                                         "messages": [{"role": "user", "content": WORDS}]}),
    "embeddings": ("/v1/embeddings", {"model": "embed", "input": [WORDS, WORDS]}),
    "rerank": ("/v1/rerank", {"model": "embed", "query": WORDS, "documents": [WORDS, WORDS]}),
}


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fake pooling worker's base URL."""
    proc = start_fake("fake-embed", tmp_path_factory.mktemp("embed"))
    with proc:
        yield f"http://127.0.0.1:{proc.cmd[proc.cmd.index('--port') + 1]}/v1"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with RedisServer(Path(tmp_path_factory.mktemp("redis")) / "redis.log") as server:
        yield server.url


def spender_config(fakes: dict[str, Upstream], embedder: str, budget_usd: float, store: str) -> dict[str, Any]:
    cfg = fake_config(fakes, server={"default_max_tokens": 40})
    cfg["workers"][0]["price"] = PRICE
    cfg["workers"].append({"name": "embed", "model": "fake-embed", "base_url": embedder, "kind": "pooling",
                           "price": PRICE})
    cfg["auth"] = {"enabled": True, "keys": [{"name": "spender", "key_sha256": hash_key(KEY),
                                              "budget_usd": budget_usd}]}
    cfg["state"] = {"backend": store}
    return cfg


def model_of(body: dict[str, Any]) -> str:
    return "fake-embed" if body["model"] == "embed" else "fake-small"


async def one_cost(gw: InProcess, path: str, body: dict[str, Any]) -> float:
    """What one such request costs, as the gateway charged it (the first request of a fresh budget)."""
    r = await gw.http.post(path, json=body, headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    return float(sample((await gw.http.get("/metrics")).text, "turnout_cost_usd_total",
                        {"model": model_of(body), "policy": ""}))


@pytest.mark.parametrize("store", ["memory", "redis"])
@pytest.mark.parametrize("endpoint", list(BODIES))
async def test_concurrent_spenders_never_pass_the_budget(fakes: dict[str, Upstream], fake_reset: None,
                                                         embedder: str, redis_url: str,
                                                         monkeypatch: pytest.MonkeyPatch, endpoint: str,
                                                         store: str) -> None:
    monkeypatch.setenv("TURNOUT_REDIS_URL", redis_url)
    path, body = BODIES[endpoint]
    async with gateway_in_process(spender_config(fakes, embedder, 1.0, "memory")) as probe:
        cost = await one_cost(probe, path, body)
    budget = 12 * cost  # more than one worst case, which may be several times the actual cost
    headers = {"authorization": f"Bearer {KEY}"}
    async with gateway_in_process(spender_config(fakes, embedder, budget, store)) as gw:
        answers = await asyncio.gather(*(gw.http.post(path, json=body, headers=headers) for _ in range(30)))
        await asyncio.sleep(0.3)  # the settles go out in the background
        metrics = (await gw.http.get("/metrics")).text
        codes = sorted(a.status_code for a in answers)
        spent = sample(metrics, "turnout_cost_usd_total", {"model": model_of(body), "policy": ""})
        overruns = sample(metrics, "turnout_hold_overruns_total", {"key": "spender"})
    if store == "redis":  # the budget in Redis outlives this gateway: cleared for the next case
        client = aioredis.from_url(redis_url)
        await client.flushdb()
        await client.aclose()
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, (codes, answers[0].text)
    assert spent == pytest.approx(codes.count(200) * cost, rel=1e-9)
    assert spent <= budget * (1 + 1e-9), f"spent {spent / budget:.2f}x the budget"
    assert overruns == 0


@pytest.mark.parametrize("ending", ["cut by the worker", "completed"])
async def test_a_stream_with_continuous_usage_cut_short_is_charged_its_hold(
        fakes: dict[str, Upstream], fake_reset: None, embedder: str, ending: str) -> None:
    """With `continuous_usage_stats` every chunk carries the usage so far. A stream cut before its final usage
    chunk may have generated more than its last chunk said: it is charged the worst case held, never less; a
    stream that completes is charged its final usage."""
    messages = [{"role": "user", "content": WORDS}]
    body: dict[str, Any] = {"model": "small", "messages": messages, "max_tokens": 30, "stream": True,
                            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    if ending == "cut by the worker":
        body["fake"] = {"drop_after": 3}
    async with gateway_in_process(spender_config(fakes, embedder, 1.0, "memory")) as gw:
        r = await gw.http.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"})
        usages = [orjson.loads(line[6:])["usage"] for line in r.text.splitlines()
                  if line.startswith("data: {") and '"usage"' in line]
        await asyncio.sleep(0.2)
        budget = await gw.app.state.gateway.store.budget(f"turnout:budget:spender:{period('day', time.time())[0]}")
    assert budget.held == 0
    if ending == "completed":
        final = usages[-1]
        assert budget.spent == pytest.approx((final["prompt_tokens"] * PRICE["input_per_1m"]
                                              + final["completion_tokens"] * PRICE["output_per_1m"]) / 1e6)
    else:
        assert usages and usages[-1]["completion_tokens"] == 3, "the client saw the usage so far"
        worst = (prompt_tokens_bound({"messages": messages}) * PRICE["input_per_1m"]
                 + 30 * PRICE["output_per_1m"]) / 1e6
        assert budget.spent == pytest.approx(worst, rel=1e-9)
