"""Routed requests awaiting feedback: `POST /v1/feedback {request_id, score}` finds the policy that routed
the request (the instance that decided, even if a reload has replaced it since) and feeds it the score."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from routers.base import Router, RoutingOutcome


@dataclass(slots=True)
class _Routed:
    router: Router
    chosen: str
    at: float
    cost_usd: float | None = None
    scored: bool = False


class FeedbackBook:
    """The last `max_requests` routed requests, each open for feedback for `ttl_s`."""

    def __init__(self, ttl_s: float, max_requests: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.max_requests, self._clock = ttl_s, max_requests, clock
        self._entries: OrderedDict[str, _Routed] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, request_id: str, router: Router, chosen: str) -> None:
        """Remember a routed request."""
        self._entries[request_id] = _Routed(router, chosen, self._clock())
        self._entries.move_to_end(request_id)
        while len(self._entries) > self.max_requests:
            self._entries.popitem(last=False)

    def set_cost(self, request_id: str, cost_usd: float | None) -> None:
        """Note what the request cost (the bandit's reward uses it)."""
        entry = self._entries.get(request_id)
        if entry is not None:
            entry.cost_usd = cost_usd

    def give(self, request_id: str, score: float) -> tuple[str, str | None]:
        """Feed `score` to the policy that routed `request_id`. Returns ("accepted", policy),
        ("duplicate", policy) for a second score of one request (ignored), or ("unknown", None) for an id
        never routed here or routed more than `ttl_s` ago."""
        entry = self._entries.get(request_id)
        if entry is None or self._clock() - entry.at > self.ttl_s:
            self._entries.pop(request_id, None)
            return "unknown", None
        if entry.scored:
            return "duplicate", entry.router.name
        entry.scored = True
        entry.router.observe(RoutingOutcome(request_id=request_id, chosen=entry.chosen, ok=True,
                                            cost_usd=entry.cost_usd, quality=score))
        return "accepted", entry.router.name
