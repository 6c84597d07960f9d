"""API keys and per-key limits in one gateway (memory store): 401, 403 and 429 in OpenAI's shape, with
`Retry-After`; budgets held at the worst case and spent at the actual cost."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from server.quota.keys import hash_key
from testkit.clock import DAY_S, fresh_period_wait_s
from tests.conftest import InProcess, Upstream, fake_config, gateway_in_process

HI: list[Any] = [{"role": "user", "content": "hi"}]


def keyed_config(fakes: dict[str, Upstream], **key: Any) -> dict[str, Any]:
    cfg = fake_config(fakes)
    cfg["auth"] = {"enabled": True, "keys": [
        {"name": "team", "key_sha256": hash_key("tk-team"), **key},
        {"name": "other", "key_env": "TURNOUT_TEST_OTHER_KEY"},
    ]}
    return cfg


def client_for(gw: InProcess, key: str | None) -> openai.AsyncOpenAI:
    return gw.client.with_options(api_key=key or "", max_retries=0)


async def test_missing_bad_and_forbidden(fakes: dict[str, Upstream], fake_reset: None,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURNOUT_TEST_OTHER_KEY", "tk-other")
    async with gateway_in_process(keyed_config(fakes, policies=["cheap"], models=["small"])) as gw:
        missing = await gw.http.post("/v1/chat/completions", json={"model": "auto", "messages": HI})
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError) as bad:
            await client_for(gw, "tk-wrong").chat.completions.create(model="turnout/cheap", messages=HI)
        assert "tk-wrong" not in str(bad.value.body)
        team = client_for(gw, "tk-team")
        assert (await team.chat.completions.create(model="turnout/cheap", messages=HI)).choices
        assert (await team.chat.completions.create(model="small", messages=HI)).choices
        for model in ("turnout/split", "big"):
            with pytest.raises(openai.PermissionDeniedError) as denied:
                await team.chat.completions.create(model=model, messages=HI)
            assert denied.value.code == "permission_denied"
        # The key from the environment works too, and may do everything.
        assert (await client_for(gw, "tk-other").chat.completions.create(model="big", messages=HI)).choices
        route = await gw.http.post("/v1/route", json={"model": "turnout/split", "messages": HI},
                                   headers={"authorization": "Bearer tk-team"})
        assert route.status_code == 403


async def test_a_key_from_an_unset_variable_is_a_config_problem(fakes: dict[str, Upstream]) -> None:
    from server.config import ConfigError

    with pytest.raises(ConfigError, match="TURNOUT_TEST_OTHER_KEY"):
        async with gateway_in_process(keyed_config(fakes)):
            pass


async def test_requests_per_minute(fakes: dict[str, Upstream], fake_reset: None,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURNOUT_TEST_OTHER_KEY", "tk-other")
    async with gateway_in_process(keyed_config(fakes, requests_per_minute=3)) as gw:
        team = client_for(gw, "tk-team")
        await asyncio.sleep(fresh_period_wait_s())  # all five in one window
        codes: list[int] = []
        for _ in range(5):
            resp = await team.chat.completions.with_raw_response.create(model="turnout/cheap", messages=HI) \
                if len(codes) < 3 else None
            if resp is not None:
                codes.append(resp.status_code)
                continue
            with pytest.raises(openai.RateLimitError) as err:
                await team.chat.completions.create(model="turnout/cheap", messages=HI)
            codes.append(429)
            assert 1 <= int(err.value.response.headers["retry-after"]) <= 60
            assert err.value.code == "rate_limit_exceeded"
        assert codes == [200, 200, 200, 429, 429]
        # Another key has its own window.
        assert (await client_for(gw, "tk-other").chat.completions.create(model="small", messages=HI)).choices
        text = (await gw.http.get("/metrics")).text
        assert 'turnout_limited_requests_total{key="team",limit="requests_per_minute"} 2.0' in text


async def test_budget_is_held_at_worst_case_and_spent_at_actual(fakes: dict[str, Upstream], fake_reset: None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURNOUT_TEST_OTHER_KEY", "tk-other")
    # small costs $0.1/$0.2 per 1M tokens. A request's worst case here: its messages' JSON bytes as prompt
    # tokens plus max_tokens=10 answer tokens.
    async with gateway_in_process(keyed_config(fakes, budget_usd=0.00002)) as gw:
        team = client_for(gw, "tk-team")
        await asyncio.sleep(fresh_period_wait_s(DAY_S, 30.0))  # the budget is per UTC day: all of it in one
        spent = 0.0
        ok = 0
        while True:
            try:
                raw = await team.chat.completions.with_raw_response.create(model="small", messages=HI, max_tokens=10)
            except openai.RateLimitError as err:
                assert err.code == "budget_exceeded"
                break
            usage = raw.parse().usage
            assert usage is not None
            spent += (usage.prompt_tokens * 0.1 + usage.completion_tokens * 0.2) / 1e6
            ok += 1
            assert ok < 1000
            # Settles run in the background once a response is out; the memory store never suspends, so give
            # them a turn as real traffic (and a network store) would.
            await asyncio.sleep(0.01)
        state = await gw.app.state.gateway.store.budget(next(
            k for k in gw.app.state.gateway.store._data if k.startswith("turnout:budget:team:")))
        assert state.held == pytest.approx(0.0, abs=1e-12)
        assert state.spent == pytest.approx(spent, rel=1e-9) and state.spent <= 0.00002
        assert ok > 0


async def test_an_answer_without_usage_is_charged_its_whole_hold(fakes: dict[str, Upstream], fake_reset: None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURNOUT_TEST_OTHER_KEY", "tk-other")
    async with gateway_in_process(keyed_config(fakes, budget_usd=1.0)) as gw:
        team = client_for(gw, "tk-team")
        stream = await team.chat.completions.create(model="small", messages=HI, max_tokens=10, stream=True,
                                                    extra_body={"fake": {"no_usage": True}})
        async for _ in stream:
            pass
        store = gw.app.state.gateway.store
        (key,) = [k for k in store._data if k.startswith("turnout:budget:team:")]
        deadline = asyncio.get_running_loop().time() + 10
        while (state := await store.budget(key)).spent == 0:  # the settle runs once the response is out
            assert asyncio.get_running_loop().time() < deadline, "the request was never settled"
            await asyncio.sleep(0.02)
    # Nothing says what the worker generated: the worst case held is what is spent.
    assert state.held == pytest.approx(0.0, abs=1e-15) and state.spent > 0
    from server.quota.limits import prompt_tokens_bound
    worst = (prompt_tokens_bound({"messages": HI}) * 0.1 + 10 * 0.2) / 1e6
    assert state.spent == pytest.approx(worst, rel=1e-9)


def budget_state(gw: InProcess) -> Any:
    store = gw.app.state.gateway.store
    (key,) = [k for k in store._data if k.startswith("turnout:budget:team:")]
    return store.budget(key)


async def test_a_budget_too_small_for_the_dear_model_routes_to_the_cheap_one(
        fakes: dict[str, Upstream], fake_reset: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hold is made before routing, for the dearest candidate that fits; routing keeps to the candidates
    that fit it, and once the model is chosen the rest of the hold is given back."""
    monkeypatch.setenv("TURNOUT_TEST_OTHER_KEY", "tk-other")
    from server.quota.limits import prompt_tokens_bound
    bound = prompt_tokens_bound({"messages": HI})
    small, big = (bound * 0.1 + 10 * 0.2) / 1e6, (bound * 1.0 + 10 * 3.0) / 1e6
    # Room for big's worst case once, then only for small's: `split` sends half of its requests to big.
    async with gateway_in_process(keyed_config(fakes, budget_usd=big + 20 * small)) as gw:
        team = client_for(gw, "tk-team")
        # Held while it runs: the worst case of the model chosen (big fits at first), not more.
        slow = asyncio.create_task(team.chat.completions.create(
            model="turnout/split", messages=HI, max_tokens=10, extra_body={"fake": {"latency_ms": 300}}))
        await asyncio.sleep(0.15)
        held = (await budget_state(gw)).held
        first = await slow
        assert held == pytest.approx(big if first.model == "fake-big" else small, rel=1e-9)
        models: list[str] = []
        for _ in range(60):
            try:
                got = await team.chat.completions.create(model="turnout/split", messages=HI, max_tokens=10)
            except openai.RateLimitError as err:
                assert err.code == "budget_exceeded" and "left of" in err.message
                break
            models.append(got.model)
            await asyncio.sleep(0.01)  # the settle runs once the response is out
        state = await budget_state(gw)
    assert state.spent <= big + 20 * small and state.held == pytest.approx(0.0, abs=1e-12)
    # Once big's worst case no longer fit, every request went to small, however `split` would have chosen.
    assert models.count("fake-small") >= 15, models
    last_big = max((i for i, m in enumerate(models) if m == "fake-big"), default=-1)
    assert all(m == "fake-small" for m in models[last_big + 1:]) and len(models) - last_big > 10
