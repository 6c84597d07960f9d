"""Training routers on a routing table: hyper-parameters by cross-validation on the training rows only,
then an artifact of plain arrays. The same defaults serve every table; nothing is tuned per table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from routers.artifacts import Artifact
from routers.bandit import LinUCB, Projection
from routers.cost_aware import LAMBDA_GRID, choose
from routers.offline.dataset import RoutingData
from routers.offline.evaluation import aiq, apgr, hull
from routers.offline.splits import kfold
from routers.predictors import KnnIndex, KnnPredictor, ProbePredictor
from routers.textstats import STAT_NAMES, prompt_stats

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
ROUTER_TYPES = ("knn", "cost_aware", "bandit")


@dataclass(frozen=True)
class TrainOptions:
    """Search spaces and fixed settings; the defaults are used for every table."""

    seed: int = 0
    cv_folds: int = 3
    knn_k: tuple[int, ...] = (5, 10, 20, 40, 80, 160)
    knn_temperature: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1)  # softmax weighting; 0 means uniform
    probe_c: tuple[float, ...] = (0.3, 1.0, 3.0)
    knn_weights: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # ensemble share of the kNN prediction
    bandit_dim: int = 32
    bandit_alpha: float = 0.3
    bandit_lambda: float = 0.0


@dataclass
class Fitted:
    """What training produced: the artifact and how its hyper-parameters were chosen."""

    artifact: Artifact
    selection: dict[str, Any] = field(default_factory=dict)


def cost_ref_of(costs: F64 | None) -> float:
    """The normalising cost: the mean cost of the most expensive model (1 when there are no costs)."""
    if costs is None:
        return 1.0
    ref = float(np.nanmax(np.nanmean(costs, axis=0)))
    return ref if ref > 0 else 1.0


def policy_curve(q_pred: F64, c_pred: F64, scores: F64, costs: F64 | None, cost_ref: float,
                 lambdas: Sequence[float] = tuple(LAMBDA_GRID)) -> F64:
    """(len(lambdas), 2) points (mean true cost, mean true quality) of the lambda sweep. A chosen model
    whose score is unknown counts as 0."""
    rows = np.arange(len(q_pred))
    true_q = np.nan_to_num(scores)
    true_c = costs if costs is not None else np.zeros_like(scores)
    pts = []
    for lam in lambdas:
        pick = choose(q_pred, c_pred / cost_ref, float(lam))
        pts.append((float(true_c[rows, pick].mean()), float(true_q[rows, pick].mean())))
    return np.array(pts)


def selection_score(q_pred: F64, c_pred: F64, scores: F64, costs: F64 | None, cost_ref: float) -> float:
    """The criterion for hyper-parameters, the metric the table is judged by: AIQ of the lambda sweep where
    costs exist; without costs, APGR of the predicted gain for two models (RouteLLM's metric: what matters
    is ranking prompts by their need of the stronger model) and quality at lambda 0 for more."""
    if costs is None:
        known = np.nan_to_num(scores)
        if scores.shape[1] == 2:
            strong = int(np.argmax(known.mean(axis=0)))
            weak = 1 - strong
            if known[:, strong].mean() > known[:, weak].mean():
                return apgr(q_pred[:, strong] - q_pred[:, weak], known[:, strong], known[:, weak])
        rows = np.arange(len(q_pred))
        return float(known[rows, np.argmax(q_pred, axis=1)].mean())
    pts = policy_curve(q_pred, c_pred, scores, costs, cost_ref)
    return float(aiq(hull(pts), max_cost=float(np.nanmax(np.nanmean(costs, axis=0)))))


def _knn_oof(x: F32, data: RoutingData, folds: list[tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]],
             opts: TrainOptions) -> dict[tuple[int, float], tuple[F64, F64 | None]]:
    """Out-of-fold kNN predictions (quality, cost) for every (k, temperature) in the search space."""
    n, m = data.scores.shape
    out: dict[tuple[int, float], tuple[F64, F64 | None]] = {}
    for k in opts.knn_k:
        for t in (0.0, *opts.knn_temperature):
            out[(k, t)] = (np.zeros((n, m)), None if data.costs is None else np.zeros((n, m)))
    for tr, va in folds:
        index = KnnIndex(x[tr], data.scores[tr], None if data.costs is None else data.costs[tr])
        for (k, t), (q_out, c_out) in out.items():
            pred = KnnPredictor(index, k=k, weighting="uniform" if t == 0 else "softmax", temperature=t or 1.0)
            q_out[va] = pred.predict(x[va])
            c = pred.predict_cost(x[va])
            if c_out is not None and c is not None:
                c_out[va] = c
    return out


def _probe_oof(x: F32, stats: F64, data: RoutingData,
               folds: list[tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]], c: float) -> F64:
    q = np.zeros(data.scores.shape)
    for tr, va in folds:
        q[va] = ProbePredictor.fit(x[tr], data.scores[tr], c=c, stats=stats[tr]).predict(x[va], stats[va])
    return q


def _mean_costs(data: RoutingData) -> F64:
    return np.zeros(len(data.models)) if data.costs is None else np.nanmean(data.costs, axis=0)


def _base_meta(data: RoutingData, embedder_id: str, opts: TrainOptions) -> dict[str, Any]:
    return {"embedder": embedder_id, "models": list(data.models), "data_hash": data.data_hash,
            "rows": len(data), "cost_source": data.cost_source, "options": asdict(opts)}


def train(kind: str, data: RoutingData, x: F32, embedder_id: str, opts: TrainOptions | None = None) -> Fitted:
    """Train a router of type `kind` on all rows of `data` (whose embeddings are `x`)."""
    opts = opts or TrainOptions()
    if kind not in ROUTER_TYPES:
        raise ValueError(f"unknown router type {kind!r}; known: {', '.join(ROUTER_TYPES)}")
    meta = _base_meta(data, embedder_id, opts)
    cost_ref = cost_ref_of(data.costs)
    meta["cost_ref"] = cost_ref
    arrays: dict[str, Any] = {"mean_costs": _mean_costs(data)}
    if kind == "bandit":
        return _train_bandit(data, x, meta, arrays, cost_ref, opts)
    folds = kfold(data, k=opts.cv_folds, seed=opts.seed)
    knn = _knn_oof(x, data, folds, opts)
    mean_c = np.broadcast_to(_mean_costs(data), data.scores.shape)

    def c_of(pred: F64 | None) -> F64:
        return pred if pred is not None else np.asarray(mean_c)

    knn_scores = {key: selection_score(q, c_of(c), data.scores, data.costs, cost_ref) for key, (q, c) in knn.items()}
    best_k, best_t = max(knn_scores, key=lambda key: knn_scores[key])
    selection: dict[str, Any] = {"knn": {f"k={k},t={t}": round(v, 5) for (k, t), v in knn_scores.items()}}
    meta["knn"] = {"k": best_k, "weighting": "uniform" if best_t == 0 else "softmax", "temperature": best_t or 1.0}
    arrays.update(embeddings=x.astype(np.float32), scores=data.scores)
    if data.costs is not None:
        arrays["costs"] = data.costs
    if kind == "knn":
        meta["predictor"] = "knn"
        return Fitted(Artifact("knn", meta, arrays), selection)
    q_knn, c_knn = knn[(best_k, best_t)]
    stats = prompt_stats(data.prompts)
    probe_scores, probe_q = {}, {}
    for c in opts.probe_c:
        probe_q[c] = _probe_oof(x, stats, data, folds, c)
        probe_scores[c] = selection_score(probe_q[c], c_of(c_knn), data.scores, data.costs, cost_ref)
    best_c = max(probe_scores, key=lambda c: probe_scores[c])
    blend = {w: selection_score(w * q_knn + (1 - w) * probe_q[best_c], c_of(c_knn), data.scores, data.costs,
                                cost_ref) for w in opts.knn_weights}
    best_w = max(blend, key=lambda w: blend[w])
    selection.update(probe={str(c): round(v, 5) for c, v in probe_scores.items()},
                     knn_weight={str(w): round(v, 5) for w, v in blend.items()})
    probe = ProbePredictor.fit(x, data.scores, c=best_c, stats=stats)
    assert probe.text_stats is not None
    # The training prompts' raw statistics travel with the embeddings, for calibrating lambda from a target.
    arrays.update(probe_coef=probe.coef, probe_intercept=probe.intercept, text_stats=stats,
                  text_stats_mean=probe.text_stats.mean, text_stats_std=probe.text_stats.std)
    meta.update(predictor="ensemble", probe_c=best_c, knn_weight=best_w, probe_inputs=["embedding", *STAT_NAMES])
    return Fitted(Artifact("cost_aware", meta, arrays), selection)


def _train_bandit(data: RoutingData, x: F32, meta: dict[str, Any], arrays: dict[str, Any], cost_ref: float,
                  opts: TrainOptions) -> Fitted:
    """Warm start: every known (prompt, model, score) of the table is one observation of that arm."""
    proj = Projection.fit(x, opts.bandit_dim)
    z = proj(x)
    m, r = len(data.models), z.shape[1]
    bandit = LinUCB(m, r, alpha=opts.bandit_alpha)
    costs = data.costs if data.costs is not None else np.zeros_like(data.scores)
    for j in range(m):
        known = ~np.isnan(data.scores[:, j])
        zj = z[known]
        reward = data.scores[known, j] - opts.bandit_lambda * costs[known, j] / cost_ref
        bandit.a[j] += zj.T @ zj
        bandit.b[j] += zj.T @ reward
        bandit.n[j] += known.sum()
    meta.update(bandit={"dim": opts.bandit_dim, "alpha": opts.bandit_alpha, "lambda": opts.bandit_lambda})
    arrays.update(proj_mean=proj.mean, proj_components=proj.components, bandit_a=bandit.a, bandit_b=bandit.b,
                  bandit_n=bandit.n)
    return Fitted(Artifact("bandit", meta, arrays), {})
