"""The gateway as a real server process on a real port, in front of fake workers (sync openai SDK)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from testkit.promtext import sample_sum
from tests.conftest import Upstream, fake_config, serve_gateway

MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def gateway(fakes: dict[str, Upstream], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = serve_gateway(fake_config(fakes), Path(tmp_path_factory.mktemp("gw")))
    with proc:
        yield url


@pytest.fixture
def sdk(gateway: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gateway}/v1", api_key="test", max_retries=0, timeout=30) as c:
        yield c


def stats(up: Upstream) -> dict[str, int]:
    data: dict[str, int] = httpx.get(f"{up.root}/fake/stats", timeout=5).json()
    return data


@pytest.mark.usefixtures("fake_reset")
def test_sync_sdk_streams_through_a_real_socket(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(model="auto", messages=MSG, max_tokens=4, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    resp = sdk.completions.create(model="big", prompt="a b c", max_tokens=2)
    assert resp.model == "fake-big" and resp.usage is not None and resp.usage.prompt_tokens == 4


@pytest.mark.usefixtures("fake_reset")
def test_stream_is_relayed_as_it_arrives(sdk: openai.OpenAI, fakes: dict[str, Upstream]) -> None:
    # 10 tokens 100 ms apart: the first chunk must reach the client long before the last is generated.
    t0 = time.perf_counter()
    arrivals = []
    raw = sdk.chat.completions.with_raw_response.create(
        model="auto", messages=MSG, max_tokens=10, stream=True, extra_body={"fake": {"itl_ms": 100}})
    assert raw.headers["x-turnout-model"] == "small"
    assert float(raw.headers["x-turnout-overhead-ms"]) >= 0
    for chunk in raw.parse():
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter() - t0)
    assert len(arrivals) == 10
    # Ordering, not a latency bound: chunks arrive spread out, not in one buffered burst.
    assert arrivals[-1] - arrivals[0] >= 0.5


@pytest.mark.usefixtures("fake_reset")
def test_client_disconnect_mid_stream_cancels_upstream(sdk: openai.OpenAI, fakes: dict[str, Upstream],
                                                       gateway: str) -> None:
    up = fakes["fake-small"]
    stream = sdk.chat.completions.create(model="auto", messages=MSG, max_tokens=200, stream=True,
                                         extra_body={"fake": {"itl_ms": 50}})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while stats(up)["cancelled"] < 1:
        assert time.monotonic() < deadline, f"the worker never saw the request end early: {stats(up)}"
        time.sleep(0.1)
    assert stats(up)["completed"] == 0
    deadline = time.monotonic() + 10
    while sample_sum(f"{gateway}/metrics", "turnout_requests_total", status="client_disconnect") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert sample_sum(f"{gateway}/metrics", "turnout_in_flight_requests") == 0
    assert sample_sum(f"{gateway}/metrics", "turnout_upstream_errors_total", reason="client_disconnect") == 0, \
        "the client left, not the worker"


@pytest.mark.usefixtures("fake_reset")
def test_client_disconnect_while_waiting_for_first_token(gateway: str, fakes: dict[str, Upstream]) -> None:
    # The worker sends headers, then nothing for 30 s; the client gives up after 1 s.
    up = fakes["fake-small"]
    with pytest.raises(httpx.ReadTimeout), httpx.stream(
        "POST", f"{gateway}/v1/chat/completions", timeout=httpx.Timeout(30, read=1.0),
        json={"model": "auto", "messages": MSG, "stream": True, "fake": {"ttft_ms": 30000}},
    ) as r:
        for _ in r.iter_bytes():
            pass
    deadline = time.monotonic() + 10
    while stats(up)["cancelled"] < 1:
        assert time.monotonic() < deadline, f"the worker never saw the request end early: {stats(up)}"
        time.sleep(0.1)


@pytest.mark.usefixtures("fake_reset")
def test_client_disconnect_during_a_non_streaming_request(gateway: str, fakes: dict[str, Upstream]) -> None:
    # The worker takes 30 s; the client gives up after 1 s; the gateway must not wait the 30 s out.
    up = fakes["fake-small"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway}/v1/chat/completions", timeout=httpx.Timeout(30, read=1.0),
                   json={"model": "auto", "messages": MSG, "fake": {"latency_ms": 30000}})
    deadline = time.monotonic() + 10
    while stats(up)["cancelled"] < 1:
        assert time.monotonic() < deadline, f"the worker never saw the request end early: {stats(up)}"
        time.sleep(0.1)
    deadline = time.monotonic() + 10
    while sample_sum(f"{gateway}/metrics", "turnout_requests_total", status="client_disconnect") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert sample_sum(f"{gateway}/metrics", "turnout_upstream_errors_total", reason="client_disconnect") == 0


def readyz_in_flight(gateway: str) -> dict[str, int]:
    workers = httpx.get(f"{gateway}/readyz", timeout=5).json()["workers"]
    return {name: w["in_flight"] for name, w in workers.items()}


@pytest.mark.usefixtures("fake_reset")
def test_disconnect_before_the_worker_answers_leaves_no_request_in_flight(gateway: str) -> None:
    # The worker never answers, not even headers; the client gives up; nothing may stay counted.
    for stream in (True, False):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{gateway}/v1/chat/completions", timeout=httpx.Timeout(30, read=0.5),
                       json={"model": "small", "messages": MSG, "stream": stream, "fake": {"hang": True}})
    deadline = time.monotonic() + 10
    while readyz_in_flight(gateway) != {"small": 0, "big": 0}:
        assert time.monotonic() < deadline, readyz_in_flight(gateway)
        time.sleep(0.1)
    while sample_sum(f"{gateway}/metrics", "turnout_in_flight_requests") != 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.usefixtures("fake_reset")
def test_stream_overhead_excludes_the_time_spent_streaming(gateway: str, sdk: openai.OpenAI) -> None:
    before = sample_sum(f"{gateway}/metrics", "turnout_gateway_overhead_seconds_sum")
    t0 = time.perf_counter()
    list(sdk.chat.completions.create(model="auto", messages=MSG, max_tokens=10, stream=True,
                                     extra_body={"fake": {"itl_ms": 100}}))
    streamed_s = time.perf_counter() - t0
    overhead_s = sample_sum(f"{gateway}/metrics", "turnout_gateway_overhead_seconds_sum") - before
    # The stream took about a second; the gateway's own share of it is a small part of that.
    assert overhead_s < streamed_s / 4, (overhead_s, streamed_s)


def test_client_disconnect_during_the_upload_is_recorded_cleanly(gateway: str) -> None:
    host, port = gateway.removeprefix("http://").split(":")
    before = sample_sum(f"{gateway}/metrics", "turnout_requests_total", status="client_disconnect")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\": \"auto\", ")
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while sample_sum(f"{gateway}/metrics", "turnout_requests_total", status="client_disconnect") <= before:
        assert time.monotonic() < deadline
        time.sleep(0.1)
