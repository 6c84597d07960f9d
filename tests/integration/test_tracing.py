"""OpenTelemetry traces, received by a separate OTLP/HTTP receiver process (`testkit.otlp_receiver`), as a collector
would receive them: one trace per request, its span with the GenAI attributes and the gateway's own, children for
the embedding, the scoring and the call to the worker, whose `traceparent` the worker received; a request that
falls back shows both calls; tracing is off without the OTEL_* variables."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.telemetry import tracing
from tests.api.test_live_routing import MATH, routed_config
from tests.conftest import Upstream, fake_config, gateway_in_process
from tests.routing_fixtures import TopicEmbedder, train_artifacts

SERVER, CLIENT = 2, 3  # OTLP's span kinds


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return train_artifacts(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture
def traced(receiver: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The OTEL_* variables that turn tracing on, pointing at the receiver (emptied first)."""
    httpx.post(f"{receiver}/reset", timeout=5).raise_for_status()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "turnout-test")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    yield receiver
    tracing.stop_tracing()


def received(receiver: str, count: int) -> list[dict[str, Any]]:
    """The spans received, once there are at least `count` of them (or after 15 s)."""
    deadline = time.monotonic() + 15
    while True:
        spans: list[dict[str, Any]] = httpx.get(f"{receiver}/spans", timeout=5).json()
        if len(spans) >= count or time.monotonic() > deadline:
            return spans
        time.sleep(0.1)


async def test_one_trace_per_request_with_its_steps_as_children(
        fakes: dict[str, Upstream], fake_reset: None, artifacts: dict[str, Path], traced: str) -> None:
    async with gateway_in_process(routed_config(fakes, artifacts), embedder=TopicEmbedder()) as gw:
        raw = await gw.client.chat.completions.with_raw_response.create(model="auto", messages=MATH, max_tokens=3)
        stream = await gw.client.chat.completions.create(model="turnout/smart", messages=MATH, max_tokens=4,
                                                         stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    request_ids = [raw.headers["x-turnout-request-id"]]
    stats = (await asyncio.to_thread(httpx.get, f"{fakes['fake-big'].root}/fake/stats", timeout=5)).json()
    spans = received(traced, 2 * 4)
    roots = [s for s in spans if s["kind"] == SERVER]
    assert len(roots) == 2 and len({s["trace_id"] for s in roots}) == 2, "one trace per request"
    by_trace = {r["trace_id"]: [s for s in spans if s["trace_id"] == r["trace_id"]] for r in roots}
    for root, usage in zip(roots, (raw.parse().usage, chunks[-1].usage), strict=True):
        assert usage is not None
        a = root["attributes"]
        assert root["service"] == "turnout-test" and root["name"] == "chat" and root["parent_span_id"] == ""
        assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "vllm"
        assert a["gen_ai.request.model"] in ("auto", "turnout/smart") and a["gen_ai.response.model"] == "fake-big"
        assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (
            usage.prompt_tokens, usage.completion_tokens)
        assert a["turnout.policy"] == "smart" and a["turnout.worker"] == "big" and a["turnout.status"] == "ok"
        assert a["turnout.predicted_quality"] > 0.9 and a["turnout.predicted_cost_usd"] > 0
        assert a["turnout.reason"] and a["turnout.cost_usd"] > 0
        children = {s["name"]: s for s in by_trace[root["trace_id"]] if s is not root}
        assert set(children) == {"turnout.embed", "turnout.score", "chat fake-big"}, children
        assert all(c["parent_span_id"] == root["span_id"] for c in children.values())
        call = children["chat fake-big"]
        assert call["kind"] == CLIENT and call["attributes"]["turnout.worker"] == "big"
        assert call["attributes"]["http.response.status_code"] == 200
        # The worker was told: its request's parent is the gateway's call span.
        told = [t.rsplit("-", 1)[0] for t in stats["traceparents"] if t]  # without the flags
        assert f"00-{root['trace_id']}-{call['span_id']}" in told
        assert children["turnout.score"]["attributes"]["turnout.chosen"] == "fake-big"
    assert request_ids[0] in {r["attributes"]["turnout.request_id"] for r in roots}


async def test_a_fallback_shows_both_calls_and_a_client_traceparent_is_the_parent(
        fakes: dict[str, Upstream], fake_reset: None, traced: str) -> None:
    await asyncio.to_thread(httpx.post, f"{fakes['fake-small'].root}/fake/mode", json={"status": 500}, timeout=5)
    parent_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with gateway_in_process(fake_config(fakes, reliability={"retries": 0})) as gw:
        for i in range(4):  # `split` sends some to the failing worker, whose requests fall back
            r = await gw.http.post("/v1/chat/completions", json={
                "model": "turnout/split", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
                headers={"traceparent": f"00-{parent_trace}-{i + 1:016x}-01"})
            assert r.status_code == 200
    spans = received(traced, 4 + 4)
    roots = [s for s in spans if s["kind"] == SERVER]
    assert len(roots) == 4 and {r["trace_id"] for r in roots} == {parent_trace}, "the client's trace goes on"
    assert {r["parent_span_id"] for r in roots} == {f"{i + 1:016x}" for i in range(4)}
    fell = [r for r in roots if r["attributes"].get("turnout.fallback_from") == ["fake-small"]]
    assert fell, "some request fell back"
    for root in fell:
        calls = sorted((s for s in spans if s["kind"] == CLIENT and s["parent_span_id"] == root["span_id"]),
                       key=lambda c: c["start_ns"])
        assert [c["name"] for c in calls] == ["chat fake-small", "chat fake-big"]
        assert calls[0]["status"] == 2 and calls[0]["attributes"]["error.type"] == "upstream_error"
        assert calls[1]["status"] != 2 and root["attributes"]["turnout.worker"] == "big"


async def test_tracing_is_off_without_the_variables(fakes: dict[str, Upstream], fake_reset: None,
                                                    receiver: str) -> None:
    await asyncio.to_thread(httpx.post, f"{receiver}/reset", timeout=5)
    async with gateway_in_process(fake_config(fakes)) as gw:
        await gw.client.chat.completions.create(model="auto", messages=MATH, max_tokens=2)
        assert not tracing.tracing_on()
    stats = (await asyncio.to_thread(httpx.get, f"{fakes['fake-small'].root}/fake/stats", timeout=5)).json()
    assert stats["traceparents"] == [None]
