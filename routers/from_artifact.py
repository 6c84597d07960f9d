"""Building a live router from a trained artifact."""

from __future__ import annotations

from routers.artifacts import Artifact
from routers.bandit import BanditRouter, LinUCB, Projection
from routers.base import Router
from routers.cost_aware import BudgetPacer
from routers.embedders import Embedder
from routers.learned import UtilityRouter
from routers.predictors import EnsemblePredictor, KnnIndex, KnnPredictor, ProbePredictor


def knn_predictor(art: Artifact) -> KnnPredictor:
    """The kNN part of a `knn` or `cost_aware` artifact."""
    a, knn = art.arrays, art.meta["knn"]
    index = KnnIndex(a["embeddings"], a["scores"], a.get("costs"))
    return KnnPredictor(index, k=int(knn["k"]), weighting=knn["weighting"], temperature=float(knn["temperature"]))


def router_from_artifact(name: str, art: Artifact, *, lam: float = 0.0, embedder: Embedder | None = None,
                         pacer: BudgetPacer | None = None) -> Router:
    """The router an artifact describes, under the policy name `name`."""
    a, meta = art.arrays, art.meta
    cost_ref = float(meta["cost_ref"])
    if art.router == "bandit":
        proj = Projection(mean=a["proj_mean"], components=a["proj_components"])
        bandit = LinUCB(len(art.models), a["bandit_a"].shape[1], alpha=float(meta["bandit"]["alpha"]))
        bandit.load(a["bandit_a"], a["bandit_b"], a["bandit_n"])
        return BanditRouter(name, art.models, proj, bandit, cost_ref=cost_ref, mean_costs=a["mean_costs"],
                            lam=float(meta["bandit"]["lambda"]) if lam == 0.0 else lam, embedder=embedder,
                            version=art.version)
    knn = knn_predictor(art)
    if art.router == "knn":
        return UtilityRouter(name, "knn", knn, art.models, cost_ref=cost_ref, lam=lam,
                             fallback_costs=a["mean_costs"], embedder=embedder, pacer=pacer, version=art.version)
    if art.router == "cost_aware":
        probe = ProbePredictor(a["probe_coef"], a["probe_intercept"])
        pred = EnsemblePredictor(knn, probe, float(meta["knn_weight"]))
        return UtilityRouter(name, "cost_aware", pred, art.models, cost_ref=cost_ref, lam=lam,
                             fallback_costs=a["mean_costs"], embedder=embedder, pacer=pacer, version=art.version)
    raise ValueError(f"artifact router type {art.router!r} is not one this Turnout builds")
