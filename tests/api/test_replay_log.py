"""Logged traffic as a source: `turnout replay` decides the gateway's served requests with a candidate policy
(no model called) and compares; `turnout collect` takes the same log's prompts, deduplicated."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from routers.offline.dataset import load_table
from server.config import parse_config
from server.fleet.feedback_table import feedback_table
from server.fleet.replay import replay
from server.fleet.sources import SourceError, read_source
from tests.conftest import Upstream, fake_config, gateway_in_process
from tests.routing_fixtures import TopicEmbedder, train_artifacts

PROMPTS = [f"hard math problem number {i}" if i % 2 else f"friendly chat message {i}" for i in range(1, 11)]


async def served_log(fakes: dict[str, Upstream], caplog: pytest.LogCaptureFixture, path: Path) -> Path:
    """Ten requests served by the `cheap` policy (always the small model), logged with their prompts, and a
    feedback score for the first four (math prompts scored 0, chat prompts 1); two more scored requests go to
    the big model (a routed request: feedback is for requests a policy decided)."""
    caplog.set_level(logging.INFO, logger="turnout.requests")
    cfg = fake_config(fakes)
    cfg["server"]["log_prompts"] = True
    async with gateway_in_process(cfg) as gw:
        for n, text in enumerate([*PROMPTS, PROMPTS[0]]):  # one prompt twice
            raw = await gw.client.chat.completions.with_raw_response.create(
                model="turnout/cheap", max_tokens=3, messages=[{"role": "user", "content": text}])
            if n < 4:
                rid = raw.headers["x-turnout-request-id"]
                score = 0.0 if "math" in text else 1.0
                assert (await gw.http.post("/v1/feedback", json={"request_id": rid, "score": score})).is_success
        for text in PROMPTS[:2]:
            raw = await gw.client.chat.completions.with_raw_response.create(
                model="turnout/split", max_tokens=3, messages=[{"role": "user", "content": text}],
                extra_body={"turnout": {"candidates": ["big"]}})
            rid = raw.headers["x-turnout-request-id"]
            assert (await gw.http.post("/v1/feedback", json={"request_id": rid, "score": 1.0})).is_success
    return write_log(path, [r.getMessage() for r in caplog.records if r.name == "turnout.requests"])


def write_log(path: Path, lines: list[str]) -> Path:
    """The log file as the gateway's stream would hold it: other lines among the request lines."""
    path.write_text("not a JSON line\n" + "".join(line + "\n" for line in lines))
    return path


@pytest.mark.usefixtures("fake_reset")
async def test_a_candidate_policy_replayed_on_served_traffic(fakes: dict[str, Upstream], tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    log = await served_log(fakes, caplog, tmp_path / "requests.log")
    artifact = train_artifacts(tmp_path / "artifacts")["cost_aware"]
    cfg = fake_config(fakes, policies={"cheap": {"type": "fixed", "worker": "small"},
                                       "smart": {"type": "cost_aware", "artifact": str(artifact), "lambda": 0.5}})
    report = replay(parse_config(cfg), None, "smart", log, TopicEmbedder())
    assert report.requests == 13 and report.skipped == 0
    assert report.served_mix == {"fake-small": 11, "fake-big": 2}
    assert report.candidate_mix == {"fake-small": 6, "fake-big": 7}, "the math prompts would go to the big model"
    data = report.as_json()
    assert data["agreement"] == pytest.approx(6 / 13)
    assert data["predicted_quality_candidate"] > data["predicted_quality_served"]
    assert report.served_cost_usd > 0 and report.candidate_cost_usd > 0


@pytest.mark.usefixtures("fake_reset")
async def test_collect_reads_the_logs_prompts_once_each(fakes: dict[str, Upstream], tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    log = await served_log(fakes, caplog, tmp_path / "requests.log")
    items = read_source(f"log:{log}")
    assert [i.text for i in items] == PROMPTS
    assert len(read_source(f"log:{log}", sample=4, seed=1)) == 4
    quiet = tmp_path / "quiet.log"
    quiet.write_text('{"request_id": "r1", "model": "m", "status": "ok"}\n')
    with pytest.raises(SourceError, match=r"turn server\.log_prompts on"):
        read_source(f"log:{quiet}")


@pytest.mark.usefixtures("fake_reset")
async def test_a_table_from_served_traffic_and_its_feedback(fakes: dict[str, Upstream], tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    log = await served_log(fakes, caplog, tmp_path / "requests.log")
    report = feedback_table(log, tmp_path / "feedback.parquet")
    assert report.rows == 6 and report.per_model == {"fake-small": 4, "fake-big": 2} and report.unmatched == 0
    data = load_table(tmp_path / "feedback.parquet")  # as `turnout train` and `turnout eval` read it
    assert data.models == ["fake-big", "fake-small"]
    small = data.scores[:, 1]
    assert list(small[:4]) == [0.0, 1.0, 0.0, 1.0] and np.isnan(small[4:]).all() and (data.scores[4:, 0] == 1).all()
    assert data.costs is not None and (np.nan_to_num(data.costs) >= 0).all()

