"""Every error case answers with the stated status and OpenAI's error shape."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import Upstream, fake_config, gateway_in_process

pytestmark = pytest.mark.usefixtures("fake_reset")

MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]


def assert_openai_error(body: Any, code: Any = None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code


async def test_malformed_json_is_400(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        r = await gw.http.post("/v1/chat/completions", content=b'{"model": "auto", "messages": [',
                               headers={"content-type": "application/json"})
        empty = await gw.http.post("/v1/chat/completions", content=b"", headers={"content-type": "application/json"})
        array = await gw.http.post("/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert_openai_error(r.json())
    assert r.headers["x-turnout-request-id"]
    assert empty.status_code == 400 and "empty" in empty.json()["error"]["message"]
    assert array.status_code == 400 and "JSON object" in array.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MSG}, "model"),
        ({"model": "auto"}, "messages"),
        ({"model": "auto", "messages": []}, "messages"),
        ({"model": "auto", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "auto", "messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
        ({"model": "auto", "messages": MSG, "max_tokens": -1}, "max_tokens"),
        ({"model": "auto", "messages": MSG, "max_tokens": "10"}, "max_tokens"),
        ({"model": "auto", "messages": MSG, "stream": "yes"}, "stream"),
        ({"model": "auto", "messages": MSG, "temperature": 9}, "temperature"),
        ({"model": 5, "messages": MSG}, "model"),
        ({"model": "auto", "messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
         "messages[0].content[0]"),
        ({"model": "auto", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
         "messages[0].content"),
        ({"model": "auto", "messages": MSG, "temperature": "0.5"}, "temperature"),
    ],
)
async def test_schema_violations_are_400_naming_the_field(
    fakes: dict[str, Upstream], body: dict[str, Any], param: str
) -> None:
    # Raw JSON: the SDK itself refuses some of these bodies before sending them.
    async with gateway_in_process(fake_config(fakes)) as gw:
        r = await gw.http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    assert_openai_error(r.json())
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"]


async def test_completions_schema_violation(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        r = await gw.http.post("/v1/completions", json={"model": "auto", "prompt": {"a": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize("model", ["nope", "turnout/nope", "turnout/"])
async def test_unknown_model_is_404(fakes: dict[str, Upstream], model: str) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        with pytest.raises(openai.NotFoundError) as exc:
            await gw.client.chat.completions.create(model=model, messages=MSG)
    assert exc.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert exc.value.body["param"] == "model"  # type: ignore[index]


async def test_auto_without_default_policy_is_404(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes, default_policy=None)) as gw:
        with pytest.raises(openai.NotFoundError) as exc:
            await gw.client.chat.completions.create(model="auto", messages=MSG)
    assert "default_policy" in exc.value.message


async def test_body_over_the_limit_is_413(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes, server={"max_body_bytes": 2048})) as gw:
        big = [{"role": "user", "content": "x" * 4096}]
        r = await gw.http.post("/v1/chat/completions", json={"model": "auto", "messages": big})
        ok = await gw.client.chat.completions.create(model="auto", messages=MSG, max_tokens=1)
    assert r.status_code == 413
    assert_openai_error(r.json(), "payload_too_large")
    assert ok.usage is not None


async def test_worker_4xx_passes_through(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        with pytest.raises(openai.BadRequestError) as exc:
            await gw.client.chat.completions.create(model="auto", messages=MSG, max_tokens=100_000)
        with pytest.raises(openai.BadRequestError) as exc_stream:
            await gw.client.chat.completions.create(model="auto", messages=MSG, max_tokens=100_000, stream=True)
    for e in (exc.value, exc_stream.value):
        assert e.status_code == 400
        assert "max_model_len" in e.message or "context" in e.message.lower()


async def test_worker_5xx_is_502(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        with pytest.raises(openai.APIStatusError) as exc:
            await gw.client.chat.completions.create(model="auto", messages=MSG, extra_body={"fake": {"status": 500}})
        with pytest.raises(openai.APIStatusError) as exc_stream:
            await gw.client.chat.completions.create(model="auto", messages=MSG, stream=True,
                                                    extra_body={"fake": {"status": 500}})
    for e in (exc.value, exc_stream.value):
        assert e.status_code == 502
        assert e.body["code"] == "upstream_error"  # type: ignore[index]
        assert "500" in e.message


async def test_unreachable_worker_is_502(fakes: dict[str, Upstream]) -> None:
    raw = fake_config(fakes)
    raw["workers"].append({"name": "gone", "model": "gone-model", "base_url": "http://127.0.0.1:9/v1"})
    async with gateway_in_process(raw) as gw:
        gw.app.state.gateway.live.registry.workers["gone"].health = gw.app.state.gateway.live.registry.workers[
            "small"].health  # pretend the health check has not noticed yet
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as exc:
                await gw.client.chat.completions.create(model="gone", messages=MSG, stream=stream)
            assert exc.value.status_code == 502
            assert exc.value.body["code"] == "upstream_unreachable"  # type: ignore[index]


async def test_worker_timeout_is_504(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes, upstream={"total_timeout_s": 0.3})) as gw:
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as exc:
                await gw.client.chat.completions.create(model="auto", messages=MSG, stream=stream,
                                                        extra_body={"fake": {"hang": True}})
            assert exc.value.status_code == 504
            assert exc.value.body["code"] == "upstream_timeout"  # type: ignore[index]


async def test_failure_mid_stream_ends_with_error_event_and_done(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        async with gw.http.stream("POST", "/v1/chat/completions", json={
            "model": "auto", "messages": MSG, "max_tokens": 20, "stream": True, "fake": {"drop_after": 3},
        }) as r:
            assert r.status_code == 200
            events = [e async for e in r.aiter_text()]
        metrics = (await gw.http.get("/metrics")).text
    text = "".join(events)
    data = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert '"error"' in data[-2] and "upstream_stream_error" in data[-2]
    assert sum('"content":"tok ' in d for d in data) == 3
    assert 'status="stream_error"' in metrics


async def test_sdk_raises_on_mid_stream_failure(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        stream = await gw.client.chat.completions.create(model="auto", messages=MSG, max_tokens=20, stream=True,
                                                         extra_body={"fake": {"drop_after": 2}})
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass


async def test_unknown_route_and_method_are_openai_shaped(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        r404 = await gw.http.get("/v1/nothing")
        r405 = await gw.http.get("/v1/chat/completions")
    assert r404.status_code == 404 and r405.status_code == 405
    assert_openai_error(r404.json())
    assert_openai_error(r405.json())


async def test_a_path_not_served_is_named_in_its_own_api_shape(fakes: dict[str, Upstream]) -> None:
    """Through each official SDK: the path, and what the gateway serves, in the error its SDK reads."""
    async with gateway_in_process(fake_config(fakes)) as gw:
        with pytest.raises(openai.NotFoundError) as oa:
            await gw.client.images.generate(model="fake-small", prompt="a cat")
        sdk = anthropic.AsyncAnthropic(base_url="http://gateway", api_key="test", http_client=gw.http,
                                       max_retries=0)
        with pytest.raises(anthropic.NotFoundError) as an:
            await sdk.messages.batches.list()
        raw = await gw.http.post("/v1/complete", json={})
    body = oa.value.body
    assert isinstance(body, dict) and body["code"] == "unsupported_path"
    assert "POST /v1/images/generations" in body["message"] and "POST /v1/chat/completions" in body["message"]
    assert "POST /v1/responses" in body["message"] and "GET /v1/responses/{response_id}" in body["message"]
    assert "/docs" not in body["message"].replace("/openapi.json", "")
    assert an.value.status_code == 404 and "GET /v1/messages/batches" in an.value.message
    assert "POST /v1/messages" in an.value.message
    assert raw.json()["type"] == "error" and raw.json()["error"]["type"] == "not_found_error"
    assert set(raw.json()) == {"type", "error"} and "/v1/complete" in raw.json()["error"]["message"]



async def test_every_response_has_a_request_id(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        ids = set()
        for method, path in [("GET", "/v1/models"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"),
                             ("GET", "/nowhere"), ("POST", "/v1/completions")]:
            r = await gw.http.request(method, path)
            ids.add(r.headers["x-turnout-request-id"])
            assert len(r.headers.get_list("x-turnout-request-id")) == 1
        raw = await gw.client.chat.completions.with_raw_response.create(model="auto", messages=MSG, max_tokens=1)
        assert len(raw.headers.get_list("x-turnout-request-id")) == 1
        ids.add(raw.headers["x-turnout-request-id"])
    assert len(ids) == 7


async def test_nesting_too_deep_to_forward_is_400(fakes: dict[str, Upstream]) -> None:
    deep = "[" * 300 + "]" * 300
    body = '{"model": "auto", "messages": [{"role": "user", "content": "x"}], "x": ' + deep + "}"
    async with gateway_in_process(fake_config(fakes)) as gw:
        r = await gw.http.post("/v1/chat/completions", content=body.encode(),
                               headers={"content-type": "application/json"})
        small = gw.app.state.gateway.live.registry.workers["small"]
        # No place at the worker is held for a body that was never sent (a leak would wedge it in time).
        assert (small.in_flight, small.gate.active) == (0, 0)
    assert r.status_code == 400 and "cannot be forwarded" in r.json()["error"]["message"]


@pytest.mark.usefixtures("fake_reset")
async def test_a_failed_exchange_is_counted_once_when_the_request_fails(fakes: dict[str, Upstream]) -> None:
    cfg = fake_config(fakes, reliability={"retries": 0})
    async with gateway_in_process(cfg) as gw:
        with pytest.raises(openai.InternalServerError):
            await gw.client.chat.completions.create(model="small", messages=MSG, extra_body={"fake": {"status": 500}})
        text = (await gw.http.get("/metrics")).text
    errors = [line for line in text.splitlines() if line.startswith("turnout_upstream_errors_total{")]
    assert errors == ['turnout_upstream_errors_total{reason="upstream_error",worker="small"} 1.0']


async def test_worker_redirect_and_auth_failure_are_502(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        for status, code in ((302, "upstream_error"), (401, "upstream_auth_failed")):
            with pytest.raises(openai.APIStatusError) as exc:
                await gw.client.chat.completions.create(model="auto", messages=MSG,
                                                        extra_body={"fake": {"status": status}})
            assert exc.value.status_code == 502
            assert exc.value.body["code"] == code  # type: ignore[index]


async def test_in_flight_returns_to_zero_after_every_kind_of_request(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes, upstream={"total_timeout_s": 0.3})) as gw:
        for fake in ({}, {"status": 500}, {"hang": True}, {"drop_after": 1}):
            for stream in (False, True):
                try:
                    resp = await gw.client.chat.completions.create(model="auto", messages=MSG, stream=stream,
                                                                   max_tokens=3, extra_body={"fake": fake})
                    if stream:
                        async for _ in resp:  # type: ignore[union-attr]
                            pass
                except openai.APIError:
                    pass
        state = gw.app.state.gateway
        assert {w.name: w.in_flight for w in state.live.registry.workers.values()} == {"small": 0, "big": 0}
        metrics = (await gw.http.get("/metrics")).text
    assert "turnout_in_flight_requests 0.0" in metrics
