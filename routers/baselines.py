"""Baseline policies that need no training: `fixed` and `weighted`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from routers.base import CandidateScore, RoutingDecision, RoutingOutcome, RoutingRequest


class FixedRouter:
    """Always chooses one target; the reference point every learned policy is compared with."""

    needs_embedding = False

    def __init__(self, name: str, target: str) -> None:
        self.name = name
        self.target = target

    def targets(self) -> Sequence[str]:
        """The single target."""
        return [self.target]

    def route(self, req: RoutingRequest) -> RoutingDecision:
        """Choose the fixed target."""
        return RoutingDecision(
            chosen=self.target,
            ranking=(CandidateScore(name=self.target, score=1.0),),
            reason=f"fixed policy: always {self.target}",
            policy=self.name,
        )

    def observe(self, outcome: RoutingOutcome) -> None:
        """Fixed routing does not learn."""


class WeightedRouter:
    """Chooses at random in proportion to configured weights (a canary or A/B split)."""

    needs_embedding = False

    def __init__(self, name: str, weights: dict[str, float], rng: np.random.Generator) -> None:
        total = sum(weights.values())
        if total <= 0:
            raise ValueError("weights must not all be zero")
        self.name = name
        self._names = list(weights)
        self._probs = np.array([weights[n] / total for n in self._names], dtype=np.float64)
        self._rng = rng

    def targets(self) -> Sequence[str]:
        """Every target with a weight."""
        return list(self._names)

    def route(self, req: RoutingRequest) -> RoutingDecision:
        """Draw one target by weight among the request's candidates (all targets when it names none of
        them, e.g. every one is down); the ranking lists the rest by weight for fallback."""
        live = np.array([n in req.candidates for n in self._names])
        if not live.any() or self._probs[live].sum() <= 0:
            live[:] = True
        probs = np.where(live, self._probs, 0.0)
        probs = probs / probs.sum()
        idx = int(self._rng.choice(len(self._names), p=probs))
        chosen = self._names[idx]
        ranking = sorted(
            (CandidateScore(name=n, score=float(p)) for n, p in zip(self._names, probs, strict=True)),
            key=lambda c: (c.name != chosen, -c.score),
        )
        return RoutingDecision(
            chosen=chosen,
            ranking=tuple(ranking),
            reason=f"weighted draw: {chosen} (p={probs[idx]:.2f})",
            policy=self.name,
        )

    def observe(self, outcome: RoutingOutcome) -> None:
        """Weighted routing does not learn."""
