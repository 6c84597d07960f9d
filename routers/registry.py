"""The explicit map from a policy's config `type` to the factory that builds it.

Factories get the policy's validated spec and a `RouterContext` (randomness, the embedder id artifacts must
match, the directory relative artifact paths start from). A spec that cannot be built (a missing artifact,
one trained with another embedder, a model mapping that names nothing) raises `PolicyError` saying why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from routers.artifacts import Artifact, ArtifactError, load_artifact
from routers.base import Router
from routers.baselines import FixedRouter, WeightedRouter
from routers.cost_aware import BudgetPacer, TargetKind, lambda_for_target
from routers.from_artifact import router_from_artifact
from routers.learned import UtilityRouter
from routers.specs import BanditSpec, CostAwareSpec, FixedSpec, KnnSpec, LambdaTarget, WeightedSpec


class PolicyError(ValueError):
    """A policy spec that validates but cannot be built here."""


@dataclass(frozen=True)
class RouterContext:
    """What a factory may use: randomness, the embedder in use (by id) and where relative paths start."""

    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng())
    embedder_id: str | None = None
    base_dir: Path = field(default_factory=Path.cwd)


def _fixed(name: str, spec: Any, ctx: RouterContext) -> Router:
    assert isinstance(spec, FixedSpec)
    return FixedRouter(name, spec.worker)


def _weighted(name: str, spec: Any, ctx: RouterContext) -> Router:
    assert isinstance(spec, WeightedSpec)
    rng = np.random.default_rng(spec.seed) if spec.seed is not None else ctx.rng
    return WeightedRouter(name, dict(spec.weights), rng)


def artifact_path(spec: KnnSpec | CostAwareSpec | BanditSpec, ctx: RouterContext) -> Path:
    """The spec's artifact directory, relative paths taken from `ctx.base_dir`."""
    path = Path(spec.artifact).expanduser()
    return path if path.is_absolute() else ctx.base_dir / path


def _load(spec: KnnSpec | CostAwareSpec | BanditSpec, ctx: RouterContext) -> tuple[Artifact, list[str]]:
    """The artifact (checked against the embedder in use, and against the spec's type) and the names its
    model columns route to."""
    try:
        art = load_artifact(artifact_path(spec, ctx), embedder_id=ctx.embedder_id)
    except ArtifactError as exc:
        raise PolicyError(str(exc)) from None
    if art.router != spec.type:
        raise PolicyError(f"artifact {spec.artifact} was trained as {art.router!r}, not {spec.type!r}")
    unknown = sorted(set(spec.models) - set(art.models))
    if unknown:
        raise PolicyError(f"models: {unknown} are not models of artifact {spec.artifact} (it has {art.models})")
    names = [spec.models.get(m, m) for m in art.models]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise PolicyError(f"models: {twice} would stand for more than one of the artifact's models")
    return art, names


def _lambda_from_target(router: UtilityRouter, art: Artifact, target: LambdaTarget) -> float:
    """Lambda meeting `target` on the artifact's own training prompts (in-sample predictions)."""
    q, c = router.scores(art.arrays["embeddings"], art.arrays.get("text_stats"))
    strongest = int(np.nanargmax(np.nanmean(art.arrays["scores"], axis=0)))
    kind: TargetKind
    if target.max_cost_usd is not None:
        kind, value = "max_cost", target.max_cost_usd
    elif target.min_quality is not None:
        kind, value = "min_quality", target.min_quality
    else:
        assert target.strong_share is not None
        kind, value = "strong_share", target.strong_share
    return lambda_for_target(kind, value, q, c, router.cost_ref, strongest)


def _utility(name: str, spec: Any, ctx: RouterContext) -> Router:
    assert isinstance(spec, KnnSpec | CostAwareSpec)
    art, names = _load(spec, ctx)
    pacer = BudgetPacer(spec.budget_usd_per_hour) if spec.budget_usd_per_hour is not None else None
    router = router_from_artifact(name, art, names=names, lam=spec.lambda_ or 0.0, pacer=pacer,
                                  queue_penalty=spec.queue_penalty)
    assert isinstance(router, UtilityRouter)
    if spec.target is not None:
        router.lam = _lambda_from_target(router, art, spec.target)
    return router


def _bandit(name: str, spec: Any, ctx: RouterContext) -> Router:
    assert isinstance(spec, BanditSpec)
    art, names = _load(spec, ctx)
    return router_from_artifact(name, art, names=names, lam=spec.lambda_, alpha=spec.alpha,
                                queue_penalty=spec.queue_penalty)


RouterFactory = Callable[[str, Any, RouterContext], Router]

REGISTRY: dict[str, RouterFactory] = {
    "fixed": _fixed,
    "weighted": _weighted,
    "knn": _utility,
    "cost_aware": _utility,
    "bandit": _bandit,
}


def build_router(name: str, spec: Any, ctx: RouterContext | None = None) -> Router:
    """Build the router for one named policy from its validated spec (`PolicyError` if it cannot be)."""
    factory = REGISTRY.get(spec.type)
    if factory is None:
        raise KeyError(f"unknown policy type {spec.type!r}; known: {sorted(REGISTRY)}")
    return factory(name, spec, ctx or RouterContext())
