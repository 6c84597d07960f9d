"""Baseline policies, the routing table's resolution of `model`, and replica choice."""

from __future__ import annotations

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
from server.routing import RoutingTable
from server.workers import Health, WorkerRegistry

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
    assert set(REGISTRY) == {"fixed", "weighted"}
    assert isinstance(build_router("f", FixedSpec(type="fixed", worker="x")), FixedRouter)
    assert isinstance(build_router("w", WeightedSpec(type="weighted", weights={"x": 1})), WeightedRouter)


def test_table_resolution() -> None:
    t = RoutingTable(config())
    assert t.select("auto", "r", "hi").policy == "fix"
    assert t.select("auto", "r", "hi").target == "b"
    assert t.select("turnout/split", "r", "hi").target in {"A", "b"}
    assert t.select("a2", "r", "hi").policy is None
    assert t.select("A", "r", "hi").target == "A"
    for bad in ("nope", "turnout/nope", "turnout/", "Auto"):
        with pytest.raises(GatewayError) as exc:
            t.select(bad, "r", "hi")
        assert exc.value.status == 404
    assert t.model_ids() == ["A", "B", "auto", "turnout/fix", "turnout/split"]


def test_weighted_seed_makes_decisions_repeatable() -> None:
    t1, t2 = RoutingTable(config()), RoutingTable(config())
    assert [t1.select("turnout/split", "r", "x").target for _ in range(50)] == [
        t2.select("turnout/split", "r", "x").target for _ in range(50)]


def test_replica_choice_prefers_idle_and_healthy() -> None:
    reg = WorkerRegistry(config())
    a1, a2 = reg.workers["a1"], reg.workers["a2"]
    a1.in_flight = 3
    assert reg.pick("A") is a2
    a2.health = Health.DOWN
    assert reg.pick("A") is a1
    a1.health = Health.DOWN
    with pytest.raises(GatewayError) as exc:
        reg.pick("A")
    assert exc.value.status == 503
    assert reg.pick("b").name == "b"
    with a2.track():
        assert a2.in_flight == 1
    assert a2.in_flight == 0
