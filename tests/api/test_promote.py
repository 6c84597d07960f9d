"""From an artifact to traffic: `turnout promote` writes a checked config that runs the trained policy as the live
policy's shadow, which the gateway then serves (the shadow's choice in every answer's headers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from routers.artifacts import save_artifact
from routers.embedding.base import Embedder
from routers.embedding.cache import model_cache_dir
from routers.embedding.static import StaticEmbedder
from routers.offline.training import TrainOptions, train
from server.config import ConfigError, parse_config
from server.fleet.promote import policy_block, promoted_config
from tests.conftest import Upstream, fake_config, gateway_in_process
from tests.routing_fixtures import topic_table, train_artifacts


def default_artifact(out: Path, emb: Embedder) -> Path:
    """A cost_aware artifact trained on the topic table with the gateway's default embedder (`emb`)."""
    data = topic_table()
    trained = train("cost_aware", data, emb.embed(data.prompts), emb.id, TrainOptions(cv_folds=3, knn_k=(5, 20)))
    return save_artifact(trained.artifact, out)


@pytest.mark.usefixtures("fake_reset")
async def test_a_promoted_shadow_is_served(fakes: dict[str, Upstream], tmp_path: Path) -> None:
    emb = StaticEmbedder.from_minilm(model_cache_dir())  # the default, which the promoted config's check expects
    artifact = default_artifact(tmp_path / "cost_aware", emb)
    raw = fake_config(fakes)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw))
    block = policy_block(parse_config(raw), artifact, "smart", {}, lam=0.5)
    assert block == {"type": "cost_aware", "artifact": str(artifact), "lambda": 0.5}, "names the config serves"
    new = tmp_path / "gateway-shadow.yaml"
    new.write_text(promoted_config(path, block, "smart", shadow_of="cheap", make_default=False))
    cfg = yaml.safe_load(new.read_text())
    assert cfg["policies"]["cheap"]["shadow"] == "smart" and cfg["default_policy"] == "cheap"
    async with gateway_in_process(cfg, embedder=emb) as gw:
        raw_answer = await gw.client.chat.completions.with_raw_response.create(
            model="auto", max_tokens=2, messages=[{"role": "user", "content": "hard math problem number 3"}])
    assert raw_answer.headers["x-turnout-model"] == "small", "the live policy still serves"
    assert raw_answer.headers["x-turnout-shadow-model"] == "fake-big", "the shadow's choice, decided, not run"


def test_unmapped_models_and_bad_promotions_are_refused(fakes: dict[str, Upstream], tmp_path: Path) -> None:
    artifact = train_artifacts(tmp_path / "artifacts")["knn"]
    raw = fake_config(fakes)
    raw["workers"][1]["model"] = "other-big"  # the artifact's fake-big is served by no worker now
    with pytest.raises(ConfigError, match="fake-big is served by no worker"):
        policy_block(parse_config(raw), artifact, "smart", {})
    block = policy_block(parse_config(raw), artifact, "smart", {"fake-big": "big"})
    assert block["models"] == {"fake-big": "big"}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="has a policy of that name"):
        promoted_config(path, block, "cheap", shadow_of=None, make_default=False)
    with pytest.raises(ConfigError, match="no such policy"):
        promoted_config(path, block, "smart", shadow_of="nope", make_default=False)
    with pytest.raises(ConfigError):  # the artifact's embedder is not the config's: check-config refuses it
        promoted_config(path, block, "smart", shadow_of="cheap", make_default=True)
