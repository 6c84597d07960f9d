"""The record of one request and where it goes when the request ends: metrics and one JSON log line."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from routers.base import RoutingDecision
from server.config import Price
from server.metrics import Metrics
from server.status import StatusBook

request_log = logging.getLogger("turnout.requests")
log = logging.getLogger("turnout.accounting")


def header_text(text: str, limit: int = 200) -> str:
    """`text` made safe for an HTTP header value: ASCII, one line, at most `limit` characters."""
    flat = " ".join(text.split()).encode("ascii", "replace").decode("ascii")
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


@dataclass(slots=True)
class Exchange:
    """Everything the gateway learns about one request while serving it."""

    request_id: str
    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    policy: str | None = None
    model: str | None = None
    worker: str | None = None
    reason: str | None = None
    stream: bool = False
    upstream_s: float = 0.0
    stream_overhead_s: float | None = None  # set when a stream's headers go out
    relay_s: float = 0.0  # the gateway's own work on a stream's chunks
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    status: str = "ok"
    http_status: int = 200
    error: str | None = None
    finished: bool = False
    decision: RoutingDecision | None = None
    shadow: RoutingDecision | None = None
    routing_s: float | None = None
    embed_s: float | None = None
    score_s: float | None = None
    embed_cached: bool | None = None
    affinity: bool = False
    key: str | None = None  # the client key's name (never the key)
    # Models that failed before their first byte, in order, before the one that answered (fallbacks).
    fallback_from: list[str] = field(default_factory=list)
    retries: int = 0  # re-sends to the same model after a failure before the first byte
    # The current worker's failure is already in `turnout_upstream_errors` (counted where it happened, before
    # a retry or fallback), so the end of the request must not count it again.
    failure_counted: bool = False
    # Savings are counted against this price (the live config's reference model when the request started).
    reference_price: Price | None = None
    reference_cost_usd: float | None = None
    # Only when the operator turned on `server.log_prompts`: the request's messages (or prompt) and the answer.
    prompt_log: Any = None
    completion_parts: list[str] | None = None
    # Run once when the request ends (after metrics): tell the policy the outcome, and so on.
    on_finish: list[Callable[[Exchange], None]] = field(default_factory=list)

    def overhead_s(self, now: float | None = None) -> float:
        """Time spent in the gateway, excluding time waiting on the worker. For a stream: the time before
        its headers went out plus the work on each relayed chunk (never the time spent streaming)."""
        if self.stream_overhead_s is not None:
            return self.stream_overhead_s + self.relay_s
        return max(0.0, (now if now is not None else time.perf_counter()) - self.started - self.upstream_s)

    def freeze_stream_overhead(self) -> None:
        """Fix the pre-stream overhead at the moment the stream's headers are sent."""
        self.stream_overhead_s = self.overhead_s()

    def headers(self) -> dict[str, str]:
        """The `x-turnout-*` response headers known so far: where the request went and, when a policy
        chose, a summary of its decision (the full one is `POST /v1/route`)."""
        out = {
            "x-turnout-request-id": self.request_id,
            "x-turnout-model": self.worker or "",
            "x-turnout-policy": self.policy or "",
            "x-turnout-overhead-ms": f"{self.overhead_s() * 1000:.3f}",
        }
        d = self.decision
        if d is not None:
            out["x-turnout-artifact"] = d.version
            out["x-turnout-reason"] = header_text(d.reason)
            chosen = next((c for c in d.ranking if c.name == d.chosen), None)
            if chosen is not None and chosen.predicted_quality is not None:
                out["x-turnout-predicted-quality"] = f"{chosen.predicted_quality:.4f}"
            if chosen is not None and chosen.predicted_cost_usd is not None:
                out["x-turnout-predicted-cost-usd"] = f"{chosen.predicted_cost_usd:.6g}"
            if self.routing_s is not None:
                out["x-turnout-routing-ms"] = f"{self.routing_s * 1000:.3f}"
            if self.affinity:
                out["x-turnout-affinity"] = "1"
        if self.shadow is not None:
            out["x-turnout-shadow-model"] = self.shadow.chosen
        if self.fallback_from:
            out["x-turnout-fallback-from"] = ",".join(self.fallback_from)
        if self.retries:
            out["x-turnout-retries"] = str(self.retries)
        return out

    def set_usage(self, usage: Any, price: Price | None) -> None:
        """Take token counts from an OpenAI `usage` object and price them."""
        if not isinstance(usage, dict):
            return
        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(pt, int) and isinstance(ct, int):
            self.prompt_tokens, self.completion_tokens = pt, ct
            if price is not None:
                self.cost_usd = price.cost_usd(pt, ct)
            if self.reference_price is not None:
                self.reference_cost_usd = self.reference_price.cost_usd(pt, ct)


