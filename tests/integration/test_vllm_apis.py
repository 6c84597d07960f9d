"""Every generating API the gateway relays, against real vLLM CPU servers (Gemma 3 270M), through the official
SDKs: OpenAI's Responses API (streamed and not, follow-ups by `previous_response_id` while two vLLM servers serve
the model), Anthropic's Messages API (streamed and not, and its token count), tool calls through `auto` routing
(streamed and not), and structured output. For each, the gateway's token counts equal the worker's own counters
and its cost equals those tokens at the configured prices.

The model is a small base model: it never calls a tool of its own accord (`tool_choice: auto` gives text), so the
tool calls are asked for (`required`, or the function named) with tools marked `strict`, which vLLM holds to their
schema; greedy decoding of a JSON schema loops on whitespace, so structured output uses a seeded sample.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from testkit.engines import ALL_APIS_ARGS, ALL_APIS_ENV, vllm_process
from testkit.procs import free_port
from testkit.promtext import sample_sum
from tests.conftest import Upstream, serve_gateway

pytestmark = pytest.mark.vllm
PRICE = {"input_per_1m": 0.10, "output_per_1m": 0.20}
HI: list[Any] = [{"role": "user", "content": "Name three colours."}]
CITIES = ["Paris", "Rome", "Oslo"]
WEATHER_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": CITIES}},
                   "required": ["city"], "additionalProperties": False}}}
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object", "properties": {"city": {"type": "string", "enum": CITIES}, "sunny": {"type": "boolean"}},
    "required": ["city", "sunny"], "additionalProperties": False}


@pytest.fixture(scope="module")
def twin(vllm: Upstream, receiver: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """A second vLLM server of the same model beside the session's, exporting its traces."""
    port = free_port()
    proc = vllm_process(port, tmp_path_factory.mktemp("vllm-twin") / "vllm.log",
                        args=(*ALL_APIS_ARGS, "--otlp-traces-endpoint", f"{receiver}/v1/traces"),
                        env={**ALL_APIS_ENV, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
                             "OTEL_SERVICE_NAME": "vllm", "OTEL_BSP_SCHEDULE_DELAY": "100"})
    with proc:
        yield Upstream(vllm.model, f"http://127.0.0.1:{port}/v1", proc)


