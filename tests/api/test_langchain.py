"""A LangChain chat model (`langchain_openai.ChatOpenAI`) as a client of the gateway, as an application would use it:
invoked and streamed, on chat completions and on the Responses API, with routing by policy and token usage
reported back to LangChain."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from tests.conftest import InProcess, Upstream, fake_config, gateway_in_process


def chat_model(gw: InProcess, responses_api: bool, model: str = "auto") -> ChatOpenAI:
    return ChatOpenAI(model=model, base_url="http://gateway/v1", api_key=SecretStr("x"), max_retries=0,
                      http_async_client=gw.http, max_completion_tokens=3, use_responses_api=responses_api,
                      stream_usage=True)


@pytest.mark.parametrize("responses_api", [False, True])
async def test_langchain_invokes_and_streams_through_the_gateway(fakes: dict[str, Upstream], fake_reset: None,
                                                                 responses_api: bool) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        model = chat_model(gw, responses_api)
        answer = await model.ainvoke("hello there")
        chunks = [c async for c in model.astream("hello there")]
        split = await chat_model(gw, responses_api, "turnout/split").ainvoke("hi")
    assert isinstance(answer, AIMessage) and answer.text == "tok tok tok "
    assert answer.usage_metadata is not None
    assert (answer.usage_metadata["input_tokens"], answer.usage_metadata["output_tokens"]) == (3, 3)
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    streamed = sum(chunks[1:], chunks[0])
    assert streamed.text == "tok tok tok " and streamed.usage_metadata is not None
    assert streamed.usage_metadata["output_tokens"] == 3
    assert split.response_metadata.get("model_name") in ("fake-small", "fake-big")
