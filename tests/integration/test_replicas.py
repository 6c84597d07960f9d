"""Three gateway processes sharing one real `redis-server`: budgets and rate limits hold in total, exactly,
under concurrent load spread over the replicas; and Redis going away and coming back is survived as configured.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from server.quota.keys import hash_key
from testkit.clock import DAY_S, fresh_period_wait_s
from testkit.engines import OPS_HEADERS
from testkit.promtext import sample_sum
from testkit.redis_server import RedisServer
from tests.conftest import Upstream, serve_gateway

pytestmark = pytest.mark.timeout(300)
REPLICAS = 3
PRICE = {"input_per_1m": 100.0, "output_per_1m": 200.0}  # dear, so a few requests make a visible spend
BODY = {"model": "small", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 4}
RPM = 40
ADMIN_SECRET = "admin-secret-of-at-least-thirty-two-chars"


def config(fakes: dict[str, Upstream], budget_usd: float, on_failure: str = "fail_open") -> dict[str, Any]:
    return {
        "workers": [{"name": "small", "model": "fake-small", "base_url": fakes["fake-small"].base_url,
                     "price": PRICE}],
        "auth": {"enabled": True, "keys": [
            {"name": "budgeted", "key_sha256": hash_key("tk-budgeted"), "budget_usd": budget_usd},
            {"name": "limited", "key_sha256": hash_key("tk-limited"), "requests_per_minute": RPM},
            {"name": "free", "key_sha256": hash_key("tk-free")},
        ]},
        # A generous store timeout: a 2-core machine running 300 requests may hold a reply back past the 1 s
        # default, and a timed-out call would be served fail-open by the replica alone (see the checks below).
        "state": {"backend": "redis", "on_failure": on_failure, "timeout_ms": 5000},
        "server": {"health_interval_s": 0.5},
    }


def one_request_cost(fakes: dict[str, Upstream]) -> float:
    """What BODY costs at PRICE, from the fake worker's own usage (the same fake answers through the gateway)."""
    usage = httpx.post(f"{fakes['fake-small'].base_url}/chat/completions",
                       json={**BODY, "model": "fake-small"}, timeout=10).json()["usage"]
    return float((usage["prompt_tokens"] * PRICE["input_per_1m"] +
                  usage["completion_tokens"] * PRICE["output_per_1m"]) / 1e6)


class Cluster:
    """Three gateways on one Redis."""

    def __init__(self, urls: list[str], redis_server: RedisServer) -> None:
        self.urls, self.redis = urls, redis_server

    def spend(self, key: str) -> tuple[float, float]:
        client = redis.Redis.from_url(self.redis.url)
        try:
            (name,) = client.keys(f"turnout:budget:{key}:*")
            raw = client.hgetall(name)
            return float(raw.get(b"spent", 0)), float(raw.get(b"held", 0))
        finally:
            client.close()


def start_cluster(stack: ExitStack, fakes: dict[str, Upstream], tmp: Path, redis_server: RedisServer,
                  **cfg: Any) -> Cluster:
    urls = []
    for _ in range(REPLICAS):
        proc, url = serve_gateway(config(fakes, **cfg), tmp)
        proc.env = {**(proc.env or {}), "TURNOUT_REDIS_URL": redis_server.url}
        stack.enter_context(proc)
        urls.append(url)
    return Cluster(urls, redis_server)


