"""Tenants kept apart (hardening from an outside review, items 8 to 10): a key's sessions, feedback and
restrictions are its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx2
import pytest

from server.quota.keys import hash_key
from tests.api.test_live_routing import CHAT, MATH, routed_config
from tests.conftest import InProcess, Upstream, gateway_in_process
from tests.routing_fixtures import TopicEmbedder, train_artifacts

KEYS = {"a": "tk-tenant-a", "b": "tk-tenant-b", "policies-only": "tk-policies", "models-only": "tk-models"}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return train_artifacts(tmp_path_factory.mktemp("artifacts"))


def tenants_config(fakes: dict[str, Upstream], artifacts: dict[str, Path]) -> dict[str, Any]:
    sticky = {"type": "knn", "artifact": str(artifacts["knn"]), "lambda": 0.5, "affinity": {"ttl_s": 60}}
    cfg = routed_config(fakes, artifacts, sticky=sticky)
    cfg["auth"] = {"enabled": True, "keys": [
        {"name": "a", "key_sha256": hash_key(KEYS["a"])},
        {"name": "b", "key_sha256": hash_key(KEYS["b"])},
        {"name": "policies-only", "key_sha256": hash_key(KEYS["policies-only"]), "policies": ["cheap"]},
        {"name": "models-only", "key_sha256": hash_key(KEYS["models-only"]), "models": ["small"]},
    ]}
    return cfg


async def chat(gw: InProcess, key: str, messages: list[Any], model: str, **extra: Any) -> httpx2.Response:
    return await gw.http.post("/v1/chat/completions", headers={"authorization": f"Bearer {KEYS[key]}",
                                                               **extra.pop("headers", {})},
                              json={"model": model, "messages": messages, "max_tokens": 2, **extra})


async def test_a_session_is_the_keys_own(fakes: dict[str, Upstream], fake_reset: None,
                                         artifacts: dict[str, Path]) -> None:
    """Key A pins session s1 to the dear model; key B naming s1 neither lands there nor sees it in /v1/route."""
    session = {"x-session-id": "s1"}
    async with gateway_in_process(tenants_config(fakes, artifacts), embedder=TopicEmbedder()) as gw:
        first = await chat(gw, "a", MATH, "turnout/sticky", headers=session)
        assert first.headers["x-turnout-model"] == "big"
        again = await chat(gw, "a", CHAT, "turnout/sticky", headers=session)
        assert again.headers["x-turnout-model"] == "big" and again.headers["x-turnout-affinity"] == "1"
        other = await chat(gw, "b", CHAT, "turnout/sticky", headers=session)
        assert other.headers["x-turnout-model"] == "small" and "x-turnout-affinity" not in other.headers
        explained = await gw.http.post("/v1/route", json={"model": "turnout/sticky", "messages": CHAT},
                                       headers={"authorization": f"Bearer {KEYS['b']}", **session})
        assert explained.json()["model"] == "fake-small", "B sees its own session's pin, never A's"
        by_user = await chat(gw, "b", CHAT, "turnout/sticky", user="s1")  # the `user` field is a session too
        assert by_user.headers["x-turnout-model"] == "small"


async def test_only_the_key_that_made_a_request_may_score_it(fakes: dict[str, Upstream], fake_reset: None,
                                                             artifacts: dict[str, Path]) -> None:
    async with gateway_in_process(tenants_config(fakes, artifacts), embedder=TopicEmbedder()) as gw:
        routed = await chat(gw, "a", MATH, "turnout/learner")
        rid = routed.headers["x-turnout-request-id"]
        stolen = await gw.http.post("/v1/feedback", json={"request_id": rid, "score": 0.0},
                                    headers={"authorization": f"Bearer {KEYS['b']}"})
        assert stolen.status_code == 404 and stolen.json()["error"]["code"] == "request_not_found"
        own = await gw.http.post("/v1/feedback", json={"request_id": rid, "score": 1.0},
                                 headers={"authorization": f"Bearer {KEYS['a']}"})
        assert own.status_code == 200 and own.json()["status"] == "accepted", "the owner's score still counts"


async def test_restrictions_compose(fakes: dict[str, Upstream], fake_reset: None,
                                    artifacts: dict[str, Path]) -> None:
    """A key limited to some policies calls no model directly; a key limited to some models reaches only them
    through any policy, whatever candidates it asks for."""
    async with gateway_in_process(tenants_config(fakes, artifacts), embedder=TopicEmbedder()) as gw:
        assert (await chat(gw, "policies-only", CHAT, "turnout/cheap")).status_code == 200
        # A conversation it was allowed to start goes on, though its follow-up is pinned to a worker.
        policies_only = {"authorization": f"Bearer {KEYS['policies-only']}"}
        first = await gw.http.post("/v1/responses", headers=policies_only,
                                   json={"model": "turnout/cheap", "input": "hi", "max_output_tokens": 2})
        follow = await gw.http.post("/v1/responses", headers=policies_only, json={
            "model": "turnout/cheap", "input": "more", "previous_response_id": first.json()["id"],
            "max_output_tokens": 2})
        assert follow.status_code == 200, follow.text
        for direct in ("big", "fake-small"):
            denied = await chat(gw, "policies-only", CHAT, direct)
            assert denied.status_code == 403 and denied.json()["error"]["code"] == "permission_denied"
        for _ in range(6):  # `split` would send half of them to `big`
            r = await chat(gw, "models-only", MATH, "turnout/split")
            assert r.status_code == 200 and r.headers["x-turnout-model"] == "small"
        smart = await chat(gw, "models-only", MATH, "turnout/smart")
        assert smart.headers["x-turnout-model"] == "small", smart.text
        pinned = await chat(gw, "models-only", MATH, "turnout/split", turnout={"candidates": ["big"]})
        assert pinned.status_code == 403
        assert (await chat(gw, "models-only", CHAT, "fake-small")).status_code == 200, "a model by its name"
        explained = await gw.http.post("/v1/route", json={"model": "turnout/smart", "messages": MATH},
                                       headers={"authorization": f"Bearer {KEYS['models-only']}"})
        assert explained.json()["model"] == "fake-small"
