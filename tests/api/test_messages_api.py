"""`POST /v1/messages` and `/v1/messages/count_tokens` through the gateway with fake workers, through the official
`anthropic` SDK: Anthropic's shapes, streams and errors, keys sent as `x-api-key`, routing on the last user turn,
accounting from the answer's usage (input and output tokens), counting tokens free; a worker breaking off a stream
ends it with Anthropic's `error` event, which the SDK raises, counted as `stream_error`."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import pytest

from server.quota.keys import hash_key
from tests.api.test_fallback import sample
from tests.conftest import InProcess, Upstream, fake_config, gateway_in_process

HI: list[Any] = [{"role": "user", "content": "hello there"}]
BIG_PRICE = (1.0, 3.0)  # fake_config's prices for `big`, USD per 1M tokens


def sdk(gw: InProcess, key: str = "unused") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url="http://gateway", api_key=key, http_client=gw.http, max_retries=0)


def cost(prompt: int, completion: int) -> float:
    return (prompt * BIG_PRICE[0] + completion * BIG_PRICE[1]) / 1e6


async def test_messages_whole_and_streamed_are_priced_from_their_usage(fakes: dict[str, Upstream],
                                                                       fake_reset: None) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        client = sdk(gw)
        raw = await client.messages.with_raw_response.create(
            model="turnout/split", max_tokens=3, system="be brief",
            messages=[{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"}, *HI],
            metadata={"user_id": "s1"})
        got = await raw.parse()
        assert got.type == "message" and got.content[0].type == "text" and got.content[0].text == "tok tok tok "
        assert (got.usage.input_tokens, got.usage.output_tokens) == (2 + 2 + 3 + 2, 3)
        assert raw.headers["x-turnout-policy"] == "split"
        async with client.messages.stream(model="big", max_tokens=4, messages=HI) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert text == "tok " * 4 and final.usage.output_tokens == 4 and final.usage.input_tokens == 3
        counted = await client.messages.count_tokens(model="big", messages=HI, system="be brief")
        assert counted.input_tokens == 3 + 2
        metrics = (await gw.http.get("/metrics")).text
    model = "fake-big" if raw.headers["x-turnout-model"] == "big" else "fake-small"
    big_tokens = (3 + 4) + (9 + 3 if model == "fake-big" else 0) + 0  # count_tokens costs nothing
    assert sample(metrics, "turnout_prompt_tokens_total", {"model": "fake-big"}) + sample(
        metrics, "turnout_completion_tokens_total", {"model": "fake-big"}) == big_tokens
    spent = sum(sample(metrics, "turnout_cost_usd_total", {"model": "fake-big", "policy": p}) for p in ("", "split"))
    assert spent == pytest.approx(cost(3, 4) + (cost(9, 3) if model == "fake-big" else 0), rel=1e-9)


async def test_keys_as_x_api_key_and_errors_in_anthropics_shape(fakes: dict[str, Upstream], fake_reset: None) -> None:
    cfg = fake_config(fakes)
    cfg["auth"] = {"enabled": True, "keys": [{"name": "team", "key_sha256": hash_key("tk-team"),
                                              "models": ["small"]}]}
    async with gateway_in_process(cfg) as gw:
        with pytest.raises(anthropic.AuthenticationError) as bad:
            await sdk(gw, "tk-wrong").messages.create(model="small", max_tokens=2, messages=HI)
        body = bad.value.body
        assert isinstance(body, dict) and set(body) == {"type", "error"} and body["type"] == "error"
        assert body["error"]["type"] == "authentication_error" and "tk-wrong" not in str(body)
        team = sdk(gw, "tk-team")
        assert (await team.messages.create(model="small", max_tokens=2, messages=HI)).content
        with pytest.raises(anthropic.PermissionDeniedError):
            await team.messages.create(model="big", max_tokens=2, messages=HI)
        for body, field in (({"model": "small", "messages": HI}, "max_tokens"),
                            ({"model": "small", "max_tokens": 2, "messages": []}, "messages"),
                            ({"model": "small", "max_tokens": 2, "messages": [{"role": "system", "content": "x"}]},
                             "messages")):
            r = await gw.http.post("/v1/messages", json=body, headers={"x-api-key": "tk-team"})
            assert r.status_code == 400 and r.json()["type"] == "error", r.text
            assert r.json()["error"]["type"] == "invalid_request_error" and field in r.json()["error"]["message"]
        with pytest.raises(anthropic.NotFoundError) as missing:
            await sdk(gw, "tk-team").messages.create(model="nowhere", max_tokens=2, messages=HI)
        assert isinstance(missing.value.body, dict) and set(missing.value.body) == {"type", "error"}


async def test_a_stream_broken_off_raises_anthropics_error_event(fakes: dict[str, Upstream],
                                                                fake_reset: None) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        got: list[str] = []
        with pytest.raises(anthropic.APIStatusError) as broken:
            async with sdk(gw).messages.stream(model="small", max_tokens=8, messages=HI,
                                               extra_body={"fake": {"drop_after": 2, "itl_ms": 5}}) as stream:
                async for text in stream.text_stream:
                    got.append(text)
        await asyncio.sleep(0.05)
        metrics = (await gw.http.get("/metrics")).text
    assert got == ["tok ", "tok "]
    assert broken.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert "small" in broken.value.message
    assert sample(metrics, "turnout_requests_total", {"policy": "", "model": "fake-small", "worker": "small",
                                                      "status": "stream_error"}) == 1