@pytest.fixture(scope="module")
def gateway(vllm: Upstream, twin: Upstream, receiver: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = {
        "workers": [{"name": "vllm-a", "model": vllm.model, "base_url": vllm.base_url, "price": PRICE},
                    {"name": "vllm-b", "model": vllm.model, "base_url": twin.base_url, "price": PRICE}],
        "policies": {"gemma": {"type": "fixed", "worker": vllm.model}},
        "default_policy": "gemma",
    }
    proc, url = serve_gateway(config, Path(tmp_path_factory.mktemp("gw-apis")))
    proc.env = {**(proc.env or {}), "OTEL_EXPORTER_OTLP_ENDPOINT": receiver, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with proc:
        yield url


def worker_counts(gateway: str, workers: list[Upstream]) -> tuple[float, float, float, float, float]:
    """(gateway prompt tokens, gateway completion tokens, gateway cost, vLLM prompt tokens, vLLM generated
    tokens), the vLLM counters summed over both servers."""
    model = workers[0].model
    return (sample_sum(f"{gateway}/metrics", "turnout_prompt_tokens_total", model=model),
            sample_sum(f"{gateway}/metrics", "turnout_completion_tokens_total", model=model),
            sample_sum(f"{gateway}/metrics", "turnout_cost_usd_total", model=model),
            sum(sample_sum(f"{w.root}/metrics", "vllm:prompt_tokens_total") for w in workers),
            sum(sample_sum(f"{w.root}/metrics", "vllm:generation_tokens_total") for w in workers))


def assert_counted_as_vllm(gateway: str, workers: list[Upstream], run: Callable[[], None]) -> None:
    """`run` makes requests; the gateway's counts of them equal vLLM's, and its cost equals them priced."""
    before = worker_counts(gateway, workers)
    run()
    deadline = time.monotonic() + 10  # vLLM updates its counters when a request finishes
    after = worker_counts(gateway, workers)
    while after[3:] == before[3:] and time.monotonic() < deadline:
        time.sleep(0.2)
        after = worker_counts(gateway, workers)
    prompt, completion, cost, vllm_prompt, vllm_generated = (a - b for a, b in zip(after, before, strict=True))
    assert prompt > 0 and completion > 0
    assert (prompt, completion) == (vllm_prompt, vllm_generated), f"gateway {after}, before {before}"
    assert cost == pytest.approx((prompt * PRICE["input_per_1m"] + completion * PRICE["output_per_1m"]) / 1e6,
                                 rel=1e-9)


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="test", max_retries=0, timeout=120)


def anthropic_client(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="test", max_retries=0, timeout=120)


def test_responses_streamed_and_not_and_follow_ups_on_the_same_server(gateway: str, vllm: Upstream,
                                                                       twin: Upstream) -> None:
    made: dict[str, str] = {}
    follow_ups: list[str] = []

    def run() -> None:
        with openai_client(gateway) as c:
            for i in range(6):
                raw = c.responses.with_raw_response.create(model="auto", input=f"Say hello, number {i}.",
                                                           max_output_tokens=4)
                made[raw.parse().id] = raw.headers["x-turnout-model"]
            for i, (rid, _) in enumerate(made.items()):
                if i % 2:
                    raw = c.responses.with_raw_response.create(model="auto", input="And again.",
                                                               previous_response_id=rid, max_output_tokens=3)
                    follow_ups.append(raw.headers["x-turnout-model"])
                    assert raw.parse().usage is not None
                else:
                    with c.responses.with_streaming_response.create(
                            model="auto", input="And again.", previous_response_id=rid, max_output_tokens=3,
                            stream=True) as streamed:
                        follow_ups.append(streamed.headers["x-turnout-model"])
                        events = [line for line in streamed.iter_lines() if line.startswith("event:")]
                    assert events[0] == "event: response.created" and events[-1] == "event: response.completed"
            assert c.responses.retrieve(next(iter(made))).id == next(iter(made))

    assert_counted_as_vllm(gateway, [vllm, twin], run)
    assert set(made.values()) == {"vllm-a", "vllm-b"}, "both servers made some first turns"
    assert follow_ups == list(made.values()), "each follow-up reached the server holding its conversation"


def test_messages_streamed_and_not_through_the_anthropic_sdk(gateway: str, vllm: Upstream, twin: Upstream) -> None:
    got: dict[str, Any] = {}

    def run() -> None:
        with anthropic_client(gateway) as c:
            whole = c.messages.create(model="auto", max_tokens=5, system="Be brief.", messages=HI)
            with c.messages.stream(model="auto", max_tokens=6, messages=HI) as stream:
                got["text"] = "".join(stream.text_stream)
                got["streamed"] = stream.get_final_message()
            got["whole"] = whole
            got["count"] = c.messages.count_tokens(model="auto", messages=HI, system="Be brief.")

    assert_counted_as_vllm(gateway, [vllm, twin], run)
    whole, streamed = got["whole"], got["streamed"]
    assert whole.type == "message" and whole.usage.output_tokens <= 5 and whole.usage.input_tokens > 0
    assert streamed.usage.output_tokens <= 6 and streamed.content[0].text == got["text"]
    assert got["count"].input_tokens == whole.usage.input_tokens, "count_tokens counts as the worker does"


def test_tool_calls_through_auto_routing_streamed_and_not(gateway: str, vllm: Upstream, twin: Upstream) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def run() -> None:
        with openai_client(gateway) as c:
            chat: Any = c.chat.completions  # the tools and choices are plain dicts here
            for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
                whole = chat.create(
                    model="auto", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                    tools=[WEATHER_TOOL], tool_choice=choice, max_tokens=40, temperature=0.7, seed=1)
                message = whole.choices[0].message
                assert message.tool_calls, message
                for call in message.tool_calls:
                    assert call.type == "function"
                    calls.append((call.function.name, json.loads(call.function.arguments)))
                chunks = list(chat.create(
                    model="auto", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                    tools=[WEATHER_TOOL], tool_choice=choice, max_tokens=40, temperature=0.7, seed=1,
                    stream=True, stream_options={"include_usage": True}))
                deltas = [t for ch in chunks if ch.choices for t in ch.choices[0].delta.tool_calls or []]
                assert deltas and deltas[0].id and deltas[0].function and deltas[0].function.name == "get_weather"
                arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
                calls.append(("get_weather", json.loads(arguments)))
                assert chunks[-1].usage is not None

    assert_counted_as_vllm(gateway, [vllm, twin], run)
    assert len(calls) == 4
    for name, arguments in calls:
        assert name == "get_weather" and set(arguments) == {"city"} and arguments["city"] in CITIES


def test_structured_output_validates_against_its_schema(gateway: str, vllm: Upstream, twin: Upstream) -> None:
    answers: list[str] = []

    def run() -> None:
        with openai_client(gateway) as c:
            chat: Any = c.chat.completions
            for stream in (False, True):
                kwargs: dict[str, Any] = dict(
                    model="auto", messages=[{"role": "user", "content": "The weather in Paris, as JSON."}],
                    response_format={"type": "json_schema", "json_schema": {"name": "weather", "strict": True,
                                                                            "schema": WEATHER_SCHEMA}},
                    max_tokens=60, temperature=0.8, seed=2)
                if stream:
                    chunks = list(chat.create(**kwargs, stream=True))
                    answers.append("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices))
                else:
                    answers.append(chat.create(**kwargs).choices[0].message.content or "")

    assert_counted_as_vllm(gateway, [vllm, twin], run)
    for text in answers:
        answer = json.loads(text)
        assert set(answer) == {"city", "sunny"}, text
        assert answer["city"] in CITIES and isinstance(answer["sunny"], bool), text


def test_the_workers_own_span_is_a_child_of_the_gateways_call(gateway: str, receiver: str) -> None:
    """The second server exports its traces: its request's span sits under the gateway's call to it."""
    with openai_client(gateway) as c:
        raw = c.chat.completions.with_raw_response.create(model="vllm-b", messages=HI, max_tokens=3)
    request_id = raw.headers["x-turnout-request-id"]
    deadline = time.monotonic() + 30
    while True:
        spans: list[dict[str, Any]] = httpx.get(f"{receiver}/spans", timeout=5).json()
        root = next((s for s in spans if s["attributes"].get("turnout.request_id") == request_id), None)
        calls = [s for s in spans if root is not None and s["parent_span_id"] == root["span_id"]
                 and s["service"] == "turnout"]
        theirs = [s for s in spans if s["service"] == "vllm" and calls
                  and s["parent_span_id"] == calls[0]["span_id"]]
        if theirs or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert root is not None and root["attributes"]["gen_ai.response.model"] == "gemma3-270m"
    assert len(calls) == 1 and calls[0]["name"] == "chat gemma3-270m", calls
    assert theirs, [s["name"] for s in spans if s["service"] == "vllm"]
    assert theirs[0]["trace_id"] == root["trace_id"]
