"""A real vLLM CPU server in pooling mode (Gemma 3 270M's mean-pooled hidden states as embeddings): first as a
worker of kind `pooling` behind `POST /v1/embeddings`; then as the remote embedder (`embedder.backend: openai`):
`turnout train` through it, a gateway whose `/v1/route` decides every test
prompt as the artifact does offline on the same server's vectors, and, with the server killed, every request
answered by the policy's fallback and counted, never a 500."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from routers.artifacts import load_artifact
from routers.cost_aware import choose
from routers.embedding.remote import RemoteEmbedder
from routers.from_artifact import router_from_artifact
from routers.learned import UtilityRouter
from routers.offline.commands import load_and_embed, run_train
from routers.offline.report import EvalOptions, eval_rows
from testkit.engines import has_avx2, vllm_process, vllm_ready
from testkit.procs import ManagedProcess, free_port
from tests.conftest import Upstream, gateway_in_process
from tests.integration.test_live_vs_offline import CHEAP, LAMBDA, STRONG, two_model_table

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]
SERVED = "gemma-embed"
POOLING = ("--runner", "pooling", "--convert", "embed", "--pooler-config", '{"pooling_type": "MEAN"}')
TRAIN_ROWS, TEST_ROWS = 400, 60  # a slice of the two-model table: each prompt is a forward pass on one core


@pytest.fixture(scope="module")
def pooling(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ManagedProcess, str]]:
    """A vLLM CPU server serving Gemma 3 270M as an embedding model (base URL ending in /v1)."""
    if not has_avx2():
        pytest.skip("the vLLM CPU build needs AVX2, which this CPU lacks")
    if not vllm_ready():
        pytest.fail("the vLLM worker is not set up: run `make vllm` (make test does it first)")
    port = free_port()
    cores = sorted(os.sched_getaffinity(0))
    proc = vllm_process(port, tmp_path_factory.mktemp("pooling") / "vllm.log", name=SERVED, cores=str(cores[-1]),
                        args=POOLING)
    with proc:
        yield proc, f"http://127.0.0.1:{port}/v1"


def small_table(tmp: Path) -> Path:
    """The two-model table cut to a seeded slice of its train and test rows."""
    df = pd.read_parquet(two_model_table(tmp))
    train = df[df.split == "train"].sample(TRAIN_ROWS, random_state=3)
    test = df[(df.split == "test") & ~df.prompt.isin(train.prompt)].sample(TEST_ROWS, random_state=3)
    pd.concat([train, test]).to_parquet(tmp / "small.parquet")
    return tmp / "small.parquet"


def config(fakes: dict[str, Upstream], artifact: str, url: str, dim: int) -> dict[str, Any]:
    return {
        "workers": [
            {"name": "small", "model": "fake-small", "base_url": fakes["fake-small"].base_url,
             "price": {"input_per_1m": 0.1, "output_per_1m": 0.1}},
            {"name": "big", "model": "fake-big", "base_url": fakes["fake-big"].base_url,
             "price": {"input_per_1m": 0.9, "output_per_1m": 0.9}},
        ],
        "policies": {"smart": {"type": "knn", "artifact": artifact, "lambda": LAMBDA, "fallback": "big",
                               "models": {CHEAP: "small", STRONG: "big"}}},
        "default_policy": "smart",
        "embedder": {"backend": "openai", "url": url, "model": SERVED, "dimensions": dim, "timeout_s": 5.0,
                     "truncate_prompt_tokens": 512},
    }


async def test_embeddings_through_the_gateway_from_the_pooling_worker(pooling: tuple[ManagedProcess, str]) -> None:
    """`POST /v1/embeddings`, `/v1/rerank` and `/v1/score` relayed to the same server as a worker of kind `pooling`
    (before the next test kills it): the vectors, scores and token counts are the worker's own, and the cost is
    the input tokens x the price."""
    _, url = pooling
    texts = ["The quick brown fox.", "Combien de protéines par jour ?"]
    calls: list[tuple[str, dict[str, Any]]] = [
        ("/embeddings", {"model": SERVED, "input": texts}),
        ("/rerank", {"model": SERVED, "query": "capital of France", "documents": ["Paris is the capital", "a recipe"]}),
        ("/score", {"model": SERVED, "text_1": "a cat", "text_2": ["a dog", "a car"]})]
    async with httpx.AsyncClient(timeout=60) as worker:
        direct = [(await worker.post(f"{url}{path}", json=body)).json() for path, body in calls]
    cfg = {"workers": [{"name": "embed", "model": SERVED, "base_url": url, "kind": "pooling",
                        "price": {"input_per_1m": 0.02, "output_per_1m": 0.0}}]}
    async with gateway_in_process(cfg) as gw:
        got = await gw.client.embeddings.create(model=SERVED, input=texts)
        via = [(await gw.http.post(f"/v1{path}", json=body)).json() for path, body in calls[1:]]
        metrics = (await gw.http.get("/metrics")).text
    assert got.usage.prompt_tokens == direct[0]["usage"]["prompt_tokens"] > 0
    for mine, theirs in zip(got.data, direct[0]["data"], strict=True):
        assert len(mine.embedding) == 640 and np.allclose(mine.embedding, theirs["embedding"], atol=1e-6)
    assert [r["relevance_score"] for r in via[0]["results"]] == pytest.approx(
        [r["relevance_score"] for r in direct[1]["results"]], abs=1e-6)
    assert [d["score"] for d in via[1]["data"]] == pytest.approx([d["score"] for d in direct[2]["data"]], abs=1e-6)
    tokens = sum(d["usage"]["prompt_tokens"] for d in direct)
    assert [v["usage"]["prompt_tokens"] for v in via] == [d["usage"]["prompt_tokens"] for d in direct[1:]]
    cost = next(float(x.split()[-1]) for x in metrics.splitlines() if x.startswith("turnout_cost_usd_total{"))
    assert cost == pytest.approx(tokens * 0.02 / 1e6, rel=1e-9)


async def test_live_routing_through_a_pooling_worker_and_its_failure(
        pooling: tuple[ManagedProcess, str], fakes: dict[str, Upstream], tmp_path: Path) -> None:
    proc, url = pooling
    quiet = Console(file=io.StringIO())
    spec = f"openai:{SERVED}@{url}"
    table = small_table(tmp_path)
    info = run_train(table, "knn", tmp_path / "artifact", spec, quiet)
    data, _, trained_with = load_and_embed(table, spec, quiet)
    assert trained_with.id == f"openai:{SERVED}" and trained_with.dim == 640
    art = load_artifact(Path(info["artifact"]), embedder_id=trained_with.id, models=[CHEAP, STRONG])
    router = router_from_artifact("offline", art)
    assert isinstance(router, UtilityRouter)
    [(_, te)] = eval_rows(data, EvalOptions(routers=("knn",)))
    prompts = [data.prompts[i] for i in te]
    # Offline: each prompt embedded alone, as the gateway embeds a lone request (a batch's padding may move
    # bfloat16 results in the last bits).
    remote = RemoteEmbedder(url, SERVED, 640, timeout_s=30.0, truncate_prompt_tokens=512)
    try:
        x = np.vstack([remote.embed([p]) for p in prompts])
    finally:
        remote.close()
    q, c = router.scores(x)
    offline = [{CHEAP: "small", STRONG: "big"}[data.models[j]] for j in choose(q, c / router.cost_ref, LAMBDA)]
    assert len(set(offline)) == 2, "the lambda should split the test prompts between the models"

    async with gateway_in_process(config(fakes, info["artifact"], url, 640)) as gw:
        live = []
        for p in prompts:
            resp = await gw.http.post("/v1/route", json={"model": "auto", "messages": [{"role": "user", "content": p}]})
            assert resp.status_code == 200, resp.text
            assert resp.json()["artifact"] == art.version
            live.append(resp.json()["model"])
        assert live == offline
        ok = await gw.client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": prompts[0]}], max_tokens=3)
        assert ok.headers["x-turnout-model"] == offline[0]

        proc.kill()  # the pooling worker is gone: the fallback answers, counted, never a 500
        for i in range(3):
            raw = await gw.client.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": f"a prompt never seen before {i}"}], max_tokens=3)
            assert raw.status_code == 200 and raw.headers["x-turnout-model"] == "big"
            assert "embedding failed" in raw.headers["x-turnout-reason"]
        metrics = (await gw.http.get("/metrics")).text
        assert 'turnout_embedding_failures_total{policy="smart"} 3.0' in metrics
        cached = await gw.client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": prompts[0]}], max_tokens=3)
        assert cached.headers["x-turnout-model"] == offline[0], "a prompt in the cache still routes by its vector"
