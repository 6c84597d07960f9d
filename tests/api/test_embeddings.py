"""`POST /v1/embeddings` through the gateway, with a fake pooling worker: by model name only (no policy), through
the official `openai` SDK; cost = input tokens x the input price, charged to the key's budget exactly; the worker's
kind keeps chat away from embedding models and embeddings away from generation models (400), and a policy that
would route to an embedding model is refused at load."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from server.config import ConfigError, parse_config
from server.quota.keys import hash_key
from server.snapshot import build_table
from tests.conftest import InProcess, Upstream, fake_config, gateway_in_process, start_fake

PRICE = 2.0  # USD per 1M input tokens


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """A fake worker serving `fake-embed` (its /v1/embeddings answers like vLLM's pooling server)."""
    proc = start_fake("fake-embed", tmp_path_factory.mktemp("embed"))
    with proc:
        port = int(proc.cmd[proc.cmd.index("--port") + 1])
        yield Upstream("fake-embed", f"http://127.0.0.1:{port}/v1", proc)


def config(fakes: dict[str, Upstream], embedder: Upstream, **overrides: Any) -> dict[str, Any]:
    raw = fake_config(fakes, **overrides)
    raw["workers"].append({"name": "embed", "model": "fake-embed", "base_url": embedder.base_url, "kind": "pooling",
                           "price": {"input_per_1m": PRICE, "output_per_1m": 0.0}})
    return raw


def counted(metrics: str, name: str, model: str) -> float:
    line = next((x for x in metrics.splitlines() if x.startswith(f"{name}{{") and f'model="{model}"' in x), None)
    return 0.0 if line is None else float(line.split()[-1])


async def test_embeddings_by_model_name_are_priced_and_counted(fakes: dict[str, Upstream],
                                                              embedder: Upstream) -> None:
    async with gateway_in_process(config(fakes, embedder)) as gw:
        raw = await gw.client.embeddings.with_raw_response.create(model="fake-embed", input=["hello world", "two"])
        got = raw.parse()
        assert [len(d.embedding) for d in got.data] == [8, 8] and [d.index for d in got.data] == [0, 1]
        assert got.usage.prompt_tokens == 5 and raw.headers["x-turnout-model"] == "embed"
        one = await gw.client.embeddings.create(model="embed", input="by worker name")  # the worker's own name
        assert len(one.data) == 1
        metrics = (await gw.http.get("/metrics")).text
    assert counted(metrics, "turnout_prompt_tokens_total", "fake-embed") == 5 + 4
    assert counted(metrics, "turnout_cost_usd_total", "fake-embed") == pytest.approx(9 * PRICE / 1e6, rel=1e-9)


async def test_kinds_keep_chat_and_embeddings_apart(fakes: dict[str, Upstream], embedder: Upstream) -> None:
    async with gateway_in_process(config(fakes, embedder)) as gw:
        with pytest.raises(openai.BadRequestError, match="embedding model"):
            await gw.client.chat.completions.create(model="fake-embed", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.BadRequestError, match="generation workers"):
            await gw.client.embeddings.create(model="fake-small", input="x")
        with pytest.raises(openai.BadRequestError, match="not routed by a policy"):
            await gw.client.embeddings.create(model="auto", input="x")
        for bad, field in (({"model": "fake-embed"}, "input"), ({"model": "fake-embed", "input": []}, "input"),
                           ({"model": "fake-embed", "input": "x", "stream": True}, "stream")):
            r = await gw.http.post("/v1/embeddings", json=bad)
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    with pytest.raises(ConfigError, match="served by embedding workers"):
        build_table(parse_config(config(fakes, embedder, policies={"p": {"type": "fixed", "worker": "embed"}},
                                        default_policy="p")), None, None)
    mixed = config(fakes, embedder)
    mixed["workers"].append({**mixed["workers"][0], "name": "small-pool", "kind": "pooling"})
    with pytest.raises(ConfigError, match="replicas of model 'fake-small' are of different kinds"):
        parse_config(mixed)


async def test_a_key_pays_exactly_the_input_tokens(fakes: dict[str, Upstream], embedder: Upstream) -> None:
    cfg = config(fakes, embedder, auth={"enabled": True, "keys": [
        {"name": "team", "key_sha256": hash_key("tk-team"), "budget_usd": 1.0}]})
    async with gateway_in_process(cfg) as gw:
        team = gw.client.with_options(api_key="tk-team")
        got = await team.embeddings.create(model="fake-embed", input=["a b c", "d"])
        assert got.usage.prompt_tokens == 6
        state = await spent(gw)
    assert state.spent == pytest.approx(6 * PRICE / 1e6, rel=1e-9) and state.held == pytest.approx(0, abs=1e-15)


async def spent(gw: InProcess) -> Any:
    store = gw.app.state.gateway.store
    (key,) = [k for k in store._data if k.startswith("turnout:budget:team:")]
    deadline = asyncio.get_running_loop().time() + 10
    while (state := await store.budget(key)).spent == 0:  # settled once the response is out
        assert asyncio.get_running_loop().time() < deadline, "never settled"
        await asyncio.sleep(0.02)
    return state


async def test_a_failing_pooling_worker_answers_in_openai_shape(fakes: dict[str, Upstream],
                                                                embedder: Upstream) -> None:
    async with httpx.AsyncClient(base_url=embedder.root, timeout=5) as fake:
        (await fake.post("/fake/mode", json={"status": 500})).raise_for_status()
        try:
            async with gateway_in_process(config(fakes, embedder)) as gw:
                r = await gw.http.post("/v1/embeddings", json={"model": "fake-embed", "input": "x"})
        finally:
            (await fake.post("/fake/mode", json={})).raise_for_status()
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"


async def test_rerank_and_score_by_model_name(fakes: dict[str, Upstream], embedder: Upstream) -> None:
    """vLLM's `/v1/rerank` and `/v1/score` relayed like embeddings: by model, priced by input tokens, counted."""
    async with gateway_in_process(config(fakes, embedder)) as gw:
        rr = await gw.http.post("/v1/rerank", json={"model": "fake-embed", "query": "capital of France",
                                                    "documents": ["Paris is the capital", "a recipe", "Lyon"],
                                                    "top_n": 2})
        sc = await gw.http.post("/v1/score", json={"model": "embed", "text_1": "a cat", "text_2": ["a dog", "a car"]})
        bad = [await gw.http.post(path, json=body) for path, body in (
            ("/v1/rerank", {"model": "fake-embed", "documents": ["x"]}),
            ("/v1/score", {"model": "fake-embed", "text_1": "x"}),
            ("/v1/score", {"model": "auto", "text_1": "x", "text_2": "y"}),
            ("/v1/rerank", {"model": "fake-small", "query": "q", "documents": ["x"]}))]
        metrics = (await gw.http.get("/metrics")).text
    assert rr.status_code == 200 and len(rr.json()["results"]) == 2 and rr.headers["x-turnout-model"] == "embed"
    assert sc.status_code == 200 and [d["index"] for d in sc.json()["data"]] == [0, 1]
    tokens = rr.json()["usage"]["prompt_tokens"] + sc.json()["usage"]["prompt_tokens"]
    assert counted(metrics, "turnout_prompt_tokens_total", "fake-embed") == tokens
    assert counted(metrics, "turnout_cost_usd_total", "fake-embed") == pytest.approx(tokens * PRICE / 1e6, rel=1e-9)
    assert [r.status_code for r in bad] == [400, 400, 400, 400]
    assert bad[0].json()["error"]["param"] == "query" and "give one pair" in bad[1].json()["error"]["message"]
    assert "not routed by a policy" in bad[2].json()["error"]["message"]
    assert "generation workers" in bad[3].json()["error"]["message"]
