"""The replay worker (loadtest/replay_worker.py): labelled answers from a routing table, deterministic usage,
latency by model size, vLLM-style metrics and OpenAI-shaped errors; in process through ASGI and as a real
server process, with the official `openai` SDK as the client.

Timing assertions compare planned lower bounds (a sleep never ends early) and ratios of minima over several
runs (noise only ever adds time), never absolute upper bounds on wall-clock time.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.types import Message, Scope

from loadtest.replay_worker import (
    ANSWER_TOKENS,
    FILLER,
    ReplayState,
    build_app,
    latency_for,
    load_replay_model,
    parse_size_b,
    prompt_tokens_of,
)
from testkit.engines import BUNDLED_TABLE
from testkit.procs import ManagedProcess, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED = BUNDLED_TABLE
SMALL, BIG = "tiny-7b", "org/huge.1-70b"  # names may contain '/' and '.'
Q_MATH, Q_COLOUR, Q_ACCENT = "What is 2+2?", "Name a colour.", "déjà vu?"
ROWS: list[dict[str, Any]] = [
    {"prompt": Q_MATH, f"score__{SMALL}": 1.0, f"score__{BIG}": 0.5},
    {"prompt": Q_COLOUR, f"score__{SMALL}": 0.0, f"score__{BIG}": 1.0},
    {"prompt": Q_ACCENT, f"score__{SMALL}": None, f"score__{BIG}": 0.25},
    {"prompt": Q_MATH, f"score__{SMALL}": 0.0, f"score__{BIG}": 0.0},  # a repeat: the first row counts
]
FAST = 20.0  # speed for tests that do not look at timing


def label(model: str, score: str) -> str:
    return f"[replay: {model} | table score {score} for this prompt]"


def user(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A four-row JSONL table with a models.json beside it giving prices and sizes (7B and 70B)."""
    folder = tmp_path_factory.mktemp("replay-table")
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    prices = {m: {"input_price": 0.2, "output_price": 0.2, "size": size} for m, size in ((SMALL, "7B"), (BIG, "70B"))}
    (folder / "models.json").write_text(json.dumps({"prices_usd_per_1M_tokens": prices}), encoding="utf-8")
    return path


@dataclass
class Replay:
    """A replay worker app in process, with an async openai client and a raw httpx2 client."""

    app: Starlette
    client: openai.AsyncOpenAI
    http: httpx2.AsyncClient

    @property
    def state(self) -> ReplayState:
        state: ReplayState = self.app.state.replay
        return state

    async def metrics(self) -> dict[str, float]:
        """Every sample of GET /metrics by name, after checking it parses and carries the served name."""
        resp = await self.http.get("/metrics")
        assert resp.status_code == 200
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(resp.text):
            for sample in family.samples:
                assert sample.labels == {"model_name": self.state.served_name}
                out[sample.name] = sample.value
        return out


@asynccontextmanager
async def in_process(app: Starlette) -> AsyncIterator[Replay]:
    """Talk to the app through ASGI, no socket (responses arrive whole, so timing is end to end)."""
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://replay") as http:
        client = openai.AsyncOpenAI(base_url="http://replay/v1", api_key="x", http_client=http, max_retries=0)
        yield Replay(app, client, http)


