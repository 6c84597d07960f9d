"""Bounded work per request (hardening from an outside review, items 3 and 4): a huge prompt costs routing what a
long paragraph does, the embedding cache does not keep prompts, and every call that makes the gateway work counts
against the key's limits."""

from __future__ import annotations

import gc
import re
import threading
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from routers.embedding.cache import CachedEmbedder
from server.api import intake
from server.policy.embedding import EmbeddingService
from server.quota.keys import hash_key
from tests.api.test_live_routing import MATH, routed_config
from tests.conftest import Upstream, fake_config, gateway_in_process
from tests.routing_fixtures import TopicEmbedder, train_artifacts

KEY = "tk-bounded-work"
AUTH = {"authorization": f"Bearer {KEY}"}
MEGABYTE_PROMPT = "math " + "word " * 199_000  # 995,005 characters: under `server.max_message_chars`


class SeeingEmbedder(TopicEmbedder):
    """`TopicEmbedder` that keeps the length of every text it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.lengths: list[int] = []

    def embed(self, texts: Sequence[str]) -> Any:
        self.lengths += [len(t) for t in texts]
        return super().embed(texts)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return train_artifacts(tmp_path_factory.mktemp("artifacts"))


def keyed_config(fakes: dict[str, Upstream], artifacts: dict[str, Path], **limits: Any) -> dict[str, Any]:
    cfg = routed_config(fakes, artifacts)
    cfg["auth"] = {"enabled": True, "keys": [{"name": "k", "key_sha256": hash_key(KEY), **limits}]}
    return cfg


async def test_a_huge_prompt_is_cut_before_the_embedder_reads_it(fakes: dict[str, Upstream], fake_reset: None,
                                                                 artifacts: dict[str, Path]) -> None:
    """The embedder (whose tokenizer reads all it is given) sees `embedder.max_chars`; the policy's text
    statistics `POLICY_TEXT_CHARS`; the worker still gets the whole prompt."""
    seeing = SeeingEmbedder()
    big = [{"role": "user", "content": MEGABYTE_PROMPT}]
    async with gateway_in_process(routed_config(fakes, artifacts), embedder=seeing) as gw:
        explained = await gw.http.post("/v1/route", json={"model": "turnout/smart", "messages": big})
        assert explained.json()["model"] == "fake-big", "the cut keeps what the prompt is about"
        sent = await gw.http.post("/v1/chat/completions", json={"model": "turnout/smart", "messages": big,
                                                                "max_tokens": 2})
    assert seeing.lengths == [8192], "embedded once (the chat's was a cache hit), 8192 characters of it"
    # The fake worker's context (2048 tokens) is far too short for it: its refusal counts the whole prompt.
    asked = re.search(r"(\d+) in the messages", sent.json()["error"]["message"])
    assert sent.status_code == 400 and asked is not None and int(asked.group(1)) > 199_000, sent.text


async def test_the_embedding_cache_keeps_vectors_not_prompts() -> None:
    """Fifty distinct megabyte prompts cached: the cache holds a digest and a vector each (kilobytes), not the
    prompts (50 MB); a prompt and its first `max_chars` characters are one entry."""
    service = EmbeddingService(TopicEmbedder(), max_wait_ms=0, max_chars=200_000)
    cache = CachedEmbedder(TopicEmbedder(), maxsize=100)
    service.start()
    try:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for i in range(50):
            text = f"{i} " + "x" * 1_000_000
            cache.embed([text])
            await service.embed(text)
            del text
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        assert kept < 2_000_000, f"the caches kept {kept} bytes for 50 prompts"
        first = await service.embed("math " * 100_000)
        same = await service.embed(("math " * 100_000)[:200_000])
        assert same.cached and np.array_equal(first.vector, same.vector)
        assert len(cache) == 50 and f"7 {'x' * 1_000_000}" in cache
    finally:
        await service.stop()


@pytest.mark.parametrize("path", ["/v1/route", "/v1/feedback"])
async def test_explain_and_feedback_count_against_the_keys_requests(fakes: dict[str, Upstream], fake_reset: None,
                                                                    artifacts: dict[str, Path], path: str) -> None:
    """A key limited to 3 requests a minute gets 3 decisions explained (or 3 scores taken), then 429: an
    embedding costs the gateway the same whether the answer is run or only explained."""
    async with gateway_in_process(keyed_config(fakes, artifacts, requests_per_minute=3),
                                  embedder=TopicEmbedder()) as gw:
        if path == "/v1/route":
            body: dict[str, Any] = {"model": "turnout/smart", "messages": MATH}
        else:
            routed = await gw.http.post("/v1/chat/completions", headers=AUTH, json={
                "model": "turnout/learner", "messages": MATH, "max_tokens": 2})
            body = {"request_id": routed.headers["x-turnout-request-id"], "score": 1.0}
        got = [(await gw.http.post(path, headers=AUTH, json=body)).status_code for _ in range(4)]
    expected = [200, 200, 200, 429] if path == "/v1/route" else [200, 200, 429, 429]
    assert got == expected


async def test_parts_are_bounded_before_the_schema_reads_them(fakes: dict[str, Upstream], fake_reset: None) -> None:
    """140,000 text parts (3.7 MB) are refused for their count, before 140,000 parts are validated; so are more
    messages than `server.max_messages`, however malformed each is."""
    many = [{"type": "text", "text": "a"}] * 140_000
    async with gateway_in_process(fake_config(fakes)) as gw:
        parts = await gw.http.post("/v1/chat/completions", json={
            "model": "small", "messages": [{"role": "user", "content": many}], "max_tokens": 2})
        messages = await gw.http.post("/v1/chat/completions", json={
            "model": "small", "messages": [{"role": 7}] * 3000, "max_tokens": 2})
        system = await gw.http.post("/v1/messages", json={
            "model": "small", "system": many[:5000], "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}]})
    assert parts.status_code == 400 and "140000 content parts" in parts.json()["error"]["message"]
    assert messages.status_code == 400 and "3000 items" in messages.json()["error"]["message"]
    assert system.status_code == 400 and "5000 content parts" in system.json()["error"]["message"]


async def test_a_large_body_is_taken_in_off_the_event_loop(fakes: dict[str, Upstream], fake_reset: None,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A body past `INLINE_BYTES` is decoded and validated in a worker thread (the loop keeps serving); a small one
    on the loop, where a thread's hand-off would cost more than the work."""
    threads: list[str] = []
    taken = intake.take_in

    def spy(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return taken(*args)

    monkeypatch.setattr(intake, "take_in", spy)
    async with gateway_in_process(fake_config(fakes)) as gw:
        for text in ("short", "x" * (intake.INLINE_BYTES + 1)):
            r = await gw.http.post("/v1/chat/completions", json={
                "model": "small", "messages": [{"role": "user", "content": text}], "max_tokens": 2})
            assert r.status_code in (200, 400), r.text
    loop_thread = threading.main_thread().name
    assert threads[0] == loop_thread and threads[1] != loop_thread


async def test_a_list_of_bad_items_is_refused_at_its_first(fakes: dict[str, Upstream], fake_reset: None) -> None:
    """150,000 bad items: the messages refused for their count whatever they are; a Responses input, an embedding
    input and a prompt validated up to their first bad item (each bad item was validated and reported before:
    0.8 s of CPU for these 150,000)."""
    bad: list[Any] = [None] * 150_000
    async with gateway_in_process(fake_config(fakes)) as gw:
        chat = await gw.http.post("/v1/chat/completions", json={"model": "small", "messages": [1] * 150_000})
        answers = [await gw.http.post(path, json={"model": model, field: bad}) for path, model, field in (
            ("/v1/responses", "small", "input"), ("/v1/embeddings", "small", "input"),
            ("/v1/completions", "small", "prompt"))]
    assert chat.status_code == 400 and "150000 items" in chat.json()["error"]["message"]
    for r in answers:
        more = re.search(r"and (\d+) more problem", r.json()["error"]["message"])
        assert r.status_code == 400 and (more is None or int(more.group(1)) < 10), r.text[:300]
