"""Reliability with real processes: fake workers killed mid-stream and before their first byte, workers that
answer 500s or hang (breakers), and SIGTERM with streams in flight. Each test owns its workers (they get
killed) and its gateway process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest

from testkit.procs import ManagedProcess
from testkit.promtext import sample_sum
from tests.conftest import _port_of, serve_gateway, start_fake

MSG: list[Any] = [{"role": "user", "content": "hello there"}]


def worker(name: str, proc: ManagedProcess, model: str, price: float = 0.1) -> dict[str, Any]:
    return {"name": name, "model": model, "base_url": f"http://127.0.0.1:{_port_of(proc)}/v1",
            "price": {"input_per_1m": price, "output_per_1m": 2 * price}}


def gateway_config(workers: list[dict[str, Any]], **sections: Any) -> dict[str, Any]:
    # A long health interval: these tests are about what requests find out, before any health check would.
    cfg: dict[str, Any] = {"workers": workers, "server": {"health_interval_s": 60}}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def fake_mode(proc: ManagedProcess, mode: dict[str, Any]) -> None:
    httpx.post(f"http://127.0.0.1:{_port_of(proc)}/fake/mode", json=mode, timeout=5).raise_for_status()


def fake_stats(proc: ManagedProcess) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"http://127.0.0.1:{_port_of(proc)}/fake/stats", timeout=5).json()
    return stats


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)


def stream_killing(url: str, body: dict[str, Any], worker: ManagedProcess, after: int,
                   timeout_s: float) -> tuple[httpx.Headers, list[str]]:
    """Stream a chat completion through the gateway at `url`, SIGKILL `worker` once `after` events arrived, and
    return the response headers and every event's data, to the end of the stream."""
    events: list[str] = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout_s) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
            if len(events) == after:
                worker.kill()
        return resp.headers, events


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


def test_a_worker_killed_mid_stream_ends_the_stream_with_an_error_event_and_done(
        tmp_path: Path, stack: ExitStack) -> None:
    small = stack.enter_context(start_fake("fake-small", tmp_path))
    proc, url = serve_gateway(gateway_config([worker("small", small, "fake-small")]), tmp_path)
    stack.enter_context(proc)
    body = {"model": "small", "messages": MSG, "max_tokens": 200, "stream": True, "fake": {"itl_ms": 50}}
    _, events = stream_killing(url, body, small, after=3, timeout_s=30)
    assert events[-1] == "[DONE]", "the stream ends properly, never a silent truncation"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "upstream_stream_error" and "mid-stream" in error["message"]
    assert all("choices" in json.loads(e) for e in events[:-2]), "only the worker's chunks before the error"
    assert sample_sum(f"{url}/metrics", "turnout_requests_total", status="stream_error") == 1
    assert sample_sum(f"{url}/metrics", "turnout_requests_total", status="ok") == 0


def test_a_worker_killed_mid_stream_on_responses_and_messages_ends_with_each_apis_error_event(
        tmp_path: Path, stack: ExitStack) -> None:
    """Through the openai SDK (Responses) and the anthropic SDK (Messages): each stream ends with its API's own
    `error` event (which the anthropic SDK raises), each counted as `stream_error`."""
    one = stack.enter_context(start_fake("fake-one", tmp_path))
    two = stack.enter_context(start_fake("fake-two", tmp_path))
    proc, url = serve_gateway(gateway_config([worker("one", one, "fake-one"), worker("two", two, "fake-two")]),
                              tmp_path)
    stack.enter_context(proc)
    seen: list[str] = []
    with sdk(url).responses.create(model="one", input="hello there", max_output_tokens=200, stream=True,
                                   extra_body={"fake": {"itl_ms": 50}}) as events:
        for event in events:
            seen.append(event.type)
            if seen.count("response.output_text.delta") == 3:
                one.kill()
    assert seen[-1] == "error" and "response.completed" not in seen
    assert event.type == "error" and event.code == "upstream_stream_error" and "mid-stream" in event.message
    client = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=30)
    texts: list[str] = []
    with (pytest.raises(anthropic.APIStatusError) as broken,
          client.messages.stream(model="two", max_tokens=200, messages=MSG,
                                 extra_body={"fake": {"itl_ms": 50}}) as stream):
        for text in stream.text_stream:
            texts.append(text)
            if len(texts) == 3:
                two.kill()
    assert len(texts) >= 3 and "mid-stream" in broken.value.message
    assert sample_sum(f"{url}/metrics", "turnout_requests_total", status="stream_error") == 2
    assert sample_sum(f"{url}/metrics", "turnout_requests_total", status="ok") == 0


