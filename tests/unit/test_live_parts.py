"""The gateway's routing parts on their own: embedding micro-batches and cache, vLLM load parsing,
session affinity and the feedback book."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from routers.base import RoutingDecision, RoutingOutcome, RoutingRequest
from server.config import TurnoutConfig, parse_config
from server.policy.affinity import AffinityStore
from server.policy.embedding import EmbeddingService
from server.policy.feedback import FeedbackBook
from server.store.guard import StoreGuard
from server.store.memory import MemoryStore
from server.telemetry.metrics import Metrics
from server.upstream.load import LoadMonitor, parse_vllm_load
from server.upstream.workers import WorkerRegistry
from tests.routing_fixtures import TopicEmbedder


class SlowEmbedder(TopicEmbedder):
    """Takes a while per call, like a real model, so concurrent requests pile up behind one batch."""

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        import time

        time.sleep(0.02)
        return super().embed(texts)


async def test_concurrent_misses_share_batches_and_repeats_hit_the_cache() -> None:
    emb = SlowEmbedder()
    svc = EmbeddingService(emb, cache_size=100, max_batch=8, max_wait_ms=5)
    svc.start()
    try:
        texts = [f"prompt {i}" for i in range(20)]
        got = await asyncio.gather(*(svc.embed(t) for t in texts))
        assert len(emb.calls) < 20 and max(emb.calls) <= 8 and sum(emb.calls) == 20
        assert not any(g.cached for g in got)
        for g, row in zip(got, TopicEmbedder().embed(texts), strict=True):
            assert np.allclose(g.vector, row)
        again = await svc.embed("prompt 3")
        assert again.cached and np.allclose(again.vector, got[3].vector)
        # The same text asked for twice at once is embedded once.
        calls = sum(emb.calls)
        twins = await asyncio.gather(svc.embed("twin"), svc.embed("twin"))
        assert sum(emb.calls) == calls + 1 and np.allclose(twins[0].vector, twins[1].vector)
    finally:
        await svc.stop()


class BrokenEmbedder(TopicEmbedder):
    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        if any("boom" in t for t in texts):
            raise RuntimeError("model failed")
        return super().embed(texts)


async def test_short_texts_are_embedded_inline_and_long_ones_batched() -> None:
    emb = SlowEmbedder()
    svc = EmbeddingService(emb, cache_size=100, max_wait_ms=0, inline_chars=10)
    svc.start()
    try:
        short = await svc.embed("short")
        assert svc.batches == 0 and emb.calls == [1], "embedded on the loop, not by the batching thread"
        assert np.allclose(short.vector, TopicEmbedder().embed(["short"])[0])
        assert (await svc.embed("short")).cached
        long = await svc.embed("a text longer than ten characters")
        assert svc.batches == 1 and not long.cached
    finally:
        await svc.stop()


async def test_a_failing_batch_fails_its_waiters_and_the_service_goes_on() -> None:
    svc = EmbeddingService(BrokenEmbedder(), max_wait_ms=0)
    svc.start()
    try:
        with pytest.raises(RuntimeError, match="model failed"):
            await svc.embed("boom")
        assert not (await svc.embed("fine")).cached
    finally:
        await svc.stop()
    with pytest.raises(RuntimeError, match="not running"):
        await EmbeddingService(TopicEmbedder()).embed("x")


def test_parse_vllm_load() -> None:
    text = "\n".join([
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
        "# TYPE vllm:num_requests_waiting gauge",
        'vllm:num_requests_waiting{engine="0",model_name="m"} 5.0',
        'vllm:num_requests_waiting{engine="1",model_name="m"} 2.0',
        "# TYPE vllm:gpu_cache_usage_perc gauge",
        'vllm:gpu_cache_usage_perc{model_name="m"} 0.5',
        "",
    ])
    assert parse_vllm_load(text) == (3.0, 7.0, 0.5)
    assert parse_vllm_load("# TYPE other gauge\nother 1\n") == (None, None, None)
    assert parse_vllm_load("this is { not prometheus") == (None, None, None)  # then "no vllm queue gauges"
    with pytest.raises(ValueError):
        parse_vllm_load('vllm:num_requests_running{engine="0" 3.0')
    # Only the gauges' lines are parsed, but all of them, wherever they are among vLLM's histograms.
    noise = "\n".join([*(f'vllm:e2e_request_latency_seconds_bucket{{le="{i}"}} {i}' for i in range(500)),
                       "vllm:a_metric_the_parser_cannot_read{ 1",  # never reaches the parser
                       'vllm:num_requests_waiting_by_reason{reason="kv"} 9.0',  # a gauge's name as a prefix
                       '  vllm:num_requests_running{engine="1"} 1.0'])  # indented: read, as the parser would
    assert parse_vllm_load(noise + "\n" + text + noise) == (5.0, 7.0, 0.5)


async def test_affinity_store_expires_and_refreshes() -> None:
    now = [0.0]
    store = AffinityStore(StoreGuard(MemoryStore(clock=lambda: now[0]), "fail_open", Metrics()))
    await store.put("p", "s1", "big", ttl_s=10)
    await store.put("p", "s2", "small", ttl_s=10)
    now[0] = 8.0
    assert await store.get("p", "s1", ttl_s=10) == "big"  # used at 8 s: kept until 18 s
    assert await store.get("other", "s1", ttl_s=10) is None  # per policy
    now[0] = 12.0
    assert await store.get("p", "s2", ttl_s=10) is None, "unused for longer than its ttl"
    assert await store.get("p", "s1", ttl_s=10) == "big"
    now[0] = 23.0
    assert await store.get("p", "s1", ttl_s=10) is None


class Recording:
    name = "rec"
    needs_embedding = False
    version = "static"

    def __init__(self) -> None:
        self.seen: list[RoutingOutcome] = []

    def route(self, req: RoutingRequest) -> RoutingDecision:  # pragma: no cover - not used here
        raise NotImplementedError

    def observe(self, outcome: RoutingOutcome) -> None:
        self.seen.append(outcome)

    def targets(self) -> list[str]:
        return ["a"]


async def test_feedback_book() -> None:
    now = [0.0]
    store = MemoryStore(clock=lambda: now[0], max_entries=4)
    book = FeedbackBook(StoreGuard(store, "fail_open", Metrics()), ttl_s=60)
    rec = Recording()
    rec.version = "v1"
    routers: dict[str, Any] = {"rec": rec}
    await book.record("r1", rec, "rec", "v1", "a")
    assert await book.give("r1", 0.7, routers) == ("accepted", "rec")
    # A score carries no cost: the policy heard the cost when the request ended, and a pacing policy would
    # otherwise count the spend twice.
    assert rec.seen[0].quality == 0.7 and rec.seen[0].cost_usd is None
    assert await book.give("r1", 0.1, routers) == ("duplicate", "rec") and len(rec.seen) == 1
    assert await book.give("nope", 0.5, routers) == ("unknown", None)
    await book.record("r2", rec, "rec", "v1", "a")
    await book.record("r3", rec, "rec", "v1", "a")
    await book.record("r4", rec, "rec", "v1", "a")  # r1 and its claim are pushed out of the 4 kept
    assert await book.give("r1", 0.5, routers) == ("unknown", None)
    # Feedback for an artifact version no longer served is accepted but teaches nothing.
    await book.record("old", rec, "rec", "v0", "a")
    assert await book.give("old", 0.5, routers) == ("accepted", "rec") and len(rec.seen) == 1
    now[0] = 61.0
    assert await book.give("r3", 0.5, routers) == ("unknown", None)
    # A score that arrives before its record (written off the request's path, maybe by another replica) waits
    # for it a moment; an id never recorded is unknown once that moment has passed.
    late = asyncio.get_running_loop().call_later(0.1, lambda: asyncio.ensure_future(
        book.record("r5", rec, "rec", "v1", "a")))
    assert await book.give("r5", 0.5, routers) == ("accepted", "rec")
    late.cancel()
    t0 = asyncio.get_running_loop().time()
    assert await book.give("never", 0.5, routers) == ("unknown", None)
    assert asyncio.get_running_loop().time() - t0 >= book.grace_s


def two_servers() -> TurnoutConfig:
    """Three workers on two servers: a (m1) and b (m2) are one vLLM (one metrics URL), c (m1) another."""
    return parse_config({
        "workers": [{"name": "a", "model": "m1", "base_url": "http://one:8000/v1"},
                    {"name": "b", "model": "m2", "base_url": "http://one:8000/v1"},
                    {"name": "c", "model": "m1", "base_url": "http://two:8000/v1"}],
        "policies": {"p": {"type": "fixed", "worker": "a"}}, "default_policy": "p"})


async def test_load_is_read_once_per_server_and_shared_by_its_workers() -> None:
    cfg = two_servers()
    hits: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hits.append(str(request.url))
        waiting = 4.0 if request.url.host == "one" else 1.0
        return httpx.Response(200, text=f"vllm:num_requests_running 2.0\nvllm:num_requests_waiting {waiting}\n")

    registry = WorkerRegistry(cfg)
    monitor = LoadMonitor(registry, 1.0, 1.0, client=httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    await monitor.visit_all()
    assert sorted(hits) == ["http://one:8000/metrics", "http://two:8000/metrics"]
    w = registry.workers
    assert (w["a"].waiting, w["b"].waiting, w["c"].waiting) == (4.0, 4.0, 1.0)
    assert w["a"].load_at == w["b"].load_at is not None and w["a"].load_error is None
    await monitor.stop()


async def test_load_swaps_our_share_of_a_reading_for_our_count_now() -> None:
    # Two model names on one server. The reading saw 5 running + 2 waiting, 3 of them ours (2 at a, 1 at b).
    cfg = two_servers()

    def handler(request: httpx.Request) -> httpx.Response:
        running = 5.0 if request.url.host == "one" else 1.0
        return httpx.Response(200, text=f"vllm:num_requests_running {running}\nvllm:num_requests_waiting 2\n")

    registry = WorkerRegistry(cfg)
    w = registry.workers
    w["a"].in_flight, w["b"].in_flight, w["c"].in_flight = 2, 1, 3
    monitor = LoadMonitor(registry, 1.0, 1.0, client=httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    await monitor.visit_all()
    await monitor.stop()
    assert (w["a"].load(), w["b"].load(), w["c"].load()) == (7.0, 7.0, 3.0)
    # Ours finish before the next reading: only the others' 4 stay on server one, and server two is idle
    # (its reading had fewer than we had in flight: nothing is left for others, never less than nothing).
    w["a"].in_flight = w["b"].in_flight = w["c"].in_flight = 0
    assert (w["a"].load(), w["b"].load(), w["c"].load()) == (4.0, 4.0, 0.0)
    assert registry.pick("m1") is w["c"]
    # A request just sent counts before any reading shows it; a stale reading counts only ours.
    w["c"].in_flight = 1
    assert w["c"].load() == 1.0
    assert w["a"].load_at is not None
    w["a"].load_at -= 11.0
    w["a"].in_flight, w["b"].in_flight = 2, 1
    assert w["a"].load() == 3.0  # a's and b's (they share a server), nothing from the stale report
