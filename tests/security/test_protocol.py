"""Protocol edges where the gateway answered differently from the vLLM server behind it (hardening from an
outside review, items 14, 15, 16 and 19)."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from server.quota.keys import hash_key
from tests.conftest import Upstream, fake_config, gateway_in_process

HI: list[Any] = [{"role": "user", "content": "hi"}]


async def test_a_workers_error_is_relayed_in_openais_schema(fakes: dict[str, Upstream]) -> None:
    """vLLM's `type` is an exception name and its `code` an integer: the client gets OpenAI's fields, the worker's
    message kept."""
    cfg = fake_config(fakes)
    cfg["workers"].append({"name": "misnamed", "model": "not-served-here", "base_url": fakes["fake-small"].base_url})
    async with gateway_in_process(cfg) as gw:
        r = await gw.http.post("/v1/chat/completions", json={"model": "misnamed", "messages": HI})
        with pytest.raises(openai.BadRequestError) as too_long:
            await gw.client.chat.completions.create(model="small", messages=HI, max_tokens=100_000)
    error = r.json()["error"]
    assert r.status_code == 404 and "does not exist" in error["message"]
    assert error["type"] == "invalid_request_error" and error["code"] == "not_found"
    assert too_long.value.code == "invalid_request" and "maximum context length" in too_long.value.message
    assert isinstance(too_long.value.body, dict) and too_long.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
async def test_a_body_not_declared_as_json_is_refused(fakes: dict[str, Upstream], content_type: str | None) -> None:
    body = b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}]}'
    headers = {"content-type": content_type} if content_type else {}
    async with gateway_in_process(fake_config(fakes)) as gw:
        answers = [await gw.http.post(path, content=body, headers=headers)
                   for path in ("/v1/chat/completions", "/v1/route", "/v1/feedback")]
        declared = await gw.http.post("/v1/chat/completions", content=body,
                                      headers={"content-type": "application/json; charset=utf-8"})
    for r in answers:
        assert r.status_code == 400 and "application/json" in r.json()["error"]["message"], r.text
    assert declared.status_code == 200


async def test_request_ids_and_rate_limit_headers(fakes: dict[str, Upstream]) -> None:
    cfg = fake_config(fakes)
    cfg["auth"] = {"enabled": True, "keys": [{"name": "slow", "key_sha256": hash_key("tk-slow"),
                                              "requests_per_minute": 1}]}
    async with gateway_in_process(cfg) as gw:
        slow = gw.client.with_options(api_key="tk-slow", max_retries=0)
        raw = await slow.chat.completions.with_raw_response.create(model="auto", messages=HI, max_tokens=1)
        with pytest.raises(openai.RateLimitError) as limited:
            await slow.chat.completions.create(model="auto", messages=HI, max_tokens=1)
        others = [await gw.http.get("/v1/models"), await gw.http.get("/nowhere"), await gw.http.get("/v1/route")]
    assert raw.request_id == raw.headers["x-turnout-request-id"], "the SDK's request id is the gateway's"
    headers = limited.value.response.headers
    assert headers["x-ratelimit-limit-requests"] == "1" and headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s") and int(headers["retry-after"]) >= 1
    assert limited.value.request_id == headers["x-turnout-request-id"]
    for r in others:
        assert r.headers["x-request-id"] == r.headers["x-turnout-request-id"], r.status_code


async def test_a_bad_content_part_is_named_for_what_is_wrong_with_it(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        r = await gw.http.post("/v1/chat/completions", json={
            "model": "auto", "messages": [{"role": "user", "content": [{"type": "text"}]}]})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "messages[0].content[0]"
    assert "needs a string 'text'" in error["message"] and "valid string" not in error["message"]


@pytest.mark.parametrize("usage", [False, True])
async def test_a_stream_keeps_its_fingerprint_whether_or_not_usage_was_asked(fakes: dict[str, Upstream],
                                                                             usage: bool) -> None:
    """vLLM puts `system_fingerprint` on the usage chunk when usage is asked for, else on the final chunk. The
    gateway always asks for usage: a client that did not still gets the fingerprint on its final chunk."""
    async with gateway_in_process(fake_config(fakes)) as gw:
        stream = await gw.client.chat.completions.create(
            model="small", messages=HI, max_tokens=3, stream=True,
            stream_options={"include_usage": True} if usage else openai.omit)
        chunks = [c async for c in stream]
    with_fp = [c for c in chunks if c.system_fingerprint == "fp_fake"]
    assert len(with_fp) == 1, [c.model_dump() for c in chunks]
    if usage:
        assert with_fp[0] is chunks[-1] and with_fp[0].usage is not None and with_fp[0].choices == []
    else:
        assert all(c.usage is None and c.choices for c in chunks)
        assert with_fp[0] is chunks[-1] and with_fp[0].choices[0].finish_reason == "length"


async def test_invalid_utf8_is_named_where_it_is(fakes: dict[str, Upstream]) -> None:
    body = b'{"model": "auto", "messages": [{"role": "user", "content": "caf\xe9"}]}'
    async with gateway_in_process(fake_config(fakes)) as gw:
        r = await gw.http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "not valid UTF-8" in message
    offset = body.index(b"\xe9")
    assert f"0xe9 at offset {offset}" in message and "surrogates" not in message