def test_a_worker_killed_before_its_first_byte_is_answered_by_the_fallback_model(
        tmp_path: Path, stack: ExitStack) -> None:
    small = stack.enter_context(start_fake("fake-small", tmp_path))
    big = stack.enter_context(start_fake("fake-big", tmp_path))
    # The policy all but always chooses small, and ranks big next.
    cfg = gateway_config([worker("small", small, "fake-small"), worker("big", big, "fake-big", 1.0)],
                         policies={"pair": {"type": "weighted", "weights": {"small": 1_000_000, "big": 1}}},
                         reliability={"breaker_failures": 5})
    cfg["default_policy"] = "pair"
    proc, url = serve_gateway(cfg, tmp_path)
    stack.enter_context(proc)
    client = stack.enter_context(sdk(url))
    assert client.chat.completions.create(model="auto", messages=MSG, max_tokens=3).model == "fake-small"
    small.kill()
    # Refused connections: one retry on small, then big answers; the client never sees the failure.
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=MSG, max_tokens=3)
    assert raw.parse().model == "fake-big" and raw.parse().choices[0].message.content
    assert raw.headers["x-turnout-fallback-from"] == "fake-small" and raw.headers["x-turnout-retries"] == "1"
    stream = client.chat.completions.with_raw_response.create(model="auto", messages=MSG, max_tokens=3,
                                                              stream=True)
    assert stream.headers["x-turnout-fallback-from"] == "fake-small"
    assert "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices)
    metrics = f"{url}/metrics"
    assert sample_sum(metrics, "turnout_fallbacks_total", from_model="fake-small", to_model="fake-big") == 2
    assert sample_sum(metrics, "turnout_requests_total", status="ok") == 3
    # Four failed requests at small so far; the fifth opens its breaker, and then small is not tried at all.
    client.chat.completions.create(model="auto", messages=MSG, max_tokens=3)
    assert sample_sum(metrics, "turnout_worker_breaker_state", worker="small") == 2
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=MSG, max_tokens=3)
    assert raw.parse().model == "fake-big" and "x-turnout-fallback-from" not in raw.headers
    ready = httpx.get(f"{url}/readyz", timeout=5).json()
    assert ready["ready"] and ready["workers"]["small"]["breaker"] == "open"


