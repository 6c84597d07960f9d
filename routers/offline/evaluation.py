"""Offline metrics for routing policies, as defined in shared/data/README.md ("Metrics everyone reports").

Pure numpy on arrays: `scores` is n prompts x m models (NaN = unknown), `costs` the same shape in USD
or None, a policy's `choice` one model index per prompt. Unknown scores: a prompt whose every score
is NaN is left out of every mean (nothing can be said about it); otherwise a chosen model with a NaN
score counts as quality 0 and a NaN cost as 0 USD, so that every policy is judged on the same prompts
and choosing an unmeasured answer earns nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IndexArray = npt.NDArray[np.intp]
ArrayLike = npt.ArrayLike


def _known(scores: FloatArray) -> npt.NDArray[np.bool_]:
    """Prompts with at least one known score: the only ones any mean is taken over."""
    return np.logical_not(np.isnan(scores).all(axis=1))


def _zero_nan(values: FloatArray) -> FloatArray:
    return np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)


def oracle_choice(
    scores: FloatArray, costs: FloatArray | None = None, order: Sequence[int] | None = None
) -> IndexArray:
    """Per prompt, the best-scoring model; among equal scores the cheapest (when `costs` is given),
    then the first in `order` (a preference order of model indices; default 0, 1, ..., m-1)."""
    m = scores.shape[1]
    rank = np.arange(m)
    if order is not None:
        if sorted(order) != list(range(m)):
            raise ValueError(f"order must be a permutation of 0..{m - 1}, got {list(order)}")
        rank[np.asarray(order)] = np.arange(m)
    filled = np.where(np.isnan(scores), -np.inf, scores)
    tied = filled == filled.max(axis=1, keepdims=True)
    if costs is not None:
        price = np.where(tied, np.nan_to_num(costs, nan=np.inf), np.inf)
        tied &= price == price.min(axis=1, keepdims=True)
    choice: IndexArray = np.where(tied, rank[None, :], m).argmin(axis=1)  # argmin of rank = most preferred
    return choice


def policy_point(
    choice: npt.NDArray[np.integer[Any]], scores: FloatArray, costs: FloatArray | None
) -> tuple[float | None, float]:
    """(mean cost, mean quality) of sending prompt i to model choice[i]; cost None without costs."""
    rows = np.arange(scores.shape[0])
    known = _known(scores)
    quality = float(_zero_nan(scores[rows, choice])[known].mean())
    cost = None if costs is None else float(_zero_nan(costs[rows, choice])[known].mean())
    return cost, quality


def best_single(scores: FloatArray, costs: FloatArray | None) -> tuple[int, float, float | None]:
    """(model index, mean quality, mean cost) of the model with the highest mean score; ties go to the
    cheaper model, then the lower index. Mean cost is None without costs."""
    known = _known(scores)
    quality = _zero_nan(scores[known]).mean(axis=0)
    cost = None if costs is None else _zero_nan(costs[known]).mean(axis=0)
    tie_break = np.zeros_like(quality) if cost is None else cost
    best = int(np.lexsort((np.arange(quality.size), tie_break, -quality))[0])
    return best, float(quality[best]), None if cost is None else float(cost[best])


def random_baseline(scores: FloatArray, costs: FloatArray | None) -> tuple[float, float | None]:
    """(quality, cost) expected from choosing a model uniformly at random for every prompt."""
    known = _known(scores)
    quality = float(_zero_nan(scores[known]).mean())
    return quality, None if costs is None else float(_zero_nan(costs[known]).mean())


def hull(points: ArrayLike) -> FloatArray:
    """The non-decreasing upper convex hull of (cost, quality) points, sorted by cost.

    A point is dropped if another costs no more and gives at least as much quality, or if it lies on or
    under the chord between two others: mixing two operating points at random reaches every point of
    that chord, so only the concave, strictly increasing frontier is worth reporting.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    pts = pts[np.isfinite(pts).all(axis=1)]
    if pts.shape[0] == 0:
        raise ValueError("hull of no finite points")
    frontier: list[tuple[float, float]] = []
    for c, q in pts[np.lexsort((-pts[:, 1], pts[:, 0]))].tolist():  # cost up, then quality down
        if not frontier or q > frontier[-1][1]:
            frontier.append((c, q))
    out: list[tuple[float, float]] = []
    for p in frontier:
        while len(out) >= 2 and _not_right_turn(out[-2], out[-1], p):
            out.pop()
        out.append(p)
    return np.array(out, dtype=np.float64)


