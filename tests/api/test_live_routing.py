"""Live routing through the gateway: learned policies from artifacts, per-request choices, explain,
feedback, session affinity, shadow policies and hot reload. Fake workers on real ports; clients are the
official `openai` SDK (raw httpx2 only for the gateway's own endpoints)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from routers.artifacts import load_artifact
from tests.conftest import InProcess, Upstream, fake_config, gateway_in_process
from tests.routing_fixtures import TopicEmbedder, train_artifacts

CHAT: list[Any] = [{"role": "user", "content": "friendly chat message 9999"}]
MATH: list[Any] = [{"role": "user", "content": "hard math problem number 9999"}]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return train_artifacts(tmp_path_factory.mktemp("artifacts"))


def routed_config(fakes: dict[str, Upstream], artifacts: dict[str, Path], **policies: Any) -> dict[str, Any]:
    raw = fake_config(fakes)
    raw["policies"].update({
        "smart": {"type": "knn", "artifact": str(artifacts["knn"]), "lambda": 0.5},
        "ensemble": {"type": "cost_aware", "artifact": str(artifacts["cost_aware"]), "lambda": 0.5},
        "learner": {"type": "bandit", "artifact": str(artifacts["bandit"])},
        **policies,
    })
    raw["default_policy"] = "smart"
    return raw


async def chat(gw: InProcess, messages: list[Any], model: str = "auto",
               **kw: Any) -> tuple[str, dict[str, str]]:
    raw = await gw.client.chat.completions.with_raw_response.create(model=model, messages=messages,
                                                                    max_tokens=3, **kw)
    return raw.headers["x-turnout-model"], dict(raw.headers)


async def test_learned_policies_route_by_prompt(fakes: dict[str, Upstream], artifacts: dict[str, Path],
                                                fake_reset: None) -> None:
    emb = TopicEmbedder()
    async with gateway_in_process(routed_config(fakes, artifacts), embedder=emb) as gw:
        for model in ("auto", "turnout/smart", "turnout/ensemble"):
            assert (await chat(gw, CHAT, model))[0] == "small"
            worker, headers = await chat(gw, MATH, model)
            assert worker == "big"
            assert headers["x-turnout-policy"] == model.removeprefix("turnout/").replace("auto", "smart")
            assert float(headers["x-turnout-predicted-quality"]) > 0.9
            assert float(headers["x-turnout-routing-ms"]) >= 0
        version = load_artifact(artifacts["knn"]).version
        assert headers["x-turnout-artifact"] == load_artifact(artifacts["cost_aware"]).version
        # Streaming routes the same way, and the decision is in the stream's headers.
        raw = await gw.client.chat.completions.with_raw_response.create(model="turnout/smart", messages=MATH,
                                                                        max_tokens=3, stream=True)
        assert raw.headers["x-turnout-model"] == "big" and raw.headers["x-turnout-artifact"] == version
        stream = raw.parse()
        assert isinstance(stream, openai.AsyncStream)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text
        # The same prompt again is a cache hit: the embedder saw each distinct prompt once.
        assert sum(emb.calls) == 2


def stats_requests(fakes: dict[str, Upstream]) -> list[int]:
    return [httpx.get(f"{u.root}/fake/stats", timeout=5).json()["requests"] for u in fakes.values()]


async def test_explain_endpoint_calls_no_worker(fakes: dict[str, Upstream], artifacts: dict[str, Path],
                                               fake_reset: None) -> None:
    async with gateway_in_process(routed_config(fakes, artifacts), embedder=TopicEmbedder()) as gw:
        before = await asyncio.to_thread(stats_requests, fakes)
        resp = await gw.http.post("/v1/route", json={"model": "auto", "messages": MATH})
        assert resp.status_code == 200
        body = resp.json()
        assert body["model"] == "fake-big" and body["policy"] == "smart"
        assert body["artifact"] == load_artifact(artifacts["knn"]).version
        names = [c["name"] for c in body["candidates"]]
        assert names[0] == "fake-big" and sorted(names) == ["fake-big", "fake-small"]
        for c in body["candidates"]:
            assert 0 <= c["predicted_quality"] <= 1 and c["predicted_cost_usd"] > 0
        assert "fake-big" in body["reason"]
        assert await asyncio.to_thread(stats_requests, fakes) == before
        bad = await gw.http.post("/v1/route", json={"model": "auto"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"


async def test_per_request_choices(fakes: dict[str, Upstream], artifacts: dict[str, Path], fake_reset: None) -> None:
    async with gateway_in_process(routed_config(fakes, artifacts), embedder=TopicEmbedder()) as gw:
        # candidates: only the small model may answer, whatever the prompt.
        worker, _ = await chat(gw, MATH, extra_body={"turnout": {"candidates": ["fake-small"]}})
        assert worker == "small"
        # A cost cap below the big model's predicted cost keeps the math prompt on the small one.
        worker, headers = await chat(gw, MATH, extra_body={"turnout": {"max_cost_usd": 5e-4}})
        assert worker == "small" and "cost <=" in headers["x-turnout-reason"]
        # The policy by header, and by body field.
        _, headers = await chat(gw, CHAT, extra_headers={"x-turnout-policy": "cheap"})
        assert headers["x-turnout-policy"] == "cheap"
        _, headers = await chat(gw, CHAT, extra_body={"turnout": {"policy": "ensemble"}})
        assert headers["x-turnout-policy"] == "ensemble"
        bad_cases = [({"turnout": {"candidates": ["nope"]}}, "turnout.candidates", 400),
                     ({"turnout": {"min_quality": 2}}, "turnout.min_quality", 400),
                     ({"turnout": {"colour": "red"}}, "turnout.colour", 400),
                     ({"turnout": {"policy": "nope"}}, "turnout.policy", 404)]
        for extra, param, status in bad_cases:
            with pytest.raises(openai.APIStatusError) as exc:
                await chat(gw, CHAT, extra_body=extra)
            assert exc.value.status_code == status, extra
            assert param in str(exc.value.body), (extra, exc.value.body)


async def test_feedback_teaches_the_bandit(fakes: dict[str, Upstream], artifacts: dict[str, Path],
                                          fake_reset: None) -> None:
    async with gateway_in_process(routed_config(fakes, artifacts), embedder=TopicEmbedder()) as gw:
        worker, headers = await chat(gw, MATH, model="turnout/learner")
        rid = headers["x-turnout-request-id"]
        router = gw.app.state.gateway.live.table.routers["learner"]
        arm = router.models.index("fake-small" if worker == "small" else "fake-big")
        n_before = router.bandit.n[arm]
        ok = await gw.http.post("/v1/feedback", json={"request_id": rid, "score": 0.25})
        assert ok.status_code == 200 and ok.json()["status"] == "accepted"
        assert router.bandit.n[arm] == n_before + 1
        again = await gw.http.post("/v1/feedback", json={"request_id": rid, "score": 1.0})
        assert again.status_code == 200 and again.json()["status"] == "ignored"
        assert router.bandit.n[arm] == n_before + 1
        unknown = await gw.http.post("/v1/feedback", json={"request_id": "never-seen", "score": 0.5})
        assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "request_id"
        for body, param in (({"request_id": rid, "score": 1.5}, "score"), ({"request_id": rid}, "score"),
                            ({"score": 0.5}, "request_id"), ({"request_id": rid, "score": "high"}, "score")):
            bad = await gw.http.post("/v1/feedback", json=body)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == param, body
        not_json = await gw.http.post("/v1/feedback", content=b"{nope", headers={"content-type": "application/json"})
        assert not_json.status_code == 400


async def test_session_affinity_keeps_a_conversation_on_its_first_model(
        fakes: dict[str, Upstream], artifacts: dict[str, Path], fake_reset: None) -> None:
    sticky = {"type": "knn", "artifact": str(artifacts["knn"]), "lambda": 0.5, "affinity": {"ttl_s": 60}}
    async with gateway_in_process(routed_config(fakes, artifacts, sticky=sticky), embedder=TopicEmbedder()) as gw:
        first, _ = await chat(gw, MATH, model="turnout/sticky", extra_headers={"x-session-id": "s1"})
        assert first == "big"
        # A later, easy turn of the same conversation stays on the big model...
        follow, headers = await chat(gw, [*MATH, {"role": "assistant", "content": "ok"}, *CHAT],
                                     model="turnout/sticky", extra_headers={"x-session-id": "s1"})
        assert follow == "big" and headers["x-turnout-affinity"] == "1"
        # ... the `user` field is a session key too; other sessions and the non-sticky policy route freely.
        assert (await chat(gw, CHAT, model="turnout/sticky", user="someone"))[0] == "small"
        assert (await chat(gw, MATH, model="turnout/sticky", user="someone"))[0] == "small"
        assert (await chat(gw, CHAT, model="turnout/smart", extra_headers={"x-session-id": "s1"}))[0] == "small"
        # When the remembered model's worker is down, the policy decides afresh.
        gw.app.state.gateway.health._task.cancel()  # a health check must not find it up again meanwhile
        await asyncio.sleep(0)
        gw.app.state.gateway.live.registry.workers["big"].health = gw.app.state.gateway.live.registry.workers[
            "big"].health.__class__.DOWN
        assert (await chat(gw, CHAT, model="turnout/sticky", extra_headers={"x-session-id": "s1"}))[0] == "small"


async def test_shadow_policy_is_recorded_not_executed(fakes: dict[str, Upstream], artifacts: dict[str, Path],
                                                      fake_reset: None) -> None:
    watched = {"type": "fixed", "worker": "small", "shadow": "smart"}
    async with gateway_in_process(routed_config(fakes, artifacts, watched=watched), embedder=TopicEmbedder()) as gw:
        worker, headers = await chat(gw, MATH, model="turnout/watched")
        assert worker == "small" and headers["x-turnout-shadow-model"] == "fake-big"
        explain = (await gw.http.post("/v1/route", json={"model": "turnout/watched", "messages": MATH})).json()
        assert explain["shadow"]["chosen"] == "fake-big" and explain["shadow"]["policy"] == "smart"
        metrics = (await gw.http.get("/metrics")).text
        assert ('turnout_shadow_decisions_total{live_model="small",policy="watched",shadow="smart",'
                'shadow_model="fake-big"} 1.0') in metrics


async def test_queue_penalty_moves_traffic_off_a_long_queue(fakes: dict[str, Upstream], artifacts: dict[str, Path],
                                                            fake_reset: None) -> None:
    patient = {"type": "knn", "artifact": str(artifacts["knn"]), "lambda": 0.5, "queue_penalty": 0.1}
    async with gateway_in_process(routed_config(fakes, artifacts, patient=patient), embedder=TopicEmbedder()) as gw:
        big = gw.app.state.gateway.live.registry.workers["big"]
        assert (await chat(gw, MATH, model="turnout/patient"))[0] == "big"
        gw.app.state.gateway.load._task.cancel()  # hold the reading fixed for the test
        await asyncio.sleep(0)
        big.running, big.waiting, big.load_at = 8.0, 20.0, time.monotonic()
        worker, headers = await chat(gw, MATH, model="turnout/patient")
        assert worker == "small" and "queue penalty" in headers["x-turnout-reason"]
        # The policy without a penalty still sends it to the big model.
        assert (await chat(gw, MATH, model="turnout/smart"))[0] == "big"


@pytest.fixture
def admin_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    key = "s3cret-admin-key-of-at-least-32-characters"
    monkeypatch.setenv("TURNOUT_ADMIN_KEY", key)
    yield key


async def test_reload_swaps_policies_and_refuses_bad_configs(
        fakes: dict[str, Upstream], artifacts: dict[str, Path], fake_reset: None, tmp_path: Path,
        admin_key: str) -> None:
    path = tmp_path / "turnout.yaml"
    raw = routed_config(fakes, artifacts)
    path.write_text(yaml.safe_dump(raw))
    async with gateway_in_process(path, embedder=TopicEmbedder()) as gw:
        auth = {"authorization": f"Bearer {admin_key}"}
        assert (await chat(gw, MATH))[0] == "big"
        assert (await gw.http.post("/admin/reload")).status_code == 401
        assert (await gw.http.post("/admin/reload", headers={"authorization": "Bearer wrong"})).status_code == 401
        raw["default_policy"] = "cheap"
        path.write_text(yaml.safe_dump(raw))
        ok = await gw.http.post("/admin/reload", headers=auth)
        assert ok.status_code == 200 and ok.json()["generation"] == 2
        assert (await chat(gw, MATH))[0] == "small"
        # A config with several problems is refused as a whole, listing each; the old one keeps serving.
        broken = dict(raw, default_policy="nope")
        broken["policies"] = dict(raw["policies"], lost={"type": "knn", "artifact": str(tmp_path / "missing")})
        path.write_text(yaml.safe_dump(broken))
        refused = await gw.http.post("/admin/reload", headers=auth)
        assert refused.status_code == 400
        problems = refused.json()["error"]["problems"]
        assert any("default_policy" in p for p in problems)
        refused_again = broken | {"default_policy": "cheap"}
        path.write_text(yaml.safe_dump(refused_again))
        refused = await gw.http.post("/admin/reload", headers=auth)
        assert refused.status_code == 400
        assert any("policies.lost" in p and "missing" in p for p in refused.json()["error"]["problems"])
        assert (await chat(gw, MATH))[0] == "small"
        assert gw.app.state.gateway.live.generation == 2
        path.write_text("workers: [")
        assert (await gw.http.post("/admin/reload", headers=auth)).status_code == 400
        metrics = (await gw.http.get("/metrics")).text
        assert 'turnout_config_reloads_total{result="ok"} 1.0' in metrics
        assert 'turnout_config_reloads_total{result="rejected"} 3.0' in metrics


async def test_reload_is_disabled_without_an_admin_key(fakes: dict[str, Upstream], artifacts: dict[str, Path],
                                                       monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TURNOUT_ADMIN_KEY", raising=False)
    path = tmp_path / "turnout.yaml"
    path.write_text(yaml.safe_dump(fake_config(fakes)))
    async with gateway_in_process(path) as gw:
        resp = await gw.http.post("/admin/reload", headers={"authorization": "Bearer anything"})
        assert resp.status_code == 403 and "TURNOUT_ADMIN_KEY" in resp.json()["error"]["message"]


async def test_artifact_for_another_embedder_is_a_config_problem(fakes: dict[str, Upstream],
                                                                artifacts: dict[str, Path]) -> None:
    from routers.embedding.onnx import OnnxMiniLMEmbedder
    from server.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        async with gateway_in_process(routed_config(fakes, artifacts), embedder=OnnxMiniLMEmbedder()):
            pass
    text = "\n".join(exc.value.problems)
    assert "policies.smart" in text and "test-topic-embedder" in text and "retrain" in text


def test_check_config_builds_every_policy_and_lists_every_problem(artifacts: dict[str, Path], tmp_path: Path) -> None:
    from server.config import ConfigError
    from server.snapshot import check_config_file

    raw: dict[str, Any] = {
        "workers": [{"name": "small", "model": "fake-small", "base_url": "http://127.0.0.1:1/v1"}],
        "policies": {
            "lost": {"type": "knn", "artifact": "no/such/dir"},
            "unmapped": {"type": "knn", "artifact": str(artifacts["knn"])},  # fake-big has no worker
            "mislabelled": {"type": "bandit", "artifact": str(artifacts["knn"])},
            "badmap": {"type": "cost_aware", "artifact": str(artifacts["cost_aware"]), "models": {"gpt-9": "small"}},
            "twolambdas": {"type": "knn", "artifact": str(artifacts["knn"]), "lambda": 1, "budget_usd_per_hour": 2},
        },
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as exc:
        check_config_file(path, TopicEmbedder.id)
    text = "\n".join(exc.value.problems)
    assert "policies.twolambdas" in text and "one way only" in text  # schema problems come first, alone
    del raw["policies"]["twolambdas"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as exc:
        check_config_file(path, TopicEmbedder.id)
    problems = exc.value.problems
    assert len(problems) == 4, problems
    text = "\n".join(problems)
    assert "policies.lost" in text and "no/such/dir" in text
    assert "policies.unmapped" in text and "fake-big" in text
    assert "policies.mislabelled" in text and "trained as 'knn'" in text
    assert "policies.badmap" in text and "gpt-9" in text


async def test_a_budgeted_key_gets_a_cheaper_model_that_fits(fakes: dict[str, Upstream], artifacts: dict[str, Path],
                                                             fake_reset: None) -> None:
    from server.quota.keys import hash_key

    raw = routed_config(fakes, artifacts)
    raw["auth"] = {"enabled": True, "keys": [{"name": "rich", "key_sha256": hash_key("tk-rich")},
                                             {"name": "poor", "key_sha256": hash_key("tk-poor")}]}
    async with gateway_in_process(raw, embedder=TopicEmbedder()) as gw:
        # What the math prompt is predicted to cost on each model (the policy picks the big one for it).
        explain = (await gw.http.post("/v1/route", json={"model": "auto", "messages": MATH},
                                      headers={"authorization": "Bearer tk-rich"})).json()
        costs = {c["name"]: c["predicted_cost_usd"] for c in explain["candidates"]}
        assert explain["model"] == "fake-big" and costs["fake-small"] < costs["fake-big"]
    # A budget between the two: the big model's predicted cost does not fit what is left, the small one's does.
    raw["auth"]["keys"][1]["budget_usd"] = (costs["fake-small"] + costs["fake-big"]) / 2
    async with gateway_in_process(raw, embedder=TopicEmbedder()) as gw:
        poor = gw.client.with_options(api_key="tk-poor")
        rich = gw.client.with_options(api_key="tk-rich")
        got = await poor.chat.completions.with_raw_response.create(model="auto", messages=MATH, max_tokens=1)
        assert got.headers["x-turnout-model"] == "small" and "cost <=" in got.headers["x-turnout-reason"]
        got = await rich.chat.completions.with_raw_response.create(model="auto", messages=MATH, max_tokens=1)
        assert got.headers["x-turnout-model"] == "big"
