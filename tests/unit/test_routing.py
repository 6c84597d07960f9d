"""Baseline policies, the routing table's resolution of `model`, and replica choice."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np
import pytest

from routers.base import Router, RoutingOutcome, RoutingRequest
from routers.baselines import FixedRouter, WeightedRouter
from routers.registry import REGISTRY, build_router
from routers.specs import FixedSpec, WeightedSpec
from server.config import parse_config
from server.errors import GatewayError
from server.policy.affinity import AffinityStore
from server.policy.options import RouteOptions
from server.policy.selection import RouteInput, Selection, select
from server.policy.table import RoutingTable
from server.store.guard import StoreGuard
from server.store.memory import MemoryStore
from server.telemetry.metrics import Metrics
from server.upstream.workers import Health, WorkerRegistry

REQ = RoutingRequest(request_id="r", text="hi", candidates=("a", "b"))


def config(**extra: Any) -> Any:
    raw = {
        "workers": [
            {"name": "a1", "model": "A", "base_url": "http://127.0.0.1:1/v1"},
            {"name": "a2", "model": "A", "base_url": "http://127.0.0.1:2/v1"},
            {"name": "b", "model": "B", "base_url": "http://127.0.0.1:3/v1"},
        ],
        "policies": {"fix": {"type": "fixed", "worker": "b"},
                     "split": {"type": "weighted", "weights": {"A": 3, "b": 1}, "seed": 1}},
        "default_policy": "fix",
        **extra,
    }
    return parse_config(raw)


def test_fixed_router() -> None:
    r = FixedRouter("p", "a")
    d = r.route(REQ)
    assert (d.chosen, d.policy, d.fallbacks()) == ("a", "p", [])
    assert "a" in d.reason
    r.observe(RoutingOutcome(request_id="r", chosen="a", ok=True))
    assert isinstance(r, Router)


def test_weighted_router_follows_weights_and_ranks_the_rest() -> None:
    r = WeightedRouter("w", {"a": 3.0, "b": 1.0}, np.random.default_rng(0))
    counts = Counter(r.route(REQ).chosen for _ in range(4000))
    assert counts["a"] / 4000 == pytest.approx(0.75, abs=0.03)
    d = r.route(REQ)
    assert d.ranking[0].name == d.chosen and len(d.ranking) == 2
    assert d.fallbacks() == [n for n in ("a", "b") if n != d.chosen]


def test_weighted_router_with_a_zero_weight_never_picks_it() -> None:
    r = WeightedRouter("w", {"a": 1.0, "b": 0.0}, np.random.default_rng(0))
    assert {r.route(REQ).chosen for _ in range(200)} == {"a"}


def test_registry_is_explicit() -> None:
    assert set(REGISTRY) == {"fixed", "weighted", "knn", "cost_aware", "bandit"}
    assert isinstance(build_router("f", FixedSpec(type="fixed", worker="x")), FixedRouter)
    assert isinstance(build_router("w", WeightedSpec(type="weighted", weights={"x": 1})), WeightedRouter)


async def choose(t: RoutingTable, model: str, options: RouteOptions | None = None,
                 header: str | None = None, reg: WorkerRegistry | None = None) -> Selection:
    reg = reg or WorkerRegistry(t.config)
    affinity = AffinityStore(StoreGuard(MemoryStore(), "fail_open", Metrics()))
    return await select(t, reg, None, affinity, RouteInput(model, "hi", options, header), "r")


async def test_table_resolution() -> None:
    t = RoutingTable(config())
    assert (await choose(t, "auto")).policy == "fix"
    assert (await choose(t, "auto")).target == "b"
    assert (await choose(t, "turnout/split")).target in {"A", "b"}
    assert (await choose(t, "a2")).policy is None
    assert (await choose(t, "A")).target == "A"
    for bad in ("nope", "turnout/nope", "turnout/", "Auto"):
        with pytest.raises(GatewayError) as exc:
            await choose(t, bad)
        assert exc.value.status == 404
    assert t.model_ids() == ["A", "B", "auto", "turnout/fix", "turnout/split"]


async def test_policy_named_by_header_or_body_field() -> None:
    t = RoutingTable(config())
    assert (await choose(t, "auto", header="split")).policy == "split"
    assert (await choose(t, "auto", RouteOptions(policy="split"))).policy == "split"
    assert (await choose(t, "turnout/split", RouteOptions(policy="split"))).policy == "split"
    cases = [("auto", RouteOptions(policy="split"), "fix", 400),  # header and body disagree
             ("turnout/fix", RouteOptions(policy="split"), None, 400),  # model and body disagree
             ("a2", None, "split", 400),  # a direct worker name takes no policy
             ("auto", None, "nope", 404)]
    for model, opts, header, status in cases:
        with pytest.raises(GatewayError) as exc:
            await choose(t, model, opts, header)
        assert exc.value.status == status, (model, opts, header)


async def test_candidates_limit_and_health_filter() -> None:
    t = RoutingTable(config())
    reg = WorkerRegistry(t.config)
    assert {(await choose(t, "turnout/split", RouteOptions(candidates=["b"]), reg=reg)).target
            for _ in range(20)} == {"b"}
    with pytest.raises(GatewayError) as exc:
        await choose(t, "turnout/split", RouteOptions(candidates=["zzz"]), reg=reg)
    assert exc.value.status == 400 and "zzz" in exc.value.message
    reg.workers["b"].health = Health.DOWN  # a down candidate leaves the draw
    assert {(await choose(t, "turnout/split", reg=reg)).target for _ in range(20)} == {"A"}
    reg.workers["a1"].health = reg.workers["a2"].health = Health.DOWN
    # Panic mode: with no candidate available the policy chooses among them all (the registry then tries the
    # least recently failed worker); without it, 503.
    assert {(await choose(t, "turnout/split", reg=reg)).target for _ in range(20)} == {"A", "b"}
    strict = RoutingTable(config(reliability={"panic": False}))
    reg = WorkerRegistry(strict.config)
    for w in reg.workers.values():
        w.health = Health.DOWN
    with pytest.raises(GatewayError) as exc:
        await choose(strict, "turnout/split", reg=reg)
    assert exc.value.status == 503


async def test_weighted_seed_makes_decisions_repeatable() -> None:
    t1, t2 = RoutingTable(config()), RoutingTable(config())
    assert [(await choose(t1, "turnout/split")).target for _ in range(50)] == [
        (await choose(t2, "turnout/split")).target for _ in range(50)]


def test_replica_choice_uses_the_workers_reported_queue() -> None:
    reg = WorkerRegistry(config())
    a1, a2 = reg.workers["a1"], reg.workers["a2"]
    # a1 reports a long queue (from other gateways); a2 is idle: a2 gets the request.
    a1.running, a1.waiting, a1.load_at = 4.0, 6.0, time.monotonic()
    assert {reg.pick("A").name for _ in range(20)} == {"a2"}
    assert reg.queue("A") == 0.0
    a2.running, a2.waiting, a2.load_at = 8.0, 3.0, time.monotonic()
    assert reg.pick("A") is a1 and reg.queue("A") == 3.0
    a1.load_at = a2.load_at = time.monotonic() - 60  # stale readings fall back to our own count
    a1.in_flight = 2
    assert reg.pick("A") is a2 and reg.queue("A") == 0.0


def test_replica_choice_prefers_idle_and_healthy() -> None:
    reg = WorkerRegistry(config())
    a1, a2 = reg.workers["a1"], reg.workers["a2"]
    a1.in_flight = 3
    assert reg.pick("A") is a2
    a2.health = Health.DOWN
    assert reg.pick("A") is a1
    a1.health = Health.DOWN
    # Panic mode: none available, so the least recently failed one not yet tried by this request.
    a1.failed_at, a2.failed_at = 20.0, 10.0
    assert reg.pick("A") is a2 and reg.pick("A", avoid=frozenset({"a2"})) is a1
    with pytest.raises(GatewayError):  # a fallback with an available worker is the better place
        reg.pick("A", panic=False)
    with pytest.raises(GatewayError) as exc:
        reg.pick("A", avoid=frozenset({"a1", "a2"}))
    assert exc.value.status == 503
    strict = WorkerRegistry(config(reliability={"panic": False}))
    strict.workers["a1"].health = strict.workers["a2"].health = Health.DOWN
    with pytest.raises(GatewayError) as exc:
        strict.pick("A")
    assert exc.value.status == 503 and exc.value.code == "no_healthy_worker"
    assert reg.pick("b").name == "b"
    with a2.track():
        assert a2.in_flight == 1
    assert a2.in_flight == 0
