"""Offline evaluation of routers on a routing table: every metric of the data README, as JSON + plot.

Routers are trained on training rows only: the table's `train` split (test prompts that also occur in
train are dropped from test), or, without a split column, seeded k-fold cross-validation stratified by
task with duplicated prompts kept on one side. `group_level` evaluates each task group on its own
(e.g. level 1 turns `mmlu/anatomy` into the group `mmlu`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from routers.artifacts import Artifact
from routers.bandit import BanditRouter
from routers.from_artifact import router_from_artifact
from routers.learned import UtilityRouter
from routers.offline.dataset import RoutingData
from routers.offline.evaluation import (
    apgr,
    best_single,
    cpt,
    curve_metrics,
    oracle_choice,
    pgr_curve,
    policy_point,
    random_baseline,
)
from routers.offline.splits import dedupe_within, kfold, train_test
from routers.offline.training import TrainOptions, cost_ref_of, policy_curve, train
from routers.textstats import prompt_stats

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate and how to split."""

    routers: tuple[str, ...] = ("knn", "cost_aware", "bandit")
    split: str = "test"
    folds: int = 5
    seed: int = 0
    group_level: int | None = None
    train: TrainOptions = field(default_factory=TrainOptions)


def predict(kind: str, data: RoutingData, x: F32, tr: npt.NDArray[np.intp], te: npt.NDArray[np.intp],
            embedder_id: str, opts: TrainOptions) -> tuple[F64, F64, dict[str, Any]]:
    """Train `kind` on rows tr, predict quality and cost for rows te; also the hyper-parameters chosen."""
    fitted = train(kind, data.subset(tr), x[tr], embedder_id, opts)
    q, c = artifact_predictions(fitted.artifact, [data.prompts[i] for i in te], x[te])
    chosen = {k: v for k, v in fitted.artifact.meta.items() if k in ("knn", "probe_c", "knn_weight", "bandit")}
    return q, c, chosen


def artifact_predictions(artifact: Artifact, prompts: list[str], x: F32) -> tuple[F64, F64]:
    """A trained artifact's predicted quality and cost (n x m) for prompts whose embeddings are `x` (a bandit's
    estimated reward, without its exploration bonus, and its mean costs)."""
    router = router_from_artifact("eval", artifact)
    if isinstance(router, UtilityRouter):
        return router.scores(x, prompt_stats(prompts))
    if isinstance(router, BanditRouter):
        q = router.projection(x) @ router.bandit.theta.T
        return q, np.broadcast_to(router.mean_costs, q.shape).copy()
    raise TypeError(type(router).__name__)  # pragma: no cover - every trained type is one of the above


def eval_rows(data: RoutingData, opts: EvalOptions) -> list[tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]]:
    """(train, test) row sets: the table's split, or k folds over its distinct prompts."""
    if data.splits is not None and (data.splits == opts.split).any():
        tr, te = train_test(data, opts.split)
        return [(tr, dedupe_within(data, te))]
    rows = dedupe_within(data, np.arange(len(data)))
    sub = data.subset(rows)
    return [(rows[a], rows[b]) for a, b in kfold(sub, k=opts.folds, seed=opts.seed, stratify_by_task=True)]


def evaluate_group(data: RoutingData, x: F32, embedder_id: str, opts: EvalOptions,
                   progress: Progress | None = None) -> dict[str, Any]:
    """All metrics for one table (or task group): baselines, then each router's curve."""
    splits = eval_rows(data, opts)
    te_all = np.concatenate([te for _, te in splits])
    scores = data.scores[te_all]
    costs = None if data.costs is None else data.costs[te_all]
    preds: dict[str, tuple[F64, F64]] = {}
    chosen: dict[str, list[dict[str, Any]]] = {}
    for kind in opts.routers:
        q_parts, c_parts = [], []
        for i, (tr, te) in enumerate(splits):
            if progress:
                progress(f"{kind} fold {i + 1}/{len(splits)}")
            q, c, hp = predict(kind, data, x, tr, te, embedder_id, opts.train)
            q_parts.append(q)
            c_parts.append(c)
            chosen.setdefault(kind, []).append(hp)
        preds[kind] = (np.vstack(q_parts), np.vstack(c_parts))
    return summarise(data.models, scores, costs, preds, chosen, len(splits))


def summarise(models: list[str], scores: F64, costs: F64 | None, preds: dict[str, tuple[F64, F64]],
              chosen: dict[str, list[dict[str, Any]]], n_splits: int) -> dict[str, Any]:
    """Baselines and per-router metrics from predictions on the evaluation rows."""
    b_idx, b_q, b_c = best_single(scores, costs)
    o_c, o_q = policy_point(oracle_choice(scores, costs), scores, costs)
    r_q, r_c = random_baseline(scores, costs)
    singles = {m: (float(np.nanmean(costs[:, j])) if costs is not None else 0.0,
                   float(np.nanmean(np.nan_to_num(scores[:, j])))) for j, m in enumerate(models)}
    out: dict[str, Any] = {
        "rows": len(scores), "splits": n_splits, "models": models,
        "best_single": {"model": models[b_idx], "quality": b_q, "cost": b_c},
        "oracle": {"quality": o_q, "cost": o_c},
        "random": {"quality": r_q, "cost": r_c},
        "singles": {m: {"cost": c, "quality": q} for m, (c, q) in singles.items()},
        "routers": {},
    }
    cost_ref = cost_ref_of(costs)
    curves = {k: policy_curve(q, c, scores, costs, cost_ref) for k, (q, c) in preds.items()}
    max_cost = max([float(p[:, 0].max()) for p in curves.values()] + [c for c, _ in singles.values()])
    for kind, (q, _) in preds.items():
        pts = curves[kind]
        rec: dict[str, Any] = {"quality_at_lambda0": float(pts[0, 1]), "cost_at_lambda0": float(pts[0, 0]),
                               "hyperparameters": chosen.get(kind, [])}
        if costs is not None and max_cost > 0 and b_c is not None:
            rec.update(curve_metrics(pts, (b_q, b_c), o_q, max_cost))
        if len(models) == 2:
            rec.update(_two_model(models, b_idx, q, scores))
        out["routers"][kind] = rec
    return out


def _two_model(models: list[str], strong: int, q: F64, scores: F64) -> dict[str, Any]:
    """RouteLLM's metrics: the router's score is the predicted gain of the strong model over the weak."""
    weak = 1 - strong
    gain = q[:, strong] - q[:, weak]
    qs, qw = np.nan_to_num(scores[:, strong]), np.nan_to_num(scores[:, weak])
    if qs.mean() == qw.mean():  # no gap to recover: PGR is undefined, which is a finding, not a failure
        return {"strong": models[strong], "weak": models[weak], "apgr": None, "cpt50": None, "cpt80": None,
                "pgr_curve": None, "note": "PGR undefined: both models have the same mean quality on these rows"}
    shares, pgr = pgr_curve(gain, qs, qw)
    return {"strong": models[strong], "weak": models[weak], "apgr": apgr(gain, qs, qw),
            "cpt50": cpt(0.5, gain, qs, qw), "cpt80": cpt(0.8, gain, qs, qw),
            "pgr_curve": np.column_stack([shares, pgr]).tolist()}


def task_groups(data: RoutingData, level: int | None) -> dict[str, npt.NDArray[np.intp]]:
    """Row indices per task group ("all" when not grouping)."""
    if level is None:
        return {"all": np.arange(len(data))}
    keys = np.array(["/".join(str(t).split("/")[:level]) or "(no task)" for t in data.tasks])
    return {k: np.flatnonzero(keys == k) for k in sorted(set(keys.tolist()))}
