"""The gateway (a real server process) in front of a real vLLM CPU server, driven by the openai SDK.

The model is a small base model, so replies are not meaningful: these tests assert structure, usage
and token counts, never text.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from testkit.promtext import sample_sum
from tests.conftest import Upstream, serve_gateway

pytestmark = pytest.mark.vllm
MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def gateway(vllm: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = {
        "workers": [
            {"name": "small", "model": vllm.model, "base_url": vllm.base_url,
             "price": {"input_per_1m": 0.10, "output_per_1m": 0.20}},
            # Registered under a name vLLM does not serve: vLLM's own 404 must come back unchanged.
            {"name": "misnamed", "model": "not-served-here", "base_url": vllm.base_url},
        ],
        "policies": {"cheap": {"type": "fixed", "worker": "small"}},
        "default_policy": "cheap",
    }
    proc, url = serve_gateway(config, Path(tmp_path_factory.mktemp("gw-vllm")))
    with proc:
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="test", max_retries=0, timeout=120)


def test_stream_chat_with_usage_through_the_gateway(gateway: str, vllm: Upstream) -> None:
    with client(gateway) as c:
        stream = c.chat.completions.create(
            model="auto", messages=MSG, max_tokens=8, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = list(stream)
    content_chunks = [ch for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(content_chunks) >= 1
    assert all(ch.model == vllm.model for ch in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens > 0


def test_chat_and_completions_streaming_and_not(gateway: str) -> None:
    with client(gateway) as c:
        raw = c.chat.completions.with_raw_response.create(model="small", messages=MSG, max_tokens=5,
                                                          extra_body={"ignore_eos": True})
        chat = raw.parse()
        comp = c.completions.create(model="turnout/cheap", prompt="The sky is", max_tokens=4,
                                    extra_body={"ignore_eos": True})
        comp_stream = list(c.completions.create(model="auto", prompt="Once upon a time", max_tokens=6,
                                                stream=True, extra_body={"ignore_eos": True}))
        chat_stream = list(c.chat.completions.create(model="auto", messages=MSG, max_tokens=4, stream=True,
                                                     extra_body={"ignore_eos": True}))
    assert raw.headers["x-turnout-model"] == "small" and raw.headers["x-turnout-policy"] == ""
    assert chat.usage is not None and chat.usage.completion_tokens == 5
    assert comp.usage is not None and comp.usage.completion_tokens == 4
    # Without include_usage the usage chunk is not relayed, and every chunk carries a choice.
    assert all(ch.usage is None and ch.choices for ch in comp_stream)
    assert all(ch.usage is None and ch.choices for ch in chat_stream)
    assert chat_stream[-1].choices[0].finish_reason == "length"


def test_gateway_token_counts_equal_vllm(gateway: str, vllm: Upstream) -> None:
    def counts() -> tuple[float, float, float, float]:
        return (
            sample_sum(f"{gateway}/metrics", "turnout_prompt_tokens_total", model=vllm.model),
            sample_sum(f"{gateway}/metrics", "turnout_completion_tokens_total", model=vllm.model),
            sample_sum(f"{vllm.root}/metrics", "vllm:prompt_tokens_total"),
            sample_sum(f"{vllm.root}/metrics", "vllm:generation_tokens_total"),
        )

    before = counts()
    with client(gateway) as c:
        c.chat.completions.create(model="auto", messages=MSG, max_tokens=7)
        list(c.chat.completions.create(model="auto", messages=MSG, max_tokens=9, stream=True))
        list(c.chat.completions.create(model="auto", messages=MSG, max_tokens=3, stream=True,
                                       stream_options={"include_usage": True}))
        c.completions.create(model="small", prompt="Water boils at", max_tokens=5)
        list(c.completions.create(model="small", prompt="Water boils at", max_tokens=6, stream=True))
    # vLLM updates its counters when a request finishes; allow it a moment.
    deadline = time.monotonic() + 10
    after = counts()
    while after[2:] == before[2:] and time.monotonic() < deadline:
        time.sleep(0.2)
        after = counts()
    delta = [a - b for a, b in zip(after, before, strict=True)]
    assert delta[0] > 0 and delta[1] > 0
    assert delta[0] == delta[2], f"prompt tokens: gateway {delta[0]}, vLLM {delta[2]}"
    assert delta[1] == delta[3], f"completion tokens: gateway {delta[1]}, vLLM {delta[3]}"


def test_vllm_404_passes_through(gateway: str) -> None:
    with client(gateway) as c, pytest.raises(openai.NotFoundError) as exc:
        c.chat.completions.create(model="misnamed", messages=MSG, max_tokens=2)
    assert exc.value.status_code == 404
    assert "not-served-here" in exc.value.message and "does not exist" in exc.value.message


def test_vllm_400_passes_through(gateway: str) -> None:
    with client(gateway) as c, pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model="auto", messages=MSG, max_tokens=100_000)
    assert "max_tokens" in exc.value.message


def test_client_disconnect_cancels_the_vllm_request(gateway: str, vllm: Upstream) -> None:
    gen_before = sample_sum(f"{vllm.root}/metrics", "vllm:generation_tokens_total")
    with client(gateway) as c:
        stream = c.chat.completions.create(model="auto", messages=MSG, max_tokens=1500, stream=True,
                                           extra_body={"ignore_eos": True})
        for i, _ in enumerate(stream):
            if i == 3:
                break
        assert sample_sum(f"{vllm.root}/metrics", "vllm:num_requests_running") == 1
        stream.close()
    # The worker sees the request end early: nothing running, far fewer than 1500 tokens generated.
    deadline = time.monotonic() + 15
    while sample_sum(f"{vllm.root}/metrics", "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "vLLM kept generating after the client disconnected"
        time.sleep(0.2)
    generated = sample_sum(f"{vllm.root}/metrics", "vllm:generation_tokens_total") - gen_before
    assert generated < 1500
    assert sample_sum(f"{gateway}/metrics", "turnout_requests_total", status="client_disconnect") >= 1
