"""The routing interface every policy implements, and the values that cross it.

A policy sees one `RoutingRequest` per chat request (the prompt text, and later its embedding) and
answers with a `RoutingDecision` that names the chosen candidate and carries every candidate's
predicted quality and cost, so that each decision can be logged, exported and explained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    """What a policy may look at to choose a candidate.

    `candidates` are the names the policy may choose among (worker or model names, in the policy's
    own order). `embedding` is the L2-normalised prompt embedding when the gateway computed one.
    `queue` is the live load per candidate (requests waiting at its least loaded worker), for policies
    with a queueing penalty; empty when unknown.
    """

    request_id: str
    text: str
    candidates: tuple[str, ...]
    embedding: npt.NDArray[np.float32] | None = None
    max_cost_usd: float | None = None
    min_quality: float | None = None
    queue: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CandidateScore:
    """One candidate's predicted quality (0..1, None if unknown), predicted cost (USD, None if
    unknown) and the policy's combined score (higher is better)."""

    name: str
    score: float
    predicted_quality: float | None = None
    predicted_cost_usd: float | None = None


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    """The chosen candidate, every candidate's scores ranked best first, and a one-line reason."""

    chosen: str
    ranking: tuple[CandidateScore, ...]
    reason: str
    policy: str
    version: str = "static"

    def fallbacks(self) -> list[str]:
        """Candidates after the chosen one, in the policy's own order of preference."""
        return [c.name for c in self.ranking if c.name != self.chosen]


@dataclass(frozen=True, slots=True)
class RoutingOutcome:
    """What happened to a routed request, fed back to learning policies through `observe`."""

    request_id: str
    chosen: str
    ok: bool
    cost_usd: float | None = None
    latency_s: float | None = None
    quality: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Router(Protocol):
    """A routing policy. Implementations get their state, embedder and clock passed in; they never
    read the environment, do I/O at import time or know about HTTP."""

    name: str
    #: Whether `route` needs `RoutingRequest.embedding` (the gateway embeds the prompt only if so).
    needs_embedding: bool

    def route(self, req: RoutingRequest) -> RoutingDecision:
        """Choose one of `req.candidates`."""
        ...

    def observe(self, outcome: RoutingOutcome) -> None:
        """Learn from an outcome (a no-op for policies that do not learn)."""
        ...

    def targets(self) -> Sequence[str]:
        """Every candidate name this policy may choose, for config cross-checks."""
        ...
