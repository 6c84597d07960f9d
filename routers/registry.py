"""The explicit map from a policy's config `type` to the factory that builds it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from routers.base import Router
from routers.baselines import FixedRouter, WeightedRouter
from routers.specs import FixedSpec, WeightedSpec


@dataclass(frozen=True)
class RouterContext:
    """What a factory may hand to a router: randomness now; store, embedder and clock later."""

    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng())


def _fixed(name: str, spec: Any, ctx: RouterContext) -> Router:
    assert isinstance(spec, FixedSpec)
    return FixedRouter(name, spec.worker)


def _weighted(name: str, spec: Any, ctx: RouterContext) -> Router:
    assert isinstance(spec, WeightedSpec)
    rng = np.random.default_rng(spec.seed) if spec.seed is not None else ctx.rng
    return WeightedRouter(name, dict(spec.weights), rng)


RouterFactory = Callable[[str, Any, RouterContext], Router]

REGISTRY: dict[str, RouterFactory] = {
    "fixed": _fixed,
    "weighted": _weighted,
}


def build_router(name: str, spec: Any, ctx: RouterContext | None = None) -> Router:
    """Build the router for one named policy from its validated spec."""
    factory = REGISTRY.get(spec.type)
    if factory is None:
        raise KeyError(f"unknown policy type {spec.type!r}; known: {sorted(REGISTRY)}")
    return factory(name, spec, ctx or RouterContext())