class Recorder:
    """Turns a finished `Exchange` into metrics and a log line, exactly once per request."""

    def __init__(self, metrics: Metrics, status: StatusBook) -> None:
        self.metrics = metrics
        self.status = status

    def finish(self, ex: Exchange) -> None:
        """Record `ex`; later calls for the same exchange are ignored."""
        if ex.finished:
            return
        ex.finished = True
        now = time.perf_counter()
        if self.metrics.enabled:
            self._observe(ex, now)
        self.status.add(ex, now - ex.started)
        for callback in ex.on_finish:
            try:
                callback(ex)
            except Exception:  # a policy's bookkeeping must never break request accounting
                log.exception("on_finish callback failed for request %s", ex.request_id)
        if request_log.isEnabledFor(logging.INFO):
            request_log.info(orjson.dumps({
                "request_id": ex.request_id, "endpoint": ex.endpoint, "key": ex.key, "policy": ex.policy,
                "model": ex.model, "worker": ex.worker, "reason": ex.reason, "stream": ex.stream,
                "status": ex.status, "http_status": ex.http_status, "error": ex.error,
                "prompt_tokens": ex.prompt_tokens, "completion_tokens": ex.completion_tokens,
                "cost_usd": ex.cost_usd, "latency_ms": round((now - ex.started) * 1000, 3),
                "ttft_ms": None if ex.ttft_s is None else round(ex.ttft_s * 1000, 3),
                "overhead_ms": round(ex.overhead_s(now) * 1000, 3),
                "reference_cost_usd": ex.reference_cost_usd,
                "fallback_from": ex.fallback_from or None,
                "retries": ex.retries or None,
                **_decision_log(ex),
                **_text_log(ex),
            }).decode())

    def _observe(self, ex: Exchange, now: float) -> None:
        m = self.metrics
        model = ex.model or ""
        policy = ex.policy or ""
        m.requests.labels(policy, model, ex.worker or "", ex.status).inc()
        if ex.model:
            m.latency.labels(model).observe(now - ex.started)
            if ex.ttft_s is not None:
                m.ttft.labels(model).observe(ex.ttft_s)
            if ex.prompt_tokens is not None and ex.completion_tokens is not None:
                m.prompt_tokens.labels(model).inc(ex.prompt_tokens)
                m.completion_tokens.labels(model).inc(ex.completion_tokens)
            if ex.cost_usd is not None:
                m.cost.labels(model, policy).inc(ex.cost_usd)
                if ex.reference_cost_usd is not None:
                    m.reference_cost.labels(model, policy).inc(ex.reference_cost_usd)
                    m.savings.labels(policy).inc(ex.reference_cost_usd - ex.cost_usd)
        m.overhead.observe(ex.overhead_s(now))
        # A client that went away says nothing about the worker (its breaker hears "neutral" too).
        if ex.status not in ("ok", "client_error", "client_disconnect") and ex.worker and not ex.failure_counted:
            m.upstream_errors.labels(ex.worker, ex.status).inc()
        if ex.decision is not None:
            m.decisions.labels(policy, ex.decision.chosen, "affinity" if ex.affinity else "policy").inc()
            if ex.routing_s is not None:
                m.routing.labels(policy).observe(ex.routing_s)
            if ex.embed_s is not None:
                m.embedding.labels("hit" if ex.embed_cached else "miss").observe(ex.embed_s)
            if ex.score_s is not None:
                m.scoring.labels(policy).observe(ex.score_s)
        if ex.shadow is not None and ex.decision is not None:
            m.shadow_decisions.labels(policy, ex.shadow.policy, ex.decision.chosen, ex.shadow.chosen).inc()
            if ex.shadow.chosen != ex.decision.chosen:
                m.shadow_disagreements.labels(policy, ex.shadow.policy).inc()


def _text_log(ex: Exchange) -> dict[str, Any]:
    """The prompt and the answer, only where the operator asked for them (`server.log_prompts`)."""
    if ex.completion_parts is None:
        return {}
    return {"prompt": ex.prompt_log, "completion": "".join(ex.completion_parts)}


def _decision_log(ex: Exchange) -> dict[str, Any]:
    """The decision's part of the request log line: the ranking, and the shadow's choice next to it."""
    if ex.decision is None:
        return {}
    d = ex.decision
    out: dict[str, Any] = {
        "artifact": d.version, "routing_ms": None if ex.routing_s is None else round(ex.routing_s * 1000, 3),
        "embed_ms": None if ex.embed_s is None else round(ex.embed_s * 1000, 3),
        "score_ms": None if ex.score_s is None else round(ex.score_s * 1000, 3),
        "embed_cached": ex.embed_cached, "affinity": ex.affinity,
        "candidates": [{"name": c.name, "score": round(c.score, 6), "quality": c.predicted_quality,
                        "cost_usd": c.predicted_cost_usd} for c in d.ranking],
    }
    if ex.shadow is not None:
        s = ex.shadow
        pick = next((c for c in s.ranking if c.name == s.chosen), None)
        out["shadow"] = {"policy": s.policy, "model": s.chosen, "artifact": s.version,
                         "quality": pick.predicted_quality if pick else None,
                         "cost_usd": pick.predicted_cost_usd if pick else None}
    return out
