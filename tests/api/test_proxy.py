"""The gateway in process (ASGI) in front of fake workers on real ports, driven by the async openai SDK."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import Upstream, fake_config, gateway_in_process

pytestmark = pytest.mark.usefixtures("fake_reset")

# 3 words + 1 per message = 4 prompt tokens at the fake worker
MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "three little words"}]


async def test_chat_non_streaming_headers_body_and_usage(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        raw = await gw.client.chat.completions.with_raw_response.create(model="auto", messages=MSG, max_tokens=5)
        resp = raw.parse()
    assert raw.headers["x-turnout-model"] == "small"
    assert raw.headers["x-turnout-policy"] == "cheap"
    assert len(raw.headers["x-turnout-request-id"]) == 32
    assert float(raw.headers["x-turnout-overhead-ms"]) >= 0
    assert resp.model == "fake-small"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (4, 5)
    assert (resp.choices[0].message.content or "").split() == ["tok"] * 5


@pytest.mark.parametrize(
    ("model", "worker", "policy"),
    [("auto", "small", "cheap"), ("turnout/cheap", "small", "cheap"), ("big", "big", ""),
     ("fake-big", "big", ""), ("fake-small", "small", "")],
)
async def test_model_resolution(fakes: dict[str, Upstream], model: str, worker: str, policy: str) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        raw = await gw.client.chat.completions.with_raw_response.create(model=model, messages=MSG, max_tokens=1)
    assert (raw.headers["x-turnout-model"], raw.headers["x-turnout-policy"]) == (worker, policy)
    assert raw.parse().model == fakes[f"fake-{worker}"].model


async def test_weighted_policy_uses_both_workers(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        seen = set()
        for _ in range(30):
            raw = await gw.client.chat.completions.with_raw_response.create(
                model="turnout/split", messages=MSG, max_tokens=1)
            seen.add(raw.headers["x-turnout-model"])
    assert seen == {"small", "big"}


async def test_stream_without_usage_request_relays_no_usage_but_accounts_it(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        stream = await gw.client.chat.completions.create(model="auto", messages=MSG, max_tokens=6, stream=True)
        chunks = [c async for c in stream]
        metrics = (await gw.http.get("/metrics")).text
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.split() == ["tok"] * 6
    # The gateway asked the worker for usage anyway, and accounted for it.
    assert 'turnout_completion_tokens_total{model="fake-small"} 6.0' in metrics
    assert 'turnout_prompt_tokens_total{model="fake-small"} 4.0' in metrics


async def test_stream_with_usage_relays_the_usage_chunk(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        stream = await gw.client.chat.completions.create(
            model="big", messages=MSG, max_tokens=3, stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1
    assert (usage[0].prompt_tokens, usage[0].completion_tokens) == (4, 3)
    assert chunks[-1].choices == []


async def test_text_completions_streaming_and_not(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        resp = await gw.client.completions.create(model="auto", prompt="one two", max_tokens=2)
        stream = await gw.client.completions.create(model="auto", prompt="one two", max_tokens=2, stream=True,
                                                    stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    assert resp.usage is not None and (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (3, 2)
    assert resp.model == "fake-small"
    assert "".join(c.choices[0].text for c in chunks if c.choices).split() == ["tok", "tok"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2


async def test_unknown_fields_reach_the_worker(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        await gw.client.chat.completions.create(
            model="auto", messages=MSG, max_tokens=1,
            extra_body={"top_k": 5, "repetition_penalty": 1.1, "ignore_eos": True, "guided_choice": ["a", "b"]})
    async with httpx.AsyncClient() as hc:
        body = (await hc.get(f"{fakes['fake-small'].root}/fake/stats")).json()["last_body"]
    assert body["top_k"] == 5 and body["repetition_penalty"] == 1.1 and body["ignore_eos"] is True
    assert body["guided_choice"] == ["a", "b"]
    assert body["model"] == "fake-small"  # rewritten from "auto" to the served name


async def test_models_lists_models_and_policies(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        ids = [m.id async for m in gw.client.models.list()]
    assert ids == ["fake-small", "fake-big", "auto", "turnout/cheap", "turnout/split"]


async def test_replicas_share_load(fakes: dict[str, Upstream]) -> None:
    raw = fake_config(fakes)
    raw["workers"].append({**raw["workers"][0], "name": "small-2"})
    raw["workers"].append({**raw["workers"][0], "name": "small-3"})
    async with gateway_in_process(raw) as gw:
        seen = set()
        for _ in range(40):
            r = await gw.client.chat.completions.with_raw_response.create(model="fake-small", messages=MSG,
                                                                          max_tokens=1)
            seen.add(r.headers["x-turnout-model"])
    assert seen == {"small", "small-2", "small-3"}


async def test_health_and_readiness(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        assert (await gw.http.get("/healthz")).status_code == 200
        ready = await gw.http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["workers"]["small"]["health"] == "up"
    dead = fake_config(fakes, workers=[{"name": "gone", "model": "m", "base_url": "http://127.0.0.1:9/v1"}],
                       policies={}, default_policy=None)
    async with gateway_in_process(dead) as gw:
        ready = await gw.http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["workers"]["gone"]["health"] == "down"
        # Panic mode: a model whose only worker is down is tried all the same (its check may be stale).
        with pytest.raises(openai.InternalServerError) as exc:
            await gw.client.chat.completions.create(model="m", messages=MSG)
        assert exc.value.status_code == 502 and "unreachable" in exc.value.message
    dead["reliability"] = {"panic": False}
    async with gateway_in_process(dead) as gw:
        # Without it, 503 at once, in OpenAI's shape.
        with pytest.raises(openai.InternalServerError) as exc:
            await gw.client.chat.completions.create(model="m", messages=MSG)
        assert exc.value.status_code == 503
        assert exc.value.body["code"] == "no_healthy_worker"  # type: ignore[index]