@pytest.mark.parametrize("fault", ["status_500", "hang"])
def test_a_failing_replica_is_cut_off_by_its_breaker_and_returns_when_it_recovers(
        fault: str, tmp_path: Path, stack: ExitStack) -> None:
    a = stack.enter_context(start_fake("fake-m", tmp_path))
    b = stack.enter_context(start_fake("fake-m", tmp_path))
    cfg = gateway_config([worker("a", a, "fake-m"), worker("b", b, "fake-m")],
                         reliability={"breaker_failures": 3, "breaker_open_s": 10})
    cfg["workers"][0]["timeouts"] = {"total_timeout_s": 0.5}  # a only: b, however slow the machine, answers
    proc, url = serve_gateway(cfg, tmp_path)
    stack.enter_context(proc)
    fake_mode(a, {"status": 500} if fault == "status_500" else {"hang": True})
    client = stack.enter_context(sdk(url))
    metrics = f"{url}/metrics"
    t0 = time.monotonic()
    sent = 0
    # Replicas are chosen by load (a hung one reports its stuck requests), so a gets some of the requests.
    while fake_stats(a)["requests"] < 3:
        # Every request succeeds: a failure at a goes on to b (the other replica) at once.
        assert client.chat.completions.create(model="fake-m", messages=MSG, max_tokens=2).choices
        sent += 1
        assert sent < 200, "a never got 3 requests"
    assert sample_sum(metrics, "turnout_worker_breaker_state", worker="a") == 2, "open after 3 failures"
    for _ in range(20):
        assert client.chat.completions.create(model="fake-m", messages=MSG, max_tokens=2).choices
    assert time.monotonic() - t0 < 10, "the breaker must still be open for the count below"
    assert fake_stats(a)["requests"] == 3, "no request reached a while its breaker was open"
    reason = "upstream_error" if fault == "status_500" else "upstream_timeout"
    assert sample_sum(metrics, "turnout_retries_total", reason=reason) == 3
    assert sample_sum(metrics, "turnout_requests_total", status="ok") == sent + 20
    # a recovers; once the breaker half-opens, one probe closes it and a takes its share again.
    fake_mode(a, {})
    time.sleep(10.2)
    # One at a time, both replicas are idle at each pick: a gets about half (fewer than 3 of 30: p < 1e-6).
    for _ in range(30):
        client.chat.completions.create(model="fake-m", messages=MSG, max_tokens=2)
    assert sample_sum(metrics, "turnout_worker_breaker_state", worker="a") == 0
    assert fake_stats(a)["completed"] >= 3, "a is back in rotation"
    assert sample_sum(metrics, "turnout_breaker_transitions_total", worker="a", state="closed") == 1


def test_sigterm_lets_50_streams_in_flight_finish(tmp_path: Path, stack: ExitStack) -> None:
    small = stack.enter_context(start_fake("fake-small", tmp_path))
    proc, url = serve_gateway(gateway_config([worker("small", small, "fake-small")],
                                             server={"drain_timeout_s": 30}), tmp_path)
    stack.enter_context(proc)
    tokens = 40  # 40 tokens 50 ms apart: each stream lasts 2 s

    async def run() -> tuple[list[int], bool]:
        started = asyncio.Event()
        first = 0

        async def one(client: openai.AsyncOpenAI) -> int:
            nonlocal first
            stream = await client.chat.completions.create(
                model="small", messages=MSG, max_tokens=tokens, stream=True,
                stream_options={"include_usage": True}, extra_body={"fake": {"itl_ms": 50}})
            got = 0
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    got += 1
                    if got == 1:
                        first += 1
                        if first == 50:
                            started.set()
                if chunk.usage is not None:
                    assert chunk.usage.completion_tokens == tokens
            return got

        limits = httpx2.Limits(max_connections=60)
        async with httpx2.AsyncClient(limits=limits, timeout=30) as http:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, http_client=http)
            tasks = [asyncio.create_task(one(client)) for _ in range(50)]
            await asyncio.wait_for(started.wait(), 20)
            os.kill(proc.pid, signal.SIGTERM)
            refused = False
            for _ in range(40):  # new connections are refused while the streams still run
                try:
                    async with httpx.AsyncClient(timeout=1) as fresh:
                        await fresh.get(f"{url}/healthz")
                except httpx.TimeoutException:
                    raise  # accepted and left unanswered: that is no refusal
                except httpx.TransportError:
                    # Refused, or (accepted by the kernel just before the listener closed) reset or closed
                    # unanswered: a connect, read, write or protocol error, depending on when the reset came.
                    refused = True
                    break
                await asyncio.sleep(0.025)
            return await asyncio.gather(*tasks), refused

    counts, refused = asyncio.run(run())
    assert counts == [tokens] * 50, "every stream in flight ran to its end"
    assert refused, "the gateway stopped accepting connections at once"
    deadline = time.monotonic() + 15
    while proc.alive():
        assert time.monotonic() < deadline, "the gateway did not exit after draining"
        time.sleep(0.1)
    # uvicorn re-raises the signal once it has shut down cleanly, so the exit status is the signal's.
    assert proc.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in proc.log_text(), "the lifespan's shutdown ran"
    assert fake_stats(small)["completed"] == 50
