"""Building a live router from a trained artifact."""

from __future__ import annotations

from collections.abc import Sequence

from routers.artifacts import Artifact
from routers.bandit import BanditRouter, LinUCB, Projection
from routers.base import Router
from routers.cost_aware import BudgetPacer
from routers.embedding.base import Embedder
from routers.learned import UtilityRouter
from routers.predictors import EnsemblePredictor, KnnIndex, KnnPredictor, ProbePredictor
from routers.textstats import TextStats


def knn_predictor(art: Artifact) -> KnnPredictor:
    """The kNN part of a `knn` or `cost_aware` artifact."""
    a, knn = art.arrays, art.meta["knn"]
    index = KnnIndex(a["embeddings"], a["scores"], a.get("costs"))
    return KnnPredictor(index, k=int(knn["k"]), weighting=knn["weighting"], temperature=float(knn["temperature"]))


def router_from_artifact(name: str, art: Artifact, *, names: Sequence[str] | None = None, lam: float | None = None,
                         alpha: float | None = None, embedder: Embedder | None = None,
                         pacer: BudgetPacer | None = None, queue_penalty: float = 0.0) -> Router:
    """The router an artifact describes, under the policy name `name`.

    `names` label the artifact's model columns (default: the artifact's own model names), so a policy can
    route to this config's workers. `lam` and `alpha` default to what the artifact was trained with (0 for
    the utility routers).
    """
    a, meta = art.arrays, art.meta
    labels = list(names) if names is not None else art.models
    if len(labels) != len(art.models):
        raise ValueError(f"{len(labels)} names for the artifact's {len(art.models)} models")
    cost_ref = float(meta["cost_ref"])
    if art.router == "bandit":
        proj = Projection(mean=a["proj_mean"], components=a["proj_components"])
        trained = meta["bandit"]
        bandit = LinUCB(len(labels), a["bandit_a"].shape[1],
                        alpha=float(trained["alpha"]) if alpha is None else alpha)
        bandit.set_base(a["bandit_a"], a["bandit_b"], a["bandit_n"])
        return BanditRouter(name, labels, proj, bandit, cost_ref=cost_ref, mean_costs=a["mean_costs"],
                            lam=float(trained["lambda"]) if lam is None else lam, embedder=embedder,
                            version=art.version, queue_penalty=queue_penalty)
    knn = knn_predictor(art)
    if art.router == "knn":
        return UtilityRouter(name, "knn", knn, labels, cost_ref=cost_ref, lam=lam or 0.0,
                             fallback_costs=a["mean_costs"], embedder=embedder, pacer=pacer, version=art.version,
                             queue_penalty=queue_penalty)
    if art.router == "cost_aware":
        stats = TextStats(a["text_stats_mean"], a["text_stats_std"]) if "text_stats_mean" in a else None
        probe = ProbePredictor(a["probe_coef"], a["probe_intercept"], stats)
        pred = EnsemblePredictor(knn, probe, float(meta["knn_weight"]))
        return UtilityRouter(name, "cost_aware", pred, labels, cost_ref=cost_ref, lam=lam or 0.0,
                             fallback_costs=a["mean_costs"], embedder=embedder, pacer=pacer, version=art.version,
                             queue_penalty=queue_penalty)
    raise ValueError(f"artifact router type {art.router!r} is not one this Turnout builds")
