"""Hostile and odd input: limits on messages, their length, tokens and answers; invalid UTF-8; huge numbers;
unknown fields passed through. Every refusal is a 400 in OpenAI's shape naming the field; nothing reaches
the worker, and the gateway keeps serving."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.api.test_errors import assert_openai_error
from tests.conftest import Upstream, fake_config, gateway_in_process

pytestmark = pytest.mark.usefixtures("fake_reset")
MSG: list[Any] = [{"role": "user", "content": "hello"}]
LIMITS = {"max_messages": 4, "max_message_chars": 100, "max_output_tokens": 1000, "max_n": 3}


async def fake_stats(up: Upstream) -> Any:
    async with httpx.AsyncClient(timeout=5) as http:
        return (await http.get(f"{up.root}/fake/stats")).json()


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"messages": MSG * 5}, "messages", "at most 4"),
        ({"messages": [{"role": "user", "content": "x" * 101}]}, "messages[0].content", "at most 100"),
        ({"messages": [*MSG, {"role": "user", "content": [{"type": "text", "text": "y" * 60}] * 2}]},
         "messages[1].content", "at most 100"),
        ({"messages": MSG, "max_tokens": 1001}, "max_tokens", "at most 1000"),
        ({"messages": MSG, "max_completion_tokens": 10**9}, "max_completion_tokens", "at most 1000"),
        ({"messages": MSG, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"messages": MSG, "n": 4}, "n", "at most 3"),
        ({"messages": MSG, "n": 0}, "n", "greater than or equal to 1"),
        ({"messages": MSG, "max_tokens": 10**30}, "max_tokens", "integer"),  # past 64 bits it parses as a float
        ({"messages": MSG, "max_tokens": 1.5}, "max_tokens", "integer"),
        ({"messages": {"role": "user"}}, "messages", "list"),
        ({"messages": MSG, "turnout": {"policy": "cheap", "nonsense": 1}}, "turnout.nonsense", "Extra"),
    ],
)
async def test_limits_and_types_are_400_naming_the_field(fakes: dict[str, Upstream], body: dict[str, Any],
                                                         param: str, says: str) -> None:
    async with gateway_in_process(fake_config(fakes, server=LIMITS)) as gw:
        r = await gw.http.post("/v1/chat/completions", json={"model": "auto", **body})
        assert r.status_code == 400, r.text
        assert_openai_error(r.json())
        assert r.json()["error"]["param"] == param and says in r.json()["error"]["message"]
        # The same limits hold for the explain endpoint, and the gateway goes on serving.
        route = await gw.http.post("/v1/route", json={"model": "auto", **body})
        assert route.status_code == 400 and route.json()["error"]["param"] == param
        assert (await gw.client.chat.completions.create(model="auto", messages=MSG)).choices
    stats = await fake_stats(fakes["fake-small"])
    assert stats["requests"] == 1, "no refused request reached the worker"


async def test_invalid_utf8_and_odd_bodies(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        bad = b'{"model": "auto", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
        r = await gw.http.post("/v1/chat/completions", content=bad, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        assert_openai_error(r.json())
        for raw in (b"null", b"7", b'"text"', b"{}" * 3, b"\x00"):
            r = await gw.http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400, raw
            assert_openai_error(r.json())


async def test_n_answers_and_unknown_fields_pass_through(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes, server=LIMITS)) as gw:
        got = await gw.client.chat.completions.create(
            model="auto", messages=MSG, n=3, max_tokens=2,
            extra_body={"top_k": 5, "repetition_penalty": 1.1, "some_future_field": {"a": [1, 2]}})
        assert got.choices
    last = (await fake_stats(fakes["fake-small"]))["last_body"]
    assert last["n"] == 3 and last["top_k"] == 5 and last["some_future_field"] == {"a": [1, 2]}


async def test_the_sdk_sees_a_bad_request_error(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes, server=LIMITS)) as gw:
        with pytest.raises(openai.BadRequestError) as err:
            await gw.client.chat.completions.create(model="auto", messages=MSG, n=9)
    assert err.value.code == "invalid_request" and err.value.param == "n"
