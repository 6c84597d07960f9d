"""Choosing a model by predicted quality minus lambda x predicted cost, and setting lambda.

Costs are divided by `cost_ref` (the mean cost of the most expensive model on the training data), so
lambda has no unit: lambda = 1 trades the whole quality scale against the whole cost range.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
TargetKind = Literal["max_cost", "min_quality", "strong_share"]

# Swept to draw a policy's cost-quality curve: 0 (quality only) up to "always the cheapest".
LAMBDA_GRID = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 90)])


class QualityPredictor(Protocol):
    """What a utility router needs from a predictor."""

    kind: str

    @property
    def uses_text_stats(self) -> bool:
        """Whether predictions need the prompts' raw text statistics (`routers.textstats.prompt_stats`)."""
        ...

    def predict(self, x: F32, stats: F64 | None = None) -> F64:
        """(n, m) predicted quality from embeddings and (if the predictor uses them) raw text statistics."""
        ...

    def predict_cost(self, x: F32) -> F64 | None:
        """(n, m) predicted cost in USD, or None."""
        ...

    def predict_with_cost(self, x: F32, stats: F64 | None = None) -> tuple[F64, F64 | None]:
        """Both at once (one neighbour search where there is one)."""
        ...


def choose(q: F64, c: F64, lam: float, allowed: npt.NDArray[np.bool_] | None = None) -> npt.NDArray[np.intp]:
    """Per row, the index maximising q - lam * c among allowed columns; ties go to the cheaper model."""
    utility: F64 = q - lam * c - 1e-9 * c  # the tiny term breaks exact ties toward the cheaper model
    if allowed is not None:
        utility = np.where(allowed, utility, -np.inf)
    picks: npt.NDArray[np.intp] = np.argmax(utility, axis=1)
    return picks


def _achieved(kind: TargetKind, q: F64, c_usd: F64, lam: float, c_norm: F64, strongest: int) -> float:
    pick = choose(q, c_norm, lam)
    rows = np.arange(len(pick))
    if kind == "max_cost":
        return float(c_usd[rows, pick].mean())
    if kind == "min_quality":
        return float(q[rows, pick].mean())
    return float((pick == strongest).mean())


def lambda_for_target(kind: TargetKind, value: float, q: F64, c_usd: F64, cost_ref: float,
                      strongest: int, steps: int = 60) -> float:
    """Lambda meeting a target on calibration predictions (q, c_usd of shape (n, m)).

    Each target is monotone in lambda (a larger lambda never picks a pricier model for a prompt), so a
    bisection on log-lambda finds it. `max_cost`: the smallest lambda with mean USD per request <= value;
    `strong_share`: the smallest lambda with share of calls to model `strongest` <= value (RouteLLM's
    calibration); `min_quality`: the largest lambda with mean predicted quality >= value. A target that
    cannot be met gives the nearest end (0 or the largest lambda tried).
    """
    c_norm = c_usd / cost_ref
    lo_end, hi_end = -6.0, 4.0  # log10 lambda

    def feasible(lam: float) -> bool:
        got = _achieved(kind, q, c_usd, lam, c_norm, strongest)
        return got >= value - 1e-12 if kind == "min_quality" else got <= value + 1e-12

    if kind == "min_quality":  # feasible for small lambda: find the largest feasible
        if not feasible(0.0):
            return 0.0
        if feasible(10**hi_end):
            return float(10**hi_end)
        good, bad = lo_end, hi_end
        if not feasible(10**good):
            return 0.0
    else:  # feasible for large lambda: find the smallest feasible
        if feasible(0.0):
            return 0.0
        if not feasible(10**hi_end):
            return float(10**hi_end)
        good, bad = hi_end, lo_end
        if feasible(10**bad):
            return float(10**bad)
    for _ in range(steps):
        mid = (good + bad) / 2
        good, bad = (mid, bad) if feasible(10**mid) else (good, mid)
    return float(10**good)


class BudgetPacer:
    """Adjusts lambda online so that spend tracks a USD-per-hour budget.

    Spend is measured over a sliding window; when the rate runs above budget lambda grows
    (multiplicatively, so it works at any scale), when below it shrinks, within [lam_min, lam_max].
    """

    def __init__(self, usd_per_hour: float, lam: float = 0.1, *, window_s: float = 300.0, gain: float = 0.5,
                 lam_min: float = 0.0, lam_max: float = 1e3, clock: Callable[[], float] = time.monotonic) -> None:
        if usd_per_hour <= 0:
            raise ValueError("usd_per_hour must be positive")
        self.budget, self.lam, self.window, self.gain = usd_per_hour, lam, window_s, gain
        self.lam_min, self.lam_max, self.clock = lam_min, lam_max, clock
        self._spend: deque[tuple[float, float]] = deque()
        self._started = clock()
        self._last = self._started

    def rate(self) -> float:
        """Observed spend in USD per hour over the window (over the time so far while it is shorter)."""
        now = self.clock()
        while self._spend and self._spend[0][0] < now - self.window:
            self._spend.popleft()
        span = max(min(self.window, now - self._started), 1.0)
        return sum(c for _, c in self._spend) / span * 3600.0

    def record(self, cost_usd: float) -> float:
        """Account one request's cost and update lambda; returns the new lambda."""
        now = self.clock()
        self._spend.append((now, cost_usd))
        ratio = self.rate() / self.budget
        step = min((now - self._last) / self.window, 1.0) * 10  # a full correction over ~window/10
        self._last = now
        self.lam = max(self.lam, 1e-4) * math.exp(self.gain * step * math.log(max(ratio, 1e-3)))
        self.lam = min(max(self.lam, self.lam_min), self.lam_max)
        return self.lam