async def wait_for(check: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> None:
    """Poll `check` until it holds; fail after `timeout_s` (generous: the machine may be busy)."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not reached within {timeout_s} s")
        await asyncio.sleep(0.01)


# Answers and usage


async def test_chat_non_streaming_names_model_score_and_usage(table: Path) -> None:
    async with in_process(build_app(table, SMALL, served_name="small", speed=FAST)) as rp:
        resp = await rp.client.chat.completions.create(model="small", messages=user(Q_MATH))
    text = resp.choices[0].message.content or ""
    assert text.startswith(label(SMALL, "1.00"))  # the first of the two rows with this prompt
    assert FILLER.split()[0] in text
    assert resp.model == "small"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (math.ceil(len(Q_MATH) / 4), ANSWER_TOKENS)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + ANSWER_TOKENS


async def test_chat_streaming_chunks_and_final_usage_chunk(table: Path) -> None:
    async with in_process(build_app(table, BIG, speed=FAST)) as rp:
        full = await rp.client.chat.completions.create(model=BIG, messages=user(Q_COLOUR))
        stream = await rp.client.chat.completions.create(
            model=BIG, messages=user(Q_COLOUR), stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    assert {c.model for c in chunks} == {BIG}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3
    assert pieces[0] == label(BIG, "1.00")
    assert "".join(pieces) == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    *_, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (4, ANSWER_TOKENS)


async def test_stream_without_include_usage_has_no_usage_chunk(table: Path) -> None:
    async with in_process(build_app(table, SMALL, speed=FAST)) as rp:
        body = {"model": SMALL, "messages": user(Q_MATH), "stream": True}
        resp = await rp.http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = [e for e in resp.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(p["choices"] and "usage" not in p for p in payloads)


@pytest.mark.parametrize(
    ("limits", "tokens", "pieces"),
    [({"max_tokens": 5}, 5, 5), ({"max_tokens": 1}, 1, 1), ({"max_completion_tokens": 3, "max_tokens": 50}, 3, 3),
     ({"max_tokens": 1000}, ANSWER_TOKENS, None)],
)
async def test_max_tokens_caps_completion_tokens(
    table: Path, limits: dict[str, int], tokens: int, pieces: int | None
) -> None:
    async with in_process(build_app(table, SMALL, speed=FAST)) as rp:
        resp = await rp.http.post("/v1/chat/completions", json={"model": SMALL, "messages": user(Q_MATH), **limits})
    assert resp.status_code == 200
    doc = resp.json()
    assert doc["usage"]["completion_tokens"] == tokens
    assert doc["choices"][0]["finish_reason"] == ("stop" if tokens == ANSWER_TOKENS else "length")
    content = doc["choices"][0]["message"]["content"]
    assert content.startswith(label(SMALL, "1.00"))  # the label survives any limit
    expected_words = len(FILLER.split()) if pieces is None else pieces - 1
    assert content.removeprefix(label(SMALL, "1.00")).split() == FILLER.split()[:expected_words]


async def test_unknown_prompt_and_unknown_score_are_said(table: Path) -> None:
    async with in_process(build_app(table, SMALL, speed=FAST)) as rp:
        absent = await rp.client.chat.completions.create(model=SMALL, messages=user("not in the table"))
        nan = await rp.client.chat.completions.create(model=SMALL, messages=user(Q_ACCENT))
    assert (absent.choices[0].message.content or "").startswith(
        f"[replay: {SMALL} | prompt not in the table, score unknown]"
    )
    assert (nan.choices[0].message.content or "").startswith(label(SMALL, "unknown"))
    assert nan.usage is not None
    assert nan.usage.prompt_tokens == math.ceil(len(Q_ACCENT.encode("utf-8")) / 4) == 3  # bytes, not characters


async def test_chat_prompt_is_the_last_user_message(table: Path) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": Q_MATH},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": [{"type": "text", "text": Q_COLOUR}]},
    ]
    async with in_process(build_app(table, BIG, speed=FAST)) as rp:
        resp = await rp.client.chat.completions.create(model=BIG, messages=messages)
    assert (resp.choices[0].message.content or "").startswith(label(BIG, "1.00"))
    assert resp.usage is not None and resp.usage.prompt_tokens == prompt_tokens_of(Q_COLOUR)


async def test_completions_endpoint_streaming_and_not(table: Path) -> None:
    async with in_process(build_app(table, BIG, served_name="big", speed=FAST)) as rp:
        resp = await rp.client.completions.create(model="big", prompt=Q_ACCENT, max_tokens=4)
        stream = await rp.client.completions.create(
            model="big", prompt=[Q_ACCENT], stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    assert resp.model == "big" and resp.object == "text_completion"
    assert resp.choices[0].text.startswith(label(BIG, "0.25"))
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (3, 4)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.startswith(label(BIG, "0.25")) and text.endswith(FILLER.split()[-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == ANSWER_TOKENS


async def test_models_and_health(table: Path) -> None:
    async with in_process(build_app(table, BIG, served_name="big")) as rp:
        models = await rp.client.models.list()
        health = await rp.http.get("/health")
    assert [m.id for m in models.data] == ["big"]
    assert health.status_code == 200


# Errors


@pytest.mark.parametrize(
    ("path", "content", "param"),
    [
        ("/v1/chat/completions", b"{not json", None),
        ("/v1/chat/completions", b"[1, 2]", None),
        ("/v1/chat/completions", b'{"model": "m"}', "messages"),
        ("/v1/chat/completions", b'{"messages": []}', "messages"),
        ("/v1/chat/completions", b'{"messages": "hi"}', "messages"),
        ("/v1/chat/completions", b'{"messages": [{"content": "no role"}]}', "messages"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', "messages"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "max_tokens"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}',
         "max_tokens"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "n": 2}', "n"),
        ("/v1/completions", b'{"model": "m"}', "prompt"),
        ("/v1/completions", b'{"prompt": [1, 2, 3]}', "prompt"),
        ("/v1/completions", b'{"prompt": ["a", "b"]}', "prompt"),
    ],
)
async def test_bad_input_is_400_with_openai_error(table: Path, path: str, content: bytes, param: str | None) -> None:
    async with in_process(build_app(table, SMALL, served_name="m")) as rp:
        resp = await rp.http.post(path, content=content, headers={"content-type": "application/json"})
        after = await rp.metrics()
    assert resp.status_code == 400
    assert resp.json() == {
        "error": {"message": resp.json()["error"]["message"], "type": "invalid_request_error", "param": param,
                  "code": "invalid_request"}
    }
    assert resp.json()["error"]["message"]
    assert after["vllm:num_requests_running"] == 0 and after["vllm:prompt_tokens_total"] == 0


async def test_bad_input_through_the_sdk_raises_bad_request(table: Path) -> None:
    async with in_process(build_app(table, SMALL)) as rp:
        with pytest.raises(openai.BadRequestError) as err:
            await rp.client.chat.completions.create(model=SMALL, messages=[])
    assert err.value.status_code == 400


async def test_wrong_model_is_404(table: Path) -> None:
    async with in_process(build_app(table, SMALL, served_name="small")) as rp:
        resp = await rp.http.post("/v1/chat/completions", json={"model": SMALL, "messages": user(Q_MATH)})
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "model_not_found" and resp.json()["error"]["param"] == "model"


def test_build_app_rejects_an_unknown_model_and_bad_options(table: Path) -> None:
    with pytest.raises(ValueError, match=f"not in data.jsonl; its models are: {SMALL}, {BIG}"):
        build_app(table, "gpt-17")
    with pytest.raises(ValueError, match="speed"):
        build_app(table, SMALL, speed=0)
    with pytest.raises(ValueError, match="max_concurrency"):
        build_app(table, SMALL, max_concurrency=0)


# Latency


def test_latency_model_grows_with_size_and_speed() -> None:
    small, big = latency_for(7).total_s(ANSWER_TOKENS), latency_for(70).total_s(ANSWER_TOKENS)
    assert 0.030 <= small <= 0.060
    assert 0.100 <= big <= 0.300
    assert latency_for(70, speed=2).total_s(ANSWER_TOKENS) == pytest.approx(big / 2)
    assert latency_for(7).total_s(1) == latency_for(7).ttft_s
    assert latency_for(51).ttft_s < latency_for(70).ttft_s
    with pytest.raises(ValueError):
        latency_for(7, speed=-1)


@pytest.mark.parametrize(
    ("text", "size"),
    [("7B", 7.0), ("70B", 70.0), (" 1.5b ", 1.5), ("270M", 0.27), ("8x7B", 56.0), ("big", None), ("7", None)],
)
def test_parse_size_b(text: str, size: float | None) -> None:
    assert parse_size_b(text) == (None if size is None else pytest.approx(size))


def test_model_size_sources(table: Path, tmp_path: Path) -> None:
    assert (load_replay_model(table, BIG).size_b, load_replay_model(table, BIG).size_source) == (70.0, "models.json")
    assert load_replay_model(table, BIG, size_b=3).size_source == "given"
    bare = tmp_path / "bare.jsonl"  # no models.json: the size comes from the name, else the default
    rows = [{"prompt": "p", "score__qwen2.5-7b-instruct": 1, "score__mixtral-8x7b": 0, "score__gpt-4-1106": 1}]
    bare.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert load_replay_model(bare, "qwen2.5-7b-instruct").size_b == 7.0
    assert load_replay_model(bare, "mixtral-8x7b").size_b == 56.0
    default = load_replay_model(bare, "gpt-4-1106")
    assert (default.size_b, default.size_source) == (7.0, "default")


async def test_bigger_model_answers_slower(table: Path) -> None:
    speed = 0.5  # planned: 7B about 0.10 s, 70B about 0.42 s
    durations: dict[str, float] = {}
    for model in (SMALL, BIG):
        async with in_process(build_app(table, model, speed=speed)) as rp:
            planned = rp.state.latency.total_s(ANSWER_TOKENS)
            runs = []
            for _ in range(3):
                start = time.monotonic()
                await rp.client.chat.completions.create(model=model, messages=user(Q_MATH))
                runs.append(time.monotonic() - start)
        assert min(runs) >= planned - 0.002  # a sleep never ends early
        durations[model] = min(runs)  # noise only adds: the minimum is the cleanest of the runs
    assert durations[BIG] > 1.5 * durations[SMALL]  # planned ratio about 4


# Metrics and concurrency


async def test_metrics_show_running_requests_served_concurrently(table: Path) -> None:
    # speed 0.001: each answer would take minutes, so the requests are surely in flight while we look.
    async with in_process(build_app(table, BIG, served_name="big", speed=0.001)) as rp:
        idle = await rp.metrics()
        assert (idle["vllm:num_requests_running"], idle["vllm:num_requests_waiting"]) == (0, 0)
        tasks = [asyncio.ensure_future(rp.client.chat.completions.create(model="big", messages=user(Q_MATH),
                                                                           stream=i % 2 == 0)) for i in range(5)]

        async def all_running() -> bool:
            return (await rp.metrics())["vllm:num_requests_running"] == 5

        await wait_for(all_running)
        busy = await rp.metrics()
        assert busy["vllm:num_requests_waiting"] == 0
        assert busy["vllm:kv_cache_usage_perc"] == 0  # no concurrency limit, nothing to be a share of
        assert busy["vllm:prompt_tokens_total"] == 5 * prompt_tokens_of(Q_MATH)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

        async def all_done() -> bool:
            return (await rp.metrics())["vllm:num_requests_running"] == 0

        await wait_for(all_done)


async def test_max_concurrency_queues_and_counts_waiting(table: Path) -> None:
    async with in_process(build_app(table, SMALL, speed=0.001, max_concurrency=2)) as rp:
        tasks = [asyncio.ensure_future(rp.client.chat.completions.create(model=SMALL, messages=user(Q_MATH)))
                 for _ in range(3)]

        async def two_run_one_waits() -> bool:
            m = await rp.metrics()
            return (m["vllm:num_requests_running"], m["vllm:num_requests_waiting"]) == (2, 1)

        await wait_for(two_run_one_waits)
        assert (await rp.metrics())["vllm:kv_cache_usage_perc"] == 1.0
        tasks[0].cancel()  # frees a slot: the waiting request is admitted

        async def two_run_none_waits() -> bool:
            m = await rp.metrics()
            return (m["vllm:num_requests_running"], m["vllm:num_requests_waiting"]) == (2, 0)

        await wait_for(two_run_none_waits)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

        async def idle() -> bool:
            m = await rp.metrics()
            return (m["vllm:num_requests_running"], m["vllm:kv_cache_usage_perc"]) == (0, 0)

        await wait_for(idle)


async def test_finished_requests_count_generation_tokens(table: Path) -> None:
    async with in_process(build_app(table, SMALL, speed=FAST)) as rp:
        await rp.client.chat.completions.create(model=SMALL, messages=user(Q_MATH), max_tokens=7)
        stream = await rp.client.chat.completions.create(model=SMALL, messages=user(Q_MATH), stream=True)
        _ = [chunk async for chunk in stream]
        m = await rp.metrics()
    assert m["vllm:generation_tokens_total"] == 7 + ANSWER_TOKENS
    assert m["vllm:prompt_tokens_total"] == 2 * prompt_tokens_of(Q_MATH)


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_frees_the_slot(table: Path, stream: bool) -> None:
    """Raw ASGI, as a server sees it: the body, then nothing until the client goes away."""
    app = build_app(table, SMALL, speed=0.001, max_concurrency=1)
    state: ReplayState = app.state.replay
    gone = asyncio.Event()
    body = json.dumps({"model": SMALL, "messages": user(Q_MATH), "stream": stream}).encode()
    inbox: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[Message] = []

    async def receive() -> Message:
        if inbox:
            return inbox.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    call = asyncio.ensure_future(app(scope, receive, send))

    async def running() -> bool:
        return state.running == 1

    await wait_for(running)
    gone.set()
    await asyncio.wait_for(call, timeout=20)
    assert (state.running, state.waiting, state.generation_tokens_total) == (0, 0, 0)
    assert [m["type"] for m in sent] == (["http.response.start"] if stream else [])


# The bundled table


@pytest.fixture(scope="module")
def bundled() -> Path:
    """The routing table shipped beside the repository; the test is skipped where it is absent."""
    if not BUNDLED.is_file():
        pytest.skip(f"{BUNDLED} is not present")
    return BUNDLED


async def test_bundled_table_replays_its_prompts(bundled: Path) -> None:
    model = "llama3-chatqa-1.5-70b"
    app = build_app(bundled, model, speed=FAST)
    state: ReplayState = app.state.replay
    assert (state.replay.size_b, state.replay.size_source) == (70.0, "models.json")
    assert len(state.replay.scores) == 5989  # unique prompts of the table's 6,108 rows
    prompt, score = next(iter(state.replay.scores.items()))
    async with in_process(app) as rp:
        resp = await rp.client.chat.completions.create(model=model, messages=user(prompt))
    assert (resp.choices[0].message.content or "").startswith(label(model, f"{score:.2f}"))
    assert resp.usage is not None and resp.usage.prompt_tokens == prompt_tokens_of(prompt)


# The CLI, on a real port


@pytest.fixture(scope="module")
def served(table: Path) -> Iterator[str]:
    """`python -m loadtest.replay_worker` for the 70B model, half speed, as `big`; yields its /v1 URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "loadtest.replay_worker", "--table", str(table), "--model", BIG,
           "--port", str(port), "--served-name", "big", "--speed", "0.5"]
    with ManagedProcess(cmd, f"http://127.0.0.1:{port}/health", cwd=REPO_ROOT, timeout_s=60):
        yield f"http://127.0.0.1:{port}/v1"