def _not_right_turn(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> bool:
    """True when `a` lies on or under the chord o-b (collinear within rounding counts as under)."""
    left = (a[0] - o[0]) * (b[1] - o[1])
    right = (a[1] - o[1]) * (b[0] - o[0])
    return left - right >= -1e-12 * (abs(left) + abs(right))


# Means of the same numbers summed in a different order differ in the last bits, so a point compared
# with the hull (e.g. the best single model against a hull it is a vertex of) is matched within this.
_REL_TOL = 1e-9


def _beyond(x: float, limit: float) -> bool:
    """x > limit by more than float rounding."""
    return x - limit > _REL_TOL * max(abs(x), abs(limit))


def _as_hull(h: ArrayLike) -> FloatArray:
    arr = np.asarray(h, dtype=np.float64).reshape(-1, 2)
    if arr.shape[0] == 0:
        raise ValueError("empty hull")
    return arr


def quality_at_cost(h: ArrayLike, c: float) -> float | None:
    """Quality the hull reaches at cost `c`: linear between vertices, flat right of the last vertex,
    None left of the first (nothing that cheap was measured), all within float rounding."""
    arr = _as_hull(h)
    if _beyond(arr[0, 0], c):
        return None
    return float(np.interp(c, arr[:, 0], arr[:, 1]))


def cost_to_quality(h: ArrayLike, q: float) -> float | None:
    """Smallest cost at which the hull reaches quality `q` (within float rounding); None if it never does."""
    arr = _as_hull(h)
    if _beyond(q, arr[-1, 1]):
        return None
    if q <= arr[0, 1]:
        return float(arr[0, 0])
    return float(np.interp(q, arr[:, 1], arr[:, 0]))  # hull quality is strictly increasing


def aiq(h: ArrayLike, max_cost: float, *, left: Literal["zero", "flat"] = "zero") -> float:
    """Area under the hull over costs [0, max_cost], divided by max_cost (RouterBench's AIQ).

    `max_cost` is the largest cost among the compared policies; the hull is extended flat to it (and
    cut there). Left of the hull's first vertex, `left="zero"` counts quality 0 (nothing cheaper was
    achieved) and `left="flat"` counts the first vertex's quality; report which one you use.
    """
    if max_cost <= 0:
        raise ValueError("max_cost must be > 0")
    arr = _as_hull(h)
    x0 = arr[0, 0]
    inner = arr[(arr[:, 0] > 0) & (arr[:, 0] < max_cost), 0]
    cuts = np.unique(np.concatenate([[0.0, max_cost], inner]))
    left_value = 0.0 if left == "zero" else float(arr[0, 1])
    area = 0.0
    for a, b in itertools.pairwise(cuts):
        if b <= x0:  # x0 is itself a cut when inside (0, max_cost), so no segment straddles it
            area += (b - a) * left_value
        else:
            fa, fb = np.interp([a, b], arr[:, 0], arr[:, 1])
            area += (b - a) * (fa + fb) / 2
    return float(area / max_cost)


def curve_metrics(
    points: ArrayLike,
    best: tuple[float, float],
    oracle_quality: float,
    max_cost: float,
    *,
    left: Literal["zero", "flat"] = "zero",
) -> dict[str, Any]:
    """The README's curve metrics for one policy's (cost, quality) points; `best` is the best single
    model's (quality, cost). Values that the hull never reaches are None."""
    h = hull(points)
    best_q, best_c = best
    q_at = quality_at_cost(h, best_c)
    c_to = cost_to_quality(h, best_q)
    gap = oracle_quality - best_q
    return {
        "aiq": aiq(h, max_cost, left=left),
        "quality_at_best_single_cost": q_at,
        "cost_to_best_single_quality": None if c_to is None or best_c <= 0 else c_to / best_c,
        "oracle_gap_share": None if q_at is None or gap == 0 else (q_at - best_q) / gap,
        "curve": h.tolist(),
    }


# Two-model tables (RouteLLM). Convention from lm-sys/RouteLLM routellm/evals/benchmarks.py
# (MMLU/GSM8K/MTBench.evaluate) and routellm/evals/evaluate.py (generate_results):
#   thresholds = pd.qcut(score, 10, retbins=True)[1]: the 11 quantile edges of the router's score
#   (min, the 9 inner deciles, max; linear interpolation). For every edge but the last, a prompt goes
#   to the strong model when score >= edge (the min edge therefore gives 100% strong calls); for the
#   last edge, when score > edge (0% strong). So both 0% and 100% are included and ties at an edge
#   all go to the strong model (a share can exceed its nominal decile). pd.qcut raises on repeated
#   edges; we keep them instead (they add coincident points, which the trapezoid ignores).
#   APGR = (trapz(quality, share) - weak * span) / ((strong - weak) * span) with the points sorted
#   by share (span = 1 here), i.e. the trapezoidal mean of PGR over the strong-call share.
#   CPT: RouteLLM's np.interp(target, quality, share) along the same points, which equals the
#   smallest interpolated share reaching the target when PGR rises with share; we take that smallest
#   share directly so that a non-monotone curve still gives a defined answer.


def _pair(strong_score: ArrayLike, q_strong: ArrayLike, q_weak: ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
    s, qs, qw = (np.asarray(a, dtype=np.float64).ravel() for a in (strong_score, q_strong, q_weak))
    if not s.size == qs.size == qw.size > 0:
        raise ValueError("strong_score, q_strong and q_weak must be non-empty and of equal length")
    if not (np.isfinite(s).all() and np.isfinite(qs).all() and np.isfinite(qw).all()):
        raise ValueError("strong_score, q_strong and q_weak must be finite")
    if qs.mean() == qw.mean():
        raise ValueError("PGR is undefined: the strong and weak models have the same mean quality")
    return s, qs, qw


def _pgr(strong: npt.NDArray[np.bool_], qs: FloatArray, qw: FloatArray) -> float:
    return float((np.where(strong, qs, qw).mean() - qw.mean()) / (qs.mean() - qw.mean()))


def pgr_curve(
    strong_score: ArrayLike, q_strong: ArrayLike, q_weak: ArrayLike, *, n_bins: int = 10
) -> tuple[FloatArray, FloatArray]:
    """(strong-call shares, PGR) at RouteLLM's thresholds (the n_bins-quantile edges of the router's
    score, see the comment above), sorted by share; higher `strong_score` = more need of the strong model."""
    s, qs, qw = _pair(strong_score, q_strong, q_weak)
    edges = np.quantile(s, np.linspace(0.0, 1.0, n_bins + 1))
    picks = [s >= t if i < n_bins else s > t for i, t in enumerate(edges)]
    shares = np.array([p.mean() for p in picks])
    pgr = np.array([_pgr(p, qs, qw) for p in picks])
    order = np.argsort(shares, kind="stable")
    return shares[order], pgr[order]


def pgr_at_share(share: float, strong_score: ArrayLike, q_strong: ArrayLike, q_weak: ArrayLike) -> float:
    """PGR when exactly round(share * n) prompts, those with the highest score, go to the strong model;
    equal scores are taken in row order, so the result is deterministic."""
    s, qs, qw = _pair(strong_score, q_strong, q_weak)
    if not 0.0 <= share <= 1.0:
        raise ValueError("share must be in [0, 1]")
    strong = np.zeros(s.size, dtype=bool)
    strong[np.argsort(-s, kind="stable")[: round(share * s.size)]] = True
    return _pgr(strong, qs, qw)


def apgr(strong_score: ArrayLike, q_strong: ArrayLike, q_weak: ArrayLike, *, n_bins: int = 10) -> float:
    """Average performance gap recovered: the trapezoidal mean of PGR over the strong-call share along
    RouteLLM's decile thresholds (0.5 for a router no better than chance)."""
    shares, pgr = pgr_curve(strong_score, q_strong, q_weak, n_bins=n_bins)
    span = shares[-1] - shares[0]
    return float(np.trapezoid(pgr, shares) / span) if span > 0 else float(pgr.mean())


def cpt(
    x: float, strong_score: ArrayLike, q_strong: ArrayLike, q_weak: ArrayLike, *, n_bins: int = 10
) -> float | None:
    """Call-performance threshold: the smallest strong-call share (a fraction) whose PGR is >= x, on
    the piecewise-linear curve through RouteLLM's threshold points (a point between two thresholds is
    reached by mixing them at random). `x` is a fraction: 0.5 = CPT(50%); targets above 1 are allowed
    (a router can beat the strong model), and None means the curve never reaches x."""
    if not x >= 0.0:
        raise ValueError("x is a fraction of the gap >= 0 (0.5 means CPT(50%))")
    shares, pgr = pgr_curve(strong_score, q_strong, q_weak, n_bins=n_bins)
    if pgr[0] >= x:
        return float(shares[0])
    for i in range(1, shares.size):
        if pgr[i] >= x:
            s0, s1, p0, p1 = shares[i - 1], shares[i], pgr[i - 1], pgr[i]
            return float(s0 + (x - p0) * (s1 - s0) / (p1 - p0))  # p0 < x <= p1, so p1 > p0
    return None


def _figure(title: str) -> tuple[Any, Any]:
    """A figure drawn by the Agg canvas directly: headless, and pyplot's global backend is untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig, ax


def plot_curves(
    path: Path,
    curves: Mapping[str, ArrayLike],
    singles: Mapping[str, tuple[float, float]],
    oracle: tuple[float, float],
    best_single_name: str,
    title: str,
) -> None:
    """Cost-quality hulls per policy, single models as labelled points (cost, quality), the oracle as
    a star, and dashed guides at the best single model's quality and cost; written as PNG to `path`."""
    fig, ax = _figure(title)
    for name, h in curves.items():
        arr = _as_hull(h)
        ax.plot(arr[:, 0], arr[:, 1], marker="o", markersize=4, linewidth=1.5, label=name)
    costs = [c for c, _ in singles.values()]
    qualities = [q for _, q in singles.values()]
    ax.scatter(costs, qualities, color="grey", marker="s", s=25, zorder=3, label="single models")
    for name, (c, q) in singles.items():
        ax.annotate(name.split("/")[-1], (c, q), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.scatter([oracle[0]], [oracle[1]], marker="*", s=220, color="gold", edgecolor="black", zorder=4, label="oracle")
    best_c, best_q = singles[best_single_name]
    ax.axhline(best_q, color="black", linestyle="--", linewidth=0.8, label=f"best single: {best_single_name}")
    ax.axvline(best_c, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlabel("mean cost per prompt (USD)")
    ax.set_ylabel("mean quality")
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_pgr(path: Path, curves: Mapping[str, tuple[ArrayLike, ArrayLike]], title: str) -> None:
    """PGR against strong-model call share per router (two-model tables), with the random diagonal;
    written as PNG to `path`."""
    fig, ax = _figure(title)
    for name, (shares, pgr) in curves.items():
        ax.plot(np.asarray(shares), np.asarray(pgr), marker="o", markersize=4, label=name)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="chance (random choice)")
    ax.axhline(1.0, color="black", linestyle=":", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("strong-model call share")
    ax.set_ylabel("performance gap recovered (PGR)")
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, format="png")