@pytest.fixture(scope="module")
def cluster(fakes: dict[str, Upstream], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("replicas")
    budget = 100 * one_request_cost(fakes)
    with ExitStack() as stack:
        server = stack.enter_context(RedisServer(tmp / "redis.log"))
        yield start_cluster(stack, fakes, tmp, server, budget_usd=budget)


async def fire(urls: list[str], key: str, n: int) -> list[httpx.Response]:
    """n concurrent chat requests, round-robin over the replicas."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        return list(await asyncio.gather(*(
            http.post(f"{urls[i % len(urls)]}/v1/chat/completions", json=BODY,
                      headers={"authorization": f"Bearer {key}"}) for i in range(n))))


def test_a_budget_for_100_requests_is_never_overspent_by_300_over_three_replicas(
        cluster: Cluster, fakes: dict[str, Upstream]) -> None:
    cost = one_request_cost(fakes)
    time.sleep(fresh_period_wait_s(DAY_S, 30.0))  # the budget is per UTC day: the burst and its check in one
    responses = asyncio.run(fire(cluster.urls, "tk-budgeted", 300))
    codes = Counter(r.status_code for r in responses)
    assert set(codes) <= {200, 429}, codes
    assert 0 < codes[200] <= 100, codes
    assert all(r.json()["error"]["code"] == "budget_exceeded" and int(r.headers["retry-after"]) >= 1
               for r in responses if r.status_code == 429)
    assert len({r.request.url.port for r in responses}) == REPLICAS
    assert sum(sample_sum(f"{url}/metrics", "turnout_store_errors_total") for url in cluster.urls) == 0, \
        "every admission went through Redis"
    # Every answer settles in the background: wait for the holds to drain, then the spend is exact.
    deadline = time.monotonic() + 10
    while (state := cluster.spend("budgeted"))[1] > 1e-12:
        assert time.monotonic() < deadline, f"holds never released: {state}"
        time.sleep(0.1)
    spent = state[0]
    assert spent == pytest.approx(codes[200] * cost, rel=1e-9)
    assert spent <= 100 * cost * (1 + 1e-12)


def burst_in_one_minute(urls: list[str], key: str, n: int) -> list[httpx.Response]:
    """`fire`, started early enough in a calendar minute (the limit's window) that the burst cannot straddle two."""
    time.sleep(fresh_period_wait_s())
    return asyncio.run(fire(urls, key, n))


def test_a_per_minute_limit_admits_exactly_n_over_three_replicas(cluster: Cluster) -> None:
    responses = burst_in_one_minute(cluster.urls, "tk-limited", 3 * RPM)
    codes = Counter(r.status_code for r in responses)
    assert codes == {200: RPM, 429: 2 * RPM}, codes
    assert all(r.json()["error"]["code"] == "rate_limit_exceeded" for r in responses if r.status_code == 429)


def metric(url: str, name: str) -> float:
    """A sample's value from the gateway's /metrics: `name` may include its labels (as exposed, sorted)."""
    for line in httpx.get(f"{url}/metrics", headers=OPS_HEADERS, timeout=5).text.splitlines():
        if line.startswith(name + " ") or ("{" not in name and line.startswith(name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def steady_load(urls: dict[str, str], key: str, seconds: float) -> list[tuple[str, int, str | None]]:
    """Requests one after another to each gateway for `seconds`: (gateway, status, error code)."""
    out: list[tuple[str, int, str | None]] = []
    async with httpx.AsyncClient(timeout=10) as http:  # a hung request fails the test through this timeout
        end = time.monotonic() + seconds

        async def one(name: str, url: str) -> None:
            while time.monotonic() < end:
                r = await http.post(f"{url}/v1/chat/completions", json=BODY,
                                    headers={"authorization": f"Bearer {key}"})
                out.append((name, r.status_code, r.json().get("error", {}).get("code") if r.status_code != 200
                            else None))
                await asyncio.sleep(0.02)

        await asyncio.gather(*(one(n, u) for n, u in urls.items()))
    return out


def test_redis_killed_and_restarted_during_load(fakes: dict[str, Upstream], tmp_path: Path) -> None:
    with ExitStack() as stack:
        server = stack.enter_context(RedisServer(tmp_path / "redis.log"))
        urls = {}
        for mode in ("fail_open", "fail_closed"):
            proc, url = serve_gateway(config(fakes, budget_usd=1000.0, on_failure=mode), tmp_path)
            proc.env = {**(proc.env or {}), "TURNOUT_REDIS_URL": server.url}
            stack.enter_context(proc)
            urls[mode] = url
        before = asyncio.run(steady_load(urls, "tk-budgeted", 1.0))
        assert {status for _, status, _ in before} == {200}
        server.stop(kill=True)
        during = asyncio.run(steady_load(urls, "tk-budgeted", 2.0))
        free = asyncio.run(steady_load(urls, "tk-free", 0.5))  # a key with no limits needs no store
        assert all(metric(u, "turnout_store_up") == 0 for u in urls.values())
        server.start()  # an empty Redis on the same port, as after a crash without persistence
        time.sleep(0.5)
        after = asyncio.run(steady_load(urls, "tk-budgeted", 1.0))

    for name, status, code in during:
        if name == "fail_open":
            assert status == 200, (status, code)  # served on the replica's own state
        else:
            assert (status, code) == (503, "state_unavailable")
    assert {status for _, status, _ in free} == {200}
    assert {status for _, status, _ in after} == {200}, "both gateways use Redis again by themselves"
    assert all(status != 500 for _, status, _ in before + during + free + after)
    assert len(during) > 10


def test_limits_hold_again_after_redis_returns(fakes: dict[str, Upstream], tmp_path: Path) -> None:
    with ExitStack() as stack:
        server = stack.enter_context(RedisServer(tmp_path / "redis.log"))
        cluster = start_cluster(stack, fakes, tmp_path, server, budget_usd=1000.0)
        server.stop(kill=True)
        down = asyncio.run(fire(cluster.urls, "tk-free", 6))
        assert {r.status_code for r in down} == {200}
        server.start()
        # Recovery: each replica finds Redis back at its next request after its retry interval.
        time.sleep(1.2)
        asyncio.run(fire(cluster.urls, "tk-budgeted", 2 * REPLICAS))
        responses = burst_in_one_minute(cluster.urls, "tk-limited", 3 * RPM)
        codes = Counter(r.status_code for r in responses)
        # The window restarted with the empty Redis; replicas that had fallen back to their own state for the
        # `limited` key count on Redis again, so the total is exact once more.
        assert codes == {200: RPM, 429: 2 * RPM}, codes


def test_bandit_feedback_through_all_replicas_all_lands(fakes: dict[str, Upstream], tmp_path: Path) -> None:
    import io as _io

    import numpy as np
    from rich.console import Console

    from routers.offline.commands import run_train
    from tests.integration.test_live_vs_offline import CHEAP, STRONG, two_model_table

    info = run_train(two_model_table(tmp_path), "bandit", tmp_path / "bandit", "static",
                     Console(file=_io.StringIO()))
    cfg: dict[str, Any] = {
        "workers": [
            {"name": "small", "model": "fake-small", "base_url": fakes["fake-small"].base_url},
            {"name": "big", "model": "fake-big", "base_url": fakes["fake-big"].base_url},
        ],
        "policies": {"learn": {"type": "bandit", "artifact": info["artifact"],
                               "models": {CHEAP: "small", STRONG: "big"}}},
        "default_policy": "learn",
        "embedder": {"backend": "static"},
        "state": {"backend": "redis", "sync_interval_s": 0.5},
        "server": {"health_interval_s": 0.5},
    }
    prompts = ["What is 2+2?", "Write a poem about rain.", "Explain quicksort.", "hi", "Translate cat to French.",
               "Prove that sqrt(2) is irrational.", "Name three rivers.", "What is TCP?"]
    n_feedback = 30
    with ExitStack() as stack:
        server = stack.enter_context(RedisServer(tmp_path / "redis.log"))
        urls = []
        for _ in range(REPLICAS):
            proc, url = serve_gateway(cfg, tmp_path)
            proc.env = {**(proc.env or {}), "TURNOUT_REDIS_URL": server.url}
            stack.enter_context(proc)
            urls.append(url)
        with httpx.Client(timeout=30) as http:
            for i in range(n_feedback):
                r = http.post(f"{urls[i % REPLICAS]}/v1/chat/completions", json={
                    "model": "auto", "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                    "max_tokens": 2})
                assert r.status_code == 200, r.text
                # The score goes to another replica than the one that routed the request, as a load balancer may.
                fb = http.post(f"{urls[(i + 1) % REPLICAS]}/v1/feedback",
                               json={"request_id": r.headers["x-turnout-request-id"], "score": (i % 5) / 4})
                assert fb.json()["status"] == "accepted", fb.text
                again = http.post(f"{urls[(i + 2) % REPLICAS]}/v1/feedback",
                                  json={"request_id": r.headers["x-turnout-request-id"], "score": 1.0})
                assert again.json()["status"] == "ignored", "a repeat on a third replica is refused too"

            def learned(url: str) -> float:
                return metric(url, 'turnout_policy_online_observations{policy="learn"}')

            deadline = time.monotonic() + 15
            while [learned(u) for u in urls] != [n_feedback] * REPLICAS:
                assert time.monotonic() < deadline, [learned(u) for u in urls]
                time.sleep(0.2)
        client = redis.Redis.from_url(server.url)
        (key,) = client.keys("turnout:bandit:learn:*")
        fields: dict[bytes, bytes] = client.hgetall(key)  # type: ignore[assignment]
        client.close()
        total = 0.0
        for blob in fields.values():
            total += float(np.load(_io.BytesIO(blob), allow_pickle=False)["n"].sum())
        assert total == n_feedback and len(fields) == REPLICAS


def test_keys_added_and_revoked_at_run_time_reach_every_replica(fakes: dict[str, Upstream], tmp_path: Path) -> None:
    import json as _json
    import os
    import subprocess
    import sys

    from testkit.engines import PY_ENV, REPO

    cfg: dict[str, Any] = {
        "workers": [{"name": "small", "model": "fake-small", "base_url": fakes["fake-small"].base_url}],
        "auth": {"enabled": True},
        "state": {"backend": "redis"},
    }
    with ExitStack() as stack:
        server = stack.enter_context(RedisServer(tmp_path / "redis.log"))
        env = {**PY_ENV, "TURNOUT_REDIS_URL": server.url, "TURNOUT_ADMIN_KEY": ADMIN_SECRET}
        urls = []
        for _ in range(2):
            proc, url = serve_gateway(cfg, tmp_path)
            proc.env = {**(proc.env or {}), **env}
            stack.enter_context(proc)
            urls.append(url)

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "server", "keys", *args], capture_output=True, text=True,
                                  env={**os.environ, **env}, cwd=REPO, timeout=60)

        added = cli("add", "team-a", "--rpm", "100", "--model", "small")
        assert added.returncode == 0, added.stderr
        key = added.stdout.strip()
        assert key.startswith("tk-")
        assert cli("add", "team-a").returncode == 1, "a name is used once"
        listed = [_json.loads(line) for line in cli("list").stdout.splitlines()]
        assert [k["name"] for k in listed] == ["team-a"] and listed[0]["requests_per_minute"] == 100
        assert key not in cli("list").stdout

        def status(url: str, k: str) -> int:
            return httpx.post(f"{url}/v1/chat/completions", json={**BODY, "model": "small"},
                              headers={"authorization": f"Bearer {k}"}, timeout=10).status_code

        assert [status(u, key) for u in urls] == [200, 200]
        assert status(urls[0], "tk-nope") == 401
        # The admin endpoint does the same through one replica; the key works on the other.
        made = httpx.post(f"{urls[0]}/admin/keys", json={"name": "team-b", "budget_usd": 5},
                          headers={"authorization": f"Bearer {ADMIN_SECRET}"}, timeout=10)
        assert made.status_code == 201, made.text
        assert status(urls[1], made.json()["key"]) == 200
        listing = httpx.get(f"{urls[1]}/admin/keys", headers={"authorization": f"Bearer {ADMIN_SECRET}"}).json()
        assert sorted(k["name"] for k in listing["keys"]) == ["team-a", "team-b"]
        assert "tk-" not in str(listing) and "sha256" not in str(listing), "never a key or its hash"
        # Revoked: refused everywhere once the replicas' few-second cache of the key has lapsed.
        assert cli("revoke", "team-a").returncode == 0
        gone = httpx.delete(f"{urls[1]}/admin/keys/team-b", headers={"authorization": f"Bearer {ADMIN_SECRET}"})
        assert gone.status_code == 200
        deadline = time.monotonic() + 15
        while {status(u, key) for u in urls} | {status(u, made.json()["key"]) for u in urls} != {401}:
            assert time.monotonic() < deadline, "revoked keys still accepted"
            time.sleep(0.5)


def test_a_response_made_through_one_replica_is_found_through_the_others(cluster: Cluster) -> None:
    """The worker holding a Responses API response is remembered in Redis: a follow-up and a retrieval through
    another replica reach it (a replica that had only its own memory would not know the id: 404), and for
    another key the id does not exist on any replica."""
    free, budgeted = {"authorization": "Bearer tk-free"}, {"authorization": "Bearer tk-budgeted"}
    made = httpx.post(f"{cluster.urls[0]}/v1/responses", headers=free, timeout=30,
                      json={"model": "small", "input": "one two three", "max_output_tokens": 2})
    assert made.status_code == 200, made.text
    rid = made.json()["id"]
    for url in cluster.urls[1:]:
        got = httpx.get(f"{url}/v1/responses/{rid}", headers=free, timeout=30)
        assert got.status_code == 200 and got.json()["id"] == rid, got.text
        follow = httpx.post(f"{url}/v1/responses", headers=free, timeout=30,
                            json={"model": "small", "input": "four", "previous_response_id": rid,
                                  "max_output_tokens": 1})
        assert follow.status_code == 200 and follow.headers["x-turnout-model"] == "small", follow.text
        other = httpx.get(f"{url}/v1/responses/{rid}", headers=budgeted, timeout=30)
        assert other.status_code == 404 and other.json()["error"]["code"] == "response_not_found"
