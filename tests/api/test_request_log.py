"""The request log: one JSON line per request with the decision, tokens, cost, latency and status; no prompt
or completion text unless `server.log_prompts` is on; and the metrics switch that the load benchmark flips."""

from __future__ import annotations

import json
import logging
from typing import Any

import openai
import pytest

from tests.conftest import Upstream, fake_config, gateway_in_process

SECRET = "my card number is 4111 1111 1111 1111"


def lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "turnout.requests"]


async def test_one_line_per_request_without_prompt_text(fakes: dict[str, Upstream], fake_reset: None,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="turnout.requests")
    async with gateway_in_process(fake_config(fakes)) as gw:
        ok = await gw.client.chat.completions.with_raw_response.create(
            model="turnout/split", messages=[{"role": "user", "content": SECRET}], max_tokens=3)
        stream = await gw.client.chat.completions.create(
            model="turnout/cheap", messages=[{"role": "user", "content": SECRET}], max_tokens=3, stream=True)
        async for _ in stream:
            pass
        with pytest.raises(openai.NotFoundError):
            await gw.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": SECRET}])
    logged = lines(caplog)
    assert len(logged) == 3
    assert SECRET not in caplog.text and "4111" not in caplog.text
    first = logged[0]
    assert first["request_id"] == ok.headers["x-turnout-request-id"] and first["policy"] == "split"
    assert first["worker"] == ok.headers["x-turnout-model"] and first["status"] == "ok"
    usage = ok.parse().usage
    assert usage is not None and first["prompt_tokens"] == usage.prompt_tokens
    assert first["completion_tokens"] == usage.completion_tokens
    assert first["cost_usd"] > 0 and first["reference_cost_usd"] >= first["cost_usd"]
    assert first["candidates"][0]["name"] == first["worker"] and "score" in first["candidates"][0]
    assert first["latency_ms"] > 0 and first["ttft_ms"] is None
    assert logged[1]["stream"] is True and logged[1]["ttft_ms"] > 0
    assert logged[2]["status"] == "client_error" and logged[2]["http_status"] == 404 and logged[2]["error"]
    assert "prompt" not in first and "completion" not in first


async def test_prompts_and_completions_only_when_turned_on(fakes: dict[str, Upstream], fake_reset: None,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="turnout.requests")
    cfg = fake_config(fakes)
    cfg["server"]["log_prompts"] = True
    async with gateway_in_process(cfg) as gw:
        plain = await gw.client.chat.completions.create(
            model="turnout/cheap", messages=[{"role": "user", "content": SECRET}], max_tokens=3)
        stream = await gw.client.chat.completions.create(
            model="turnout/cheap", messages=[{"role": "user", "content": SECRET}], max_tokens=3, stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    logged = lines(caplog)
    assert [entry["prompt"] for entry in logged] == [[{"role": "user", "content": SECRET}]] * 2
    assert logged[0]["completion"] == plain.choices[0].message.content
    assert logged[1]["completion"] == streamed and streamed


async def test_metrics_off_records_nothing_but_serves(fakes: dict[str, Upstream], fake_reset: None) -> None:
    cfg = fake_config(fakes)
    cfg["server"]["metrics"] = False
    async with gateway_in_process(cfg) as gw:
        await gw.client.chat.completions.create(model="turnout/cheap", messages=[{"role": "user", "content": "x"}])
        text = (await gw.http.get("/metrics")).text
        status = (await gw.http.get("/ui/status.json")).json()
    assert "turnout_requests_total{" not in text and "turnout_worker_up{" in text
    assert status["requests"] == 1, "the status page still counts"
