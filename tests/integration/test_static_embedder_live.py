"""The static embedder end to end: `turnout train --embedder static`, a gateway configured with
`embedder.backend: static`, and `/v1/route` deciding every test prompt exactly as `turnout eval` does offline.

The distilled table is built from the packaged MiniLM on first use (about 20 s on 2 cores) and kept in
`$TURNOUT_CACHE/models`, like the table embeddings the other routing tests keep there.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from routers.artifacts import load_artifact
from routers.cost_aware import LAMBDA_GRID, choose
from routers.embedding.static import STATIC_ID
from routers.from_artifact import router_from_artifact
from routers.learned import UtilityRouter
from routers.offline.commands import load_and_embed, run_train
from routers.offline.report import EvalOptions, eval_rows
from server.config import ConfigError
from server.snapshot import check_config_file
from tests.conftest import Upstream, gateway_in_process
from tests.integration.test_live_vs_offline import CHEAP, STRONG, two_model_table

pytestmark = pytest.mark.timeout(600)
LAMBDA = float(LAMBDA_GRID[np.argmin(np.abs(LAMBDA_GRID - 0.05))])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The two-model table and a knn artifact trained on it by `turnout train --embedder static`'s code."""
    tmp = tmp_path_factory.mktemp("static")
    table = two_model_table(tmp)
    return table, run_train(table, "knn", tmp / "artifact", "static", Console(file=io.StringIO()))


async def test_static_embedder_routes_live_as_offline(fakes: dict[str, Upstream],
                                                      trained: tuple[Path, dict[str, Any]]) -> None:
    table, info = trained
    quiet = Console(file=io.StringIO())
    data, x, embedder = load_and_embed(table, "static", quiet)
    assert embedder.id == STATIC_ID
    art = load_artifact(Path(info["artifact"]), embedder_id=STATIC_ID, models=[CHEAP, STRONG])
    router = router_from_artifact("eval", art)
    assert isinstance(router, UtilityRouter)
    [(_, te)] = eval_rows(data, EvalOptions(routers=("knn",)))
    q, c = router.scores(x[te])
    offline = [data.models[j] for j in choose(q, c / router.cost_ref, LAMBDA)]
    assert len(set(offline)) == 2, "the lambda should split the prompts between the models"

    fake_of = {CHEAP: "small", STRONG: "big"}
    config = {
        "workers": [
            {"name": "small", "model": "fake-small", "base_url": fakes["fake-small"].base_url,
             "price": {"input_per_1m": 0.1, "output_per_1m": 0.1}},
            {"name": "big", "model": "fake-big", "base_url": fakes["fake-big"].base_url,
             "price": {"input_per_1m": 0.9, "output_per_1m": 0.9}},
        ],
        "policies": {"smart": {"type": "knn", "artifact": info["artifact"], "lambda": LAMBDA, "models": fake_of}},
        "default_policy": "smart",
        "embedder": {"backend": "static"},
    }
    async with gateway_in_process(config) as gw:
        live = []
        for i in te:
            resp = await gw.http.post("/v1/route", json={"model": "auto",
                                                         "messages": [{"role": "user", "content": data.prompts[i]}]})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["artifact"] == art.version
            live.append(body["model"])
    assert live == [fake_of[m] for m in offline]  # /v1/route names the chosen worker


def test_a_static_artifact_is_refused_by_a_minilm_gateway(trained: tuple[Path, dict[str, Any]],
                                                           tmp_path: Path) -> None:
    _, info = trained
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "workers:\n"
        "  - {name: small, model: s, base_url: 'http://127.0.0.1:9/v1', price: {input_per_1m: 1, output_per_1m: 1}}\n"
        f"policies:\n  smart: {{type: knn, artifact: '{info['artifact']}',"
        f" models: {{{CHEAP}: small, {STRONG}: small}}}}\n"
        "default_policy: smart\n"
        "embedder: {backend: onnx}\n"
    )
    with pytest.raises(ConfigError, match="embedder"):
        check_config_file(cfg)
