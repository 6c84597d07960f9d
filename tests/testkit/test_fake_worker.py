"""Tests of the fake vLLM worker on a real socket, through the official ``openai`` SDK."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from testkit.procs import ManagedProcess, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "fake-model"
MAX_MODEL_LEN = 256


def _worker_cmd(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "testkit.fakes.worker", "--host", "127.0.0.1", "--port", str(port), *extra]


@pytest.fixture(scope="module")
def worker_url() -> Iterator[str]:
    """One fake worker process for the whole module."""
    port = free_port()
    cmd = _worker_cmd(port, "--model", MODEL, "--max-model-len", str(MAX_MODEL_LEN))
    with ManagedProcess(cmd, f"http://127.0.0.1:{port}/health", cwd=REPO_ROOT, timeout_s=30):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def ctl(worker_url: str) -> Iterator[httpx.Client]:
    """Plain HTTP client for the worker's control endpoints (``/fake/*``, ``/metrics``)."""
    with httpx.Client(base_url=worker_url, trust_env=False) as http:
        yield http


@pytest.fixture(autouse=True)
def _clean_worker(ctl: httpx.Client) -> None:
    ctl.post("/fake/mode", json={}).raise_for_status()
    ctl.post("/fake/reset").raise_for_status()


@pytest.fixture
def client(worker_url: str) -> Iterator[openai.OpenAI]:
    """Sync SDK client without retries."""
    with openai.OpenAI(base_url=f"{worker_url}/v1", api_key="x", max_retries=0) as sdk:
        yield sdk


