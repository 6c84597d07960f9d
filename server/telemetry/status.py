"""The built-in status page's numbers: totals since start and recent latencies, kept in this process.

`GET /ui` is a static page (no build step, no CDN) that polls `GET /ui/status.json`, for a single machine
without Prometheus and Grafana. Latency percentiles are exact over each model's most recent requests (a
bounded window), not estimated from histogram buckets.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.outcome import Outcome
from server.telemetry.readings import LiveReading
from server.telemetry.record import Exchange

#: Requests per model whose latencies the percentiles are computed over.
RECENT = 1000


@dataclass(slots=True)
class ModelTotals:
    """One model's totals since the gateway started, and its recent latencies."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    reference_cost_usd: float = 0.0
    latency_s: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    ttft_s: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))


class StatusBook:
    """Counts every finished request (called by the recorder, on the event loop)."""

    def __init__(self) -> None:
        self.started = time.time()
        self.models: dict[str, ModelTotals] = {}
        self.mix: Counter[tuple[str, str]] = Counter()  # (policy, model) -> decisions
        self.requests = 0

    def add(self, ex: Exchange, latency_s: float) -> None:
        """Count one finished request."""
        self.requests += 1
        if ex.decision is not None and ex.policy:
            self.mix[(ex.policy, ex.decision.chosen)] += 1
        if not ex.model:
            return
        t = self.models.setdefault(ex.model, ModelTotals())
        t.requests += 1
        if ex.status.is_error:
            t.errors += 1
        if ex.prompt_tokens is not None and ex.completion_tokens is not None:
            t.prompt_tokens += ex.prompt_tokens
            t.completion_tokens += ex.completion_tokens
        if ex.cost_usd is not None:
            t.cost_usd += ex.cost_usd
            t.reference_cost_usd += ex.reference_cost_usd or 0.0
        if ex.status is Outcome.OK:
            t.latency_s.append(latency_s)
            if ex.ttft_s is not None:
                t.ttft_s.append(ex.ttft_s)

    def snapshot(self, live: LiveReading) -> dict[str, Any]:
        """What the status page shows, as JSON-ready data."""
        ref_model = live.reference_model
        cost = sum(t.cost_usd for t in self.models.values())
        ref = sum(t.reference_cost_usd for t in self.models.values())
        policies: dict[str, dict[str, int]] = {}
        for (policy, model), n in sorted(self.mix.items()):
            policies.setdefault(policy, {})[model] = n
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "config_generation": live.generation,
            "requests": self.requests,
            "reference_model": ref_model,
            "cost_usd": cost,
            "reference_cost_usd": ref,
            "savings_usd": ref - cost,
            "savings_share": (ref - cost) / ref if ref > 0 else None,
            "routing_mix": policies,
            "models": {name: _model_json(t) for name, t in sorted(self.models.items())},
            "workers": [
                {"name": w.name, "model": w.model, "up": w.up, "health": w.health,
                 "in_flight": w.in_flight, "running": w.running, "waiting": w.waiting,
                 "kv_cache_usage": w.kv_cache_usage, "error": w.error}
                for w in live.workers
            ],
        }


def _percentiles_ms(values: deque[float]) -> dict[str, float] | None:
    if not values:
        return None
    p50, p90, p99 = np.percentile(np.fromiter(values, dtype=np.float64), [50, 90, 99])
    return {"p50": round(p50 * 1000, 1), "p90": round(p90 * 1000, 1), "p99": round(p99 * 1000, 1), "n": len(values)}


def _model_json(t: ModelTotals) -> dict[str, Any]:
    return {
        "requests": t.requests, "errors": t.errors, "prompt_tokens": t.prompt_tokens,
        "completion_tokens": t.completion_tokens, "cost_usd": t.cost_usd, "reference_cost_usd": t.reference_cost_usd,
        "latency_ms": _percentiles_ms(t.latency_s), "ttft_ms": _percentiles_ms(t.ttft_s),
    }
