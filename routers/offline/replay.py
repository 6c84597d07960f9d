"""Online replay of a routing table through the bandit: route each prompt in random order, feed the
chosen model's score back as the reward, and measure cumulative regret."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from routers.bandit import BanditRouter, LinUCB, Projection
from routers.base import RoutingOutcome, RoutingRequest
from routers.offline.dataset import RoutingData
from routers.offline.evaluation import oracle_choice
from routers.offline.training import TrainOptions, cost_ref_of

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


@dataclass
class ReplayResult:
    """Cumulative regret per step against the best fixed model (in hindsight) and the oracle."""

    regret_vs_best_fixed: F64
    regret_vs_oracle: F64
    best_fixed_model: str
    mean_quality: float
    choices: npt.NDArray[np.intp]

    def summary(self) -> dict[str, float | str | int]:
        """Final values, for the JSON report."""
        n = len(self.choices)
        return {"steps": n, "best_fixed_model": self.best_fixed_model, "mean_quality": self.mean_quality,
                "regret_vs_best_fixed": float(self.regret_vs_best_fixed[-1]),
                "regret_vs_oracle": float(self.regret_vs_oracle[-1]),
                "regret_vs_best_fixed_last_quarter": float(self.regret_vs_best_fixed[-1]
                                                           - self.regret_vs_best_fixed[3 * n // 4])}


def replay(data: RoutingData, x: F32, rows: npt.NDArray[np.intp], proj_rows: npt.NDArray[np.intp],
           opts: TrainOptions | None = None, seed: int = 0) -> ReplayResult:
    """Replay `rows` in a seeded random order through a cold-start LinUCB (projection fitted on
    `proj_rows`, which need no scores: only their embeddings are used)."""
    opts = opts or TrainOptions()
    proj = Projection.fit(x[proj_rows], opts.bandit_dim)
    scores = np.nan_to_num(data.scores)
    costs = data.costs if data.costs is not None else np.zeros_like(scores)
    router = BanditRouter("replay", data.models, proj, LinUCB(len(data.models), opts.bandit_dim + 1,
                                                               alpha=opts.bandit_alpha),
                          cost_ref=cost_ref_of(data.costs), mean_costs=costs[rows].mean(axis=0),
                          lam=opts.bandit_lambda)
    order = np.random.default_rng(seed).permutation(rows)
    candidates = tuple(data.models)
    chosen = np.empty(len(order), dtype=np.intp)
    for step, i in enumerate(order):
        rid = str(step)
        d = router.route(RoutingRequest(request_id=rid, text="", candidates=candidates, embedding=x[i]))
        j = data.models.index(d.chosen)
        chosen[step] = j
        router.observe(RoutingOutcome(request_id=rid, chosen=d.chosen, ok=True, quality=float(scores[i, j]),
                                      cost_usd=float(costs[i, j])))
    got = scores[order, chosen]
    best = int(np.argmax(scores[order].mean(axis=0)))
    oracle = scores[order, oracle_choice(data.scores[order], None if data.costs is None else costs[order])]
    return ReplayResult(regret_vs_best_fixed=np.cumsum(scores[order, best] - got),
                        regret_vs_oracle=np.cumsum(oracle - got), best_fixed_model=data.models[best],
                        mean_quality=float(got.mean()), choices=chosen)


def plot_regret(path: Path, result: ReplayResult, title: str) -> None:
    """Cumulative regret against the best fixed model and the oracle, per step (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = np.arange(1, len(result.choices) + 1)
    ax.plot(steps, result.regret_vs_best_fixed, label=f"vs best fixed model ({result.best_fixed_model})")
    ax.plot(steps, result.regret_vs_oracle, label="vs oracle")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("requests replayed")
    ax.set_ylabel("cumulative regret (quality)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