def test_cli_streams_chunk_by_chunk(served: str) -> None:
    latency = latency_for(70, speed=0.5)
    decode_s = latency.total_s(ANSWER_TOKENS) - latency.ttft_s  # about 0.30 s between first and last piece
    with openai.OpenAI(base_url=served, api_key="x", max_retries=0) as client:
        start = time.monotonic()
        stream = client.chat.completions.create(
            model="big", messages=user(Q_MATH), stream=True, stream_options={"include_usage": True}
        )
        arrivals: list[tuple[float, str]] = []
        usage = None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append((time.monotonic(), chunk.choices[0].delta.content))
            usage = chunk.usage or usage
        end = time.monotonic()
    assert arrivals[0][1] == label(BIG, "0.50")
    assert end - start >= latency.total_s(ANSWER_TOKENS) - 0.002
    # Pieces arrive spread over the decode time, not all at once at the end (a late first piece only
    # shortens the spread by its own delay, hence the wide margin).
    assert arrivals[-1][0] - arrivals[0][0] >= 0.25 * decode_s
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (3, ANSWER_TOKENS)


def test_cli_non_streaming_and_metrics(served: str) -> None:
    with openai.OpenAI(base_url=served, api_key="x", max_retries=0) as client:
        resp = client.chat.completions.create(model="big", messages=user(Q_COLOUR), max_tokens=10)
        assert [m.id for m in client.models.list().data] == ["big"]
    assert resp.model == "big"
    assert (resp.choices[0].message.content or "").startswith(label(BIG, "1.00"))
    assert resp.usage is not None and resp.usage.completion_tokens == 10
    metrics = httpx2.get(served.removesuffix("/v1") + "/metrics", timeout=10)
    names = {f.name for f in text_string_to_metric_families(metrics.text)}
    assert {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"} <= names


def test_cli_rejects_an_unknown_model(table: Path) -> None:
    cmd = [sys.executable, "-m", "loadtest.replay_worker", "--table", str(table), "--model", "nope",
           "--port", str(free_port())]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert f"its models are: {SMALL}, {BIG}" in done.stderr
