"""The benchmarks' light fake worker (`loadtest.fast_upstream`), read by the official `openai` SDK: whole answers
and streams of exactly `max_tokens` tokens with their usage, keep-alive, and clear refusals."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from loadtest.fast_upstream import Answers, serve
from testkit.procs import free_port


@pytest.fixture
async def url() -> AsyncIterator[str]:
    port = free_port()
    task = asyncio.create_task(serve("127.0.0.1", port, Answers(0.001, 0.001, 0.001)))
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient() as http:
        for _ in range(100):
            try:
                await http.get(base + "/health")
                break
            except httpx.ConnectError:
                await asyncio.sleep(0.02)
    yield base
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_whole_answers_and_streams_through_the_sdk(url: str) -> None:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
        for _ in range(3):  # one kept-alive connection answers one request after another
            answer = await client.chat.completions.create(
                model="any", messages=[{"role": "user", "content": "hello"}], max_tokens=5)
            assert answer.model == "any" and answer.usage is not None and answer.usage.completion_tokens == 5
            assert answer.choices[0].message.content == "tok " * 5
        stream = await client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True,
            stream_options={"include_usage": True})
        texts, usage, finish = [], None, None
        async for chunk in stream:
            if chunk.choices:
                texts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            else:
                usage = chunk.usage
        assert "".join(texts) == "tok " * 4 and finish == "length"
        assert usage is not None and usage.completion_tokens == 4 and usage.prompt_tokens > 0


async def test_refusals(url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/v1/models")).json()["data"][0]["id"] == "fake-model"
        assert (await http.get("/nope")).status_code == 404
        bad = await http.post("/v1/chat/completions", content=b"{not json")
        assert bad.status_code == 400 and "bad request body" in bad.text
