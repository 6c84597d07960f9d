"""The remote embedder (`embedder.backend: openai`) against scripted answers: vectors in input order and
normalised, what it sends, and every way a server can fail it (each an `EmbedderUnavailable`, then a quiet spell
before it asks again). The real server is tested in tests/integration/test_remote_embedder.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from routers.embedding.factory import embedder_id, make_embedder
from routers.embedding.remote import EmbedderUnavailable, RemoteEmbedder
from server.config import ConfigError, parse_config

Handler = Callable[[httpx.Request], httpx.Response]


def answer(vectors: list[list[float]], order: list[int] | None = None) -> httpx.Response:
    idx = order if order is not None else list(range(len(vectors)))
    data = [{"index": i, "object": "embedding", "embedding": vectors[i]} for i in idx]
    return httpx.Response(200, json={"object": "list", "data": data, "model": "m"})


def embedder(handler: Handler, **kw: Any) -> RemoteEmbedder:
    return RemoteEmbedder("http://embed.test/v1", "m", 2, transport=httpx.MockTransport(handler), **kw)


def test_vectors_come_back_in_input_order_and_normalised() -> None:
    seen: list[dict[str, Any]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(json.loads(req.content))
        assert req.url.path == "/v1/embeddings" and req.headers["authorization"] == "Bearer sk-test"
        return answer([[3.0, 4.0], [0.0, 2.0]], order=[1, 0])

    emb = embedder(handler, api_key="sk-test", max_chars=5, truncate_prompt_tokens=64)
    rows = emb.embed(["first text", "second"])
    assert np.allclose(rows, [[0.6, 0.8], [0.0, 1.0]])
    assert seen == [{"model": "m", "input": ["first", "secon"], "encoding_format": "float",
                     "truncate_prompt_tokens": 64}]
    assert emb.id == "openai:m" == embedder_id("openai:m@http://embed.test/v1")


@pytest.mark.parametrize(("response", "message"), [
    (httpx.Response(503, text="overloaded"), "HTTP 503: overloaded"),
    (httpx.Response(200, text="not json"), "not 2 embeddings"),
    (httpx.Response(200, json={"data": [{"index": 0, "embedding": [1.0, 0.0]}]}), "not 2 embeddings"),
    (httpx.Response(200, json={"data": [{"index": i, "embedding": [1.0, 0.0, 0.0]} for i in (0, 1)]}),
     "vectors of 3 dimensions, expected 2"),
    (httpx.Response(200, text='{"data": [{"index": 0, "embedding": [NaN, 0]}, {"index": 1, "embedding": [1, 0]}]}'),
     "not 2 finite embeddings"),
])
def test_a_bad_answer_is_unavailable_and_says_why(response: httpx.Response, message: str) -> None:
    emb = embedder(lambda req: response)
    with pytest.raises(EmbedderUnavailable, match=message):
        emb.embed(["a", "b"])


def test_after_a_failure_it_fails_fast_then_asks_again() -> None:
    calls: list[int] = []
    state = {"down": True}

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(1)
        if state["down"]:
            raise httpx.ConnectError("connection refused")
        return answer([[1.0, 0.0]])

    emb = embedder(handler, retry_after_s=0.2)
    with pytest.raises(EmbedderUnavailable, match="ConnectError"):
        emb.embed(["a"])
    state["down"] = False
    with pytest.raises(EmbedderUnavailable, match=r"not retried for 0\.2 s"):
        emb.embed(["a"])
    assert len(calls) == 1, "no call while the server is known to be down"
    emb._down_until = 0.0  # the quiet spell is over (no sleeping in tests)
    assert emb.embed(["a"]).shape == (1, 2) and len(calls) == 2


def test_a_timeout_is_unavailable() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=req)

    with pytest.raises(EmbedderUnavailable, match="no answer within"):
        embedder(handler, timeout_s=0.5).embed(["a"])


def test_no_texts_make_no_call() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise AssertionError("called")

    assert embedder(handler).embed([]).shape == (0, 2)


def test_a_spec_names_model_and_url() -> None:
    with pytest.raises(ValueError, match="openai:<model>@<base url>"):
        make_embedder("openai:no-url")
    with pytest.raises(ValueError, match="openai:<model>@<base url>"):
        embedder_id("openai:@http://x/v1")


def test_the_config_needs_url_model_and_dimensions() -> None:
    base = {"workers": [{"name": "w", "model": "m", "base_url": "http://127.0.0.1:9/v1"}]}
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "embedder": {"backend": "openai", "model": "e"}})
    assert "backend 'openai' needs url, dimensions" in str(err.value)
    cfg = parse_config({**base, "embedder": {"backend": "openai", "model": "e", "url": "http://127.0.0.1:8001/v1",
                                            "dimensions": 640}})
    assert cfg.embedder.spec() == "openai:e@http://127.0.0.1:8001/v1"
