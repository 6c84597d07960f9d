"""When a learned policy cannot embed the prompt (its embedder fails or is down), the policy's configured fallback
answers: a 200 for chat, streams and `/v1/route`, the reason in the decision, each request counted in
`turnout_embedding_failures_total`, and routing by prompt again as soon as the embedder is back."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from server.config import ConfigError, parse_config
from server.snapshot import build_table
from tests.conftest import Upstream, fake_config, gateway_in_process
from tests.routing_fixtures import TopicEmbedder, train_artifacts

MATH: list[Any] = [{"role": "user", "content": "hard math problem number 9999"}]
CHAT: list[Any] = [{"role": "user", "content": "friendly chat message 4242"}]


class SwitchableEmbedder(TopicEmbedder):
    """The topic embedder, failing while `down` is set (as a remote embedder does when its server is gone)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Rows, or the error a server that is down gives."""
        if self.down:
            raise ConnectionError("embedding server refused the connection")
        return super().embed(texts)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return train_artifacts(tmp_path_factory.mktemp("artifacts"))


def config(fakes: dict[str, Upstream], artifacts: dict[str, Path], fallback: str | None) -> dict[str, Any]:
    raw = fake_config(fakes)
    raw["policies"]["smart"] = {"type": "knn", "artifact": str(artifacts["knn"]), "lambda": 0.5}
    if fallback is not None:
        raw["policies"]["smart"]["fallback"] = fallback
    raw["default_policy"] = "smart"
    return raw


def failures(metrics: str, policy: str) -> float:
    line = next((x for x in metrics.splitlines()
                 if x.startswith(f'turnout_embedding_failures_total{{policy="{policy}"}}')), None)
    return 0.0 if line is None else float(line.split()[-1])


@pytest.mark.usefixtures("fake_reset")
async def test_the_fallback_answers_while_the_embedder_is_down(fakes: dict[str, Upstream],
                                                              artifacts: dict[str, Path]) -> None:
    emb = SwitchableEmbedder()
    async with gateway_in_process(config(fakes, artifacts, fallback="fake-small"), embedder=emb) as gw:
        ok = await gw.client.chat.completions.with_raw_response.create(model="auto", messages=MATH, max_tokens=3)
        assert ok.headers["x-turnout-model"] == "big", "with its embedder up, the policy sends math to big"
        emb.down = True
        raw = await gw.client.chat.completions.with_raw_response.create(model="auto", messages=CHAT, max_tokens=3)
        assert raw.status_code == 200 and raw.headers["x-turnout-model"] == "small"
        assert "embedding failed" in raw.headers["x-turnout-reason"] and "refused" in raw.headers["x-turnout-reason"]
        streamed = await gw.client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "hard math problem number 77"}], max_tokens=3,
            stream=True)
        assert streamed.headers["x-turnout-model"] == "small", "a new prompt while down goes to the fallback too"
        chunks = [c async for c in streamed.parse()]
        assert chunks
        route = await gw.http.post("/v1/route", json={"model": "auto", "messages": [
            {"role": "user", "content": "hard math problem number 78"}]})
        assert route.status_code == 200 and route.json()["model"] == "fake-small"
        assert "embedding failed" in route.json()["reason"]
        metrics = (await gw.http.get("/metrics")).text
        assert failures(metrics, "smart") == 2, "the chat and the stream (`/v1/route` decides, answers nothing)"
        emb.down = False
        back = await gw.client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "hard math problem number 79"}], max_tokens=3)
        assert back.headers["x-turnout-model"] == "big", "routing by prompt resumes when the embedder is back"
        assert failures((await gw.http.get("/metrics")).text, "smart") == 2


@pytest.mark.usefixtures("fake_reset")
async def test_without_a_fallback_the_first_available_candidate_answers(fakes: dict[str, Upstream],
                                                                       artifacts: dict[str, Path]) -> None:
    emb = SwitchableEmbedder()
    emb.down = True
    async with gateway_in_process(config(fakes, artifacts, fallback=None), embedder=emb) as gw:
        raw = await gw.client.chat.completions.with_raw_response.create(model="auto", messages=MATH, max_tokens=3)
        assert raw.status_code == 200 and "embedding failed" in raw.headers["x-turnout-reason"]
        assert raw.headers["x-turnout-model"] in ("small", "big")


def test_a_fallback_outside_the_candidates_is_refused(fakes: dict[str, Upstream], artifacts: dict[str, Path]) -> None:
    cfg = parse_config(config(fakes, artifacts, fallback="nowhere"))
    with pytest.raises(ConfigError) as err:
        build_table(cfg, None, TopicEmbedder.id)
    assert "policies.smart.fallback: 'nowhere' is not one of the policy's candidates" in str(err.value)