def _async_client(worker_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{worker_url}/v1", api_key="x", max_retries=0)


def stats(ctl: httpx.Client) -> dict[str, Any]:
    """Current ``/fake/stats``."""
    response = ctl.get("/fake/stats")
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def wait_stats(ctl: httpx.Client, pred: Callable[[dict[str, Any]], bool], timeout_s: float = 5.0) -> dict[str, Any]:
    """Poll ``/fake/stats`` until ``pred`` holds; fail with the last stats otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = stats(ctl)
        if pred(current):
            return current
        if time.monotonic() > deadline:
            pytest.fail(f"stats never matched: {current}")
        time.sleep(0.02)


def test_chat_non_streaming_usage(client: openai.OpenAI) -> None:
    """Chat answer shape and usage: words + 1 per message (string and text-part content)."""
    result = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello big world"}]},
        ],
        max_tokens=5,
    )
    assert result.id.startswith("chatcmpl-")
    assert result.object == "chat.completion"
    assert result.model == MODEL
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content is not None
    assert choice.message.content.split() == ["tok"] * 5
    assert choice.finish_reason == "length"
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (7, 5, 12)


def test_chat_default_and_max_completion_tokens(client: openai.OpenAI) -> None:
    """16 completion tokens by default; ``max_completion_tokens`` is honoured."""
    default = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert default.usage is not None and default.usage.completion_tokens == 16
    explicit = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3
    )
    assert explicit.usage is not None and explicit.usage.completion_tokens == 3


def test_completions_non_streaming_usage(client: openai.OpenAI) -> None:
    """Completions answer shape; a list prompt counts all words + 1."""
    result = client.completions.create(model=MODEL, prompt="one two three", max_tokens=4)
    assert result.id.startswith("cmpl-")
    assert result.object == "text_completion"
    assert result.choices[0].text.split() == ["tok"] * 4
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (4, 4)
    batch = client.completions.create(model=MODEL, prompt=["a b", "c"], max_tokens=2)
    assert batch.usage is not None and batch.usage.prompt_tokens == 4


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_streaming(client: openai.OpenAI, include_usage: bool) -> None:
    """vLLM chunk sequence; the usage chunk comes only when asked for."""
    options: Any = {"include_usage": True} if include_usage else openai.omit
    with client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "one two"}],
        max_tokens=6,
        stream=True,
        stream_options=options,
    ) as stream:
        chunks = list(stream)
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    contents = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert contents == ["tok "] * 6
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    usage_chunks = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0]
        assert chunks[-1].choices == []
        usage = usage_chunks[0].usage
        assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (3, 6)
    else:
        assert usage_chunks == []


@pytest.mark.parametrize("include_usage", [False, True])
async def test_completions_streaming_async(worker_url: str, include_usage: bool) -> None:
    """Completions streaming through the async SDK, with and without usage."""
    options: Any = {"include_usage": True} if include_usage else openai.omit
    async with _async_client(worker_url) as sdk:
        stream = await sdk.completions.create(
            model=MODEL, prompt="x y z", max_tokens=5, stream=True, stream_options=options
        )
        async with stream:
            chunks = [chunk async for chunk in stream]
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "tok " * 5
    usage = [c.usage for c in chunks if c.usage is not None]
    if include_usage:
        assert len(usage) == 1 and (usage[0].prompt_tokens, usage[0].completion_tokens) == (4, 5)
    else:
        assert usage == []


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    """Unknown model: vLLM's NotFoundError body."""
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="hi")
    assert info.value.status_code == 404
    assert info.value.body == {
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


def test_too_many_tokens_is_400(client: openai.OpenAI, ctl: httpx.Client) -> None:
    """Prompt + max_tokens above max_model_len is a 400."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "a b c"}], max_tokens=MAX_MODEL_LEN
        )
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "BadRequestError"
    assert "maximum context length" in info.value.message
    assert stats(ctl)["errors"] == 1


def test_malformed_json_and_bad_fake_keys_are_400(ctl: httpx.Client) -> None:
    """Malformed JSON and unknown ``fake`` keys are 400s."""
    headers = {"content-type": "application/json"}
    bad = ctl.post("/v1/completions", content=b'{"model": ', headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "BadRequestError"
    typo = ctl.post("/v1/completions", json={"model": MODEL, "prompt": "a", "fake": {"stauts": 1}})
    assert typo.status_code == 400


def test_injected_status(client: openai.OpenAI, ctl: httpx.Client) -> None:
    """``fake.status`` answers with that status; the extra body field is recorded."""
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model=MODEL, prompt="hi", extra_body={"fake": {"status": 500}})
    assert info.value.status_code == 500
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_body={"fake": {"status": 429}},
        )
    current = stats(ctl)
    assert current["last_body"]["fake"] == {"status": 429}
    assert [body["fake"] for body in current["bodies"]] == [{"status": 500}, {"status": 429}]


def test_a_scripted_reply_is_the_whole_answer(client: openai.OpenAI, ctl: httpx.Client) -> None:
    """``reply`` replaces the text, streamed or not; usage still counts the tokens asked for."""
    msgs: Any = [{"role": "user", "content": "grade it"}]
    whole = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4,
                                           extra_body={"fake": {"reply": "Rating: 8"}})
    assert whole.choices[0].message.content == "Rating: 8"
    assert whole.usage is not None and whole.usage.completion_tokens == 4
    ctl.post("/fake/mode", json={"reply": "The answer is (B)"}).raise_for_status()
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "The answer is (B)"
    text = client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert text.choices[0].text == "The answer is (B)"
    assert ctl.post("/fake/mode", json={"reply": 3}).status_code == 400


def test_drop_after_breaks_the_stream(client: openai.OpenAI, ctl: httpx.Client) -> None:
    """``drop_after`` cuts the stream (and non-streaming answers) abruptly."""
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError):  # noqa: SIM117 - the raise happens inside the stream
        with client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=10,
            stream=True,
            extra_body={"fake": {"drop_after": 3, "itl_ms": 5}},
        ) as stream:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    received.append(chunk.choices[0].delta.content)
    assert received == ["tok "] * 3
    with pytest.raises(openai.APIConnectionError):
        client.completions.create(model=MODEL, prompt="hi", extra_body={"fake": {"drop_after": 0}})
    assert wait_stats(ctl, lambda s: s["dropped"] == 2)["completed"] == 0


def test_no_usage(client: openai.OpenAI) -> None:
    """``no_usage`` removes usage from both kinds of answers."""
    plain = client.completions.create(model=MODEL, prompt="hi", extra_body={"fake": {"no_usage": True}})
    assert plain.usage is None
    with client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"fake": {"no_usage": True}},
    ) as stream:
        chunks = list(stream)
    assert chunks and all(c.usage is None for c in chunks)


def test_worker_wide_mode_then_reset(client: openai.OpenAI, ctl: httpx.Client) -> None:
    """``/fake/mode`` applies to every request until reset with ``{}``."""
    assert ctl.post("/fake/mode", json={"status": 503}).json() == {"status": 503}
    assert ctl.get("/fake/mode").json() == {"status": 503}
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model=MODEL, prompt="hi")
    assert info.value.status_code == 503
    ok = client.completions.create(model=MODEL, prompt="hi", extra_body={"fake": {"status": None}})
    assert ok.choices[0].text
    assert ctl.post("/fake/mode", json={"stauts": 1}).status_code == 400
    ctl.post("/fake/mode", json={}).raise_for_status()
    assert client.completions.create(model=MODEL, prompt="hi").usage is not None


async def test_ttft_is_observed(worker_url: str) -> None:
    """The first chunk waits for ``ttft_ms`` (lower bound only)."""
    ttft_s = 0.3
    async with _async_client(worker_url) as sdk:
        started = time.monotonic()
        stream = await sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            stream=True,
            extra_body={"fake": {"ttft_ms": ttft_s * 1000}},
        )
        async with stream:
            first_at: float | None = None
            async for _chunk in stream:
                if first_at is None:
                    first_at = time.monotonic()
    assert first_at is not None and first_at - started >= 0.8 * ttft_s


def test_client_closing_stream_counts_as_cancelled(client: openai.OpenAI, ctl: httpx.Client) -> None:
    """Closing a stream early is seen by the worker as a cancellation."""
    with client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=200,
        stream=True,
        extra_body={"fake": {"itl_ms": 20}},
    ) as stream:
        for index, _chunk in enumerate(stream):
            if index == 2:
                break
    final = wait_stats(ctl, lambda s: s["cancelled"] == 1 and s["active"] == 0)
    assert final["completed"] == 0 and final["requests"] == 1


@pytest.mark.parametrize("stream", [False, True])
def test_hang_until_client_timeout_counts_as_cancelled(client: openai.OpenAI, ctl: httpx.Client, stream: bool) -> None:
    """A hanging request whose client times out counts as cancelled."""
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.5).completions.create(
            model=MODEL, prompt="hi", stream=stream, extra_body={"fake": {"hang": True}}
        )
    wait_stats(ctl, lambda s: s["cancelled"] == 1 and s["active"] == 0)


def _metric_samples(ctl: httpx.Client) -> dict[str, float]:
    text = ctl.get("/metrics").text
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert sample.labels == {"model_name": MODEL}
            samples[sample.name] = sample.value
    return samples


async def test_metrics_show_running_requests(worker_url: str, ctl: httpx.Client) -> None:
    """``/metrics`` parses as Prometheus text and tracks running requests and tokens."""
    idle = _metric_samples(ctl)
    assert idle["vllm:num_requests_running"] == 0
    assert idle["vllm:num_requests_waiting"] == 0
    assert idle["vllm:kv_cache_usage_perc"] == 0
    async with _async_client(worker_url) as sdk:
        stream = await sdk.completions.create(
            model=MODEL, prompt="a b c", max_tokens=20, stream=True, extra_body={"fake": {"itl_ms": 20}}
        )
        async with stream:
            await stream.__anext__()
            busy = await asyncio.to_thread(_metric_samples, ctl)
            async for _chunk in stream:
                pass
    assert busy["vllm:num_requests_running"] == 1
    assert 0 < busy["vllm:kv_cache_usage_perc"] <= 1
    assert busy["vllm:prompt_tokens_total"] == 4
    done = wait_stats(ctl, lambda s: s["active"] == 0)
    assert done["completed"] == 1
    final = _metric_samples(ctl)
    assert final["vllm:num_requests_running"] == 0
    assert final["vllm:generation_tokens_total"] == 20


def test_models_and_health(client: openai.OpenAI, ctl: httpx.Client) -> None:
    """``/v1/models`` lists the one model; ``/health`` is an empty 200."""
    models = client.models.list()
    assert [(m.id, m.owned_by) for m in models.data] == [(MODEL, "fake")]
    health = ctl.get("/health")
    assert health.status_code == 200 and health.content == b""


async def test_concurrent_requests_are_all_counted(worker_url: str, ctl: httpx.Client) -> None:
    """A burst of concurrent requests is fully counted; bodies keep the last 50."""
    async with _async_client(worker_url) as sdk:
        await asyncio.gather(*(sdk.completions.create(model=MODEL, prompt="hi", max_tokens=2) for _ in range(100)))
    final = stats(ctl)
    assert (final["requests"], final["completed"], final["active"]) == (100, 100, 0)
    assert len(final["bodies"]) == 50


def test_managed_process_cli_flags_and_kill(tmp_path: Path) -> None:
    """CLI flags take effect; ManagedProcess.kill() ends the process at once."""
    port = free_port()
    cmd = _worker_cmd(port, "--model", "other", "--latency-ms", "150", "--max-model-len", "64")
    log = tmp_path / "worker.log"
    with ManagedProcess(cmd, f"http://127.0.0.1:{port}/health", cwd=REPO_ROOT, log_path=log) as proc:
        assert proc.alive() and proc.pid > 0
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0) as sdk:
            started = time.monotonic()
            result = sdk.completions.create(model="other", prompt="hi", max_tokens=2)
            assert time.monotonic() - started >= 0.8 * 0.15
            assert result.model == "other"
            with pytest.raises(openai.BadRequestError):
                sdk.completions.create(model="other", prompt="hi", max_tokens=64)
        proc.kill()
        assert not proc.alive()
    assert log.exists()


def test_managed_process_reports_early_exit() -> None:
    """A process that dies before being ready raises with its log tail."""
    cmd = [sys.executable, "-c", "import sys; print('boom from child', flush=True); sys.exit(3)"]
    with (
        pytest.raises(RuntimeError, match="boom from child"),
        ManagedProcess(cmd, f"http://127.0.0.1:{free_port()}/health", timeout_s=10),
    ):
        pass


def test_any_model_serves_whatever_model_is_named() -> None:
    """``--model '*'``: one process answers as any model (the side-by-side benchmark's shared upstream)."""
    port = free_port()
    cmd = _worker_cmd(port, "--model", "*")
    with ManagedProcess(cmd, f"http://127.0.0.1:{port}/health", cwd=REPO_ROOT, timeout_s=30), \
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0) as sdk:
        for name in ("qwen-a", "llama-b"):
            got = sdk.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            assert got.model == name and got.usage is not None and got.usage.completion_tokens == 2
