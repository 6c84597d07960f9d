"""Routers that choose by predicted quality minus lambda x predicted cost: `knn` and `cost_aware`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from routers.base import CandidateScore, RoutingDecision, RoutingOutcome, RoutingRequest
from routers.cost_aware import BudgetPacer, QualityPredictor
from routers.embedding.base import Embedder
from routers.textstats import prompt_stats

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


class UtilityRouter:
    """Routes each prompt to argmax over candidates of predicted quality - lambda x normalised cost.

    `models` label the predictor's columns (the routing table's model names, or the config names they route
    to). A `pacer`, when given, owns lambda and moves it so that spend tracks a budget; `observe` feeds it the
    actual cost. `queue_penalty` is subtracted from a candidate's utility per request waiting in its queue.
    """

    needs_embedding = True

    def __init__(self, name: str, kind: str, predictor: QualityPredictor, models: Sequence[str], *,
                 cost_ref: float, lam: float = 0.0, fallback_costs: F64 | None = None,
                 embedder: Embedder | None = None, pacer: BudgetPacer | None = None, version: str = "",
                 queue_penalty: float = 0.0) -> None:
        self.name, self.kind, self.predictor = name, kind, predictor
        self.models = list(models)
        self.cost_ref, self.lam, self.pacer = cost_ref, lam, pacer
        self.queue_penalty = queue_penalty
        self.embedder, self.version = embedder, version
        # Mean cost per model on the training data, for predictors that do not predict cost.
        self.fallback_costs = fallback_costs if fallback_costs is not None else np.zeros(len(self.models))

    def targets(self) -> Sequence[str]:
        """The models this router chooses among."""
        return list(self.models)

    def current_lambda(self) -> float:
        """Lambda in force: the pacer's when pacing, else the configured one."""
        return self.pacer.lam if self.pacer is not None else self.lam

    def scores(self, x: F32, stats: F64 | None = None) -> tuple[F64, F64]:
        """Predicted quality and cost (USD) of every model for embeddings x (n, d) and the prompts' raw text
        statistics (`routers.textstats.prompt_stats`; needed when the predictor's probe uses them)."""
        q, c = self.predictor.predict_with_cost(x, stats)
        if c is None:
            c = np.broadcast_to(self.fallback_costs, q.shape).copy()
        return q, c

    def _embedding(self, req: RoutingRequest) -> F32:
        if req.embedding is not None:
            return req.embedding.reshape(1, -1).astype(np.float32, copy=False)
        if self.embedder is None:
            raise ValueError(f"policy {self.name!r} needs the prompt's embedding and has no embedder")
        x: F32 = self.embedder.embed([req.text])
        return x

    def route(self, req: RoutingRequest) -> RoutingDecision:
        """Choose among the request's candidates (all models when it names none this router knows)."""
        stats = prompt_stats([req.text]) if self.predictor.uses_text_stats else None
        q, c = self.scores(self._embedding(req), stats)
        q, c = q[0], c[0]
        lam = self.current_lambda()
        names = [m for m in self.models if m in req.candidates] or self.models
        cols = np.array([self.models.index(m) for m in names])
        utility = q[cols] - lam * c[cols] / self.cost_ref
        why = ""
        if self.queue_penalty and req.queue:
            waiting = np.array([req.queue.get(n, 0.0) for n in names])
            utility = utility - self.queue_penalty * waiting
            if waiting.any():
                why = f", queue penalty {self.queue_penalty:g}/waiting request"
        allowed = np.ones(len(cols), dtype=bool)
        if req.max_cost_usd is not None:
            allowed &= c[cols] <= req.max_cost_usd
            why += f", cost <= ${req.max_cost_usd:g}"
        if req.min_quality is not None:
            allowed &= q[cols] >= req.min_quality
            why += f", quality >= {req.min_quality:g}"
        if not allowed.any():  # no candidate meets the limits: the best effort is the best utility
            allowed[:] = True
            why += " (no candidate meets the limits)"
        order = sorted(range(len(cols)), key=lambda i: (not allowed[i], -utility[i], c[cols[i]]))
        ranking = tuple(
            CandidateScore(name=names[i], score=float(utility[i]), predicted_quality=float(q[cols[i]]),
                           predicted_cost_usd=float(c[cols[i]]))
            for i in order
        )
        best = ranking[0]
        reason = (f"max quality - {lam:.3g} x cost{why}: {best.name} "
                  f"(q={best.predicted_quality:.3f}, ${best.predicted_cost_usd:.3g})")
        return RoutingDecision(chosen=best.name, ranking=ranking, reason=reason, policy=self.name,
                               version=self.version)

    def observe(self, outcome: RoutingOutcome) -> None:
        """Feed the actual cost to the budget pacer (when pacing); the predictors do not learn online."""
        if self.pacer is not None and outcome.cost_usd is not None:
            self.pacer.record(outcome.cost_usd)
